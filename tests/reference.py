"""Independent float64 numpy references for the golden tests.

Everything here is re-derived from the papers / mergekit semantics (see the
golden test modules' docstrings); nothing imports tadrop_cli. The random stream
is specified as SplitMix64 (numpy uint64 arithmetic here): output j of seed s is
mix(s + (j + 1) * 0x9E3779B97F4A7C15), and 32-bit word 2j / 2j+1 is its low / high half.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------- sparsifiers


def kept_count(n: int, density: float) -> int:
    """mergekit's magnitude trim count: int(density * n), at least 1 for density > 0 (a 2-entry
    bias at density 0.4 keeps one), clipped to [0, n]."""
    if density <= 0 or n == 0:
        return 0
    return max(1, min(n, int(density * n)))


def topk_keep_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest scores; among equal scores, the lowest flat index wins."""
    flat = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = flat.size
    # lexsort: last key is primary -> sort by -score, then by index (ascending).
    order = np.lexsort((np.arange(n), -flat))
    mask = np.zeros(n, dtype=bool)
    mask[order[: max(0, min(k, n))]] = True
    return mask.reshape(np.shape(scores))


def rescale(original: np.ndarray, kept: np.ndarray, density: float, how) -> np.ndarray:
    if how in (False, None, "none"):
        return kept
    if how in (True, "paper"):
        return kept / density if density > 0 else kept
    if how == "l1":
        before, after = np.abs(original).sum(), np.abs(kept).sum()
    elif how == "l2":
        before, after = np.sqrt((original**2).sum()), np.sqrt((kept**2).sum())
    elif how == "linf":
        before, after = np.abs(original).max(), np.abs(kept).max()
    else:
        raise ValueError(how)
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def magnitude(delta: np.ndarray, density: float, how=False) -> np.ndarray:
    delta = np.asarray(delta, dtype=np.float64)
    if density >= 1:
        return delta.copy()
    keep = topk_keep_mask(np.abs(delta), kept_count(delta.size, density))
    return rescale(delta, delta * keep, density, how)


def splitmix64_words(seed: int, n: int) -> np.ndarray:
    """The first n 32-bit words (uint32) of the random stream of `seed`."""
    j = np.arange(1, (n + 1) // 2 + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed % 2**64) + j * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z.astype("<u8").view("<u4")[:n]


def dare_uniform(shape, seed: int) -> np.ndarray:
    """The specified uniforms: the top 24 bits of each word times 2^-24 (float32)."""
    n = int(np.prod(shape))
    return ((splitmix64_words(seed, n) >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)).reshape(shape)


def dare_keep(shape, density: float, seed: int) -> np.ndarray:
    """DARE's keep mask: uniform < density, compared in float32."""
    return dare_uniform(shape, seed) < np.float32(density)


def random_drop(delta: np.ndarray, density: float, seed: int, how=True) -> np.ndarray:
    delta = np.asarray(delta, dtype=np.float64)
    if density >= 1:
        return delta.copy()
    keep = dare_keep(delta.shape, density, seed)
    return rescale(delta, delta * keep, density, how)


def breadcrumbs(delta: np.ndarray, density: float, gamma: float, how=False) -> np.ndarray:
    """Sort |delta| ascending; keep ranks [n_bottom, n - n_top)."""
    delta = np.asarray(delta, dtype=np.float64)
    if density >= 1:
        return delta.copy()
    n = delta.size
    n_keep = int(density * n)
    n_top = int(gamma * n)
    n_bottom = n - n_keep - n_top
    if n_bottom < 0:
        n_top += n_bottom
        n_bottom = 0
    order = np.argsort(np.abs(delta).reshape(-1), kind="stable")
    mask = np.zeros(n, dtype=bool)
    mask[order[n_bottom : n - n_top]] = True
    return rescale(delta, delta * mask.reshape(delta.shape), density, how)


def della_keep_probabilities(delta: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    """DELLA (mergekit's form): per row (dim 0; 1-D = one row; N-D flattened to shape[0] rows),
    rank |delta| ascending (stable: ties by position), keep with probability
    density - eps + 2 eps r/(n-1), eps = min(epsilon, density, 1 - density).
    Evaluated in float32 as r * (2 eps/(n-1)) + (density - eps): the specified arithmetic."""
    delta = np.asarray(delta, dtype=np.float64)
    eps = max(0.0, min(epsilon, density, 1.0 - density))
    rows = delta.reshape(1, -1) if delta.ndim < 2 else delta.reshape(delta.shape[0], -1)
    n = rows.shape[1]
    if n < 2 or eps == 0.0:
        return np.full(delta.shape, np.float32(density), dtype=np.float32)
    ranks = np.empty(rows.shape, dtype=np.int64)
    for i, row in enumerate(np.abs(rows)):
        ranks[i, np.argsort(row, kind="stable")] = np.arange(n)
    q = ranks.astype(np.float32) * np.float32(2 * eps / (n - 1)) + np.float32(density - eps)
    return q.astype(np.float32).reshape(delta.shape)


def della(delta: np.ndarray, density: float, epsilon: float, seed: int, how=True) -> np.ndarray:
    delta = np.asarray(delta, dtype=np.float64)
    if density >= 1:
        return delta.copy()
    if density <= 0:
        return np.zeros_like(delta)
    q = della_keep_probabilities(delta, density, epsilon)
    keep = dare_uniform(delta.shape, seed) < q
    if how in (True, "paper"):
        return np.divide(delta, q.astype(np.float64), out=np.zeros_like(delta), where=keep)
    return rescale(delta, delta * keep, density, how)


# ---------------------------------------------------------------- merge methods


@dataclass
class TV:
    delta: np.ndarray
    weight: float = 1.0
    density: float = 1.0
    seed: int = 0
    gamma: float = 0.01
    epsilon: float = 0.15
    tall_mask_lambda: float = 0.4


def sparsify(tv: TV, sparsifier: str | None, how) -> np.ndarray:
    d = np.asarray(tv.delta, dtype=np.float64)
    if sparsifier is None:
        return d.copy()
    if sparsifier == "magnitude":
        return magnitude(d, tv.density, how)
    if sparsifier == "random":
        return random_drop(d, tv.density, tv.seed, how)
    if sparsifier == "breadcrumbs":
        return breadcrumbs(d, tv.density, tv.gamma, how)
    if sparsifier == "della":
        return della(d, tv.density, tv.epsilon, tv.seed, how)
    raise ValueError(sparsifier)


def generalized_task_arithmetic(
    base, tvs: Sequence[TV], sparsifier, consensus: bool, normalize: bool, lam: float, how
) -> np.ndarray:
    base = np.asarray(base, dtype=np.float64)
    weights = np.array([tv.weight for tv in tvs], dtype=np.float64)
    weighted = np.stack([sparsify(tv, sparsifier, how) * tv.weight for tv in tvs])  # (m, ...)
    if consensus:
        total = weighted.sum(axis=0)
        majority = np.where(total >= 0, 1.0, -1.0)
        counts = (np.sign(weighted) == majority) & (weighted != 0)
        mixed = (weighted * counts).sum(axis=0)
        divisor = np.tensordot(weights, counts.astype(np.float64), axes=1)
        divisor = np.where(divisor == 0, 1.0, divisor)
    else:
        mixed = weighted.sum(axis=0)
        divisor = weights.sum()
        if abs(divisor) < 1e-8:
            divisor = 1.0
    if normalize:
        mixed = mixed / divisor
    mixed = mixed * lam
    return base + mixed


def linear(base, tvs: Sequence[TV], normalize: bool) -> np.ndarray:
    base = np.asarray(base, dtype=np.float64)
    total = sum(tv.weight for tv in tvs)
    merged = sum(tv.weight * (base + np.asarray(tv.delta, dtype=np.float64)) for tv in tvs)
    if normalize:
        merged = merged / total
    return merged


# (sparsifier, TIES consensus, default normalize, default rescale) per method, from the papers/mergekit.
GTA_METHODS = {
    "task_arithmetic": (None, False, False, False),
    "magnitude_prune": ("magnitude", False, False, False),
    "ties": ("magnitude", True, True, False),
    "dare_linear": ("random", False, False, True),
    "dare_ties": ("random", True, False, True),
    "breadcrumbs": ("breadcrumbs", False, False, False),
    "breadcrumbs_ties": ("breadcrumbs", True, False, False),
    "della": ("della", True, True, True),
    "della_linear": ("della", False, False, True),
}


def _gta_ref(name):
    sparsifier, consensus, default_normalize, default_rescale = GTA_METHODS[name]

    def ref(base, tvs, normalize=None, lam=1.0, how=None):
        normalize = default_normalize if normalize is None else normalize
        how = default_rescale if how is None else how
        return generalized_task_arithmetic(base, tvs, sparsifier, consensus, normalize, lam, how)

    return ref


def _linear_ref(base, tvs, normalize=None, lam=1.0, how=None):
    return linear(base, tvs, True if normalize is None else normalize)


# ---------------------------------------------------------------- SVD-based methods (TSV-M, Iso-C, Iso-CTS)
#
# Re-derived from the papers, in float64. The Procrustes / polar factor is computed another
# way than in tadrop (through the eigendecomposition of the Gram matrix, M (M^T M)^(-1/2),
# not an SVD of M), so a wrong factor would not agree by construction.


def rank_count(budget: int, density: float) -> int:
    """floor(density * budget) with a 1e-9 tolerance (so 1/T * budget counts budget/T), clipped."""
    return max(0, min(budget, math.floor(density * budget + 1e-9)))


def split_budget(budget: int, densities) -> list[int]:
    ranks = [rank_count(budget, d) for d in densities]
    total = sum(ranks)
    return [k * budget // total for k in ranks] if total > budget else ranks


def polar(matrix: np.ndarray) -> np.ndarray:
    """The orthogonal (Procrustes) factor of a full-rank matrix: M (M^T M)^(-1/2) for a tall M,
    its transpose's for a wide one."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape[0] < m.shape[1]:
        return polar(m.T).T
    values, vectors = np.linalg.eigh(m.T @ m)
    return m @ (vectors / np.sqrt(values)) @ vectors.T


EPS32 = float(np.finfo(np.float32).eps)


def null_tolerance(matrix) -> float:
    """Singular values <= eps32 * max(m, n) * |M|_F are numerically zero: not kept as directions."""
    m = np.asarray(matrix, dtype=np.float64)
    return float(np.sqrt((m * m).sum())) * max(m.shape) * EPS32


def top_triplets(matrix: np.ndarray, k: int, tolerance: float = 0.0):
    u, s, vt = np.linalg.svd(np.asarray(matrix, dtype=np.float64), full_matrices=False)
    k = min(k, int((s > tolerance).sum()))
    return u[:, :k], s[:k], vt[:k, :]


def tsv_m_matrix(deltas, densities) -> np.ndarray:
    """TSV-M: per task the top k_t triplets; U_perp = polar([U_1..U_T]), V_perp likewise;
    merged = U_perp diag([S_1..S_T]) V_perp^T."""
    r = min(deltas[0].shape)
    parts = [
        top_triplets(d, k, null_tolerance(d)) for d, k in zip(deltas, split_budget(r, densities), strict=True) if k > 0
    ]
    if sum(p[1].size for p in parts) == 0:
        return np.zeros_like(deltas[0])
    u = np.concatenate([p[0] for p in parts], axis=1)
    s = np.concatenate([p[1] for p in parts])
    v = np.concatenate([p[2].T for p in parts], axis=1)
    return polar(u) @ np.diag(s) @ polar(v).T


def iso_c_matrix(deltas) -> np.ndarray:
    """Iso-C: mean singular value of the sum times its orthogonal factor: (sum_i sigma_i / r) polar(sum).
    A rank-deficient sum: its numerically null directions are left out (U_k V_k^T)."""
    total = np.sum(deltas, axis=0)
    sigma = np.linalg.svd(total, compute_uv=False)
    rank = int((sigma > null_tolerance(total)).sum())
    if rank < min(total.shape):
        u, _, vt = top_triplets(total, rank)
        return sigma.mean() * u @ vt
    return sigma.mean() * polar(total)


def iso_cts_matrix(deltas, densities, fraction: float = 0.8) -> np.ndarray:
    """Iso-CTS as the authors' code sizes it: common = int(r f), task-specific budget
    B = round((r - common)/T) T, common = r - B; tasks' directions from (I - U_c U_c^T) tau_t."""
    total = np.sum(deltas, axis=0)
    r, tasks = min(total.shape), len(deltas)
    common = int(r * fraction)
    budget = max(0, min(r, round((r - common) / tasks) * tasks))
    common = r - budget
    uc, sc, vtc = top_triplets(total, common, null_tolerance(total))
    us, ss, vs = [uc], [sc], [vtc.T]
    asked = common  # the flat level: kept singular values over the directions asked for
    for d, k in zip(deltas, split_budget(budget, densities), strict=True):
        if k > 0:
            u, s, vt = top_triplets(d - uc @ (uc.T @ d), k, null_tolerance(d))
            us.append(u), ss.append(s), vs.append(vt.T)
            asked += k
    s = np.concatenate(ss)
    if s.size == 0:  # no direction kept (a rank-1 matrix whose one direction no task was given)
        return np.zeros_like(total)
    return s.sum() / asked * polar(np.concatenate(us, axis=1)) @ polar(np.concatenate(vs, axis=1)).T


SUBSPACE_MATRIX = {"tsv_m": tsv_m_matrix, "iso_c": iso_c_matrix, "iso_cts": iso_cts_matrix}


def subspace_method(
    name: str, base, tvs: Sequence[TV], lam: float = 1.0, common_space_fraction: float = 0.8
) -> np.ndarray:
    """base + lam * merged; the task matrices are the weighted task vectors; non-2-D tensors: their mean."""
    base = np.asarray(base, dtype=np.float64)
    deltas = [np.asarray(tv.delta, dtype=np.float64) * tv.weight for tv in tvs]
    if base.ndim != 2:
        merged = np.mean(deltas, axis=0)
    elif name == "iso_c":
        merged = iso_c_matrix(deltas)
    elif name == "iso_cts":
        merged = iso_cts_matrix(deltas, [tv.density for tv in tvs], common_space_fraction)
    else:
        merged = tsv_m_matrix(deltas, [tv.density for tv in tvs])
    return base + lam * merged


# ---------------------------------------------------------------- consensus merging (TALL masks)


def consensus(base, tvs: Sequence[TV], ties: bool, normalize: bool, k: float = 2, lam: float = 1.0) -> np.ndarray:
    """tau_MTL = task arithmetic of the magnitude-trimmed weighted task vectors (or TIES with
    disjoint sum / mean); mask_t = |w_t tau_t| >= lambda_t |tau_MTL - w_t tau_t| with the
    untrimmed tau_t; keep tau_MTL where sum_t mask_t >= k; base + lam * kept."""
    base = np.asarray(base, dtype=np.float64)
    full = [np.asarray(tv.delta, dtype=np.float64) * tv.weight for tv in tvs]
    trimmed = [magnitude(tv.delta, tv.density) * tv.weight for tv in tvs]
    if ties:
        mtl = generalized_task_arithmetic(
            np.zeros_like(base), [TV(t, 1.0) for t in trimmed], None, True, False, 1.0, False
        )
        if normalize:  # disjoint mean: divide by the agreeing models' weights
            majority = np.where(np.sum(trimmed, axis=0) >= 0, 1.0, -1.0)
            divisor = sum(tv.weight * ((np.sign(t) == majority) & (t != 0)) for tv, t in zip(tvs, trimmed, strict=True))
            mtl = mtl / np.where(divisor == 0, 1.0, divisor)
    else:
        mtl = np.sum(trimmed, axis=0)
        if normalize:
            total = sum(tv.weight for tv in tvs)
            mtl = mtl / (total if abs(total) >= 1e-8 else 1.0)
    votes = sum(
        (np.abs(f) >= tv.tall_mask_lambda * np.abs(mtl - f)).astype(np.int64) for tv, f in zip(tvs, full, strict=True)
    )
    return base + lam * mtl * (votes >= k)


def _subspace_ref(name):
    def ref(base, tvs, normalize=None, lam=1.0, how=None, common_space_fraction=0.8):
        return subspace_method(name, base, tvs, lam, common_space_fraction)

    return ref


def _consensus_ref(ties):
    def ref(base, tvs, normalize=None, lam=1.0, how=None, k=2):
        return consensus(base, tvs, ties, False if normalize is None else normalize, k, lam)

    return ref


def passthrough(base, tvs: Sequence[TV]) -> np.ndarray:
    """mergekit's passthrough: its one input's tensor, times `scale` (TV.weight)."""
    (tv,) = tvs
    return (np.asarray(base, dtype=np.float64) + np.asarray(tv.delta, dtype=np.float64)) * tv.weight


def _passthrough_ref(base, tvs, normalize=None, lam=1.0, how=None):
    return passthrough(base, tvs)


REFERENCES = {
    "passthrough": _passthrough_ref,
    "linear": _linear_ref,
    **{name: _gta_ref(name) for name in GTA_METHODS},
    **{name: _subspace_ref(name) for name in SUBSPACE_MATRIX},
    "consensus_ta": _consensus_ref(False),
    "consensus_ties": _consensus_ref(True),
}
DEFAULT_NORMALIZE = {
    "passthrough": None,  # no such parameter
    "linear": True,
    **{k: v[2] for k, v in GTA_METHODS.items()},
    "tsv_m": None,
    "iso_c": None,
    "iso_cts": None,  # no such parameter
    "consensus_ta": False,
    "consensus_ties": False,  # the authors' task arithmetic sum and TIES disjoint sum
}
DEFAULT_RESCALE = {k: v[3] for k, v in GTA_METHODS.items()}
SPARSIFIER = {
    "passthrough": None,
    "linear": None,
    **{k: v[0] for k, v in GTA_METHODS.items()},
    "tsv_m": "rank",
    "iso_c": None,
    "iso_cts": "rank",
    "consensus_ta": "magnitude",
    "consensus_ties": "magnitude",
}


# ---------------------------------------------------------------- TADrop statistics


def _values(tau) -> np.ndarray:
    return np.asarray(tau, dtype=np.float64).reshape(-1)


def excess_kurtosis(tau) -> float:
    x = _values(tau)
    if np.all(x == x[0]):
        return -2.0
    c = x - x.mean()
    m2 = np.mean(c**2)
    m4 = np.mean(c**4)
    return float(m4 / m2**2 - 3.0)


def hoyer(tau) -> float:
    x = _values(tau)
    n = x.size
    l2 = math.sqrt(float(np.sum(x * x)))
    if n < 2 or l2 == 0:
        return 0.0
    l1 = float(np.sum(np.abs(x)))
    return (math.sqrt(n) - l1 / l2) / (math.sqrt(n) - 1)


def cv(tau) -> float:
    a = np.abs(_values(tau))
    mean = a.mean()
    if mean == 0:
        return 0.0
    return float(np.sqrt(np.mean((a - mean) ** 2)) / mean)


def gini(tau) -> float:
    a = np.sort(np.abs(_values(tau)))
    n = a.size
    total = a.sum()
    if total == 0:
        return 0.0
    i = np.arange(1, n + 1, dtype=np.float64)
    return float(np.sum((2 * i - n - 1) * a) / (n * total))


def topmass(tau, fraction: float = 0.01) -> float:
    a = np.sort(np.abs(_values(tau)))[::-1]
    k = max(1, math.ceil(fraction * a.size))
    return float(a[:k].sum() / a.sum())


STATISTICS = {"kurtosis": excess_kurtosis, "hoyer": hoyer, "cv": cv, "gini": gini, "topmass": topmass}


def score(tau, statistic: str, fraction: float = 0.01) -> float | None:
    if not np.any(_values(tau) != 0):
        return None
    if statistic == "topmass":
        return topmass(tau, fraction)
    return STATISTICS[statistic](tau)


# ---------------------------------------------------------------- normalisation and ratios


def normalize_rank(scores: Sequence[float]) -> list[float]:
    x = np.asarray(scores, dtype=np.float64)
    m = x.size
    if m == 1:
        return [0.5]
    # average 0-based rank: (# strictly smaller) + (# equal - 1) / 2
    less = (x[None, :] < x[:, None]).sum(axis=1)
    equal = (x[None, :] == x[:, None]).sum(axis=1)
    return list((less + (equal - 1) / 2) / (m - 1))


def normalize_minmax(scores: Sequence[float]) -> list[float]:
    x = np.asarray(scores, dtype=np.float64)
    if x.size == 1 or x.max() == x.min():
        return [0.5] * x.size
    return list((x - x.min()) / (x.max() - x.min()))


def _broadcast(value, count):
    arr = np.asarray(value, dtype=np.float64)
    return np.full(count, float(arr)) if arr.ndim == 0 else arr.copy()


@dataclass
class Ratios:
    ratios: np.ndarray
    reachable: bool
    shift: float


def adaptive_ratios(
    normalized, base_ratios, sizes, strength, min_ratio=0.0, max_ratio=0.99, preserve_budget=True
) -> Ratios:
    """clip(p_t0 + g_t (1 - 2 s_t) + shift, lo_t, hi_t); with the budget, `shift` solves
    sum n_t ratio_t(shift) = sum n_t p_t0 exactly (piecewise-linear, via sorted breakpoints)."""
    s = np.asarray(normalized, dtype=np.float64)
    count = s.size
    p0 = np.asarray(base_ratios, dtype=np.float64)
    n = np.asarray(sizes, dtype=np.float64)
    g, lo, hi = _broadcast(strength, count), _broadcast(min_ratio, count), _broadcast(max_ratio, count)
    raw = p0 + g * (1 - 2 * s)

    def ratios(shift):
        return np.clip(raw + shift, lo, hi)

    if not preserve_budget:
        return Ratios(ratios(0.0), True, 0.0)

    target = float(np.dot(n, p0))

    def f(shift):
        return float(np.dot(n, ratios(shift)))

    floor, ceiling = float(np.dot(n, lo)), float(np.dot(n, hi))
    scale = max(1.0, float(n.sum()))
    if target < floor - 1e-12 * scale:
        return Ratios(lo.copy(), False, -math.inf)
    if target > ceiling + 1e-12 * scale:
        return Ratios(hi.copy(), False, math.inf)
    breaks = np.unique(np.concatenate([lo - raw, hi - raw]))
    values = np.array([f(b) for b in breaks])
    j = int(np.searchsorted(values, target, side="left"))  # first breakpoint with f >= target
    if j == 0:
        shift = float(breaks[0])
    elif j >= breaks.size:
        shift = float(breaks[-1])
    else:
        b0, b1, f0, f1 = breaks[j - 1], breaks[j], values[j - 1], values[j]
        shift = float(b0 + (target - f0) * (b1 - b0) / (f1 - f0))
    return Ratios(ratios(shift), True, shift)


# ---------------------------------------------------------------- TADrop allocations (issue 17), by sorting every entry
#
# tadrop finds these from per-tensor magnitude histograms and a bisection; here every entry is
# sorted, and the budget is met by taking entries one at a time in the order they are needed.


def mass_allocation_counts(taus, target: int, q: int = 1) -> list[int]:
    """`allocation: mass` without bounds: tensor t keeps the fewest largest |tau| holding a common
    share f of its sum |tau|^q. Entry k+1 of t is needed once f exceeds c_t[k], the share held by
    t's k largest entries; so the allocation is the `target` smallest pairs (c_t[k], t), ties to
    the lower tensor index."""
    pairs = []
    for t, tau in enumerate(taus):
        powered = np.sort(np.abs(np.asarray(tau, dtype=np.float64)).ravel())[::-1] ** q
        shares = np.concatenate([[0.0], np.cumsum(powered)[:-1]]) / powered.sum()
        pairs.extend((float(c), t) for c in shares)
    pairs.sort()
    counts = [0] * len(taus)
    for _, t in pairs[:target]:
        counts[t] += 1
    return counts


def mass_boundary_is_tied(taus, target: int, q: int = 1) -> bool:
    """Whether the target-th and next share above are equal (the split would then be a tie-break)."""
    shares = []
    for tau in taus:
        powered = np.sort(np.abs(np.asarray(tau, dtype=np.float64)).ravel())[::-1] ** q
        shares.extend(np.concatenate([[0.0], np.cumsum(powered)[:-1]]) / powered.sum())
    shares.sort()
    return 0 < target < len(shares) and shares[target - 1] == shares[target]


def global_trim_counts(taus, target: int) -> list[int]:
    """`allocation: global`: the `target` largest |tau| over all tensors together (one threshold
    over the model's whole task vector), counted per tensor."""
    owners = np.concatenate([np.full(np.asarray(tau).size, t) for t, tau in enumerate(taus)])
    magnitudes = np.concatenate([np.abs(np.asarray(tau, dtype=np.float64)).ravel() for tau in taus])
    order = np.argsort(-magnitudes, kind="stable")
    return [int(c) for c in np.bincount(owners[order[:target]], minlength=len(taus))]


def mass_reverse_counts(taus, uniform: Sequence[int], q: int = 1) -> list[int]:
    """`allocation: mass_reverse` where no bound binds: 2 u_t - m_t, the mass allocation's counts
    m_t (at the same budget) mirrored about the uniform counts u_t."""
    mass = mass_allocation_counts(taus, int(sum(uniform)), q)
    return [2 * u - m for u, m in zip(uniform, mass, strict=True)]


LAYER_WORDS = ("layers", "h", "blocks", "block", "layer")


def _layer_index(parts: list[str]) -> int | None:
    """The index of the first part that names a stack of numbered layers (followed by a number and more)."""
    for i in range(len(parts) - 2):
        if parts[i] in LAYER_WORDS and parts[i + 1].isdigit():
            return i
    return None


def tensor_kind(name: str) -> str:
    """A tensor's kind: its name with the (first) layer number after layers/h/blocks/block/layer as {}."""
    parts = name.split(".")
    i = _layer_index(parts)
    return name if i is None else ".".join(parts[: i + 1] + ["{}"] + parts[i + 2 :])


def tensor_layer(name: str) -> int | None:
    parts = name.split(".")
    i = _layer_index(parts)
    return None if i is None else int(parts[i + 1])


def layer_group(name: str) -> str:
    """TADrop's `scope: layer` group: the layer's own module path, its stack's name with its number
    (encoder.block.3 and decoder.block.3 are two layers), or "no layer"."""
    parts = name.split(".")
    i = _layer_index(parts)
    return "no layer" if i is None else ".".join(parts[: i + 2])


# ---------------------------------------------------------------- Model Stock, SCE, Arcee Fusion (issue 13)
#
# Re-derived in float64 from the papers (Model Stock: arXiv 2403.19522 eq. 3; SCE: arXiv 2408.07990)
# and mergekit 0.1.5's arcee_fusion; the deliberate differences from mergekit are in docs/mergekit.md.


def _stock_rows(a: np.ndarray, filter_wise: bool) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if not filter_wise or a.ndim < 2:
        return a.reshape(1, -1)
    return a.reshape(-1, a.shape[-1])


def model_stock(base, tvs: Sequence[TV], filter_wise: bool = False) -> np.ndarray:
    """w0 + t mean(tau), t = N c / (1 + (N - 1) c), c the mean pairwise cosine per row (0 for a zero
    vector); t = 0 where |1 + (N - 1) c| < 1e-6; fewer than two models: the base."""
    base = np.asarray(base, dtype=np.float64)
    if len(tvs) < 2:
        return base.copy()
    rows = [_stock_rows(tv.delta, filter_wise) for tv in tvs]
    cosines = []
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            norms = np.linalg.norm(rows[i], axis=-1) * np.linalg.norm(rows[j], axis=-1)
            dots = np.einsum("rk,rk->r", rows[i], rows[j])
            cosines.append(np.clip(np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0), -1, 1))
    c = np.mean(cosines, axis=0)
    n = len(rows)
    denominator = 1 + (n - 1) * c
    t = np.where(np.abs(denominator) < 1e-6, 0.0, n * c / np.where(np.abs(denominator) < 1e-6, 1.0, denominator))
    mean = np.mean(rows, axis=0)
    return base + (t[:, None] * mean).reshape(base.shape)


def sce(base, tvs: Sequence[TV], normalize: bool = True) -> np.ndarray:
    """Select the k = int(fraction * nnz(var)) entries of largest population variance across the task
    vectors (fraction: the mean of the models' densities); eta_i = sum tau_i^2 / sum_j sum tau_j^2
    (1/N when all zero); keep entries whose sign equals that of the sum (>= 0: +1); merged = base +
    sum eta_i keep_i tau_i / max(sum eta_i keep_i, 1e-6) (1 without normalize)."""
    base = np.asarray(base, dtype=np.float64)
    if not tvs:
        return base.copy()
    taus = np.stack([np.asarray(tv.delta, dtype=np.float64) for tv in tvs])
    fraction = sum(tv.density for tv in tvs) / len(tvs)
    if fraction <= 0:
        taus = taus * 0
    elif fraction < 1:
        variance = taus.var(axis=0)
        k = int(np.count_nonzero(variance) * fraction)
        taus = taus * topk_keep_mask(variance, k)
    squares = (taus**2).reshape(len(tvs), -1).sum(axis=1)
    eta = squares / squares.sum() if squares.sum() > 0 else np.full(len(tvs), 1.0 / len(tvs))
    majority = np.where(taus.sum(axis=0) >= 0, 1.0, -1.0)
    keep = (np.sign(taus) == majority).astype(np.float64)
    weights = eta.reshape((-1,) + (1,) * base.ndim) * keep
    merged = (weights * taus).sum(axis=0)
    if normalize:
        merged = merged / np.maximum(weights.sum(axis=0), 1e-6)
    return base + merged


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def arcee_fusion(base, tv: TV) -> np.ndarray:
    """importance = |tau| KL(softmax(base + tau) + 1e-8 || softmax(base) + 1e-8) per row (last axis);
    keep where importance >= median + 1.5 (q3 - q1), each quantile the sorted importance at
    floor(q (n - 1)); base + tau * keep."""
    base = np.asarray(base, dtype=np.float64)
    tau = np.asarray(tv.delta, dtype=np.float64)
    importance, threshold = arcee_fusion_scores(base, tau)
    return base + tau * (importance >= threshold)


def arcee_fusion_scores(base, tau) -> tuple[np.ndarray, float]:
    """(importance per entry, threshold) of arcee_fusion."""
    base, tau = np.asarray(base, dtype=np.float64), np.asarray(tau, dtype=np.float64)
    p = _softmax(base + tau) + 1e-8
    q = _softmax(base) + 1e-8
    importance = np.abs(tau) * (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    ordered = np.sort(importance.reshape(-1))
    q1, median, q3 = (ordered[math.floor(f * (ordered.size - 1))] for f in (0.25, 0.5, 0.75))
    return importance, median + 1.5 * (q3 - q1)


def _model_stock_ref(base, tvs, normalize=None, lam=1.0, how=None, filter_wise=False):
    return model_stock(base, tvs, filter_wise)


def _sce_ref(base, tvs, normalize=None, lam=1.0, how=None):
    return sce(base, tvs, True if normalize is None else normalize)


def _arcee_fusion_ref(base, tvs, normalize=None, lam=1.0, how=None):
    (tv,) = tvs
    return arcee_fusion(base, tv)


REFERENCES.update(model_stock=_model_stock_ref, sce=_sce_ref, arcee_fusion=_arcee_fusion_ref)
DEFAULT_NORMALIZE.update(model_stock=None, sce=True, arcee_fusion=None)
SPARSIFIER.update(model_stock=None, sce="variance", arcee_fusion=None)
MODEL_COUNT = {"arcee_fusion": 1}  # methods that merge a fixed number of models into the base


# ---------------------------------------------------------------- interpolation methods (mergekit 0.1.5's definitions)


def _unit(x: np.ndarray, floor: float = 0.0) -> np.ndarray:
    return x / max(float(np.linalg.norm(x)), floor)


def slerp(t: float, v0, v1, dot_threshold: float = 0.9995, eps: float = 1e-8) -> np.ndarray:
    """Shoemake's slerp of the flattened tensors; linear where |cos theta| > dot_threshold; a norm
    at or below eps is taken as 1."""
    a, b = np.asarray(v0, np.float64), np.asarray(v1, np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cos = float(np.clip(np.sum((a / (na if na > eps else 1.0)) * (b / (nb if nb > eps else 1.0))), -1, 1))
    if abs(cos) > dot_threshold:
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def _nuslerp_vectors(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = float(np.clip(np.dot(_unit(a, 1e-7), _unit(b, 1e-7)), -1, 1))
    if 1 - cos * cos <= 1e-16:
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def nuslerp(base, tensors, weights, flatten: bool = True, row_wise: bool = False) -> np.ndarray:
    """mergekit's nuslerp: t = w1 / (w0 + w1) (0.5 if ~0); with a base, base + nuslerp of the task
    vectors; vectors: the whole tensor, each row (last dim), or with row_wise each column (dim 0)."""
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    x0, x1 = (np.asarray(x, np.float64) for x in tensors)
    if base is not None:
        x0, x1 = x0 - base, x1 - base
    if flatten or x0.ndim == 1:
        out = _nuslerp_vectors(t, x0.reshape(-1), x1.reshape(-1)).reshape(x0.shape)
    else:
        a, b = (np.moveaxis(x, 0, -1) if row_wise else x for x in (x0, x1))
        rows = [
            _nuslerp_vectors(t, p, q)
            for p, q in zip(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), strict=True)
        ]
        out = np.array(rows).reshape(a.shape)
        out = np.moveaxis(out, -1, 0) if row_wise else out
    return out if base is None else out + base


def multislerp(base, tensors, weights, normalize_weights: bool = True, eps: float = 1e-8) -> np.ndarray:
    """Barycentric interpolation on the sphere: project the unit tensors to the tangent space at their
    normalised weighted mean, average there, map back with the exponential map, rescale to the
    weighted mean norm; with a base, of the task vectors."""
    xs = [np.asarray(x, np.float64).reshape(-1) for x in tensors]
    if len(xs) == 1:
        return np.asarray(tensors[0], np.float64)
    shape = np.shape(tensors[0])
    if base is not None:
        xs = [x - np.asarray(base, np.float64).reshape(-1) for x in xs]
    w = np.asarray(weights, np.float64)
    if normalize_weights:
        w = w / w.sum()
    norms = np.array([np.linalg.norm(x) for x in xs])
    units = [x / (n + eps) for x, n in zip(xs, norms, strict=True)]
    mean = sum(wi * u for wi, u in zip(w, units, strict=True))
    if np.linalg.norm(mean) < eps:
        assert len(xs) == 2
        out = (w[0] * xs[0] + w[1] * xs[1]).reshape(shape)
    else:
        m = mean / np.linalg.norm(mean)
        tangent = sum(wi * (u - np.dot(u, m) * m) for wi, u in zip(w, units, strict=True))
        length = np.linalg.norm(tangent) + eps
        on_sphere = math.cos(length) * m + math.sin(length) / length * tangent
        out = (on_sphere * float(np.dot(norms, w))).reshape(shape)
    return out if base is None else out + np.asarray(base, np.float64)


def karcher(tensors, max_iter: int = 10, tol: float = 1e-5) -> np.ndarray:
    """Weighted (1/N) Karcher mean on the unit sphere by Riemannian gradient steps: m <- exp_m(sum a_i
    log_m(u_i)), with log_m(u) = theta / sin theta (u - cos theta m) (0 below tol) and
    exp_m(v) = cos|v| m + sin|v| v / |v|; tensors with norm <= tol are left out; scaled by mean norm."""
    xs = [np.asarray(x, np.float64) for x in tensors]
    if len(xs) == 1:
        return xs[0]
    norms = [float(np.linalg.norm(x)) for x in xs]
    kept = [i for i, n in enumerate(norms) if n > tol]
    if not kept:
        return np.zeros_like(xs[0])
    units = [xs[i].reshape(-1) / norms[i] for i in kept]
    a = [1.0 / len(kept)] * len(kept)

    def log_map(m, u):
        cos = float(np.clip(np.dot(m, u), -1, 1))
        theta = math.acos(cos)
        return np.zeros_like(m) if theta < tol else theta / math.sin(theta) * (u - cos * m)

    m = sum(ai * u for ai, u in zip(a, units, strict=True))
    m = units[0].copy() if np.linalg.norm(m) < tol else m / np.linalg.norm(m)
    for _ in range(max_iter):
        v = sum(ai * log_map(m, u) for ai, u in zip(a, units, strict=True))
        length = float(np.linalg.norm(v))
        if length < tol:
            break
        m = math.cos(length) * m + math.sin(length) * v / length
        if np.linalg.norm(m) > tol:
            m = m / np.linalg.norm(m)
    return (sum(norms) / len(xs) * m).reshape(xs[0].shape)


def nearswap(t: float, base, other) -> np.ndarray:
    """Per entry: w = clip(t / max(|base - other|, 1e-6), 0, 1); w other + (1 - w) base."""
    a, b = np.asarray(base, np.float64), np.asarray(other, np.float64)
    w = np.clip(t / np.maximum(np.abs(a - b), 1e-6), 0, 1)
    return w * b + (1 - w) * a


INTERPOLATION_REFERENCES = {
    "slerp": slerp,
    "nuslerp": nuslerp,
    "multislerp": multislerp,
    "karcher": karcher,
    "nearswap": nearswap,
}
DEFAULT_NORMALIZE.update(dict.fromkeys(INTERPOLATION_REFERENCES))  # no normalize parameter
SPARSIFIER.update(dict.fromkeys(INTERPOLATION_REFERENCES))  # no drop: TADrop is refused


# ---------------------------------------------------------------- LoRA adapters


def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """PEFT's LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_merged(base, a, b, scale: float, transposed: bool = False) -> np.ndarray:
    """W + scale * B @ A in float64, A and B as (rank, ...) and (out, rank, ...) matrices (conv
    kernels flattened); (B @ A)^T for fan_in_fan_out layers and embeddings."""
    base = np.asarray(base, dtype=np.float64)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    delta = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
    if transposed:
        delta = delta.T
    return base + scale * delta.reshape(base.shape)


def dora_merged(merged, magnitude, by_columns: bool = False) -> np.ndarray:
    """DoRA: W' = m / ||W + delta||_2 * (W + delta) in float64, the norm over each output's weights
    (a row of the (out, in) matrix; a column of the stored matrix for fan_in_fan_out and embeddings)."""
    merged, magnitude = np.asarray(merged, dtype=np.float64), np.asarray(magnitude, dtype=np.float64).reshape(-1)
    if by_columns:
        return merged * (magnitude / np.sqrt((merged**2).sum(axis=0)))[None, :]
    return merged * (magnitude / np.sqrt((merged**2).sum(axis=1)))[:, None]


# ---------------------------------------------------------------- tokenizer merge


def aligned_vocabulary_rows(
    output: dict[str, int],
    rows: int,
    models: Sequence[tuple[dict[str, int], int, np.ndarray]],
    base: int | None,
    rules: dict[str, dict] | None = None,
) -> list[np.ndarray]:
    """mergekit's PermutedVocabulary, token by token in float64: each model (its tokenizer's token -> id,
    its vocab_size, its tensor with the token axis first) re-indexed to the `output` vocabulary.

    A model that has a token (at an id below its vocab_size) keeps its own row, unless the token is
    forced. Every other model gets the token's default: the rule's source ("model", m): m's row for the
    token; ("row", m, r): m's row r; ("zero",): zeros; without a rule: the only model that has it, zeros
    if none, the base's row if the base has it, else the mean over the models that have it. Rows past
    the vocabulary: the mean of the model's aligned rows."""
    rules = rules or {}
    n = len(output)
    shape = np.asarray(models[0][2]).shape[1:]
    out = [np.zeros((rows, *shape)) for _ in models]
    for token, i in output.items():
        own = {
            m: np.asarray(tensor, dtype=np.float64)[vocab[token]]
            for m, (vocab, size, tensor) in enumerate(models)
            if token in vocab and vocab[token] < size
        }
        rule = rules.get(token, {})
        forced = rule.get("force", False)
        source = rule.get("source")
        if source is not None:
            if source[0] == "model":
                default = own[source[1]]
            elif source[0] == "row":
                default = np.asarray(models[source[1]][2], dtype=np.float64)[source[2]]
            else:
                default = np.zeros(shape)
        elif len(own) == 1:
            default = next(iter(own.values()))
        elif not own:
            default = np.zeros(shape)
        elif base is not None and base in own:
            default = own[base]
        else:
            default = sum(own.values()) / len(own)
        for m in range(len(models)):
            out[m][i] = own[m] if m in own and not forced else default
    for m in range(len(models)):
        out[m][n:] = out[m][:n].mean(axis=0)
    return out
