/* tadrop's CPU kernels: a merge slice's per-entry work in one pass over its inputs.
 *
 * On a CPU, eager PyTorch runs one operation at a time over the whole slice (convert,
 * subtract, compare, multiply, ...), each reading and writing every entry again. These
 * loops do all of an entry's work while it is in a register. Each function mirrors torch
 * code in tadrop_cli, named in its comment, and gives the same bits: every float operation
 * below is one IEEE single-precision operation in the same order as there, and the file is
 * compiled with -ffp-contract=off so that no multiply-add is fused. tests/test_kernels.py
 * compares the two on every path.
 *
 * The inputs are the stored entries of one tensor slice, all of one dtype (float32, float16
 * or bfloat16), converted to float32 as they are read. tadrop_cli/kernels.py loads this
 * library with ctypes and owns every buffer; the functions here never allocate what they
 * return. The parallel loops use OpenMP; torch's libgomp (same soname) is already loaded,
 * so both share one pool of threads.
 */
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

enum dtype { F32 = 0, F16 = 1, BF16 = 2 };

/* The exported functions are compiled twice on x86-64: for AVX2 (8 floats per instruction) and
 * for the baseline (SSE2, 4); the loader picks the one this CPU runs. (TADROP_BASELINE_ONLY
 * builds the baseline alone: tests/test_kernels.py checks that it gives the same bits.) */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(TADROP_BASELINE_ONLY)
#define EXPORT __attribute__((target_clones("avx2", "default")))
#else
#define EXPORT
#endif

/* Entry i of a stored array, as float32. `dtype` is a constant wherever this is inlined, so
 * the switch disappears from the loops. */
static inline __attribute__((always_inline)) float load(const void *data, int dtype, int64_t i) {
    if (dtype == BF16) {
        uint32_t bits = (uint32_t)((const uint16_t *)data)[i] << 16; /* bfloat16 is float32's top half */
        float value;
        memcpy(&value, &bits, 4);
        return value;
    }
    if (dtype == F16) return (float)((const _Float16 *)data)[i];
    return ((const float *)data)[i];
}

static inline uint32_t bits_of(float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    return bits;
}

#define MAGNITUDE_BUCKETS 32768 /* values of the top 16 bits of |x| (sign bit 0): sparsify.MAGNITUDE_BUCKETS */
#define BUCKET_VALUES 65536     /* values of the low 16 bits */

/* ------------------------------------------------------------------ the top-k cut's sweeps */

#ifndef _OPENMP
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_max_threads(void) { return 1; }
#endif

/* The number of threads the parallel loops of later calls from this thread use (kernels.py
 * sets it before each call, from the cores that other work leaves idle: cpu_share.py). */
void tadrop_set_threads(int threads) {
#ifdef _OPENMP
    if (threads > 0) omp_set_num_threads(threads);
#else
    (void)threads;
#endif
}

int tadrop_max_threads(void) { return omp_get_max_threads(); }

/* A call on fewer entries than this (all models' together) runs on one thread: waking the other
 * threads and waiting for them at the loop's end costs more than such a call's work, and on a
 * busy machine, where a sleeping thread waits for a core, milliseconds (a checkpoint of 20,000
 * tiny tensors merged 5-10x slower). The results do not depend on the thread count. */
#define PARALLEL_MIN (1 << 16)

/* Each thread's counting table (two halves of BUCKET_VALUES), kept from call to call (OpenMP
 * keeps its threads) and all zero between calls: a call clears only the range it used, so a
 * slice costs the entries it counts, not the table's size (zeroing and summing whole tables
 * took longer than counting a 1M-entry slice). Freed when the process ends. */
static __thread uint32_t *thread_table;

static uint32_t *table_of_this_thread(void) {
    if (!thread_table) thread_table = calloc(2 * BUCKET_VALUES, sizeof(uint32_t));
    return thread_table;
}

/* A histogram of the task vector tuned - base, added to `hist`: with bucket < 0, of the top 16
 * bits of |delta| (sparsify.magnitude_histogram; NaN and Inf land in buckets >= 0x7F80); else
 * of the low 16 bits of the entries whose top 16 bits are `bucket` (sparsify.bucket_histogram).
 *
 * Each thread counts into its own table, in two halves that take alternate entries (a slice
 * often holds long runs of one value, and two tables halve the wait of each count on the one
 * before it); then the threads sum the tables into `hist`, each a share of the values, and clear
 * what they used (for a bucket histogram, only the range of values counted: most of its
 * 65536 values are never seen).
 * Returns -1 when out of memory, else 0. */
static inline __attribute__((always_inline)) int histogram_of(int dtype, const void *base, const void *tuned, int64_t n, int64_t bucket, int64_t *hist) {
    const int size = bucket < 0 ? MAGNITUDE_BUCKETS : BUCKET_VALUES;
    const int max_threads = omp_get_max_threads();
    uint32_t **tables = calloc(max_threads, sizeof(uint32_t *));
    int *lowest = malloc(max_threads * sizeof(int)), *highest = malloc(max_threads * sizeof(int));
    if (!tables || !lowest || !highest) {
        free(tables), free(lowest), free(highest);
        return -1;
    }
#pragma omp parallel if (n >= PARALLEL_MIN)
    {
        const int me = omp_get_thread_num();
        uint32_t *table = tables[me] = table_of_this_thread();
        uint32_t magnitudes[1024];
        int low = size, high = -1; /* the values this thread counted lie in [low, high] */
        int64_t blocks = (n + 1023) / 1024;
#pragma omp for schedule(static)
        for (int64_t block = 0; block < blocks; block++) {
            int64_t start = block * 1024;
            int length = n - start < 1024 ? (int)(n - start) : 1024;
            for (int i = 0; i < length; i++) magnitudes[i] = bits_of(load(tuned, dtype, start + i) - load(base, dtype, start + i)) & 0x7FFFFFFFu;
            if (table && bucket < 0) {
                for (int i = 0; i < length; i++) table[(i & 1) * size + (magnitudes[i] >> 16)]++;
                low = 0, high = size - 1; /* a task vector's magnitudes span most buckets: the whole table (256 KB) */
            } else if (table) {
                int in_bucket = 0;
                for (int i = 0; i < length; i++) in_bucket += (magnitudes[i] >> 16) == (uint32_t)bucket;
                if (in_bucket * 16 < length) {
                    /* few entries in the bucket (often ~1%): a well-predicted branch, and the
                     * others do not touch the table */
                    for (int i = 0; i < length && in_bucket > 0; i++) {
                        if ((magnitudes[i] >> 16) != (uint32_t)bucket) continue;
                        int value = (int)(magnitudes[i] & 0xFFFFu);
                        table[(i & 1) * size + value]++;
                        low = value < low ? value : low;
                        high = value > high ? value : high;
                    }
                } else {
                    /* many (bf16 deltas cluster in few buckets): every entry adds 0 or 1, with
                     * no branch to mispredict */
                    for (int i = 0; i < length; i++) {
                        uint32_t in = (magnitudes[i] >> 16) == (uint32_t)bucket;
                        int value = (int)(magnitudes[i] & 0xFFFFu);
                        table[(i & 1) * size + value] += in;
                        low = in && value < low ? value : low;
                        high = in && value > high ? value : high;
                    }
                }
            } else { /* no memory for a table: count straight into hist */
                for (int i = 0; i < length; i++) {
                    if (bucket >= 0 && (magnitudes[i] >> 16) != (uint32_t)bucket) continue;
#pragma omp atomic
                    hist[bucket < 0 ? magnitudes[i] >> 16 : magnitudes[i] & 0xFFFFu]++;
                }
            }
        }
        lowest[me] = low, highest[me] = high;
#pragma omp barrier
        int threads = omp_get_num_threads(), all_low = size, all_high = -1;
        for (int t = 0; t < threads; t++) {
            all_low = lowest[t] < all_low ? lowest[t] : all_low;
            all_high = highest[t] > all_high ? highest[t] : all_high;
        }
#pragma omp for schedule(static)
        for (int v = all_low; v <= all_high; v++) {
            int64_t total = 0;
            for (int t = 0; t < threads; t++) {
                if (tables[t]) total += (int64_t)tables[t][v] + tables[t][size + v];
            }
            hist[v] += total;
        }
        /* the loop's end waits for every thread: no table is read any more */
        if (table && high >= low) {
            memset(table + low, 0, (size_t)(high - low + 1) * sizeof(uint32_t));
            memset(table + size + low, 0, (size_t)(high - low + 1) * sizeof(uint32_t));
        }
    }
    free(tables), free(lowest), free(highest);
    return 0;
}

EXPORT int tadrop_magnitude_histogram(int dtype, const void *base, const void *tuned, int64_t n, int64_t *hist) {
    switch (dtype) {
        case BF16: return histogram_of(BF16, base, tuned, n, -1, hist);
        case F16: return histogram_of(F16, base, tuned, n, -1, hist);
        default: return histogram_of(F32, base, tuned, n, -1, hist);
    }
}

EXPORT int tadrop_bucket_histogram(int dtype, const void *base, const void *tuned, int64_t n, uint32_t bucket, int64_t *hist) {
    switch (dtype) {
        case BF16: return histogram_of(BF16, base, tuned, n, bucket, hist);
        case F16: return histogram_of(F16, base, tuned, n, bucket, hist);
        default: return histogram_of(F32, base, tuned, n, bucket, hist);
    }
}

/* The index of the `count`-th entry (1-based) whose |tuned - base| equals `threshold`, or n if
 * there are fewer: where a top-k cut's kept ties end inside one slice (sparsify.cut_mask).
 * Ties are counted a block at a time (a loop the compiler vectorizes); only the block that
 * holds the answer is walked entry by entry. */
static inline __attribute__((always_inline)) int64_t nth_tie_of(int dtype, const void *base, const void *tuned, int64_t n, float threshold, int64_t count) {
    for (int64_t start = 0; start < n; start += 1024) {
        int length = n - start < 1024 ? (int)(n - start) : 1024;
        int ties = 0;
        for (int i = 0; i < length; i++) ties += fabsf(load(tuned, dtype, start + i) - load(base, dtype, start + i)) == threshold;
        if (ties < count) {
            count -= ties;
            continue;
        }
        for (int i = 0; i < length; i++) {
            if (fabsf(load(tuned, dtype, start + i) - load(base, dtype, start + i)) == threshold && --count == 0) return start + i;
        }
    }
    return n;
}

EXPORT int64_t tadrop_nth_tie(int dtype, const void *base, const void *tuned, int64_t n, float threshold, int64_t count) {
    switch (dtype) {
        case BF16: return nth_tie_of(BF16, base, tuned, n, threshold, count);
        case F16: return nth_tie_of(F16, base, tuned, n, threshold, count);
        default: return nth_tie_of(F32, base, tuned, n, threshold, count);
    }
}

/* ------------------------------------------------------------------ TADrop's scores */

#define SUM_BLOCK 4096 /* entries summed per block; blocks are summed in order at the end */
#define LANES 16       /* accumulators per block: entry i goes to lane i % LANES */

/* The sums behind TADrop's Hoyer score of a slice's task vector, for each of n_models models
 * (tadrop.HoyerSums): sums[2j] += sum |delta_j|, sums[2j + 1] += sum delta_j^2, in float64. A
 * float32 entry and its square are exact in a double (no underflow, no overflow), so the sums
 * are within ~1e-16 x log(n) of exact: PyTorch's float64 sums of other slices in another order
 * (a GPU's) agree to that, and a plan, even min-max normalised, does not depend on the device.
 * Within a block each of LANES lanes sums every LANES-th entry; lanes, then blocks, are added
 * in order, so the result does not depend on the number of threads, the instruction set, or
 * which other models are summed alongside. The base's block is converted once for all models.
 * Returns 1 if an entry is NaN or Inf, -1 when out of memory, else 0. */
static inline __attribute__((always_inline)) int hoyer_sums_of(int dtype, const void *base, const void *const *tuned, int n_models, int64_t n, double *sums) {
    int64_t blocks = (n + SUM_BLOCK - 1) / SUM_BLOCK;
    double *partial = malloc(sizeof(double) * 2 * n_models * (blocks ? blocks : 1));
    if (!partial) return -1;
    uint32_t non_finite = 0;
#pragma omp parallel for schedule(static) reduction(| : non_finite) if (n * n_models >= PARALLEL_MIN)
    for (int64_t block = 0; block < blocks; block++) {
        int64_t start = block * SUM_BLOCK;
        int length = n - start < SUM_BLOCK ? (int)(n - start) : SUM_BLOCK;
        int padded = (length + LANES - 1) / LANES * LANES;
        float b[SUM_BLOCK], magnitude[SUM_BLOCK];
        for (int i = 0; i < length; i++) b[i] = load(base, dtype, start + i);
        for (int j = 0; j < n_models; j++) {
            double l1[LANES] = {0}, l2[LANES] = {0};
            for (int i = 0; i < length; i++) {
                uint32_t bits = bits_of(load(tuned[j], dtype, start + i) - b[i]) & 0x7FFFFFFFu;
                non_finite |= bits >= 0x7F800000u;
                memcpy(&magnitude[i], &bits, 4);
            }
            for (int i = length; i < padded; i++) magnitude[i] = 0.0f;
            /* two simple loops: the compiler vectorizes these better than one that does both */
            for (int i = 0; i < padded; i += LANES) {
                for (int k = 0; k < LANES; k++) l1[k] += (double)magnitude[i + k];
            }
            for (int i = 0; i < padded; i += LANES) {
                for (int k = 0; k < LANES; k++) l2[k] += (double)magnitude[i + k] * (double)magnitude[i + k];
            }
            double block_l1 = 0.0, block_l2 = 0.0;
            for (int k = 0; k < LANES; k++) {
                block_l1 += l1[k];
                block_l2 += l2[k];
            }
            partial[2 * (block * n_models + j)] = block_l1;
            partial[2 * (block * n_models + j) + 1] = block_l2;
        }
    }
    for (int j = 0; j < n_models; j++) {
        for (int64_t block = 0; block < blocks; block++) {
            sums[2 * j] += partial[2 * (block * n_models + j)];
            sums[2 * j + 1] += partial[2 * (block * n_models + j) + 1];
        }
    }
    free(partial);
    return non_finite != 0;
}

EXPORT int tadrop_hoyer_sums(int dtype, const void *base, const void *const *tuned, int n_models, int64_t n, double *sums) {
    switch (dtype) {
        case BF16: return hoyer_sums_of(BF16, base, tuned, n_models, n, sums);
        case F16: return hoyer_sums_of(F16, base, tuned, n_models, n, sums);
        default: return hoyer_sums_of(F32, base, tuned, n_models, n, sums);
    }
}

/* tadrop_hoyer_sums of each of n_tensors small tensors whole, in one call (plan._score_batch):
 * tensor t's base is bases[t], its models' entries tuned[t * n_models + j], its size numels[t];
 * its sums go to sums[2 * (t * n_models + j)] (zeroed by the caller) and status[t] is what
 * tadrop_hoyer_sums returns for it. The same function per tensor: the same bits as alone.
 * Returns -1 when out of memory, else 0. */
EXPORT int tadrop_hoyer_sums_batch(int dtype, const void *const *bases, const void *const *tuned, const int64_t *numels, int n_tensors, int n_models, double *sums, int32_t *status) {
    for (int t = 0; t < n_tensors; t++) {
        status[t] = tadrop_hoyer_sums(dtype, bases[t], tuned + (int64_t)t * n_models, n_models, numels[t], sums + 2 * (int64_t)t * n_models);
        if (status[t] < 0) return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ the merge of a slice */

enum drop { KEEP_ALL = 0, MAGNITUDE_CUT = 1, RANDOM_DROP = 2 };

/* One model's settings for this slice (see kernels.ModelSlice). */
struct model_slice {
    const void *tuned;   /* its stored entries of the slice */
    float weight;
    int32_t drop;        /* enum drop */
    float threshold;     /* MAGNITUDE_CUT: keep |delta| > threshold, ... */
    int64_t ties_before; /* ... and |delta| == threshold at slice positions before this */
    uint64_t seed;       /* RANDOM_DROP: the (model, tensor) stream's seed, ... */
    uint32_t limit;      /* ... keep where the word's top 24 bits are below this */
    int32_t rescale;     /* divide the kept entries by `density` (DARE's rescale) */
    float density;
};

#define GOLDEN 0x9E3779B97F4A7C15ull

/* SplitMix64 output `index` of `seed` (sparsify._splitmix64). Word 2j of a random stream is
 * output j's low half, word 2j + 1 its high half (sparsify.random_words). */
static inline uint64_t splitmix64(uint64_t seed, int64_t index) {
    uint64_t z = seed + ((uint64_t)index + 1) * GOLDEN;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

#define BLOCK 256 /* entries merged at a time: each model's block of task vector stays in L1 */

/* Model m's block of task vector, dropped and weighted, into `out` (sparsify.magnitude with
 * its cut_mask, or sparsify.random with its random_keep_mask; then the weight, as
 * generalized_task_arithmetic). `start`: the block's first entry in the slice, `offset`: the
 * slice's first entry in the tensor. Returns nonzero if an entry of the task vector is NaN or
 * Inf. `outputs`: room for BLOCK / 2 + 1 random outputs. */
static inline __attribute__((always_inline)) uint32_t task_vector_block(int dtype, const struct model_slice *m, const float *base, int64_t start, int count,
                                                                        int64_t offset, float *out, uint64_t *outputs) {
    uint32_t non_finite = 0;
    for (int i = 0; i < count; i++) {
        float delta = load(m->tuned, dtype, start + i) - base[i];
        non_finite |= (bits_of(delta) & 0x7F800000u) == 0x7F800000u;
        out[i] = delta;
    }
    if (m->drop == MAGNITUDE_CUT) {
        /* ties are kept at block positions below this */
        int ties = m->ties_before <= start ? 0 : m->ties_before - start >= count ? count : (int)(m->ties_before - start);
        float threshold = m->threshold;
        for (int i = 0; i < count; i++) {
            float magnitude = fabsf(out[i]);
            out[i] = out[i] * (float)((magnitude > threshold) | ((magnitude == threshold) & (i < ties)));
        }
    } else if (m->drop == RANDOM_DROP) {
        /* each SplitMix64 output makes two words: outputs first .. first + pairs - 1 cover the block */
        uint64_t seed = m->seed;
        uint32_t limit = m->limit;
        int64_t position = offset + start, first = position >> 1;
        int pairs = (int)(((position + count - 1) >> 1) - first + 1);
        for (int p = 0; p < pairs; p++) outputs[p] = splitmix64(seed, first + p);
        const uint32_t *words = (const uint32_t *)outputs + (position & 1); /* little-endian: low half first */
        for (int i = 0; i < count; i++) out[i] = out[i] * (float)((words[i] >> 8) < limit);
    }
    if (m->drop != KEEP_ALL && m->rescale) {
        for (int i = 0; i < count; i++) out[i] = out[i] / m->density;
    }
    if (m->weight != 1.0f) {
        for (int i = 0; i < count; i++) out[i] = out[i] * m->weight;
    }
    return non_finite;
}

/* The merged entries of a block, stored in the output's dtype as torch's .to() would (round to
 * nearest, ties to even); returns nonzero if one of them is NaN or Inf there (Inf: too large
 * for a bf16 or fp16 output). */
static inline uint32_t store_block(int out_dtype, void *out, int64_t start, const float *merged, int count) {
    uint32_t non_finite = 0;
    if (out_dtype == BF16) {
        uint16_t *target = (uint16_t *)out + start;
        for (int i = 0; i < count; i++) {
            uint32_t bits = bits_of(merged[i]);
            uint16_t rounded = (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16); /* c10::BFloat16's rounding */
            non_finite |= (rounded & 0x7F80u) == 0x7F80u; /* NaN rounds to a NaN or Inf: flagged either way */
            target[i] = rounded;
        }
    } else if (out_dtype == F16) {
        _Float16 *target = (_Float16 *)out + start;
        for (int i = 0; i < count; i++) {
            target[i] = (_Float16)merged[i];
            uint16_t bits;
            memcpy(&bits, &target[i], 2);
            non_finite |= (bits & 0x7C00u) == 0x7C00u;
        }
    } else {
        float *target = (float *)out + start;
        for (int i = 0; i < count; i++) {
            target[i] = merged[i];
            non_finite |= (bits_of(merged[i]) & 0x7F800000u) == 0x7F800000u;
        }
    }
    return non_finite;
}

/* methods.generalized_task_arithmetic of a slice: base + lambda * mix(drop(tau_j) * w_j),
 * where mix is the sum (consensus 0) or TIES's disjoint sum with the elected sign (consensus
 * 1), divided by the sum of the weights (normalize), stored in `out` as `out_dtype`. Returns 1
 * if any task-vector or merged entry is NaN or Inf (the caller then redoes the slice in
 * PyTorch, which names the input at fault or refuses the result), else 0. */
static inline __attribute__((always_inline)) int merge_slice_of(int dtype, const void *base, const struct model_slice *models, int n_models, int64_t n,
                                                                int64_t offset, int consensus, int normalize, float sum_of_weights, float lambda, int out_dtype, void *out) {
    uint32_t non_finite = 0;
#pragma omp parallel reduction(| : non_finite) if (n * n_models >= PARALLEL_MIN)
    {
        /* base, total (the elected sign), mixed, divisor, one block per model, then random outputs */
        float *work = malloc(sizeof(float) * BLOCK * (4 + n_models) + sizeof(uint64_t) * (BLOCK / 2 + 1));
        int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp for schedule(static)
        for (int64_t block = 0; block < blocks; block++) {
            if (!work) {
                non_finite = 1; /* out of memory: the caller's PyTorch path takes over */
                continue;
            }
            int64_t start = block * BLOCK;
            int count = n - start < BLOCK ? (int)(n - start) : BLOCK;
            float *b = work, *total = work + BLOCK, *mixed = work + 2 * BLOCK, *divisor = work + 3 * BLOCK, *weighted = work + 4 * BLOCK;
            for (int i = 0; i < count; i++) b[i] = load(base, dtype, start + i);
            for (int j = 0; j < n_models; j++) {
                float *w = weighted + j * BLOCK;
                non_finite |= task_vector_block(dtype, &models[j], b, start, count, offset, w, (uint64_t *)(weighted + n_models * BLOCK));
                if (j == 0) {
                    for (int i = 0; i < count; i++) total[i] = w[i];
                } else {
                    for (int i = 0; i < count; i++) total[i] = total[i] + w[i];
                }
            }
            if (consensus) {
                /* sparsify.sign_consensus and methods.disjoint_mean: the elected sign is +1 where
                 * the total is >= 0, else -1; each model adds the entries that agree with it */
                for (int i = 0; i < count; i++) {
                    total[i] = 2.0f * (float)(total[i] >= 0.0f) - 1.0f;
                    mixed[i] = 0.0f;
                    divisor[i] = 0.0f;
                }
                for (int j = 0; j < n_models; j++) {
                    const float *restrict w = weighted + j * BLOCK;
                    float *restrict sign = total, *restrict sum = mixed, *restrict agreeing = divisor;
                    float weight = models[j].weight;
                    for (int i = 0; i < count; i++) {
                        /* where this model disagrees (or is 0), relu in torch gives +0 and this
                         * gives -0 or +0: either adds nothing to a sum that starts at +0 */
                        float aligned = w[i] * sign[i];
                        float agrees = (float)(aligned > 0.0f);
                        sum[i] = sum[i] + aligned * agrees * sign[i];
                        agreeing[i] = agreeing[i] + agrees * weight;
                    }
                }
                if (normalize) {
                    for (int i = 0; i < count; i++) mixed[i] = mixed[i] / (divisor[i] + (float)(divisor[i] == 0.0f)); /* 0 -> 1 */
                }
            } else {
                for (int i = 0; i < count; i++) mixed[i] = normalize ? total[i] / sum_of_weights : total[i];
            }
            if (lambda != 1.0f) {
                for (int i = 0; i < count; i++) mixed[i] = mixed[i] * lambda;
            }
            for (int i = 0; i < count; i++) mixed[i] = mixed[i] + b[i];
            non_finite |= store_block(out_dtype, out, start, mixed, count);
        }
        free(work);
    }
    return non_finite != 0;
}

EXPORT int tadrop_merge_slice(int dtype, const void *base, const struct model_slice *models, int n_models, int64_t n, int64_t offset,
                       int consensus, int normalize, float sum_of_weights, float lambda, int out_dtype, void *out) {
    if (n_models < 1) return -1;
    switch (dtype) {
        case BF16: return merge_slice_of(BF16, base, models, n_models, n, offset, consensus, normalize, sum_of_weights, lambda, out_dtype, out);
        case F16: return merge_slice_of(F16, base, models, n_models, n, offset, consensus, normalize, sum_of_weights, lambda, out_dtype, out);
        default: return merge_slice_of(F32, base, models, n_models, n, offset, consensus, normalize, sum_of_weights, lambda, out_dtype, out);
    }
}

/* ------------------------------------------------------------------ many small tensors in one call */

/* One small tensor of a batch (see kernels.Segment): its base entries, its size, where its
 * merged entries go in the batch's output, and its own global parameters. */
struct segment {
    const void *base;    /* the base's stored entries of the tensor */
    int64_t n;           /* its entries (at most BATCH_SEGMENT_MAX) */
    int64_t out_start;   /* its first merged entry's position in `out` */
    float sum_of_weights;
    float lambda;
    int32_t normalize;
    int32_t non_finite;  /* out: 1 if an input's task-vector entry or a merged entry is NaN or Inf */
};

#define BATCH_SEGMENT_MAX (1 << 14) /* tensor_merge.SMALL_CUT: the largest tensor a batch takes */

/* The k-th largest (1 <= k <= n) of n magnitude keys, by four passes of 8-bit radix selection
 * (a table of 256 counts each): the value np.partition finds in sparsify.cut_of_keys, at a
 * cost that stays in proportion to a tiny tensor (the 2^15 and 2^16 histograms do not). */
static uint32_t kth_largest_key(const uint32_t *keys, int64_t n, int64_t k) {
    uint32_t prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        int64_t counts[256] = {0};
        for (int64_t i = 0; i < n; i++) counts[(keys[i] >> shift) & 255u] += (keys[i] & mask) == prefix;
        int digit = 255;
        while (counts[digit] < k) k -= counts[digit--];
        prefix |= (uint32_t)digit << shift;
        mask |= 255u << shift;
    }
    return prefix;
}

/* Model m's top-k cut of one whole small tensor, set in m (threshold, ties_before): the cut of
 * sparsify.cut_of_keys with kernels.ties_kept_before at offset 0. k <= 0 keeps nothing
 * (sparsify.KEEP_NOTHING). `keys`: room for n keys. Returns 1 if a task-vector entry is NaN or
 * Inf (nothing set: the caller's per-tensor path names the input). */
static inline __attribute__((always_inline)) int cut_of_tensor(int dtype, const void *base, struct model_slice *m, int64_t n, int64_t k, uint32_t *keys) {
    uint32_t non_finite = 0;
    for (int64_t i = 0; i < n; i++) {
        keys[i] = bits_of(load(m->tuned, dtype, i) - load(base, dtype, i)) & 0x7FFFFFFFu;
        non_finite |= keys[i] >= 0x7F800000u;
    }
    if (non_finite) return 1;
    if (k <= 0) {
        m->threshold = INFINITY;
        m->ties_before = 0;
        return 0;
    }
    uint32_t cut = kth_largest_key(keys, n, k);
    int64_t above = 0, tied = 0;
    for (int64_t i = 0; i < n; i++) {
        above += keys[i] > cut;
        tied += keys[i] == cut;
    }
    memcpy(&m->threshold, &cut, 4);
    int64_t quota = k - above; /* the first `quota` tied entries are kept */
    m->ties_before = INT64_MAX;
    if (quota < tied) {
        for (int64_t i = 0; i < n; i++) {
            if (keys[i] == cut && --quota == 0) {
                m->ties_before = i + 1;
                break;
            }
        }
    }
    return 0;
}

/* The merges of n_segments small tensors in one call: for each, methods.generalized_task_arithmetic
 * of the whole tensor as tadrop_merge_slice gives it (offset 0), into out[out_start ...). The
 * models' settings are models[s * n_models + j]; where kept[s * n_models + j] >= 0, model j's
 * magnitude cut of tensor s is found here first (cut_of_tensor: k = that count) and written into
 * its settings. Each tensor's own seeds, cuts and parameters: the result of a tensor does not
 * depend on the others in the call. A tensor with a NaN or Inf is flagged (non_finite) and the
 * others go on. Returns -1 for a bad model count or size, -2 when out of memory, else 0. */
static inline __attribute__((always_inline)) int merge_batch_of(int dtype, struct segment *segments, int n_segments, struct model_slice *models,
                                                                const int64_t *kept, int n_models, int consensus, int out_dtype, void *out) {
    uint32_t *keys = NULL;
    for (int s = 0; s < n_segments; s++) {
        struct segment *segment = &segments[s];
        struct model_slice *mine = models + (int64_t)s * n_models;
        segment->non_finite = 0;
        for (int j = 0; j < n_models && !segment->non_finite; j++) {
            if (kept[(int64_t)s * n_models + j] < 0) continue;
            if (!keys && !(keys = malloc(sizeof(uint32_t) * BATCH_SEGMENT_MAX))) return -2;
            segment->non_finite = cut_of_tensor(dtype, segment->base, &mine[j], segment->n, kept[(int64_t)s * n_models + j], keys);
        }
        if (segment->non_finite) continue;
        char *target = (char *)out + segment->out_start * (out_dtype == F32 ? 4 : 2);
        segment->non_finite = merge_slice_of(dtype, segment->base, mine, n_models, segment->n, 0, consensus, segment->normalize,
                                             segment->sum_of_weights, segment->lambda, out_dtype, target);
    }
    free(keys);
    return 0;
}

EXPORT int tadrop_merge_batch(int dtype, struct segment *segments, int n_segments, struct model_slice *models, const int64_t *kept,
                              int n_models, int consensus, int out_dtype, void *out) {
    if (n_models < 1) return -1;
    for (int s = 0; s < n_segments; s++) {
        if (segments[s].n < 0 || segments[s].n > BATCH_SEGMENT_MAX) return -1;
    }
    switch (dtype) {
        case BF16: return merge_batch_of(BF16, segments, n_segments, models, kept, n_models, consensus, out_dtype, out);
        case F16: return merge_batch_of(F16, segments, n_segments, models, kept, n_models, consensus, out_dtype, out);
        default: return merge_batch_of(F32, segments, n_segments, models, kept, n_models, consensus, out_dtype, out);
    }
}

/* Whether any of n stored entries is NaN or Inf (all exponent bits set): the read-back check of
 * a written shard. */
static inline __attribute__((always_inline)) int non_finite_of(const void *data, int64_t n, uint32_t exponent, int width) {
    int found = 0;
#pragma omp parallel for schedule(static) reduction(| : found) if (n >= PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        uint32_t bits = width == 2 ? ((const uint16_t *)data)[i] : ((const uint32_t *)data)[i];
        found |= (bits & exponent) == exponent;
    }
    return found;
}

EXPORT int tadrop_non_finite(int dtype, const void *data, int64_t n) {
    switch (dtype) {
        case BF16: return non_finite_of(data, n, 0x7F80u, 2);
        case F16: return non_finite_of(data, n, 0x7C00u, 2);
        default: return non_finite_of(data, n, 0x7F800000u, 4);
    }
}

/* An importable (empty) module, so that the package finds this library like any extension. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "tadrop's CPU kernels, called through ctypes (see kernels.py)", -1, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
