"""TADrop maths: a score per task-vector tensor, and a drop ratio per tensor from the scores.

Pure functions, no I/O (spec: ../shared/TADROP.md, mirrored in docs/tadrop.md):
1. `tensor_score` measures how concentrated one tensor's change is (higher = a few
   large entries, worth keeping).
2. `normalize_scores` maps one model's scores to [0, 1] across its tensors.
3. `adaptive_ratios` turns those into drop ratios around the host's ratio p, and
   shifts them so the element-weighted mean drop stays p (`preserve_budget`).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .lazy import torch
from .sparsify import MAGNITUDE_BUCKETS

Statistic = Literal["kurtosis", "hoyer", "cv", "gini", "topmass"]
Normalization = Literal["rank", "minmax"]
STATISTICS: tuple[str, ...] = ("kurtosis", "hoyer", "cv", "gini", "topmass")

# The score a statistic gives a tensor with no spread at all (every entry equal):
# the bottom of its range, i.e. "spread thinly", pruned hardest.
_FLAT_SCORE = {"kurtosis": -2.0, "hoyer": 0.0, "cv": 0.0, "gini": 0.0}


def _scaled(tau: torch.Tensor) -> torch.Tensor | None:
    """tau / max|tau| in float64 (None if all zero). The statistics are scale-free. Float64,
    because its sums are accurate to ~1e-16 whatever their order: the scores, and so the plans,
    do not depend on the device (a GPU reduces in another order than a CPU)."""
    flat = tau.reshape(-1)
    peak = float(flat.abs().max())
    return None if peak == 0 else flat.double() / peak


def _mean(x: torch.Tensor) -> float:
    return float(x.sum()) / x.numel()


def excess_kurtosis(tau: torch.Tensor) -> float:
    """Excess kurtosis m4 / m2^2 - 3 of the entries (heavy tails = a few large entries)."""
    x = _scaled(tau)
    if x is None:
        return _FLAT_SCORE["kurtosis"]
    squared = (x - _mean(x)).square_()
    m2 = _mean(squared)
    if m2 <= 1e-30:
        return _FLAT_SCORE["kurtosis"]
    return _mean(squared.square_()) / (m2 * m2) - 3.0


def hoyer(tau: torch.Tensor) -> float:
    """Hoyer sparsity (sqrt(n) - L1/L2) / (sqrt(n) - 1), in [0, 1]: HoyerSums of the whole tensor."""
    sums = HoyerSums()
    sums.add(tau)
    score = sums.score()
    return _FLAT_SCORE["hoyer"] if score is None else score


class HoyerSums:
    """The Hoyer sparsity of a tensor seen in slices: entries, L1 and squared L2 add up in
    float64. A float32 entry and its square are exact in a double, so the sums are within
    ~1e-16 x log(n) of exact whatever the slices and the order: the CPU kernels
    (kernels.hoyer_sums) and a GPU agree to that, and so do their plans."""

    def __init__(self) -> None:
        self.numel, self.l1, self.l2_squared = 0, 0.0, 0.0

    def add(self, tau: torch.Tensor) -> None:
        magnitudes = tau.reshape(-1).double().abs_()
        self.numel += magnitudes.numel()
        self.l1 += float(magnitudes.sum())
        self.l2_squared += float(magnitudes.square_().sum())

    def add_sums(self, numel: int, l1: float, l2_squared: float) -> None:
        """A slice's sums computed elsewhere (kernels.hoyer_sums)."""
        self.numel += numel
        self.l1 += l1
        self.l2_squared += l2_squared

    def score(self) -> float | None:
        """The Hoyer sparsity, or None if every entry was zero (as tensor_score)."""
        if self.l1 == 0:
            return None
        if self.numel < 2:
            return _FLAT_SCORE["hoyer"]
        root_n = math.sqrt(self.numel)
        return device_free((root_n - self.l1 / math.sqrt(self.l2_squared)) / (root_n - 1))


def coefficient_of_variation(tau: torch.Tensor) -> float:
    """std(|tau|) / mean(|tau|) (population std)."""
    x = _scaled(tau)
    if x is None:
        return _FLAT_SCORE["cv"]
    magnitudes = x.abs_()
    mean = _mean(magnitudes)
    variance = _mean((magnitudes - mean).square_())
    return math.sqrt(max(variance, 0.0)) / mean if variance > 1e-30 else _FLAT_SCORE["cv"]


def gini(tau: torch.Tensor) -> float:
    """Gini coefficient of |tau|: 0 when all equal, towards 1 when one entry holds all. In
    float64: rank-weighted sums of entries near float32's range overflow float32."""
    magnitudes = tau.abs().reshape(-1).double().sort().values
    n = magnitudes.numel()
    total = float(magnitudes.sum())
    if total == 0:
        return _FLAT_SCORE["gini"]
    ranks = torch.arange(1, n + 1, dtype=magnitudes.dtype, device=magnitudes.device)
    return float(((2 * ranks - n - 1) * magnitudes).sum()) / (n * total)


def top_mass(tau: torch.Tensor, fraction: float = 0.01) -> float:
    """Share of ||tau||_1 held by the largest `fraction` of entries (at least one); sums in float64
    (float32 sums of entries near its range overflow)."""
    magnitudes = tau.abs().reshape(-1)
    total = float(magnitudes.double().sum())
    k = max(1, math.ceil(fraction * magnitudes.numel()))
    if total == 0:
        return k / magnitudes.numel()
    return float(magnitudes.topk(k, sorted=False).values.double().sum()) / total


def device_free(score: float) -> float:
    """A score from float64 sums, rounded to float32. Sums in another order (a GPU's, other
    slices) differ in a double's last digits; rounded, the scores are equal unless one lies within
    ~1e-16 of a float32 rounding boundary (odds ~1e-9 a score), so min-max normalisation, which
    carries a score's digits into its ratio, gives the same plan on every device."""
    return float(np.float32(score))


def tensor_score(tau: torch.Tensor, statistic: Statistic, topmass_fraction: float = 0.01) -> float | None:
    """The concentration score of one task-vector tensor (device_free), or None if tau is all zeros."""
    if not bool(tau.any()):
        return None
    return device_free(_score(tau, statistic, topmass_fraction))


def _score(tau: torch.Tensor, statistic: Statistic, topmass_fraction: float) -> float:
    if statistic == "kurtosis":
        return excess_kurtosis(tau)
    if statistic == "hoyer":
        return hoyer(tau)
    if statistic == "cv":
        return coefficient_of_variation(tau)
    if statistic == "gini":
        return gini(tau)
    if statistic == "topmass":
        return top_mass(tau, topmass_fraction)
    raise ValueError(f"unknown statistic {statistic!r}")


def normalize_scores(scores: Sequence[float], method: Normalization) -> list[float]:
    """Map scores to [0, 1]: percentile rank (ties share their mean rank) or min-max."""
    m = len(scores)
    if m == 0:
        return []
    if m == 1:
        return [0.5]
    if method == "minmax":
        low, high = min(scores), max(scores)
        if high == low:
            return [0.5] * m
        return [(s - low) / (high - low) for s in scores]
    if method == "rank":
        order = sorted(range(m), key=lambda i: scores[i])
        ranks = [0.0] * m
        i = 0
        while i < m:
            j = i
            while j + 1 < m and scores[order[j + 1]] == scores[order[i]]:
                j += 1
            for position in range(i, j + 1):
                ranks[order[position]] = (i + j) / 2
            i = j + 1
        return [r / (m - 1) for r in ranks]
    raise ValueError(f"unknown normalization {method!r}")


@dataclass(frozen=True)
class RatioResult:
    ratios: list[float]
    shift: float  # the common shift added to meet the budget (0 without preserve_budget)
    budget_met: bool  # False when clipping made the target mean unreachable


def _per_tensor(value: float | Sequence[float], count: int) -> list[float]:
    return [float(value)] * count if isinstance(value, (int, float)) else [float(v) for v in value]


def adaptive_ratios(
    normalized: Sequence[float],
    base_ratios: Sequence[float],
    sizes: Sequence[int],
    strength: float | Sequence[float],
    min_ratio: float | Sequence[float] = 0.0,
    max_ratio: float | Sequence[float] = 0.99,
    preserve_budget: bool = True,
) -> RatioResult:
    """Per-tensor drop ratios p_t = clip(p + strength * (1 - 2 s_t) + shift, min_ratio, max_ratio).

    `base_ratios` is the host's ratio p for each tensor (usually one value);
    strength and the bounds may be one value or one per tensor. Strength is signed: > 0
    drops concentrated tensors (high s) less, < 0 drops them more.
    With `preserve_budget`, `shift` is found by bisection so that
    sum(n_t * p_t) = sum(n_t * p) over these tensors: the same number of
    entries is kept as with the uniform ratio.
    """
    count = len(normalized)
    if count == 0:
        return RatioResult([], 0.0, True)
    strengths = _per_tensor(strength, count)
    lows, highs = _per_tensor(min_ratio, count), _per_tensor(max_ratio, count)
    raw = np.array([p + g * (1.0 - 2.0 * s) for p, g, s in zip(base_ratios, strengths, normalized, strict=True)])
    lows_array, highs_array = np.array(lows), np.array(highs)

    def clipped(shift: float) -> np.ndarray:
        """min(high, max(low, r + shift)) per tensor, with Python's min and max's choice between
        equal values (signed zeros included)."""
        shifted = raw + shift
        above_low = np.where(shifted > lows_array, shifted, lows_array)
        return np.where(above_low < highs_array, above_low, highs_array)

    def ratios_for(shift: float) -> list[float]:
        return clipped(shift).tolist()

    if not preserve_budget:
        return RatioResult(ratios_for(0.0), 0.0, True)

    total = float(sum(sizes))
    target = sum(n * p for n, p in zip(sizes, base_ratios, strict=True)) / total
    weights = np.array(sizes, dtype=np.float64)

    def mean_drop(shift: float) -> float:
        # a running sum adds in order, as Python's sum() did: the same bits, at numpy's speed (the
        # bisection calls this ~200 times over every tensor of a model)
        return float(np.cumsum(weights * clipped(shift))[-1]) / total

    reach = 2.0 + max(abs(g) for g in strengths)  # signed strengths: |shift| this wide reaches both clip bounds
    low, high = -reach, reach
    if mean_drop(low) > target or mean_drop(high) < target:
        shift = low if mean_drop(low) > target else high
        return RatioResult(ratios_for(shift), shift, False)
    for _ in range(100):  # mean_drop is monotone in shift
        middle = (low + high) / 2
        if mean_drop(middle) < target:
            low = middle
        else:
            high = middle
    shift = (low + high) / 2
    return RatioResult(ratios_for(shift), shift, abs(mean_drop(shift) - target) < 1e-6)


# ---------------------------------------------------------------- allocations with no strength knob
#
# `mass`, `mass_reverse` and `global` set each tensor's kept COUNT (an integer) from its |tau|
# distribution, seen in pass 1 as a magnitude histogram (sparsify.magnitude_histogram's buckets:
# the top 16 bits of |tau| as float32, 2^15 buckets, 128 per binade, 0.8% wide) with the float64
# sum of |tau|^q per bucket. A model's budget is its uniform kept count sum_t kept_count(n_t, d_t);
# a common parameter (the mass fraction f, or the threshold level) is set by bisection and the
# last entries are handed out one by one, so the budget is met exactly where the bounds allow.

PROFILE_POINTS = 512  # at most this many groups of buckets kept per (model, tensor): 10 KB (see MagnitudeProfile)


@dataclass(frozen=True)
class MagnitudeProfile:
    """One tensor's |tau| distribution, compressed and cumulative from the top.

    Groups of `width` consecutive buckets (a power of two: the fewest that leave at most
    PROFILE_POINTS non-empty groups), largest first. `lows[i]` is group i's first bucket;
    `above_counts[i]` / `above_masses[i]` count the entries / sum |tau|^q of groups 0..i.
    Within a group entries are taken as equal, so the allocations are exact where a group
    holds one value, and otherwise off by at most the boundary group's entries.
    Memory: 512 x (8 + 8 + 8) bytes = 12 KB at most per (model, tensor).
    """

    lows: np.ndarray  # int64, descending
    width: int
    above_counts: np.ndarray  # int64
    above_masses: np.ndarray  # float64
    numel: int
    nonzero: int  # entries outside bucket 0 (|tau| >= 2^-133: not zero, nor a tiny denormal)

    @property
    def mass(self) -> float:
        return float(self.above_masses[-1]) if self.above_masses.size else 0.0


def magnitude_profile(
    counts_in: np.ndarray, masses: np.ndarray | None = None, points: int = PROFILE_POINTS
) -> MagnitudeProfile:
    """The MagnitudeProfile of a bucket histogram (`counts_in`, int) and its per-bucket sums of
    |tau|^q (`masses`, float64; None: counts only)."""
    counts = np.asarray(counts_in, dtype=np.int64)
    masses = np.zeros(counts.size) if masses is None else np.asarray(masses, dtype=np.float64)
    width = 1
    while np.count_nonzero(counts) > points:
        counts, masses, width = counts.reshape(-1, 2).sum(1), masses.reshape(-1, 2).sum(1), width * 2
    groups = np.flatnonzero(counts)[::-1]
    nonzero = int(np.asarray(counts_in, dtype=np.int64)[1:].sum())
    return MagnitudeProfile(
        groups.astype(np.int64) * width,
        width,
        np.cumsum(counts[groups]),
        np.cumsum(masses[groups]),
        int(counts.sum()),
        nonzero,
    )


def kept_for_mass(profile: MagnitudeProfile, fraction: float) -> int:
    """The fewest entries, largest |tau| first, whose mass reaches `fraction` of the tensor's;
    at fraction 1 every entry (zeros too: they count as kept, as in a uniform trim)."""
    total = profile.mass
    if fraction >= 1:
        return profile.numel
    if fraction <= 0 or total <= 0:
        return 0
    need = fraction * total
    i = int(np.searchsorted(profile.above_masses, need, side="left"))
    if i >= profile.lows.size:  # rounding: need is the whole mass; every entry with mass
        i = int(np.searchsorted(profile.above_masses, total, side="left"))
    count_before = int(profile.above_counts[i - 1]) if i else 0
    mass_before = float(profile.above_masses[i - 1]) if i else 0.0
    group_count = int(profile.above_counts[i]) - count_before
    group_mass = float(profile.above_masses[i]) - mass_before
    if group_mass <= 0:
        return count_before
    partial = math.ceil((need - mass_before) / (group_mass / group_count))
    return count_before + min(group_count, max(0, partial))


def kept_above_level(profile: MagnitudeProfile, level: float) -> int:
    """Entries above a magnitude level (in buckets: level b is bucket b's lower edge; a
    fraction of a bucket takes that fraction of its entries, from the top)."""
    lows = profile.lows
    whole = int(np.searchsorted(-lows, -level, side="right"))  # groups whose first bucket is >= level
    kept = int(profile.above_counts[whole - 1]) if whole else 0
    if whole < lows.size and lows[whole] + profile.width > level:  # the group that holds the level
        group_count = int(profile.above_counts[whole]) - kept
        kept += math.floor(group_count * (lows[whole] + profile.width - level) / profile.width)
    return kept


@dataclass(frozen=True)
class CountAllocation:
    kept: list[int]
    parameter: float  # the common parameter found: the mass fraction f, or the threshold's level
    budget_met: bool
    shift: float = 0.0  # mass_reverse: the common shift that restored the budget after the bounds


def allocate_counts(
    kept_at: Callable[[float], np.ndarray], target: int, low: float, high: float, iterations: int = 64
) -> CountAllocation:
    """Kept counts that sum to `target`, from `kept_at(x)`: each tensor's count at parameter x,
    bounded and non-decreasing in x over [low, high].

    Bisection finds the smallest x (to double precision) whose counts reach the target; the
    few entries the last step added beyond it are taken back from the last tensor first (ties
    go to earlier tensors), so the total is exact and every count lies between its counts at
    two adjacent parameters."""
    counts_low, counts_high = kept_at(low), kept_at(high)
    if counts_low.sum() >= target:
        return CountAllocation(counts_low.tolist(), low, int(counts_low.sum()) == target)
    if counts_high.sum() < target:
        return CountAllocation(counts_high.tolist(), high, False)
    for _ in range(iterations):
        middle = (low + high) / 2
        counts = kept_at(middle)
        if counts.sum() >= target:
            high, counts_high = middle, counts
        else:
            low, counts_low = middle, counts
    kept = counts_high.copy()
    excess = int(kept.sum()) - target
    for t in reversed(range(kept.size)):
        if excess <= 0:
            break
        back = min(excess, int(kept[t] - counts_low[t]))
        kept[t] -= back
        excess -= back
    return CountAllocation(kept.tolist(), high, True)


def _bounded(counts: np.ndarray, lows: np.ndarray, highs: np.ndarray) -> np.ndarray:
    return np.minimum(highs, np.maximum(lows, counts))


def mass_allocation(
    profiles: Sequence[MagnitudeProfile], target: int, lows: Sequence[int], highs: Sequence[int]
) -> CountAllocation:
    """`allocation: mass`: tensor t keeps the fewest entries (largest |tau| first) that retain a
    common fraction f of its own mass (L1, or L2 squared: as the profiles were summed), bounded
    by [lows[t], highs[t]] entries; f is set so the counts sum to `target`."""
    low_counts, high_counts = np.asarray(lows, np.int64), np.asarray(highs, np.int64)

    def kept_at(fraction: float) -> np.ndarray:
        return _bounded(np.array([kept_for_mass(p, fraction) for p in profiles], np.int64), low_counts, high_counts)

    return allocate_counts(kept_at, target, 0.0, 1.0)


def mass_reverse_allocation(
    profiles: Sequence[MagnitudeProfile], uniform: Sequence[int], lows: Sequence[int], highs: Sequence[int]
) -> CountAllocation:
    """`allocation: mass_reverse`: the mass allocation mirrored about the uniform counts.

    With u_t the uniform kept count and m_t the unbounded mass allocation's (same budget), tensor
    t keeps 2 u_t - m_t entries: a tensor that needs few entries to reach f (its mass sits in a
    few large entries) keeps MORE than uniform, by as much as the mass allocation gave it fewer.
    The mirrored counts sum to the budget; where bounds clip them, a common shift x (a fraction
    of each tensor's size, floor(x n_t) entries) restores it. `parameter` is the mass
    allocation's f, `shift` that x."""
    uniform_counts = np.asarray(uniform, np.int64)
    sizes = np.array([p.numel for p in profiles], np.int64)
    target = int(uniform_counts.sum())
    mass = mass_allocation(profiles, target, [0] * len(profiles), sizes.tolist())
    mirrored = 2 * uniform_counts - np.asarray(mass.kept, np.int64)
    low_counts, high_counts = np.asarray(lows, np.int64), np.asarray(highs, np.int64)

    def kept_at(shift: float) -> np.ndarray:
        return _bounded(mirrored + np.floor(shift * sizes).astype(np.int64), low_counts, high_counts)

    if int(kept_at(0.0).sum()) == target:
        return CountAllocation(kept_at(0.0).tolist(), mass.parameter, True)
    shifted = allocate_counts(kept_at, target, -2.0, 2.0)
    return CountAllocation(shifted.kept, mass.parameter, shifted.budget_met, shifted.parameter)


def global_allocation(
    profiles: Sequence[MagnitudeProfile], target: int, lows: Sequence[int], highs: Sequence[int]
) -> CountAllocation:
    """`allocation: global`: one |tau| threshold over the model's whole task vector (the TIES
    authors' code, FusionBench); each tensor keeps its entries above it, bounded by
    [lows[t], highs[t]]. `parameter` is the threshold's level in buckets (see
    kept_above_level; threshold_value gives |tau| there)."""
    low_counts, high_counts = np.asarray(lows, np.int64), np.asarray(highs, np.int64)
    top = float(MAGNITUDE_BUCKETS)

    def kept_at(x: float) -> np.ndarray:  # x = 0: the level above every bucket; x = 1: level 0
        counts = np.array([kept_above_level(p, top * (1.0 - x)) for p in profiles], np.int64)
        return _bounded(counts, low_counts, high_counts)

    result = allocate_counts(kept_at, target, 0.0, 1.0)
    return CountAllocation(result.kept, top * (1.0 - result.parameter), result.budget_met)


def threshold_value(level: float) -> float:
    """|tau| at a magnitude level (bucket b's lower edge is the float32 with top bits b)."""
    bucket = min(int(level), MAGNITUDE_BUCKETS - 1)
    low = struct.unpack("<f", struct.pack("<I", bucket << 16))[0]
    high = struct.unpack("<f", struct.pack("<I", min(bucket + 1, 0x7F80) << 16))[0]
    return low + (high - low) * (level - bucket)
