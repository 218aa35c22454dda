"""TADrop maths: a score per task-vector tensor, and a drop ratio per tensor from the scores.

Pure functions, no I/O (spec: ../shared/TADROP.md, mirrored in the README):
1. `tensor_score` measures how concentrated one tensor's change is (higher = a few
   large entries, worth keeping).
2. `normalize_scores` maps one model's scores to [0, 1] across its tensors.
3. `adaptive_ratios` turns those into drop ratios around the host's ratio p, and
   shifts them so the element-weighted mean drop stays p (`preserve_budget`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

from .lazy import torch


Statistic = Literal["kurtosis", "hoyer", "cv", "gini", "topmass"]
Normalization = Literal["rank", "minmax"]
STATISTICS: tuple[str, ...] = ("kurtosis", "hoyer", "cv", "gini", "topmass")

# The score a statistic gives a tensor with no spread at all (every entry equal):
# the bottom of its range, i.e. "spread thinly", pruned hardest.
_FLAT_SCORE = {"kurtosis": -2.0, "hoyer": 0.0, "cv": 0.0, "gini": 0.0}


def _scaled(tau: torch.Tensor) -> torch.Tensor | None:
    """tau / max|tau| (None if all zero). The statistics are scale-free; scaling first
    keeps squares and fourth powers of tiny deltas from underflowing in float32."""
    flat = tau.reshape(-1)
    peak = float(flat.abs().max())
    return None if peak == 0 else flat / peak


def _sum(x: torch.Tensor) -> float:
    """A float32 sum: torch reduces float32 pairwise (cascaded), so its relative error stays
    near 1e-7 even over 1e8 entries, and it runs ~15x faster than a float64 accumulator."""
    return float(x.sum())


def _mean(x: torch.Tensor) -> float:
    return _sum(x) / x.numel()


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
    float64. Each slice is scaled by its own peak before squaring, so that squares of tiny
    deltas do not underflow in float32."""

    def __init__(self) -> None:
        self.numel, self.l1, self.l2_squared = 0, 0.0, 0.0

    def add(self, tau: torch.Tensor) -> None:
        magnitudes = tau.reshape(-1).abs()
        self.numel += magnitudes.numel()
        peak = float(magnitudes.max()) if magnitudes.numel() else 0.0
        if peak == 0:
            return
        self.l1 += _sum(magnitudes)
        self.l2_squared += _sum(magnitudes.div_(peak).square_()) * peak * peak

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
        return (root_n - self.l1 / math.sqrt(self.l2_squared)) / (root_n - 1)


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
    """Gini coefficient of |tau|: 0 when all equal, towards 1 when one entry holds all."""
    magnitudes = tau.abs().reshape(-1).sort().values
    n = magnitudes.numel()
    total = float(magnitudes.sum())
    if total == 0:
        return _FLAT_SCORE["gini"]
    ranks = torch.arange(1, n + 1, dtype=magnitudes.dtype, device=magnitudes.device)
    return float(((2 * ranks - n - 1) * magnitudes).sum()) / (n * total)


def top_mass(tau: torch.Tensor, fraction: float = 0.01) -> float:
    """Share of ||tau||_1 held by the largest `fraction` of entries (at least one)."""
    magnitudes = tau.abs().reshape(-1)
    total = float(magnitudes.sum())
    k = max(1, math.ceil(fraction * magnitudes.numel()))
    if total == 0:
        return k / magnitudes.numel()
    return float(magnitudes.topk(k, sorted=False).values.sum()) / total


def tensor_score(tau: torch.Tensor, statistic: Statistic, topmass_fraction: float = 0.01) -> float | None:
    """The concentration score of one task-vector tensor, or None if tau is all zeros."""
    if not bool(tau.any()):
        return None
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


def _clip(value: float, low: float, high: float) -> float:
    return min(high, max(low, value))


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
    raw = [p + g * (1.0 - 2.0 * s) for p, g, s in zip(base_ratios, strengths, normalized)]

    def ratios_for(shift: float) -> list[float]:
        return [_clip(r + shift, lo, hi) for r, lo, hi in zip(raw, lows, highs)]

    if not preserve_budget:
        return RatioResult(ratios_for(0.0), 0.0, True)

    total = float(sum(sizes))
    target = sum(n * p for n, p in zip(sizes, base_ratios)) / total

    def mean_drop(shift: float) -> float:
        return sum(n * r for n, r in zip(sizes, ratios_for(shift))) / total

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
