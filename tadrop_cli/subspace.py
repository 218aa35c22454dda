"""SVD-based merges of one 2-D tensor: TSV-M, Iso-C and Iso-CTS (tensors in, tensor out).

Every function takes the (already weighted) task matrices of one tensor and returns
the merged task matrix in float32, before the scale `lambda` and the base are applied.
Nothing here reads files or knows about models; it runs on whatever device the
tensors are on.

Two routes to the same maths (the recipe parameter `exact_svd` picks one):
- exact: full float32 SVDs (torch.linalg.svd) of every task matrix and of the concatenated
  bases, as the papers' code does;
- fast: only what the maths needs. A task's top k directions by seeded randomized subspace
  iteration, stopped when its residual says the kept subspace is converged to float32 level
  (else, or where k is a large share of the rank, by the eigendecomposition of the float64
  Gram matrix: exact); the Procrustes factor M (M^T M)^(-1/2) from the float64 Gram of M's
  smaller side; Iso-CTS's left factor block by block (its task directions are orthogonal to
  the common ones by construction). Its products and eigendecompositions are dense_linalg's
  (numpy/scipy's OpenBLAS where the process computes on one CPU core, PyTorch otherwise).
Both scale the task matrices by a power of two first, so that norms and Gram matrices of
large entries cannot overflow (a power of two scales exactly).

The rank budgets are fractions ("densities") so that TADrop can set them per
(model, tensor): a task keeps k_t = rank_count(budget, density_t) singular triplets.

Papers:
- TSV-M: Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model
  Merging", CVPR 2025, arXiv 2412.00081.
- Iso-C / Iso-CTS: Marczak et al., "No Task Left Behind: Isotropic Model Merging with
  Common and Task-Specific Subspaces", ICML 2025, arXiv 2502.04959.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .dense_linalg import eigh_descending, gram64, matmul, times64
from .lazy import torch

_TOLERANCE = 1e-9  # density * n is a float: 1/3 * 3 must count as 1, not 0.999...
_EPS32 = 2.0**-23  # torch.finfo(torch.float32).eps


def null_tolerance(matrix: torch.Tensor) -> float:
    """Singular values at or below this are numerically zero: eps(float32) * max(m, n) * |M|_F
    (numpy's matrix_rank rule, with the Frobenius norm as the scale). Their singular vectors
    are arbitrary (rounding decides them), so no method keeps them as directions."""
    return float(torch.linalg.matrix_norm(matrix)) * max(matrix.shape) * _EPS32


def rank_count(budget: int, density: float) -> int:
    """How many singular directions a share `density` of `budget` is: floor(density * budget),
    clipped to [0, budget] (with a 1e-9 tolerance, so that density 1/T gives budget/T exactly)."""
    return max(0, min(budget, math.floor(density * budget + _TOLERANCE)))


def split_budget(budget: int, densities: Sequence[float]) -> list[int]:
    """Each task's number of directions; if they add up to more than `budget`, each is scaled
    down in proportion (k_t * budget // sum k), so the total never exceeds it."""
    ranks = [rank_count(budget, d) for d in densities]
    total = sum(ranks)
    if total > budget:
        ranks = [k * budget // total for k in ranks]
    return ranks


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.linalg.svd(matrix, full_matrices=False). LAPACK's float32 divide-and-conquer SVD
    can fail to converge on an ill-conditioned matrix ("linalg.svd: The algorithm failed to
    converge"), which would end a whole merge: there the same SVD is taken in float64 (which
    converges where float32 does not) and rounded back, once."""
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        return u.to(matrix.dtype), s.to(matrix.dtype), vh.to(matrix.dtype)


def orthogonalize(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (or rows, for a wide matrix): the orthogonal
    Procrustes / polar factor P Q^T of matrix = P S Q^T."""
    p, _, qh = thin_svd(matrix)
    return p @ qh


# ---------------------------------------------------------------- the fast route's pieces

_OVERSAMPLE = 0.5  # randomized iteration: l = k + max(_MIN_OVERSAMPLE, _OVERSAMPLE * k) directions
_MIN_OVERSAMPLE = 16
_MAX_ITERATIONS = 8  # power iterations before the exact route takes over
_RANDOMIZED_SHARE = 0.25  # l above this share of the rank: the Gram route is cheaper
_SINGLE_SPREAD = 0.25  # _top_gram: float32 eigendecomposition where sigma_k >= this * sigma_1
_CONVERGED = 1e-5  # the kept subspace's remaining error (per direction, in the Frobenius norm)


def rounding_level(shape: tuple[int, int], frobenius_squared: float) -> float:
    """The spectral norm of a float32 matrix's rounding: eps * (sqrt(m) + sqrt(n)) * the rms entry
    (an m x n matrix of independent errors of size s has norm ~s (sqrt(m) + sqrt(n))). Singular
    values below it are rounding; above it, with a gap, their directions are resolved. (Scaled
    by sigma_1 instead of the rms entry it is sqrt(m)-ish times too large on a concatenation
    of orthonormal bases, whose entries are ~1/sqrt(m) while sigma_1 ~ 1-2.)"""
    m, n = shape
    return _EPS32 * (math.sqrt(m) + math.sqrt(n)) * math.sqrt(frobenius_squared / (m * n))


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """orthogonalize() by the float64 Gram of the smaller side: M (M^T M)^(-1/2) = P Q^T, one
    eigendecomposition of the Gram instead of an SVD of M. Directions whose singular value is
    at M's float32 rounding level (rounding_level) are left out (a partial isometry): their
    vectors are arbitrary, and (M^T M)^(-1/2) does not exist there. (Not null_tolerance, nor
    numpy's eps * max(m, n) * sigma_1, nor eps * (sqrt(m) + sqrt(n)) * sigma_1: a square
    concatenation of bases has real singular values down to ~1e-6 sigma_1, which the exact
    route keeps and which move the merge by percents.)"""
    if matrix.shape[0] < matrix.shape[1]:
        return polar(matrix.T).T
    values, vectors = eigh_descending(gram64(matrix))
    tolerance = rounding_level(matrix.shape, float(values.clamp_min(0).sum()))
    kept = int((values > tolerance * tolerance).sum())
    vectors = vectors[:, :kept]
    return times64(matrix, matmul(vectors / values[:kept].sqrt(), vectors.T))


def _spread_can_pass(gram: torch.Tensor, k: int, steps: int = 8) -> bool:
    """False where _top_gram's float32 try is sure to fail: if sigma_k >= _SINGLE_SPREAD * sigma_1,
    the Gram's top k eigenvalues are each >= spread^2 lambda_1, so trace >= k spread^2 lambda_1.
    lambda_1 is taken from below (the Rayleigh quotient of a few power steps from the all-ones
    vector never exceeds it), so False is certain. A decaying spectrum, as a fine-tune's, fails
    it (sigma_i ~ (1 + i)^-0.5 at 2048: trace ~ 8 lambda_1 < 32 = k / 16 at k = 512), and skipping
    the try saves ~0.6 s of every 2048 x 2048 task; a flat one passes it. Costs `steps` products
    of the Gram with a vector."""
    trace = float(gram.diagonal().sum())
    x = torch.ones(gram.shape[0], 1, dtype=gram.dtype, device=gram.device)
    for _ in range(steps):
        y = gram @ x
        norm = float(torch.linalg.vector_norm(y))
        if norm == 0:
            return True  # a zero Gram: nothing to decide (nothing is kept)
        x = y / norm
    largest_at_least = float((x.T @ (gram @ x)).squeeze())
    return trace >= k * _SINGLE_SPREAD**2 * largest_at_least


def _top_gram(matrix: torch.Tensor, k: int, tolerance: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """_top by the eigendecomposition of the Gram of the smaller side, formed in float64.

    The eigendecomposition is float32 (2-3x faster) where every kept singular value is within
    _SINGLE_SPREAD of the largest: a float32 eigensolver mixes directions i and j by
    ~eps * sigma_1^2 / (sigma_i^2 - sigma_j^2), a float32 SVD by ~eps * sigma_1 / (sigma_i - sigma_j),
    so there it is within sigma_1 / (sigma_i + sigma_j) <= 2x of a float32 SVD (the squared
    condition number of the Gram does not reach the kept directions). Otherwise float64
    (exact: it resolves singular values down to ~1e-8 sigma_1; the null tolerance is ~1e-4).
    The float32 try is skipped where _spread_can_pass says it cannot pass (the same result)."""
    if matrix.shape[0] < matrix.shape[1]:
        u, s, vh = _top_gram(matrix.T, k, tolerance)
        return vh.T, s, u.T
    gram = gram64(matrix)
    single = _spread_can_pass(gram, k)
    if single:
        values, vectors = eigh_descending(gram.float(), top=k)
        sigma = values.double().clamp_min(0).sqrt()
        k = min(k, int((sigma > tolerance).sum()))
    if not single or (k > 0 and sigma[k - 1] < _SINGLE_SPREAD * sigma[0]):
        values, vectors = eigh_descending(gram, top=k)
        sigma = values.clamp_min(0).sqrt()
        k = min(k, int((sigma > tolerance).sum()))
    v = vectors[:, :k].double()
    return times64(matrix, v / sigma[:k]), sigma[:k].float(), v.T.float()


def _top_randomized(matrix: torch.Tensor, k: int, tolerance: float, seed: int):
    """_top by seeded randomized subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4:
    a QR after every product, so that float32 rounding costs eps * sigma_1 / sigma_i in the
    i-th direction, not its square) with a Rayleigh-Ritz step in float64 each round.

    Converged when the kept subspace's move over the last round, times r / (1 - r) with
    r = (sigma_l / sigma_k)^2 the rate of the iteration, is <= _CONVERGED (the remaining
    error of a geometric sequence). None if it has not converged within _MAX_ITERATIONS, or
    will not by then at that rate (a flat spectrum at the cut): the caller takes the exact
    route. Works on the wide orientation, so that the first QR is of the short side."""
    if matrix.shape[0] > matrix.shape[1]:
        found = _randomized_wide(matrix.T, k, tolerance, seed)
        return None if found is None else (found[2].T, found[1], found[0].T)
    return _randomized_wide(matrix, k, tolerance, seed)


def _randomized_wide(matrix: torch.Tensor, k: int, tolerance: float, seed: int):
    m, n = matrix.shape
    width = min(m, k + max(_MIN_OVERSAMPLE, math.ceil(_OVERSAMPLE * k)))
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    start = torch.randn(n, width, generator=generator, device=matrix.device)
    q = torch.linalg.qr(matrix @ start).Q
    previous = None
    for done in range(1, _MAX_ITERATIONS + 1):
        z = matrix.T @ q  # B^T, B = Q^T A: the matrix seen in the basis
        values, w = eigh_descending(z.T.double() @ z.double())
        sigma = values.clamp_min(0).sqrt().float()
        kept = min(k, int((sigma > tolerance).sum()))
        wk = w[:, :kept].float()
        u = q @ wk
        if kept == 0:
            return u, sigma[:0], matrix.new_zeros(0, n)
        if previous is not None and previous.shape[1] == kept:
            move = float(torch.linalg.matrix_norm(u - previous @ (previous.T @ u))) / math.sqrt(kept)
            rate = float(sigma[-1] / sigma[kept - 1]) ** 2
            if rate < 1 and move * rate / (1 - rate) <= _CONVERGED:
                return u, sigma[:kept], (z @ wk / sigma[:kept]).T
            if rate >= 1 or move * rate ** (_MAX_ITERATIONS - done) > _CONVERGED:
                return None
        previous = u
        q = torch.linalg.qr(matrix @ torch.linalg.qr(z).Q).Q
    return None


def top_fast(matrix: torch.Tensor, k: int, tolerance: float, seed: int) -> tuple[torch.Tensor, ...]:
    """The top k singular triplets, less the numerically null ones, by the cheapest route that
    gives them to float32 level: randomized where k is a small share of the rank and the
    iteration converges, else the Gram's eigendecomposition."""
    r = min(matrix.shape)
    k = min(k, r)
    if k == 0:
        return matrix.new_zeros(matrix.shape[0], 0), matrix.new_zeros(0), matrix.new_zeros(0, matrix.shape[1])
    if k + max(_MIN_OVERSAMPLE, _OVERSAMPLE * k) <= _RANDOMIZED_SHARE * r:
        found = _top_randomized(matrix, k, tolerance, seed)
        if found is not None:
            return found
    return _top_gram(matrix, k, tolerance)


def mean_of(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Plain mean of the task vectors: what the papers' code does for non-2-D tensors."""
    total = deltas[0].clone()
    for d in deltas[1:]:
        total += d
    return total.div_(len(deltas))


def _top(matrix: torch.Tensor, k: int, tolerance: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top k singular triplets, less those whose singular value is <= tolerance (numerically null)."""
    u, s, vh = thin_svd(matrix)
    k = min(k, int((s > tolerance).sum()))
    return u[:, :k], s[:k], vh[:k, :]


def _low_rank(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    return matmul(u * s, vh)


# Entries in this range need no scaling: a float32 norm or product of them cannot overflow
_SAFE_LOW, _SAFE_HIGH = 2.0**-60, 2.0**40


def safe_scale(deltas: Sequence[torch.Tensor]) -> float | None:
    """A power of two that brings the task matrices' largest entry near 1 where it lies outside
    [2^-60, 2^40] (1.0 inside: nothing to do), or None if an entry is NaN or Inf. A power of
    two scales exactly, and every method here is homogeneous: merge(c tau) = c merge(tau)."""
    largests = [float(d.abs().max()) if d.numel() else 0.0 for d in deltas]
    if not all(math.isfinite(x) for x in largests):  # checked one by one: max() passes over a NaN
        return None
    largest = max(largests)
    if largest == 0 or _SAFE_LOW <= largest <= _SAFE_HIGH:
        return 1.0
    return 2.0 ** -max(-120, min(120, math.frexp(largest)[1]))


def _scaled(merge_matrix):
    """merge_matrix on task matrices brought into a safe range, scaled back after. Task matrices
    with NaN or Inf (e.g. a fine-tune minus base that overflowed float32) give NaN, which the
    engine refuses, naming the tensor."""

    def merge(deltas: Sequence[torch.Tensor], *args, **kwargs) -> torch.Tensor:
        scale = safe_scale(deltas)
        if scale is None:
            return torch.full_like(deltas[0], math.nan)
        if scale == 1.0:
            return merge_matrix(deltas, *args, **kwargs)
        return merge_matrix([d * scale for d in deltas], *args, **kwargs).div_(scale)

    merge.__doc__, merge.__name__, merge.__wrapped__ = merge_matrix.__doc__, merge_matrix.__name__, merge_matrix
    return merge


def _seeds(seeds: Sequence[int] | None, count: int) -> list[int]:
    return list(seeds) if seeds is not None else list(range(count))


def _sum_of(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    total = deltas[0].clone()
    for d in deltas[1:]:
        total += d
    return total


@_scaled
def tsv_merge(
    deltas: Sequence[torch.Tensor],
    densities: Sequence[float],
    exact_svd: bool = False,
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """TSV-M on one matrix: keep each task's top k_t singular triplets, concatenate the U's,
    singular values and V's, decorrelate U and V by orthogonal Procrustes, and return
    U_perp diag(S) V_perp^T.

    k_t = floor(density_t * r), r = min(m, n); the paper's k = r/T is density 1/T. The total
    is capped at r (split_budget). Numerically null directions (a task of lower rank than
    k_t, e.g. a LoRA fine-tune) are not kept: their vectors are arbitrary and would only
    disturb the Procrustes step. Tasks occupying orthogonal subspaces come back exactly as
    their sum. `seeds`: one per task, for the fast route's random start (TaskVector.seed).
    """
    r = min(deltas[0].shape)
    ranks = split_budget(r, densities)
    us, ss, vhs = [], [], []
    for delta, k, seed in zip(deltas, ranks, _seeds(seeds, len(deltas)), strict=True):
        if k > 0:
            tolerance = null_tolerance(delta)
            u, s, vh = _top(delta, k, tolerance) if exact_svd else top_fast(delta, k, tolerance, seed)
            us.append(u), ss.append(s), vhs.append(vh)
    if sum(s.numel() for s in ss) == 0:
        return torch.zeros_like(deltas[0])
    u, vh = torch.cat(us, dim=1), torch.cat(vhs, dim=0)
    if exact_svd:
        return _low_rank(orthogonalize(u), torch.cat(ss), orthogonalize(vh))
    return _low_rank(polar(u), torch.cat(ss), polar(vh))


@_scaled
def iso_c_merge(
    deltas: Sequence[torch.Tensor], exact_svd: bool = False, seeds: Sequence[int] | None = None
) -> torch.Tensor:
    """Iso-C on one matrix: the sum of the task matrices with its singular spectrum replaced
    by its mean, sum(sigma) / min(m, n) (every direction of the sum gets the same weight).
    Numerically null directions of the sum (a low-rank sum) are left out, not lifted to the
    mean: their vectors are arbitrary. The fast route: the spectrum and polar factor of the
    sum from one eigendecomposition of its float64 Gram."""
    total = _sum_of(deltas)
    tolerance = null_tolerance(total)
    if exact_svd:
        u, s, vh = thin_svd(total)
        k = int((s > tolerance).sum())
        return (u[:, :k] @ vh[:k, :]).mul_(s.mean())
    tall = total if total.shape[0] >= total.shape[1] else total.T
    values, vectors = eigh_descending(gram64(tall))
    mean = float(values.clamp_min(0).sqrt().mean())
    kept = int((values > tolerance * tolerance).sum())
    vectors = vectors[:, :kept]
    merged = times64(tall, matmul(vectors / values[:kept].sqrt(), vectors.T)).mul_(mean)
    return merged if tall is total else merged.T.contiguous()


def iso_cts_sizes(r: int, tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(common directions, task-specific budget) as the authors' code sizes them: the common
    space starts at int(r * fraction); the rest is rounded (Python's round) to a multiple of
    the number of tasks and the remainder returns to the common space."""
    common = int(r * common_space_fraction)
    budget = round((r - common) / tasks) * tasks
    budget = max(0, min(r, budget))
    return r - budget, budget


def polar_extended(basis: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """polar([basis, extra]) where `basis` (m x c) has orthonormal columns and `extra` (m x e) is
    thin: the Gram is I + E, E = [[0, C], [C^T, H]] with C = basis^T extra and H = extra^T
    extra - I, of rank <= 2e. With C = Q R (Q: c x p, p = min(c, e)) and Y = blockdiag(Q, I_e),
    E = Y M Y^T, M = [[0, R], [R^T, H]] (p + e square), so (I + E)^(-1/2) = I + Y Z (f(D) - I) Z^T Y^T from
    M = Z D Z^T, f(d) = (1 + d)^(-1/2). Exact, for an eigendecomposition of order 2e instead
    of c + e, in float64. Directions at rounding level are left out, as in polar()."""
    c, e = basis.shape[1], extra.shape[1]
    if c == 0:
        return polar(extra)
    if e == 0:
        return basis.clone()
    float64 = torch.float64
    cross = times64(basis.T, extra.double(), float64)
    q, r = torch.linalg.qr(cross)  # q: c x p, r: p x e, p = min(c, e)
    p = q.shape[1]
    middle = torch.zeros(p + e, p + e, dtype=float64, device=basis.device)
    middle[:p, p:], middle[p:, :p] = r, r.T
    middle[p:, p:] = gram64(extra) - torch.eye(e, dtype=float64, device=basis.device)
    d, z = eigh_descending(middle)
    values = 1 + d  # the Gram's eigenvalues off the identity
    frobenius_squared = c + float(middle[p:, p:].trace()) + e  # |[basis, extra]|_F^2 = c + |extra|_F^2
    tolerance = rounding_level((basis.shape[0], c + e), frobenius_squared)
    kept = values > tolerance * tolerance
    factor = torch.where(kept, values.clamp_min(tolerance * tolerance).rsqrt(), torch.zeros_like(values)) - 1
    y_top, y_bottom = q @ z[:p], z[p:]  # Y Z, split by the rows of basis and of extra
    mapped = times64(basis, y_top, float64) + times64(extra, y_bottom, float64)  # [basis, extra] Y Z
    update = matmul(mapped * factor, torch.cat([y_top, y_bottom]).T)
    return (torch.cat([basis, extra], dim=1).double() + update).float()


@_scaled
def iso_cts_merge(
    deltas: Sequence[torch.Tensor],
    densities: Sequence[float],
    common_space_fraction: float = 0.8,
    exact_svd: bool = False,
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Iso-CTS on one matrix.

    Common subspace: the top `common` singular triplets of the summed task matrix. Each
    task's matrix is projected off the common left subspace, (I - U_c U_c^T) tau_t, and its
    top k_t triplets are kept, k_t = floor(density_t * budget) where `budget` is the rank left
    to task-specific directions (iso_cts_sizes); the paper's equal split is density 1/T,
    and the total is capped at the budget. Common and task-specific directions are
    concatenated, U and V orthogonalized (Procrustes), and the spectrum replaced by the
    mean of the kept singular values (isotropic): their sum over the number of directions
    asked for, so a numerically null direction (left out, as in tsv_merge) counts as a zero,
    as it would in the authors' code.
    """
    total = _sum_of(deltas)
    r = min(total.shape)
    common, budget = iso_cts_sizes(r, len(deltas), common_space_fraction)
    total_tolerance = null_tolerance(total)
    u, s, vh = _top(total, common, total_tolerance) if exact_svd else _top_gram(total, common, total_tolerance)
    del total
    us, ss, vhs = [u], [s], [vh]
    asked = common
    for delta, k, seed in zip(deltas, split_budget(budget, densities), _seeds(seeds, len(deltas)), strict=True):
        if k > 0:
            specific = delta - matmul(u, matmul(u.T, delta))
            tolerance = null_tolerance(delta)
            tu, ts, tvh = _top(specific, k, tolerance) if exact_svd else top_fast(specific, k, tolerance, seed)
            us.append(tu), ss.append(ts), vhs.append(tvh)
            asked += k
    spectrum = torch.cat(ss)
    if spectrum.numel() == 0:
        return torch.zeros_like(deltas[0])
    u_all, vh_all = torch.cat(us, dim=1), torch.cat(vhs, dim=0)
    if exact_svd:
        u_perp, vh_perp = orthogonalize(u_all), orthogonalize(vh_all)
    else:
        # U: the task directions are orthogonal to the common ones by construction, so the Gram is
        # nearly the identity plus a few rows and columns: a low-rank update. V has no such
        # structure (V_c^T V_t is not small, the Gram can be ill-conditioned, and the common
        # basis's float32 rounding would be amplified there: 1e-5 seen): the full Gram.
        c = us[0].shape[1]
        u_perp, vh_perp = polar_extended(u_all[:, :c], u_all[:, c:]), polar(vh_all)
    return matmul(u_perp, vh_perp).mul_(spectrum.sum() / asked)
