"""SVD-based merges of one 2-D tensor: TSV-M, Iso-C and Iso-CTS (tensors in, tensor out).

Every function takes the (already weighted) task matrices of one tensor and returns
the merged task matrix in float32, before the scale `lambda` and the base are applied.
Nothing here reads files or knows about models; it runs on whatever device the
tensors are on (torch.linalg.svd with full_matrices=False).

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
from typing import Sequence

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


def orthogonalize(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (or rows, for a wide matrix): the orthogonal
    Procrustes / polar factor P Q^T of matrix = P S Q^T."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def mean_of(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Plain mean of the task vectors: what the papers' code does for non-2-D tensors."""
    total = deltas[0].clone()
    for d in deltas[1:]:
        total += d
    return total.div_(len(deltas))


def _top(matrix: torch.Tensor, k: int, tolerance: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top k singular triplets, less those whose singular value is <= tolerance (numerically null)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = min(k, int((s > tolerance).sum()))
    return u[:, :k], s[:k], vh[:k, :]


def _low_rank(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    return (u * s) @ vh


def tsv_merge(deltas: Sequence[torch.Tensor], densities: Sequence[float]) -> torch.Tensor:
    """TSV-M on one matrix: keep each task's top k_t singular triplets, concatenate the U's,
    singular values and V's, decorrelate U and V by orthogonal Procrustes, and return
    U_perp diag(S) V_perp^T.

    k_t = floor(density_t * r), r = min(m, n); the paper's k = r/T is density 1/T. The total
    is capped at r (split_budget). Numerically null directions (a task of lower rank than
    k_t, e.g. a LoRA fine-tune) are not kept: their vectors are arbitrary and would only
    disturb the Procrustes step. Tasks occupying orthogonal subspaces come back exactly as
    their sum.
    """
    r = min(deltas[0].shape)
    ranks = split_budget(r, densities)
    us, ss, vhs = [], [], []
    for delta, k in zip(deltas, ranks):
        if k > 0:
            u, s, vh = _top(delta, k, null_tolerance(delta))
            us.append(u), ss.append(s), vhs.append(vh)
    if sum(s.numel() for s in ss) == 0:
        return torch.zeros_like(deltas[0])
    u_perp = orthogonalize(torch.cat(us, dim=1))
    vh_perp = orthogonalize(torch.cat(vhs, dim=0))
    return _low_rank(u_perp, torch.cat(ss), vh_perp)


def iso_c_merge(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Iso-C on one matrix: the sum of the task matrices with its singular spectrum replaced
    by its mean, sum(sigma) / min(m, n) (every direction of the sum gets the same weight).
    Numerically null directions of the sum (a low-rank sum) are left out, not lifted to the
    mean: their vectors are arbitrary."""
    total = deltas[0].clone()
    for d in deltas[1:]:
        total += d
    tolerance = null_tolerance(total)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    k = int((s > tolerance).sum())
    return (u[:, :k] @ vh[:k, :]).mul_(s.mean())


def iso_cts_sizes(r: int, tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(common directions, task-specific budget) as the authors' code sizes them: the common
    space starts at int(r * fraction); the rest is rounded (Python's round) to a multiple of
    the number of tasks and the remainder returns to the common space."""
    common = int(r * common_space_fraction)
    budget = round((r - common) / tasks) * tasks
    budget = max(0, min(r, budget))
    return r - budget, budget


def iso_cts_merge(deltas: Sequence[torch.Tensor], densities: Sequence[float], common_space_fraction: float = 0.8) -> torch.Tensor:
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
    total = deltas[0].clone()
    for d in deltas[1:]:
        total += d
    r = min(total.shape)
    common, budget = iso_cts_sizes(r, len(deltas), common_space_fraction)
    u, s, vh = _top(total, common, null_tolerance(total))
    del total
    us, ss, vhs = [u], [s], [vh]
    asked = common
    for delta, k in zip(deltas, split_budget(budget, densities)):
        if k > 0:
            specific = delta - u @ (u.T @ delta)
            tu, ts, tvh = _top(specific, k, null_tolerance(delta))
            us.append(tu), ss.append(ts), vhs.append(tvh)
            asked += k
    spectrum = torch.cat(ss)
    if spectrum.numel() == 0:
        return torch.zeros_like(deltas[0])
    u_perp = orthogonalize(torch.cat(us, dim=1))
    vh_perp = orthogonalize(torch.cat(vhs, dim=0))
    return (u_perp @ vh_perp).mul_(spectrum.sum() / asked)
