"""Interpolation methods: SLERP, NuSLERP, Multi-SLERP, the Karcher mean, NearSwap (maths only).

Tensors in (float32, one tensor name's inputs), float32 tensor out. These interpolate the models'
own tensors (or, for NuSLERP and Multi-SLERP with a base, their task vectors) on a sphere or
entry by entry; none of them drops entries, so TADrop has nothing to adapt in them. Each follows
mergekit 0.1.5's definition step for step (its constants, its clamps, its fallbacks), so that its
recipes give mergekit's float32 tensors.
"""

from __future__ import annotations

from .lazy import torch

# mergekit's slerp: above this |cos theta| the two tensors are treated as colinear (or antipodal)
# and linearly interpolated; a norm at or below SLERP_EPS is taken as 1 (the tensor is ~0).
SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8
# mergekit's slerp reduces over slices of this many entries (norms of slice norms, a sum of
# slice dots): the same slices give the same float32 sums.
SLERP_SLICE = 1 << 20


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical linear interpolation of two whole tensors (flattened), from v0 (t = 0) to v1 (t = 1).

    cos theta = <v0 / |v0|, v1 / |v1|> clamped to [-1, 1] (a norm <= 1e-8 counts as 1);
    slerp = sin((1 - t) theta) / sin theta * v0 + sin(t theta) / sin theta * v1,
    and (1 - t) v0 + t v1 where |cos theta| > 0.9995 (nearly colinear or antipodal: Shoemake's
    formula divides by sin theta ~ 0 there). As mergekit 0.1.5's slerp, in float32.
    """
    a, b = v0.reshape(-1), v1.reshape(-1)
    t_ = torch.tensor(t, dtype=torch.float32, device=a.device)
    if a.numel() == 0:
        return ((1 - t_) * a + t_ * b).reshape(v0.shape)
    slices = [(start, min(start + SLERP_SLICE, a.numel())) for start in range(0, a.numel(), SLERP_SLICE)]
    norm_a = _norm_of_slices(a, slices)
    norm_b = _norm_of_slices(b, slices)
    one = torch.ones((), dtype=torch.float32, device=a.device)
    norm_a = torch.where(norm_a > SLERP_EPS, norm_a, one)
    norm_b = torch.where(norm_b > SLERP_EPS, norm_b, one)
    # normalised before multiplying, so that the dot of two large tensors cannot overflow
    dot = torch.stack([((a[s:e] / norm_a) * (b[s:e] / norm_b)).sum() for s, e in slices]).sum().clamp(-1, 1)
    linear = dot.abs() > SLERP_DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, torch.zeros_like(dot), dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t_, torch.sin((1 - t_) * theta) / sin_theta)
    coef_b = torch.where(linear, t_, torch.sin(t_ * theta) / sin_theta)
    return (coef_a * a + coef_b * b).reshape(v0.shape)


def _norm_of_slices(x: torch.Tensor, slices: list[tuple[int, int]]) -> torch.Tensor:
    """|x| as the norm of its slices' norms (mergekit's order of float32 sums)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x[s:e]) for s, e in slices]))


NUSLERP_EPS = 1e-8  # cos^2 theta within NUSLERP_EPS^2 of 1: colinear, linearly interpolated
NUSLERP_NORM_FLOOR = 1e-7  # a vector's norm is at least this when it is normalised


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, flatten: bool, row_wise: bool) -> torch.Tensor:
    """NuSLERP: slerp of v0 and v1 vector by vector (or of the whole flattened tensors).

    The vectors are the whole tensor (flatten), or the slices along the last dimension (the rows of a
    matrix), or with row_wise those along dimension 0 (a matrix's columns: mergekit's naming). Per
    vector: cos theta = <v0 / max(|v0|, 1e-7), v1 / max(|v1|, 1e-7)> clamped to [-1, 1];
    (sin((1 - t) theta) v0 + sin(t theta) v1) / sin theta, or (1 - t) v0 + t v1 where
    1 - cos^2 theta <= 1e-16. As mergekit 0.1.5's nuslerp, in float32.
    """
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_FLOOR)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_FLOOR)
    cos_theta = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    del u0, u1
    colinear = (1 - cos_theta.square()) <= NUSLERP_EPS**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos_theta), cos_theta))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp_t(weights: list[float]) -> float:
    """NuSLERP's t from the two models' weights: w1 / (w0 + w1), 0.5 where the sum is ~0 (mergekit)."""
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


class AntipodalMean(ValueError):
    """Multi-SLERP: the weighted mean of the unit tensors is zero (three or more balanced antipodes)."""


def multislerp(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    normalize_weights: bool,
    eps: float,
) -> torch.Tensor:
    """Multi-SLERP: barycentric interpolation on the hypersphere (mergekit 0.1.5's multislerp).

    With a base, x_i are the task vectors tensor_i - base (and base is added back at the end), else
    the tensors; w_i the weights (divided by their sum with normalize_weights). u_i = x_i / (|x_i| + eps);
    m = sum w_i u_i, refused where |m| < eps (two tensors are then linearly interpolated,
    sum w_i x_i); m /= |m|; the tangent vector g = sum w_i (u_i - <u_i, m> m) is mapped back by
    the exponential map, r = m cos |g|' + g sin |g|' / |g|' with |g|' = |g| + eps, and scaled to
    the weighted mean norm: r * sum w_i |x_i|. One tensor is returned as it is.
    """
    if len(tensors) == 1:
        return tensors[0]
    shape = tensors[0].shape
    xs = [x.reshape(-1) if base is None else (x - base).reshape(-1) for x in tensors]
    w = torch.tensor(weights, dtype=torch.float32, device=xs[0].device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.stack([torch.linalg.vector_norm(x) for x in xs])
    units = [x / (norm + eps) for x, norm in zip(xs, norms, strict=True)]
    mean = _weighted_sum(units, w)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(xs) != 2:
            raise AntipodalMean("the weighted mean of the unit tensors is zero (antipodal tensors balanced by weights)")
        result = (xs[0] * w[0] + xs[1] * w[1]).reshape(shape)
        return result if base is None else result + base
    mean = mean / mean_norm
    tangents = [unit - (unit * mean).sum() * mean for unit in units]
    del units
    tangent = _weighted_sum(tangents, w)
    del tangents
    tangent_norm = torch.linalg.vector_norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms * w).sum()).reshape(shape)
    return result if base is None else result + base


def _weighted_sum(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i x_i, summed in order (as torch sums a stacked [N, ...] tensor over dim 0)."""
    total = tensors[0] * weights[0]
    for x, w in zip(tensors[1:], weights[1:], strict=True):
        total += x * w
    return total


def karcher(tensors: list[torch.Tensor], *, max_iter: int, tol: float) -> torch.Tensor:
    """The Karcher (Riemannian) mean of the tensors' directions, scaled by their mean norm
    (mergekit 0.1.5's karcher, equal weights alpha_i = 1/N).

    u_i = x_i / |x_i|; tensors with |x_i| <= tol are left out of the mean (their weights too: the
    others' are renormalised). Start at m = sum a_i u_i / |.| (u_1 if that is < tol), then up to
    max_iter times: g = sum_i a_i theta_i / sin theta_i (u_i - cos theta_i m) over the i with
    theta_i = acos <m, u_i> >= tol; stop when |g| < tol; else m = cos|g| m + sin|g| g / |g|,
    renormalised. The result is (sum_i alpha_i |x_i|) m, every tensor's norm counted.
    """
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [torch.linalg.vector_norm(x) for x in tensors]
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    units = [tensors[i] / norms[i] for i in valid]
    alpha_sum = sum(alphas[i] for i in valid)
    shares = [alphas[i] / alpha_sum for i in valid]
    mean = torch.zeros_like(units[0])
    for share, unit in zip(shares, units, strict=True):
        mean += share * unit
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for share, unit in zip(shares, units, strict=True):
            dot = torch.clamp(torch.dot(mean.reshape(-1), unit.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += share * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms, strict=True))
    return scale * mean


NEARSWAP_FLOOR = 1e-6  # |base - other| is at least this in NearSwap's division


def nearswap(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """NearSwap: take the other model's entry where it is near the base's, keep the base's where far.

    w = clamp(t / max(|base - other|, 1e-6), 0, 1) per entry; w other + (1 - w) base. Entries that
    differ by at most t become the other model's; farther ones move toward it by t (mergekit 0.1.5's
    nearswap). Entry by entry, so any slice of the tensors gives that slice of the result.
    """
    weight = (t / torch.abs(base - other).clamp(min=NEARSWAP_FLOOR)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base
