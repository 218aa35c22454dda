"""Sparsifiers: functions that keep a fraction `density` of one task-vector tensor.

Tensors in, tensors out, no I/O. `density` is the fraction of entries kept
(1 - drop ratio); TADrop changes it per tensor, the functions do not care why.
Counts follow mergekit so that recipes give the same masks: a magnitude trim keeps
max(1, int(density * n)) entries at density > 0, breadcrumbs int(density * n).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .lazy import torch

Rescale = bool | Literal["none", "paper", "l1", "l2", "linf"]


def kept_count(numel: int, density: float) -> int:
    """How many entries a magnitude trim keeps: max(1, floor(density * n)) for density > 0, 0 at
    density 0, as mergekit 0.1.5's sparsify.magnitude (a 2-entry bias at density 0.4 keeps its
    larger entry, not none). The TIES paper gives no rounding; its code keeps floor(d n) + 1."""
    if density <= 0 or numel <= 0:
        return 0
    return max(1, min(numel, int(density * numel)))


def breadcrumbs_kept_count(numel: int, density: float) -> int:
    """How many entries Model Breadcrumbs keeps: floor(density * n), no minimum (mergekit's
    magnitude_outliers)."""
    return max(0, min(numel, int(density * numel)))


_SMALL = 1 << 16  # below this many entries, plain kthvalue is fastest


def _order_keys(values: torch.Tensor) -> torch.Tensor:
    """int32 keys that order like the float32 values: a non-negative float's bit pattern already
    does; for negative ones the lower 31 bits are flipped."""
    bits = values.view(torch.int32)
    if not bool((bits < 0).any()):
        return bits
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _kth_largest_counted(values: torch.Tensor, k: int) -> tuple[torch.Tensor, int, int]:
    """(k-th largest entry of a 1-D float tensor, how many entries are larger, how many equal it).

    Radix selection, exact, no sort: a histogram of the top 16 bits of each entry's order key
    finds the bucket that holds the answer, and only that bucket (a small share of the entries)
    goes to kthvalue. The counts come from the histogram and the bucket, so callers need no
    further pass over the tensor to count.
    """
    n = values.numel()
    if n <= _SMALL or values.dtype != torch.float32:
        threshold = torch.kthvalue(values.float(), n - k + 1).values.to(values.dtype)
        return threshold, int((values > threshold).count_nonzero()), int((values == threshold).count_nonzero())
    high = (_order_keys(values) >> 16) + 32768  # in [0, 65536)
    from_top = torch.bincount(high, minlength=65536).flip(0).cumsum(0)
    index = int(torch.searchsorted(from_top, k))  # first bucket (from the top) that reaches k
    larger_buckets = int(from_top[index - 1]) if index > 0 else 0
    bucket = values[high == (65535 - index)]
    threshold = torch.kthvalue(bucket, bucket.numel() - (k - larger_buckets) + 1).values
    if threshold == 0:  # -0.0 and +0.0 are equal but fall in different buckets: count them all
        return threshold, int((values > 0).count_nonzero()), int((values == 0).count_nonzero())
    larger = larger_buckets + int((bucket > threshold).count_nonzero())
    return threshold, larger, int((bucket == threshold).count_nonzero())


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a 1-D tensor (1 <= k <= n), exactly."""
    return _kth_largest_counted(values, k)[0]


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of `scores` (same shape).

    Uses selection, not a full sort. Ties at the threshold are broken by position
    (lowest flat index first), so exactly k entries are kept and the result is
    deterministic on every device.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold, larger, equal = _kth_largest_counted(flat, k)
    mask = flat >= threshold
    surplus = larger + equal - k
    if surplus > 0:  # entries equal to the threshold beyond k: drop the last ones
        tied = torch.nonzero(flat == threshold).reshape(-1)
        mask[tied[tied.numel() - surplus :]] = False
    return mask.reshape(scores.shape)


# ---------------------------------------------------------------- top-k of a tensor read in slices
#
# A magnitude trim of a tensor too large to hold whole (as float32, once per model) is found
# in two sweeps over its slices, then applied slice by slice. A non-negative float32 orders
# like its bit pattern, so the k-th largest |delta| is found on the bits, 16 at a time:
#   1. `magnitude_histogram` of each slice, summed: entries per value of the top 16 bits;
#      `boundary_bucket` names the bucket (top 16 bits) holding the k-th largest;
#   2. `bucket_histogram` of each slice: entries per value of the low 16 bits within that
#      bucket, i.e. per exact value; `cut_from_bucket_counts` finds the exact threshold, and
#      which slice holds the last tied entry that is kept;
#   3. `cut_mask` gives each slice's keep mask.
# The kept set is exactly top_k_mask's: the k largest |delta|, ties by lowest position. Only
# histograms are held, never entries, so bf16 task vectors (millions of equal values) are fine.

MAGNITUDE_BUCKETS = 1 << 15  # values of the top 16 bits of a non-negative float32 (sign bit 0)


def _magnitude_bits(delta: torch.Tensor) -> torch.Tensor:
    """The bit pattern of |delta| (float32) as int32: it orders like |delta|."""
    return delta.reshape(-1).view(torch.int32) & 0x7FFFFFFF


def magnitude_histogram(delta: torch.Tensor) -> torch.Tensor:
    """How many entries of a float32 tensor fall in each |delta| bucket (int64, MAGNITUDE_BUCKETS)."""
    return torch.bincount(_magnitude_bits(delta) >> 16, minlength=MAGNITUDE_BUCKETS)


def boundary_bucket(histogram: np.ndarray, k: int) -> tuple[int, int]:
    """(the bucket holding the k-th largest |delta|, how many entries lie in higher buckets)
    of a magnitude histogram (counted on the CPU, as numpy); 1 <= k <= its total."""
    from_top = histogram[::-1].cumsum()
    index = int(np.searchsorted(from_top, k))  # first bucket (from the top) that reaches k
    return MAGNITUDE_BUCKETS - 1 - index, int(from_top[index - 1]) if index > 0 else 0


def bucket_histogram(delta: torch.Tensor, bucket: int) -> torch.Tensor:
    """The entries of a float32 slice whose |delta| falls in `bucket`, counted per exact value:
    entry v counts those whose low 16 bits are v (int64, 2^16)."""
    low = (_magnitude_bits(delta) - (bucket << 16)).clamp_(-1, 1 << 16)  # -1 below, 2^16 above
    return torch.bincount(low.add_(1), minlength=(1 << 16) + 2)[1 : (1 << 16) + 1]


@dataclass(frozen=True)
class TopKCut:
    """The k largest |delta| of a whole tensor: every entry with |delta| > threshold, and of the
    entries equal to it, those before flat position `tie_start` plus the first `tie_quota` from
    there (all of which lie in the slice that starts at `tie_start`)."""

    threshold: float
    tie_start: float  # a flat position; math.inf when every tied entry is kept
    tie_quota: int = 0


KEEP_NOTHING = TopKCut(math.inf, 0, 0)


def _float32_of_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def cut_from_bucket_counts(bucket: int, starts: list[int], counts: np.ndarray, needed: int) -> TopKCut:
    """The cut that keeps `needed` entries of the boundary bucket besides every larger one.

    `counts[s]` is bucket_histogram of slice s (as numpy), which starts at flat position
    `starts[s]` (slices in flat order); 1 <= needed <= the bucket's total.
    """
    from_top = counts.sum(0, dtype=np.int64)[::-1].cumsum()
    index = int(np.searchsorted(from_top, needed))
    value = (1 << 16) - 1 - index
    ties_kept = needed - (int(from_top[index - 1]) if index > 0 else 0)
    threshold = _float32_of_bits((bucket << 16) | value)
    ties_through = counts[:, value].astype(np.int64).cumsum()  # tied entries up to each slice's end
    if ties_kept == int(ties_through[-1]):  # every tied entry is kept
        return TopKCut(threshold, math.inf)
    split = int(np.searchsorted(ties_through, ties_kept))  # the slice holding the last kept tie
    return TopKCut(threshold, starts[split], ties_kept - (int(ties_through[split - 1]) if split > 0 else 0))


def cut_of_keys(keys: np.ndarray, k: int) -> TopKCut:
    """The cut of the k largest |delta| of a whole tensor held at once (1 <= k <= n), from its
    magnitude keys: the bit patterns of |delta| (float32) as uint32, which order like |delta|.

    threshold = the k-th largest key; the entries above it are kept, and of those equal to it the
    first k - #above. The same cut as cut_from_bucket_counts for the tensor as one slice, by one
    selection (O(n)) instead of two histograms of 2^15 and 2^16 values, which cost more than a
    small tensor's whole merge.
    """
    threshold = np.partition(keys, keys.size - k)[keys.size - k]
    above, tied = int(np.count_nonzero(keys > threshold)), int(np.count_nonzero(keys == threshold))
    value = _float32_of_bits(int(threshold))
    return TopKCut(value, math.inf) if k - above == tied else TopKCut(value, 0, k - above)


def cut_mask(delta: torch.Tensor, cut: TopKCut, offset: int = 0) -> torch.Tensor:
    """The keep mask of entries [offset, offset + n) of the whole tensor, for a float32 slice:
    1.0 where kept, 0.0 elsewhere (float32, like delta: multiplying by a float mask is several
    times faster than by a boolean one)."""
    # sign(|delta| - t) is -1, 0 or 1 exactly as |delta| <, = or > t (a float subtraction
    # never flips a sign); +1 and clamp to 1 keeps the ties, clamp to 0 drops them
    sign = delta.abs().sub_(cut.threshold).sign_()
    if offset + sign.numel() <= cut.tie_start:
        return sign.add_(1).clamp_max_(1)
    if offset > cut.tie_start or cut.tie_quota == 0:
        return sign.clamp_min_(0)
    tied = torch.nonzero(sign.reshape(-1) == 0).reshape(-1)
    mask = sign.add_(1).clamp_max_(1)
    mask.view(-1)[tied[cut.tie_quota :]] = 0
    return mask


def top_k_cut(deltas: list[torch.Tensor], k: int) -> TopKCut | None:
    """The cut of the k largest |delta| over `deltas`, consecutive slices of one float32 tensor
    (all of it, in order); None when everything is kept (k >= n)."""
    n = sum(d.numel() for d in deltas)
    if k >= n:
        return None
    if k <= 0:
        return KEEP_NOTHING
    bucket, larger = boundary_bucket(sum(magnitude_histogram(d) for d in deltas).cpu().numpy(), k)
    starts = [sum(d.numel() for d in deltas[:i]) for i in range(len(deltas))]
    return cut_from_bucket_counts(
        bucket, starts, torch.stack([bucket_histogram(d, bucket) for d in deltas]).cpu().numpy(), k - larger
    )


def rescale_kept(original: torch.Tensor, kept: torch.Tensor, density: float, how: Rescale) -> torch.Tensor:
    """Rescale the surviving entries after a drop.

    `paper` (or True): divide by the keep probability, as DARE and DELLA state it.
    `l1`/`l2`/`linf`: match that norm of the original tensor, as mergekit does.
    """
    if how in (False, None, "none"):
        return kept
    if how in (True, "paper"):
        return kept / density if density > 0 else kept
    if how == "l1":
        before, after = original.abs().sum(), kept.abs().sum()
    elif how == "l2":
        before, after = original.norm(), kept.norm()
    elif how == "linf":
        before, after = original.abs().max(), kept.abs().max()
    else:
        raise ValueError(f"unknown rescale {how!r}")
    eps = 1e-7
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def _apply_mask(
    delta: torch.Tensor, mask: torch.Tensor, density: float, rescale: Rescale, in_place: bool
) -> torch.Tensor:
    """delta * mask, rescaled; the mask and the rescale are applied in place where allowed."""
    if rescale in (False, None, "none", True, "paper"):  # no norm of the original is needed
        kept = delta.mul_(mask) if in_place else delta * mask
        return kept.div_(density) if rescale in (True, "paper") and density > 0 else kept
    return rescale_kept(delta, delta * mask, density, rescale)


def magnitude_mask(delta: torch.Tensor, density: float, cut: TopKCut | None = None, offset: int = 0) -> torch.Tensor:
    """The keep mask of a magnitude trim of `delta` to its `density` largest |entries|: float
    1.0 / 0.0 for float32 deltas (bool otherwise). When delta is a slice (entries from
    `offset` on) of a larger tensor, `cut` is that tensor's top-k cut."""
    if cut is None and delta.dtype != torch.float32:
        return top_k_mask(delta.abs(), kept_count(delta.numel(), density))
    cut = cut or top_k_cut([delta], kept_count(delta.numel(), density))  # the whole tensor: one slice of itself
    return cut_mask(delta, cut, offset) if cut is not None else torch.ones_like(delta)


def magnitude(
    delta: torch.Tensor,
    density: float,
    rescale: Rescale = False,
    in_place: bool = False,
    cut: TopKCut | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Keep the `density` fraction of entries with the largest |delta| (TIES trim).

    With in_place, `delta` itself is overwritten (saves a tensor-sized buffer). When delta is
    a slice (entries from `offset` on) of a larger tensor, `cut` is that tensor's top-k cut.
    """
    if density >= 1:
        return delta
    mask = magnitude_mask(delta, density, cut, offset)
    return _apply_mask(delta, mask, density, rescale, in_place)


# ---------------------------------------------------------------- the random stream
#
# Every (model, tensor) has its own stream of 32-bit words, from SplitMix64 (Steele, Lea and
# Flood, 2014; it passes BigCrush) seeded with that pair's seed: output j is
# mix(seed + (j + 1) * GOLDEN), and word 2j / 2j+1 is its low / high half. The generator is
# counter-based: any slice of the stream is computed straight from its positions, in a few
# vectorised integer operations, the same bits on every device. So a tensor merged in slices,
# on a GPU or in a resumed run draws the same numbers, and it is ~3x faster than torch's
# sequential mt19937.

_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _as_int64(value: int) -> int:
    """A 64-bit pattern as the signed integer torch.int64 stores (arithmetic wraps mod 2^64)."""
    value %= 1 << 64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shifted_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical (unsigned) right shift of integer bit patterns; torch's >> is arithmetic."""
    return (z >> bits) & ((1 << (8 * z.element_size() - bits)) - 1)


_STEP_BLOCK = 1 << 19  # SplitMix64 outputs made at a time (4 MB of int64 temporaries)
_golden_steps: dict[torch.device, torch.Tensor] = {}


def _steps(device: torch.device) -> torch.Tensor:
    """j * GOLDEN for j in [0, _STEP_BLOCK) (mod 2^64), kept per device: the counters of a
    block are then one addition away."""
    if device not in _golden_steps:
        _golden_steps[device] = torch.arange(_STEP_BLOCK, dtype=torch.int64, device=device).mul_(_as_int64(_GOLDEN))
    return _golden_steps[device]


def _splitmix64(first: int, count: int, seed: int, device: torch.device) -> torch.Tensor:
    """SplitMix64 outputs first .. first + count - 1 of `seed` (count <= _STEP_BLOCK), int64."""
    z = torch.add(_steps(device)[:count], _as_int64(seed + (first + 1) * _GOLDEN))
    shifted = torch.empty_like(z)
    for bits, multiplier in ((30, _MIX1), (27, _MIX2), (31, None)):
        torch.bitwise_right_shift(z, bits, out=shifted).bitwise_and_((1 << (64 - bits)) - 1)
        z.bitwise_xor_(shifted)
        if multiplier is not None:
            z.mul_(_as_int64(multiplier))
    return z


def random_words(seed: int, start: int, stop: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Words [start, stop) of the random stream of `seed`, as int32 bit patterns."""
    device = torch.device(device)
    first, last = start // 2, (stop + 1) // 2
    blocks = [_splitmix64(j, min(_STEP_BLOCK, last - j), seed, device) for j in range(first, last, _STEP_BLOCK)]
    outputs = (
        blocks[0]
        if len(blocks) == 1
        else torch.cat(blocks)
        if blocks
        else torch.zeros(0, dtype=torch.int64, device=device)
    )
    return outputs.view(torch.int32)[start - 2 * first : stop - 2 * first]


def _top_24_bits(numel: int, seed: int, device: torch.device | str, offset: int) -> torch.Tensor:
    """m for entries [offset, offset + numel): the top 24 bits of each word (int32); the
    entry's uniform is m * 2^-24."""
    return _shifted_right(random_words(seed, offset, offset + numel, device), 8)


def random_keep_mask(
    numel: int, density: float, seed: int, device: torch.device | str = "cpu", offset: int = 0
) -> torch.Tensor:
    """Bernoulli(density) keep mask of entries [offset, offset + numel) of a flattened tensor,
    as float32 1.0 (kept) / 0.0: entry i is kept where its uniform (see seeded_uniform) is
    below float32(density). Compared as integers: u = m * 2^-24 < d exactly when
    m < ceil(d * 2^24), i.e. when m - ceil(d * 2^24) is negative (its sign bit)."""
    limit = math.ceil(float(torch.tensor(density, dtype=torch.float32)) * 2**24)
    return _top_24_bits(numel, seed, device, offset).sub_(limit).bitwise_right_shift_(31).neg_().to(torch.float32)


def seeded_uniform(numel: int, seed: int, device: torch.device | str = "cpu", offset: int = 0) -> torch.Tensor:
    """Float32 uniforms in [0, 1) for entries [offset, offset + numel): the top 24 bits of
    each word times 2^-24 (exact in float32, the resolution torch.rand has)."""
    return _top_24_bits(numel, seed, device, offset).to(torch.float32).mul_(2.0**-24)


def random(
    delta: torch.Tensor, density: float, seed: int, rescale: Rescale = True, in_place: bool = False, offset: int = 0
) -> torch.Tensor:
    """DARE: drop each entry with probability 1 - density, rescale the survivors. `offset`: the
    flat position of delta's first entry, when delta is a slice of the tensor."""
    if density >= 1:
        return delta
    mask = random_keep_mask(delta.numel(), density, seed, delta.device, offset).view(delta.shape)
    return _apply_mask(delta, mask, density, rescale, in_place)


_DELLA_BLOCK = 1 << 22  # entries ranked at a time: bounds the int64 argsort temporaries


def _della_rows(delta: torch.Tensor) -> torch.Tensor:
    """The rows DELLA ranks within: dim 0 indexes them; a 1-D tensor is one row; a tensor with
    more dimensions is flattened to shape[0] rows."""
    # the row length spelled out: reshape(0, -1) of a tensor without entries is ambiguous
    return (
        delta.reshape(1, delta.numel())
        if delta.dim() < 2
        else delta.reshape(delta.shape[0], math.prod(delta.shape[1:]))
    )


def _della_block_probabilities(rows: torch.Tensor, density: float, eps: float) -> torch.Tensor:
    """Keep probabilities of a block of whole rows (see della_keep_probabilities)."""
    n = rows.shape[1]
    if n < 2 or eps == 0.0:
        return torch.full(rows.shape, float(density), dtype=torch.float32, device=rows.device)
    magnitudes = rows.abs()
    if (
        magnitudes.dtype == torch.float32
    ):  # non-negative floats order like their bit patterns, and torch sorts int32 ~1.5x faster
        magnitudes = magnitudes.view(torch.int32)
    order = torch.argsort(magnitudes, dim=1, stable=True)
    ranks = torch.empty(rows.shape, dtype=torch.int32, device=rows.device)
    ranks.scatter_(1, order, torch.arange(n, dtype=torch.int32, device=rows.device).expand(rows.shape[0], n))
    del order
    # float32 r * (2 eps / (n - 1)) + (density - eps), one rounding per step and no division
    # by a scalar (CUDA turns that into a multiplication by the reciprocal): the same bits
    # on every device.
    return ranks.to(torch.float32).mul_(2 * eps / (n - 1)).add_(density - eps)


def _della_epsilon(density: float, epsilon: float) -> float:
    return max(0.0, min(epsilon, density, 1.0 - density))


def della_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MAGPRUNE keep probabilities, in the shape of `delta`.

    Within each row (dim 0 is the row index; a 1-D tensor is one row; a tensor with more
    dimensions is flattened to shape[0] rows), entries are ranked by |delta| ascending
    (ties: lower position first, a stable sort), r = 0 .. n-1, and kept with probability

        density - epsilon + 2 * epsilon * r / (n - 1)

    as mergekit does: the largest entry gets density + epsilon, the smallest density -
    epsilon, and the mean over a row is exactly `density`. (The paper's drop probabilities,
    p_min + (epsilon'/n) r with larger magnitudes dropped less, are the same line with
    epsilon' = 2 epsilon.) Computed as float32 r * (2 epsilon / (n - 1)) + (density - epsilon).
    epsilon is shrunk to min(epsilon, density, 1 - density) so that the probabilities stay
    within [0, 1] at any density TADrop chooses. A row of one entry gets `density`.
    """
    rows = _della_rows(delta)
    eps = _della_epsilon(density, epsilon)
    return _della_block_probabilities(rows, density, eps).reshape(delta.shape)


def della(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    seed: int,
    rescale: Rescale = True,
    in_place: bool = False,
    offset: int = 0,
) -> torch.Tensor:
    """DELLA's MAGPRUNE: drop entries at random, larger magnitudes (within a row) less often.

    Entry i is kept where u_i < q_i, with u the (seed, model, tensor) stream of
    `seeded_uniform` (DARE's) and q_i from `della_keep_probabilities` (mean `density`).
    rescale true/paper divides each survivor by its own keep probability q_i (the paper's
    1 / (1 - p_i)); l1/l2/linf match that norm of the original (mergekit); false keeps them.
    Rows are ranked a block at a time, so the temporaries stay small whatever the tensor.
    With in_place, `delta` itself is overwritten. When delta is a block of whole rows of a
    larger tensor, `offset` is the flat position of its first entry there.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_() if in_place else torch.zeros_like(delta)
    eps = _della_epsilon(density, epsilon)
    rows = _della_rows(delta)
    uniform = _della_rows(seeded_uniform(delta.numel(), seed, delta.device, offset).view(delta.shape))
    paper = rescale in (True, "paper")
    out = rows if in_place and paper else torch.empty_like(rows) if paper else None
    mask = None if paper else torch.empty(rows.shape, dtype=torch.bool, device=delta.device)
    step = max(1, _DELLA_BLOCK // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        block = slice(start, start + step)
        q = _della_block_probabilities(rows[block], density, eps)
        keep = uniform[block] < q
        if paper:
            out[block] = torch.where(keep, rows[block] / q, torch.zeros((), dtype=rows.dtype, device=rows.device))
        else:
            mask[block] = keep
    del uniform
    if paper:
        return out.reshape(delta.shape)
    mask = mask.reshape(delta.shape)
    if rescale in (False, None, "none"):
        return delta.mul_(mask) if in_place else delta * mask
    return rescale_kept(delta, delta * mask, density, rescale)


def breadcrumbs(
    delta: torch.Tensor, density: float, gamma: float = 0.01, rescale: Rescale = False, in_place: bool = False
) -> torch.Tensor:
    """Model Breadcrumbs: drop the largest `gamma` fraction (outliers) and the smallest
    entries, keeping `density` of the tensor in all (counts as in mergekit)."""
    if density >= 1:
        return delta
    n = delta.numel()
    n_keep = breadcrumbs_kept_count(n, density)
    n_top = int(gamma * n)
    n_bottom = n - n_keep - n_top
    if n_bottom < 0:  # fewer outliers removed so that the density is met
        n_top += n_bottom
        n_bottom = 0
    magnitudes = delta.abs()
    mask = top_k_mask(magnitudes, n - n_bottom)
    if n_top > 0:
        mask &= ~top_k_mask(magnitudes, n_top)
    return _apply_mask(delta, mask, density, rescale, in_place)


def sign_consensus(weighted_deltas: list[torch.Tensor], method: Literal["sum", "count"] = "sum") -> torch.Tensor:
    """TIES sign election: the sign (+1/-1) of the summed mass (or of the vote count)."""
    if method not in ("sum", "count"):
        raise ValueError(f"unknown consensus method {method!r}")
    vote = (lambda d: d) if method == "sum" else torch.sign
    total = vote(weighted_deltas[0]).clone()
    for d in weighted_deltas[1:]:
        total += vote(d)
    # sign(sign(total) + 0.5) is +1 where total >= 0 (zeros included) and -1 elsewhere: the same
    # as torch.where(total >= 0, 1, -1), in float operations that run several times faster
    return total.sign_().add_(0.5).sign_()
