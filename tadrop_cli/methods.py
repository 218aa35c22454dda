"""Merge methods and their registry.

A method is a pure function over one tensor name:

    merge(base, task_vectors, **method_parameters) -> merged float32 tensor

`base` is the base model's tensor and each `TaskVector` holds one fine-tuned
model's change (fine-tuned minus base) with that model's parameters for this
tensor. Adding a method means writing one function and one `MergeMethod` entry
in `METHODS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import torch

from . import sparsify

Sparsifier = Optional[Literal["magnitude", "random", "breadcrumbs"]]


@dataclass
class TaskVector:
    """One model's change to one tensor, with its parameters for that tensor."""

    delta: torch.Tensor
    weight: float = 1.0
    density: float = 1.0  # fraction kept; TADrop sets it per tensor
    seed: int = 0  # seeds random sparsifiers; derived from (recipe seed, model, tensor)
    gamma: float = 0.01  # breadcrumbs: fraction of largest entries dropped as outliers


@dataclass(frozen=True)
class ParamSpec:
    """One recipe parameter of a method."""

    name: str
    default: Any
    doc: str
    per_model: bool = False  # a tensor parameter: set globally, per model, or per tensor filter
    kind: str = "float"  # "float" | "bool" | "rescale"
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class MergeMethod:
    name: str
    merge: Callable[..., torch.Tensor]
    description: str
    reference: str
    sparsifier: Sparsifier = None  # where TADrop's per-tensor ratio enters; None: no sparsification
    params: tuple[ParamSpec, ...] = field(default_factory=tuple)

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)


# ---------------------------------------------------------------- the maths


def sparsify_task_vector(tv: TaskVector, sparsifier: Sparsifier, rescale: sparsify.Rescale, in_place: bool = False) -> torch.Tensor:
    """The task vector after the host's own drop, at this tensor's density."""
    if sparsifier is None or tv.density >= 1:
        return tv.delta
    if sparsifier == "magnitude":
        return sparsify.magnitude(tv.delta, tv.density, rescale, in_place)
    if sparsifier == "random":
        return sparsify.random(tv.delta, tv.density, tv.seed, rescale, in_place)
    if sparsifier == "breadcrumbs":
        return sparsify.breadcrumbs(tv.delta, tv.density, tv.gamma, rescale, in_place)
    raise ValueError(f"unknown sparsifier {sparsifier!r}")


def disjoint_mean(weighted: list[torch.Tensor], weights: list[float], consensus: str, with_divisor: bool = True, in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TIES merge step: sum only the entries whose sign agrees with the elected sign.

    Returns the summed agreeing deltas and, if asked, the summed weights of the
    agreeing models (1 where none agrees), the divisor for a mean. With in_place,
    the `weighted` tensors are overwritten.
    """
    majority = sparsify.sign_consensus(weighted, consensus)
    mixed = torch.zeros_like(weighted[0])
    divisor = torch.zeros_like(weighted[0]) if with_divisor else None
    for weight, delta in zip(weights, weighted):
        agrees = delta.sign() == majority
        mixed += delta.mul_(agrees) if in_place else delta * agrees
        if divisor is not None:
            divisor.add_(agrees, alpha=weight)
    if divisor is not None:
        divisor[divisor == 0] = 1
    return mixed, divisor


def generalized_task_arithmetic(
    base: torch.Tensor,
    task_vectors: list[TaskVector],
    *,
    sparsifier: Sparsifier,
    consensus: Literal["sum", "count"] | None,
    normalize: bool,
    lambda_: float = 1.0,
    rescale: sparsify.Rescale = False,
) -> torch.Tensor:
    """base + lambda * mix(sparsify(tau_i) * w_i): task arithmetic, TIES, DARE, breadcrumbs.

    Same steps and defaults as mergekit's generalized task arithmetic, so that its
    recipes give the same tensors. The task vectors' deltas are used as scratch
    space (overwritten): the engine hands over buffers it no longer needs, which
    saves N tensor-sized allocations per tensor.
    """
    if not task_vectors:
        return base
    weights = [tv.weight for tv in task_vectors]
    weighted = [sparsify_task_vector(tv, sparsifier, rescale, in_place=True).mul_(tv.weight) for tv in task_vectors]
    if consensus is not None:
        mixed, divisor = disjoint_mean(weighted, weights, consensus, with_divisor=normalize, in_place=True)
    else:
        mixed = weighted[0]
        for delta in weighted[1:]:
            mixed += delta
        divisor = sum(weights)
        if abs(divisor) < 1e-8:
            divisor = 1.0
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return mixed.add_(base)


def linear(base: torch.Tensor, task_vectors: list[TaskVector], *, normalize: bool = True, **_: Any) -> torch.Tensor:
    """Weighted average of the models' tensors (model soup); models are base + tau_i."""
    total_weight = sum(tv.weight for tv in task_vectors)
    merged = torch.zeros_like(base)
    for tv in task_vectors:
        merged += tv.weight * (base + tv.delta)
    if normalize and total_weight != 0:
        merged /= total_weight
    return merged


def _gta(sparsifier: Sparsifier, consensus: str | None) -> Callable[..., torch.Tensor]:
    def merge(base: torch.Tensor, task_vectors: list[TaskVector], *, normalize: bool, rescale: sparsify.Rescale = False, **params: Any) -> torch.Tensor:
        return generalized_task_arithmetic(
            base, task_vectors, sparsifier=sparsifier, consensus=consensus,
            normalize=normalize, lambda_=params.get("lambda", 1.0), rescale=rescale,
        )

    return merge


# ---------------------------------------------------------------- the registry

WEIGHT = ParamSpec("weight", 1.0, "scale of this model's task vector (or tensor, for linear)", per_model=True)
DENSITY = ParamSpec("density", 1.0, "fraction of task-vector entries kept (1 - drop ratio)", per_model=True, low=0.0, high=1.0)
GAMMA = ParamSpec("gamma", 0.01, "fraction of the largest entries removed as outliers", per_model=True, low=0.0, high=1.0)
LAMBDA = ParamSpec("lambda", 1.0, "scale of the merged task vector", low=-10.0, high=10.0)
INT8_MASK = ParamSpec("int8_mask", False, "accepted for mergekit compatibility; no effect (masks are boolean)", kind="bool")


def _normalize(default: bool) -> ParamSpec:
    return ParamSpec("normalize", default, "divide the merged task vector by the sum of the weights", kind="bool")


def _rescale(default: bool) -> ParamSpec:
    return ParamSpec(
        "rescale", default,
        "after a drop, rescale survivors: true/paper = 1/density (the papers), l1/l2/linf = match that norm (mergekit), false",
        kind="rescale",
    )


def _gta_params(normalize: bool, rescale: bool, *extra: ParamSpec) -> tuple[ParamSpec, ...]:
    return (WEIGHT, DENSITY, *extra, _normalize(normalize), LAMBDA, _rescale(rescale), INT8_MASK)


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in [
        MergeMethod("linear", linear, "weighted average of the models (model soup)", "https://arxiv.org/abs/2203.05482",
                    params=(WEIGHT, _normalize(True))),
        MergeMethod("task_arithmetic", _gta(None, None), "base + lambda * sum of weighted task vectors", "https://arxiv.org/abs/2212.04089",
                    params=(WEIGHT, ParamSpec("density", 1.0, "ignored, as in mergekit (use magnitude_prune to trim)", per_model=True, low=0.0, high=1.0),
                            _normalize(False), LAMBDA, INT8_MASK)),
        MergeMethod("magnitude_prune", _gta("magnitude", None), "trim each task vector to its largest entries, then task arithmetic", "https://arxiv.org/abs/2306.01708",
                    sparsifier="magnitude", params=_gta_params(False, False)),
        MergeMethod("ties", _gta("magnitude", "sum"), "trim, elect sign, disjoint mean (TIES-Merging)", "https://arxiv.org/abs/2306.01708",
                    sparsifier="magnitude", params=_gta_params(True, False)),
        MergeMethod("dare_linear", _gta("random", None), "random drop and rescale (DARE), then task arithmetic", "https://arxiv.org/abs/2311.03099",
                    sparsifier="random", params=_gta_params(False, True)),
        MergeMethod("dare_ties", _gta("random", "sum"), "random drop and rescale (DARE), then TIES sign election", "https://arxiv.org/abs/2311.03099",
                    sparsifier="random", params=_gta_params(False, True)),
        MergeMethod("breadcrumbs", _gta("breadcrumbs", None), "drop outliers and small entries (Model Breadcrumbs), then task arithmetic", "https://arxiv.org/abs/2312.06795",
                    sparsifier="breadcrumbs", params=_gta_params(False, False, GAMMA)),
        MergeMethod("breadcrumbs_ties", _gta("breadcrumbs", "sum"), "Model Breadcrumbs with TIES sign election", "https://arxiv.org/abs/2312.06795",
                    sparsifier="breadcrumbs", params=_gta_params(False, False, GAMMA)),
    ]
}
