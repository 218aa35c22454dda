"""tadrop's CPU kernels (`_kernels.c`, compiled when tadrop is installed), called with ctypes.

On a CPU the generalized-task-arithmetic hosts (task arithmetic, magnitude_prune, TIES,
dare_linear, DARE-TIES) spend most of their time walking every entry again for each eager
PyTorch operation. These kernels do one pass per slice instead: they read the stored entries
(bf16, fp16 or fp32), form the task vectors in float32, and give the top-k cut's histograms or
the merged float32 slice. They give exactly the bits of the PyTorch code they stand in for
(named in each docstring); tests/test_kernels.py compares the two.

Entries in, entries out, no I/O: the inputs are `dtypes.Stored` (the stored entries, in numpy
arrays), and nothing here imports torch, so a merge that the kernels do whole never loads it.
Where the library was not built (no C compiler at install time), or with TADROP_KERNELS=torch
in the environment, `available()` is False and the engine runs the PyTorch code.
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .cpu_share import CpuShare
from .dtypes import Stored, numpy_dtype
from .sparsify import MAGNITUDE_BUCKETS, TopKCut

DTYPE_CODES = {"F32": 0, "F16": 1, "BF16": 2}
NON_FINITE_BUCKET = 0x7F80  # magnitude buckets from here on hold NaN and Inf (all exponent bits set)
MAX_MODELS = 1024
ALL = (1 << 63) - 1  # a position past every slice

DROP_NOTHING, DROP_BY_MAGNITUDE, DROP_AT_RANDOM = 0, 1, 2


class _ModelSlice(ctypes.Structure):
    _fields_ = [
        ("tuned", ctypes.c_void_p),
        ("weight", ctypes.c_float),
        ("drop", ctypes.c_int32),
        ("threshold", ctypes.c_float),
        ("ties_before", ctypes.c_int64),
        ("seed", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("rescale", ctypes.c_int32),
        ("density", ctypes.c_float),
    ]


class _Segment(ctypes.Structure):
    _fields_ = [
        ("base", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("out_start", ctypes.c_int64),
        ("sum_of_weights", ctypes.c_float),
        ("lambda_", ctypes.c_float),
        ("normalize", ctypes.c_int32),
        ("non_finite", ctypes.c_int32),
    ]


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("TADROP_KERNELS", "").lower() == "torch":
        return None
    try:
        from . import _kernels
    except ImportError:
        return None
    # Threads that wait at a loop's end sleep instead of spinning, so that on a busy machine
    # they give the core to a thread with work (read by OpenMP when it loads, below).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return load_library(_kernels.__file__)


@lru_cache(maxsize=1)
def _cpu_share() -> CpuShare | None:
    """What sets the kernels' thread count: None where it is fixed (OMP_NUM_THREADS set by the
    user, or one core), else the idle cores (cpu_share.py)."""
    limit = _library().tadrop_max_threads()
    return None if os.environ.get("OMP_NUM_THREADS") or limit <= 1 else CpuShare(limit)


def _ready() -> ctypes.CDLL:
    """The library, with the thread count for its next call set."""
    library, share = _library(), _cpu_share()
    if share is not None:
        library.tadrop_set_threads(share.threads())
    return library


def load_library(path: str) -> ctypes.CDLL:
    """The kernels' shared library at `path`, its functions' argument types declared."""
    library = ctypes.CDLL(path)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.tadrop_magnitude_histogram.argtypes = [ctypes.c_int, ptr, ptr, i64, ptr]
    library.tadrop_magnitude_histogram.restype = ctypes.c_int
    library.tadrop_bucket_histogram.argtypes = [ctypes.c_int, ptr, ptr, i64, ctypes.c_uint32, ptr]
    library.tadrop_bucket_histogram.restype = ctypes.c_int
    library.tadrop_nth_tie.argtypes = [ctypes.c_int, ptr, ptr, i64, ctypes.c_float, i64]
    library.tadrop_nth_tie.restype = i64
    library.tadrop_hoyer_sums.argtypes = [ctypes.c_int, ptr, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, i64, ptr]
    library.tadrop_hoyer_sums.restype = ctypes.c_int
    library.tadrop_hoyer_sums_batch.argtypes = [ctypes.c_int, ptr, ptr, ptr, ctypes.c_int, ctypes.c_int, ptr, ptr]
    library.tadrop_hoyer_sums_batch.restype = ctypes.c_int
    library.tadrop_non_finite.argtypes = [ctypes.c_int, ptr, i64]
    library.tadrop_non_finite.restype = ctypes.c_int
    library.tadrop_merge_slice.argtypes = [
        ctypes.c_int,
        ptr,
        ctypes.POINTER(_ModelSlice),
        ctypes.c_int,
        i64,
        i64,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_float,
        ctypes.c_float,
        ctypes.c_int,
        ptr,
    ]
    library.tadrop_merge_slice.restype = ctypes.c_int
    library.tadrop_merge_batch.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(_Segment),
        ctypes.c_int,
        ctypes.POINTER(_ModelSlice),
        ptr,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ptr,
    ]
    library.tadrop_merge_batch.restype = ctypes.c_int
    library.tadrop_set_threads.argtypes = [ctypes.c_int]
    library.tadrop_set_threads.restype = None
    library.tadrop_max_threads.argtypes = []
    library.tadrop_max_threads.restype = ctypes.c_int
    return library


def available() -> bool:
    """Whether the compiled kernels are there (and not turned off with TADROP_KERNELS=torch)."""
    return _library() is not None


def supports(dtypes: list[str], models: int) -> bool:
    """Whether the kernels take inputs of these stored dtypes (safetensors names): one dtype for
    all, F32/F16/BF16."""
    return available() and len(set(dtypes)) == 1 and dtypes[0] in DTYPE_CODES and 1 <= models <= MAX_MODELS


def _address(entries: Stored) -> int:
    array = entries.array
    if (
        entries.dtype not in DTYPE_CODES
        or array.dtype != numpy_dtype(entries.dtype)
        or array.ndim != 1
        or not array.flags.c_contiguous
    ):
        raise ValueError("the kernels take 1-D contiguous F32/F16/BF16 entries")
    return array.ctypes.data


def _pair(base: Stored, tuned: Stored) -> tuple[int, int, int]:
    """(dtype code, base's address, tuned's address), checked."""
    if base.dtype != tuned.dtype or base.numel != tuned.numel:
        raise ValueError("base and tuned differ in dtype or size")
    return DTYPE_CODES[base.dtype], _address(base), _address(tuned)


# The histogram kernels count in 32-bit tables per thread: they are called on at most this many entries at a time.
_COUNT_LIMIT = 1 << 31


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("out of memory in tadrop's CPU kernels")


def _histogram(base: Stored, tuned: Stored, size: int, count) -> np.ndarray:
    """An int64 histogram of `size` values, counted by `count(dtype code, base, tuned, n, counts)`
    over pieces small enough for its 32-bit tables."""
    code, base_address, tuned_address = _pair(base, tuned)
    counts = np.zeros(size, dtype=np.int64)
    for start in range(0, base.numel, _COUNT_LIMIT):
        offset = start * base.array.itemsize
        _check(
            count(
                code,
                base_address + offset,
                tuned_address + offset,
                min(_COUNT_LIMIT, base.numel - start),
                counts.ctypes.data,
            )
        )
    return counts


def magnitude_histogram(base: Stored, tuned: Stored) -> np.ndarray:
    """sparsify.magnitude_histogram(tuned.float() - base.float()): entries per |delta| bucket (int64)."""
    return _histogram(base, tuned, MAGNITUDE_BUCKETS, _ready().tadrop_magnitude_histogram)


def float32_entries(entries: Stored) -> np.ndarray:
    """Stored entries as float32 (exactly: bf16 is float32's top half, and fp16 converts exactly),
    as the kernels' loads give them."""
    if entries.dtype == "BF16":
        return (entries.array.astype(np.uint32) << 16).view(np.float32)
    return entries.array.astype(np.float32, copy=False)


def magnitude_keys(base: Stored, tuned: Stored) -> np.ndarray:
    """The bit patterns of |tuned.float() - base.float()| (uint32), which the magnitude histograms
    count: numpy, for slices too small to be worth a kernel call's fixed cost."""
    if base.dtype != tuned.dtype or base.numel != tuned.numel:
        raise ValueError("base and tuned differ in dtype or size")
    delta = np.subtract(float32_entries(tuned), float32_entries(base), dtype=np.float32)
    return delta.view(np.uint32) & _MAGNITUDE_BITS


_MAGNITUDE_BITS = np.uint32(0x7FFFFFFF)  # all but the sign bit


def has_non_finite(counts: np.ndarray) -> bool:
    """Whether a magnitude histogram counted NaN or Inf."""
    return bool(counts[NON_FINITE_BUCKET:].any())


def non_finite(entries: Stored) -> bool:
    """Whether any entry is NaN or Inf (not checkpoint.all_finite(entries.to_torch()))."""
    return bool(_ready().tadrop_non_finite(DTYPE_CODES[entries.dtype], _address(entries), entries.numel))


def bucket_histogram(base: Stored, tuned: Stored, bucket: int) -> np.ndarray:
    """sparsify.bucket_histogram(tuned.float() - base.float(), bucket) (int64, 2^16)."""
    library = _ready()
    return _histogram(
        base,
        tuned,
        1 << 16,
        lambda code, b, t, n, counts: library.tadrop_bucket_histogram(code, b, t, n, bucket, counts),
    )


def ties_kept_before(cut: TopKCut, offset: int, base: Stored, tuned: Stored) -> int:
    """Entries of the slice [offset, offset + n) equal to the cut's threshold are kept at slice
    positions below the number returned (as sparsify.cut_mask keeps them)."""
    n = base.numel
    if offset + n <= cut.tie_start:
        return ALL
    if offset > cut.tie_start or cut.tie_quota == 0:
        return 0
    code, base_address, tuned_address = _pair(base, tuned)
    return int(_ready().tadrop_nth_tie(code, base_address, tuned_address, n, cut.threshold, cut.tie_quota)) + 1


def hoyer_sums(base: Stored, tuned: list[Stored]) -> tuple[list[tuple[float, float]], bool]:
    """(each model's (sum |delta|, sum delta^2), whether an entry is NaN or Inf) of the task
    vectors tuned[j].float() - base.float(): what tadrop.HoyerSums adds up. Both sum in float64,
    in different orders, so they agree to ~1e-16 relative, as a GPU's sums do."""
    return hoyer_sums_at(base.dtype, _address(base), [_pair(base, entries)[2] for entries in tuned], base.numel)


def hoyer_sums_batch(
    dtype: str, bases: list[int], tuned: list[list[int]], numels: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """hoyer_sums_at of many tensors whole in one call, each given by address (its base, its
    models' entries, its size): (sums of shape (tensors, models, 2), whether each tensor has a
    NaN or Inf entry). Each tensor's sums are the bits it gets alone."""
    if not bases or len(bases) != len(tuned):
        raise ValueError("a batch takes one or more tensors, each with its base and its models")
    models = len(tuned[0])
    if any(len(addresses) != models for addresses in tuned):
        raise ValueError("every tensor of a batch has the same number of models")
    base_addresses = np.array(bases, dtype=np.uint64)
    tuned_addresses = np.array(tuned, dtype=np.uint64).reshape(-1)
    sizes = np.array(numels, dtype=np.int64)
    sums = np.zeros((len(bases), models, 2), dtype=np.float64)
    status = np.zeros(len(bases), dtype=np.int32)
    _check(
        _ready().tadrop_hoyer_sums_batch(
            DTYPE_CODES[dtype],
            base_addresses.ctypes.data,
            tuned_addresses.ctypes.data,
            sizes.ctypes.data,
            len(bases),
            models,
            sums.ctypes.data,
            status.ctypes.data,
        )
    )
    return sums, status == 1


def hoyer_sums_at(dtype: str, base: int, tuned: list[int], numel: int) -> tuple[list[tuple[float, float]], bool]:
    """hoyer_sums of entries given by address (Checkpoint.address: `numel` stored entries of
    `dtype` each), without a numpy view of each."""
    addresses = (ctypes.c_void_p * len(tuned))(*tuned)
    sums = np.zeros(2 * len(tuned), dtype=np.float64)
    status = _ready().tadrop_hoyer_sums(DTYPE_CODES[dtype], base, addresses, len(tuned), numel, sums.ctypes.data)
    _check(min(status, 0))
    values = sums.tolist()
    return [(values[2 * j], values[2 * j + 1]) for j in range(len(tuned))], status == 1


def random_keep_limit(density: float) -> int:
    """sparsify.random_keep_mask keeps an entry where its word's top 24 bits are below this."""
    return math.ceil(float(np.float32(density)) * 2**24)


@dataclass
class ModelSlice:
    """One model's part in kernels.merge_slice: its stored entries of the slice, its weight, and
    its drop (sparsify.magnitude's cut, sparsify.random's stream, or none)."""

    tuned: Stored
    weight: float = 1.0
    drop: int = DROP_NOTHING
    threshold: float = math.inf  # DROP_BY_MAGNITUDE: kept where |delta| > threshold, ...
    ties_before: int = 0  # ... or equal to it at a slice position below this (ties_kept_before)
    seed: int = 0  # DROP_AT_RANDOM: the stream's seed ...
    limit: int = 0  # ... and random_keep_limit(density)
    rescale_by: float | None = None  # divide the kept entries by this (DARE's 1 / density rescale)


def merge_slice(
    base: Stored,
    models: list[ModelSlice],
    offset: int,
    consensus: bool,
    normalize: bool,
    sum_of_weights: float,
    lambda_: float,
    out_dtype: str = "F32",
) -> tuple[Stored, bool]:
    """methods.generalized_task_arithmetic of one slice, entries [offset, offset + n) of the
    flattened tensor, then .to(out_dtype) (F32, F16 or BF16): (the merge, whether any
    task-vector or merged entry was NaN or Inf).

    consensus: TIES's sign election and disjoint sum (else the plain sum); normalize: divided
    by the agreeing weights (TIES) or by `sum_of_weights`.
    """
    settings = (_ModelSlice * len(models))()
    base_address = _address(base)
    for setting, model in zip(settings, models, strict=True):
        if model.tuned.dtype != base.dtype or model.tuned.numel != base.numel:
            raise ValueError("base and tuned differ in dtype or size")
        setting.tuned = _address(model.tuned)
        setting.weight = model.weight
        setting.drop = model.drop
        setting.threshold = model.threshold
        setting.ties_before = model.ties_before
        setting.seed = model.seed % (1 << 64)
        setting.limit = model.limit
        setting.rescale = model.rescale_by is not None
        setting.density = model.rescale_by if model.rescale_by is not None else 1.0
    out = Stored(out_dtype, np.empty(base.numel, dtype=numpy_dtype(out_dtype)))
    flag = _ready().tadrop_merge_slice(
        DTYPE_CODES[base.dtype],
        base_address,
        settings,
        len(models),
        base.numel,
        offset,
        int(consensus),
        int(normalize),
        sum_of_weights,
        lambda_,
        DTYPE_CODES[out_dtype],
        _address(out),
    )
    if flag < 0:
        raise ValueError(f"the kernel takes 1 to {MAX_MODELS} models")
    return out, bool(flag)


# The largest tensor a BatchMerge takes (entries): the C kernel's BATCH_SEGMENT_MAX.
BATCH_SEGMENT_MAX = 1 << 14
NO_CUT = -1  # BatchMerge.add's `kept` for a model whose cut is not found in the kernel


def _numpy_layout(structure: type[ctypes.Structure], kinds: dict[str, str]) -> np.dtype:
    """A numpy record dtype laid out as the ctypes structure (the C struct): its columns are
    filled at numpy's speed instead of one ctypes attribute at a time."""
    names = [name for name, _ in structure._fields_]
    return np.dtype(
        {
            "names": names,
            "formats": [kinds[name] for name in names],
            "offsets": [getattr(structure, name).offset for name in names],
            "itemsize": ctypes.sizeof(structure),
        }
    )


_MODEL_SLICE = _numpy_layout(
    _ModelSlice,
    {
        "tuned": "u8",
        "weight": "f4",
        "drop": "i4",
        "threshold": "f4",
        "ties_before": "i8",
        "seed": "u8",
        "limit": "u4",
        "rescale": "i4",
        "density": "f4",
    },
)
_SEGMENT = _numpy_layout(
    _Segment,
    {
        "base": "u8",
        "n": "i8",
        "out_start": "i8",
        "sum_of_weights": "f4",
        "lambda_": "f4",
        "normalize": "i4",
        "non_finite": "i4",
    },
)


class BatchMerge:
    """merge_slice of each of many small tensors whole (offset 0), in one kernel call: each
    tensor's own models' settings, cuts and parameters, so that its result is the one it gets
    alone. A model added with `kept` >= 0 is trimmed by the top-`kept` magnitude cut of the
    tensor, found in the kernel (sparsify.cut_of_keys, then ties_kept_before at offset 0).

    The entries are given by address (`Checkpoint.address`): they must stay mapped until run()
    returns. Tensors of at most BATCH_SEGMENT_MAX entries, all of one stored dtype and model count.
    """

    def __init__(self, dtype: str, out_dtype: str, models: int, consensus: bool):
        if not 1 <= models <= MAX_MODELS:
            raise ValueError(f"the kernel takes 1 to {MAX_MODELS} models")
        self.dtype, self.out_dtype, self.models, self.consensus = dtype, out_dtype, models, consensus
        self._segments: list[tuple[int, int, float, float, bool]] = []
        self._settings: list[tuple[int, float, int, int, int, bool, float, int]] = []  # per (tensor, model)

    def add(
        self,
        base: int,
        numel: int,
        sum_of_weights: float,
        lambda_: float,
        normalize: bool,
        models: list[tuple[int, float, int, int, int, float | None, int]],
    ) -> None:
        """One tensor: its base's address and size, and per model (address, weight, drop, seed,
        random_keep_limit, rescale_by or None, kept or NO_CUT) as ModelSlice has them."""
        if not 0 <= numel <= BATCH_SEGMENT_MAX:
            raise ValueError(f"a batch takes tensors of at most {BATCH_SEGMENT_MAX} entries")
        if len(models) != self.models:
            raise ValueError("every tensor of a batch has the same number of models")
        self._segments.append((base, numel, sum_of_weights, lambda_, normalize))
        self._settings.extend(models)

    def __len__(self) -> int:
        return len(self._segments)

    def run(self) -> tuple[np.ndarray, list[int], list[bool], np.ndarray]:
        """(the merged entries of every tensor one after another, in out_dtype as Stored holds
        them; each tensor's start there; whether each had a NaN or Inf in a task vector or its
        result (its entries are then not meaningful: merge it alone); the settings as run, one
        row per (tensor, model), with the cuts found: `threshold` and `ties_before`)."""
        segments = np.zeros(len(self._segments), dtype=_SEGMENT)
        if self._segments:
            base, numel, sum_of_weights, lambda_, normalize = zip(*self._segments, strict=True)
            segments["base"], segments["n"] = base, numel
            segments["out_start"] = np.cumsum(segments["n"]) - segments["n"]
            segments["sum_of_weights"], segments["lambda_"], segments["normalize"] = sum_of_weights, lambda_, normalize
        settings = np.zeros(len(self._settings), dtype=_MODEL_SLICE)
        kept = np.zeros(len(self._settings), dtype=np.int64)
        if self._settings:
            tuned, weight, drop, seed, limit, rescale_by, kept_counts = zip(*self._settings, strict=True)
            settings["tuned"], settings["weight"], settings["drop"] = tuned, weight, drop
            settings["seed"], settings["limit"] = seed, limit
            settings["rescale"] = [r is not None for r in rescale_by]
            settings["density"] = [1.0 if r is None else r for r in rescale_by]
            settings["threshold"] = math.inf
            kept[:] = kept_counts
        total = int(segments["n"].sum())
        out = np.empty(total, dtype=numpy_dtype(self.out_dtype))
        status = _ready().tadrop_merge_batch(
            DTYPE_CODES[self.dtype],
            segments.ctypes.data_as(ctypes.POINTER(_Segment)),
            len(segments),
            settings.ctypes.data_as(ctypes.POINTER(_ModelSlice)),
            kept.ctypes.data,
            self.models,
            int(self.consensus),
            DTYPE_CODES[self.out_dtype],
            out.ctypes.data,
        )
        if status == -2:
            _check(-1)
        if status < 0:
            raise ValueError("the batch kernel refused a model count or tensor size")
        return out, segments["out_start"].tolist(), segments["non_finite"].astype(bool).tolist(), settings
