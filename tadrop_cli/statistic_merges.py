"""Merges whose mix comes from a statistic of the task vectors: Model Stock, SCE, Arcee Fusion.

Tensors in, tensors out, no I/O: `base` is the base model's tensor (float32) and each task
vector tau_i = fine-tuned_i - base is one fine-tuned model's change to it. Sums over whole
tensors (dot products, norms, squares) accumulate in float64; everything else is float32.
Where these differ from mergekit 0.1.5 (docs/mergekit.md says why), the docstring says so.
"""

from __future__ import annotations

from .lazy import torch
from .sparsify import top_k_mask

# mergekit's guard: an interpolation ratio whose denominator is this close to 0 keeps the base
SINGULAR_DENOMINATOR = 1e-6
# mergekit's floor under SCE's per-entry divisor (the summed coefficients of the models kept there)
SCE_DIVISOR_FLOOR = 1e-6
# Arcee Fusion's softmax floor and its threshold: median + IQR_SCALE * (q3 - q1)
FUSION_EPS = 1e-8
IQR_SCALE = 1.5


# ---------------------------------------------------------------- Model Stock


def _rows(tensor: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """The vectors Model Stock measures angles between: the whole tensor flattened (one row), or
    with filter_wise each slice along the last dimension (a 1-D tensor is one row), as mergekit."""
    if not filter_wise or tensor.dim() == 0:
        return tensor.reshape(1, -1)
    return tensor.reshape(-1, tensor.shape[-1]) if tensor.dim() > 1 else tensor.reshape(1, -1)


def mean_pairwise_cosine(deltas: list[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """cos(theta) per row (float64): the mean over pairs i < j of <tau_i, tau_j> / (|tau_i| |tau_j|),
    a pair counting 0 where either norm is 0, clamped to [-1, 1]."""
    rows = [_rows(delta, filter_wise) for delta in deltas]
    norms = [torch.linalg.vector_norm(r, dim=-1, dtype=torch.float64) for r in rows]
    total = torch.zeros(rows[0].shape[0], dtype=torch.float64, device=rows[0].device)
    pairs = 0
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            dot = torch.sum(rows[i] * rows[j], dim=-1, dtype=torch.float64)
            product = norms[i] * norms[j]
            cosine = torch.where(product > 0, dot / torch.where(product > 0, product, 1.0), 0.0)
            total += cosine.clamp_(-1.0, 1.0)
            pairs += 1
    return total / pairs


def model_stock_ratio(cosine: torch.Tensor, count: int) -> torch.Tensor:
    """Model Stock's interpolation ratio t = N cos / (1 + (N - 1) cos) (paper, eq. 3); 0 (the base)
    where |1 + (N - 1) cos| < 1e-6, as mergekit: no finite estimate there."""
    denominator = 1.0 + (count - 1) * cosine
    singular = denominator.abs() < SINGULAR_DENOMINATOR
    return torch.where(singular, 0.0, count * cosine / torch.where(singular, 1.0, denominator))


def model_stock(base: torch.Tensor, deltas: list[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """Model Stock (Jang et al. 2024): w_0 + t * mean_i tau_i, i.e. t w_avg + (1 - t) w_0, with t from
    model_stock_ratio of the mean pairwise cosine of the task vectors (mean_pairwise_cosine), per
    tensor or per row (filter_wise). With fewer than two task vectors there is no angle: the base.

    mergekit 0.1.5 divides by max(|tau_i| |tau_j|, 1e-6), which shrinks the cosine of small task
    vectors (e.g. a 64-entry bias moved by 1e-4 per entry) toward 0; the paper's cosine is exact.
    `deltas` are used as scratch space.
    """
    if len(deltas) < 2:
        return base.clone()
    t = model_stock_ratio(mean_pairwise_cosine(deltas, filter_wise), len(deltas)).to(torch.float32)
    mean = deltas[0]
    for delta in deltas[1:]:
        mean += delta
    mean /= len(deltas)
    rows = _rows(mean, filter_wise)
    return rows.mul_(t.unsqueeze(-1)).reshape(base.shape).add_(base)


# ---------------------------------------------------------------- SCE


def variance_across(deltas: list[torch.Tensor]) -> torch.Tensor:
    """var_e = mean_i (tau_i,e - mean_j tau_j,e)^2 per entry (population variance, float32)."""
    mean = torch.zeros_like(deltas[0])
    for delta in deltas:
        mean += delta
    mean /= len(deltas)
    variance = torch.zeros_like(deltas[0])
    for delta in deltas:
        difference = delta - mean
        variance.addcmul_(difference, difference)
    return variance.div_(len(deltas))


def sce_select_mask(deltas: list[torch.Tensor], fraction: float) -> torch.Tensor | None:
    """SCE's Select: 1.0 at the k = int(fraction * m) entries of largest variance across the task
    vectors, m the entries of non-zero variance (mergekit's count; ties: lowest index first); None
    (keep all) at fraction >= 1."""
    if fraction >= 1:
        return None
    if fraction <= 0:
        return torch.zeros_like(deltas[0])
    variance = variance_across(deltas)
    k = int(int(variance.count_nonzero()) * fraction)
    return top_k_mask(variance, k).to(torch.float32)


def sce_coefficients(deltas: list[torch.Tensor]) -> list[float]:
    """SCE's Calculate: eta_i = sum(tau_i^2) / sum_j sum(tau_j^2) (float64 sums), 1/N each when every
    task vector is 0. (mergekit 0.1.5 falls back to 1/N when the sum of the mean squares is below
    1e-6, i.e. for any task vectors of RMS below about 1e-3 / sqrt(N), typical of LLM fine-tunes.)"""
    squares = [float(torch.sum(delta * delta, dtype=torch.float64)) for delta in deltas]
    total = sum(squares)
    if total == 0:
        return [1.0 / len(deltas)] * len(deltas)
    return [s / total for s in squares]


def sce(base: torch.Tensor, deltas: list[torch.Tensor], fraction: float = 1.0, normalize: bool = True) -> torch.Tensor:
    """SCE (FuseChat, Wan et al. 2024): Select, Calculate, Erase.

    tau_i <- m * tau_i with m = sce_select_mask (shared by the models); eta_i = sce_coefficients;
    e_i = [sign(tau_i) == s], s = +1 where sum_i tau_i >= 0, else -1 (a zero entry is erased);
    merged = base + sum_i eta_i e_i tau_i / D, with D = max(sum_i eta_i e_i, 1e-6) per entry
    (mergekit's disjoint mean) or, without normalize, D = 1 (the weighted sum).
    `deltas` are used as scratch space.
    """
    if not deltas:
        return base.clone()
    mask = sce_select_mask(deltas, fraction)
    if mask is not None:
        for delta in deltas:
            delta.mul_(mask)
        del mask
    etas = sce_coefficients(deltas)
    total = deltas[0].clone()
    for delta in deltas[1:]:
        total += delta
    majority = total.sign_().add_(0.5).sign_()  # +1 where the sum is >= 0, -1 elsewhere
    del total
    mixed = torch.zeros_like(base)
    divisor = torch.zeros_like(base) if normalize else None
    for eta, delta in zip(etas, deltas, strict=True):
        agrees = (delta.sign() == majority).to(torch.float32)
        mixed.addcmul_(delta, agrees, value=eta)
        if divisor is not None:
            divisor.add_(agrees, alpha=eta)
    if divisor is not None:
        mixed /= divisor.clamp_(min=SCE_DIVISOR_FLOOR)
    return mixed.add_(base)


# ---------------------------------------------------------------- Arcee Fusion


def fusion_importance(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """|tau| * KL(p || q) per row (the last dimension; a 1-D tensor is one row), with
    p = softmax(base + tau) + 1e-8 and q = softmax(base) + 1e-8, as mergekit's arcee_fusion."""
    p = torch.softmax(base + delta, dim=-1).add_(FUSION_EPS)
    q = torch.softmax(base, dim=-1).add_(FUSION_EPS)
    terms = torch.div(p, q, out=q).log_().mul_(p)  # p log(p / q), in q's buffer: two temporaries at most
    del p
    kl = torch.sum(terms, dim=-1, keepdim=True)
    del terms
    return delta.abs().mul_(kl)


def quartile_threshold(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5 (q3 - q1) of the scores, each quantile q the sorted entry at floor(q (n - 1))
    (float32 index arithmetic, as mergekit). Exact order statistics of the whole tensor: mergekit
    0.1.5 estimates them from 1,000,000 entries drawn at random (unseeded) beyond that size."""
    flat = scores.reshape(-1)
    positions = (torch.tensor([0.25, 0.5, 0.75]) * (flat.numel() - 1)).long().tolist()
    q1, median, q3 = (torch.kthvalue(flat, position + 1).values for position in positions)
    return median + IQR_SCALE * (q3 - q1)


def arcee_fusion(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion: base + tau * [importance >= threshold], the importance from fusion_importance
    and the threshold from quartile_threshold (an outlier cut: only the most important changes)."""
    if delta.numel() == 0:
        return base.clone()
    importance = fusion_importance(base, delta)
    keep = importance >= quartile_threshold(importance)
    del importance
    return delta.mul_(keep).add_(base)
