"""Merge methods and their registry.

A method is a pure function over one tensor name:

    merge(base, task_vectors, **method_parameters) -> merged float32 tensor

`base` is the base model's tensor and each `TaskVector` holds one fine-tuned
model's change (fine-tuned minus base) with that model's parameters for this
tensor. Adding a method means writing one function and one `MergeMethod` entry
in `METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from . import interpolation, sparsify, statistic_merges, subspace
from .lazy import torch

# Where TADrop's per-tensor ratio enters a method (None: nowhere, the method does not sparsify):
#   magnitude   the kept fraction of a magnitude trim
#   random      DARE's keep probability
#   breadcrumbs the kept fraction between the outliers and the small entries
#   della       the mean keep probability of DELLA's magnitude-ranked drop
#   rank        a task's share of a rank budget (SVD-based methods; 2-D tensors only)
#   variance    SCE's select fraction (one mask for all models: the mean of the models' fractions)
Sparsifier = Literal["magnitude", "random", "breadcrumbs", "della", "rank", "variance"] | None


@dataclass
class TaskVector:
    """One model's change to one tensor, with its parameters for that tensor."""

    delta: torch.Tensor
    weight: float = 1.0
    density: float = 1.0  # fraction kept; TADrop sets it per tensor
    seed: int = 0  # seeds random sparsifiers; derived from (recipe seed, model, tensor)
    gamma: float = 0.01  # breadcrumbs: fraction of largest entries dropped as outliers
    epsilon: float = 0.15  # della: half-width of the keep probabilities around density
    tall_mask_lambda: float = 0.4  # consensus: lambda_t of this task's TALL mask
    # When delta is a slice of the tensor (flattened entries from `offset` on): the whole
    # tensor's magnitude trim, found beforehand (see sparsify.top_k_cut)
    offset: int = 0
    cut: sparsify.TopKCut | None = None


@dataclass
class ModelTensor:
    """One model's own tensor for one tensor name (not its change from the base), with its weight:
    what the interpolating methods (MergeMethod.interpolates) take."""

    tensor: torch.Tensor
    weight: float = 1.0


REQUIRED = "required"  # a ParamSpec default: the recipe must give the parameter (mergekit's required parameters)


@dataclass(frozen=True)
class ParamSpec:
    """One recipe parameter of a method."""

    name: str
    default: Any
    doc: str
    per_model: bool = False  # a tensor parameter: set globally, per model, or per tensor filter
    kind: str = "float"  # "float" | "int" | "bool" | "rescale"
    low: float | None = None
    high: float | None = None

    @property
    def required(self) -> bool:
        return self.default == REQUIRED


@dataclass(frozen=True)
class GtaSteps:
    """The steps of generalized_task_arithmetic a method takes: its drop (None: none) and its mix
    (consensus "sum": TIES's sign election and disjoint sum; None: the plain sum)."""

    sparsifier: Sparsifier
    consensus: Literal["sum", "count"] | None


@dataclass(frozen=True)
class MergeMethod:
    name: str
    merge: Callable[..., torch.Tensor]
    description: str
    reference: str
    sparsifier: Sparsifier = None  # where TADrop's per-tensor ratio enters; None: no sparsification
    params: tuple[ParamSpec, ...] = field(default_factory=tuple)
    # merge() of any slice of the flattened tensors equals that slice of the whole merge (no
    # per-tensor statistic, selection, random stream or matrix view): the engine may slice
    elementwise: bool = False
    # the same, given each task vector's `offset` and (for a magnitude trim) its whole-tensor
    # `cut`, when the rescale needs no norm of the whole tensor (see sliceable())
    sliced_trims: bool = False
    # ... provided each slice holds whole rows (dim 0), handed over as a 2-D block of them
    whole_rows: bool = False
    # merge() is generalized_task_arithmetic with these steps: on a CPU the engine may run it
    # with the compiled kernels (kernels.merge_slice), which give the same bits
    gta: GtaSteps | None = None
    # the parameter holding the kept fraction that TADrop adapts (TaskVector.density)
    density_param: str = "density"
    # why TADrop has nothing to adapt, for a method that does not sparsify (None: the generic reason)
    no_tadrop: str | None = None
    # merge(base, models: list[ModelTensor], **parameters) takes the models' own tensors, not task
    # vectors; base is None when the recipe has no base_model (then base_optional must be set)
    interpolates: bool = False
    base_optional: bool = False  # the recipe may leave out base_model
    # how many models besides the base the method merges (at least, at most; None: no limit)
    model_count: tuple[int, int | None] = (1, None)
    # the per-model parameter that weighs a model (TaskVector.weight): passthrough's is mergekit's `scale`
    weight_name: str = "weight"

    def sliceable(self, method_parameters: dict[str, Any]) -> bool:
        """Whether the engine may merge a tensor in slices with these parameters."""
        if self.elementwise:
            return True
        return self.sliced_trims and method_parameters.get("rescale", False) in (False, None, "none", True, "paper")

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)

    def density_value(self, value: Any, task_count: int) -> float:
        """A `density` parameter's value for one tensor merged from `task_count` models
        (the rank methods' default is 1/T: see resolved_density)."""
        return resolved_density(value, task_count)


# ---------------------------------------------------------------- the maths


def sparsify_task_vector(
    tv: TaskVector, sparsifier: Sparsifier, rescale: sparsify.Rescale, in_place: bool = False
) -> torch.Tensor:
    """The task vector after the host's own drop, at this tensor's density."""
    if sparsifier is None or tv.density >= 1:
        return tv.delta
    if sparsifier == "magnitude":
        return sparsify.magnitude(tv.delta, tv.density, rescale, in_place, tv.cut, tv.offset)
    if sparsifier == "random":
        return sparsify.random(tv.delta, tv.density, tv.seed, rescale, in_place, tv.offset)
    if sparsifier == "breadcrumbs":
        return sparsify.breadcrumbs(tv.delta, tv.density, tv.gamma, rescale, in_place)
    if sparsifier == "della":
        return sparsify.della(tv.delta, tv.density, tv.epsilon, tv.seed, rescale, in_place, tv.offset)
    raise ValueError(f"unknown sparsifier {sparsifier!r}")


EQUAL_SPLIT = "1/T"  # the rank methods' default density: the papers' equal split of the rank


def resolved_density(value: Any, task_count: int) -> float:
    """A `density` parameter's value for one tensor. The rank methods' default, EQUAL_SPLIT
    (or None), is 1/T, T the number of models merged into that tensor."""
    return 1.0 / max(1, task_count) if value is None or value == EQUAL_SPLIT else float(value)


def disjoint_mean(
    weighted: list[torch.Tensor],
    weights: list[float],
    consensus: str,
    with_divisor: bool = True,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TIES merge step: sum only the entries whose sign agrees with the elected sign.

    Returns the summed agreeing deltas and, if asked, the summed weights of the
    agreeing models (1 where none agrees), the divisor for a mean. With in_place,
    the `weighted` tensors are overwritten.
    """
    majority = sparsify.sign_consensus(weighted, consensus)
    mixed = torch.zeros_like(weighted[0])
    divisor = torch.zeros_like(weighted[0]) if with_divisor else None
    for weight, delta in zip(weights, weighted, strict=True):
        # delta * majority is > 0 exactly where the signs agree; relu keeps those entries'
        # magnitudes, and multiplying back by the (+-1) majority restores them exactly
        aligned = (delta.mul_(majority) if in_place else delta * majority).relu_()
        mixed.addcmul_(aligned, majority)
        if divisor is not None:  # sign(aligned) is 1 where this model agrees, 0 elsewhere
            divisor.add_(aligned.sign(), alpha=weight)
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
    weighted = []
    for tv in task_vectors:
        kept = sparsify_task_vector(tv, sparsifier, rescale, in_place=True)
        weighted.append(kept if tv.weight == 1 else kept.mul_(tv.weight))
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


def passthrough(base: torch.Tensor, task_vectors: list[TaskVector], **_: Any) -> torch.Tensor:
    """The one model's tensor, base + tau, times its `scale` (TaskVector.weight): mergekit's passthrough."""
    (tv,) = task_vectors
    return tv.delta.add_(base).mul_(tv.weight)


def _gta(steps: GtaSteps) -> Callable[..., torch.Tensor]:
    def merge(
        base: torch.Tensor,
        task_vectors: list[TaskVector],
        *,
        normalize: bool,
        rescale: sparsify.Rescale = False,
        **params: Any,
    ) -> torch.Tensor:
        return generalized_task_arithmetic(
            base,
            task_vectors,
            sparsifier=steps.sparsifier,
            consensus=steps.consensus,
            normalize=normalize,
            lambda_=params.get("lambda", 1.0),
            rescale=rescale,
        )

    return merge


def _gta_method(
    name: str, steps: GtaSteps, description: str, reference: str, params: tuple[ParamSpec, ...], **flags: Any
) -> MergeMethod:
    """A generalized-task-arithmetic host: its merge function and the steps it takes."""
    return MergeMethod(
        name, _gta(steps), description, reference, sparsifier=steps.sparsifier, params=params, gta=steps, **flags
    )


def _weighted(tv: TaskVector) -> torch.Tensor:
    """w * tau (the delta is scratch space: weighted in place)."""
    return tv.delta if tv.weight == 1 else tv.delta.mul_(tv.weight)


# The fast SVD route pays from this many rows and columns on (1.9-2.8x at 128 x 1024, docs/speed.md); on
# smaller matrices the full SVDs are faster (2 ms vs 12 ms at 40 x 30) and their entries closer to a
# float64 merge (a 16 x 24 Iso-CTS merge: 6e-6 vs 2e-5 at most).
FAST_SVD_MIN_SIDE = 128


def _subspace(merge_matrix: Callable[..., torch.Tensor], uses_density: bool) -> Callable[..., torch.Tensor]:
    """An SVD-based method: `merge_matrix` on 2-D tensors; the mean of the weighted task vectors
    on every other tensor (biases, norms: what the papers' code does); then base + lambda * delta."""

    def merge(base: torch.Tensor, task_vectors: list[TaskVector], **params: Any) -> torch.Tensor:
        if not task_vectors:
            return base.clone()
        deltas = [_weighted(tv) for tv in task_vectors]
        extra = {k: v for k, v in params.items() if k != "lambda"}  # the method's own (e.g. common_space_fraction)
        extra["seeds"] = [tv.seed for tv in task_vectors]  # the fast SVD route's random starts
        if base.dim() == 2 and min(base.shape) < FAST_SVD_MIN_SIDE:
            extra["exact_svd"] = True  # there the full SVDs are faster, and closer to float64 (golden tests)
        if base.dim() != 2:
            merged = subspace.mean_of(deltas)
        elif uses_density:
            merged = merge_matrix(deltas, [tv.density for tv in task_vectors], **extra)
        else:
            merged = merge_matrix(deltas, **extra)
        lambda_ = params.get("lambda", 1.0)
        if lambda_ != 1:
            merged *= lambda_
        return merged.add_(base)

    return merge


def consensus(
    base: torch.Tensor,
    task_vectors: list[TaskVector],
    *,
    ties: bool,
    normalize: bool,
    k: float = 2,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """Consensus merging (TALL masks): base + lambda * (consensus mask * tau_MTL).

    tau_MTL is the multi-task vector: task arithmetic of the weighted task vectors, each first
    trimmed to its `density` largest entries (a no-op at density 1), or TIES (trim at
    `density`, sign election, disjoint sum; a disjoint mean with normalize). With tau_t the
    weighted, untrimmed task vector (as the authors' code, which compares the fine-tuned
    weights), task t's TALL mask is |tau_t| >= lambda_t * |tau_MTL - tau_t| (lambda_t =
    TaskVector.tall_mask_lambda), and the consensus mask keeps the entries that at least
    `k` masks select.

    Everything after the trims is elementwise, so the engine may merge these in slices given
    the trims' cuts.
    """
    if not task_vectors:
        return base.clone()
    weights = [tv.weight for tv in task_vectors]
    keeps = [
        None if tv.density >= 1 else sparsify.magnitude_mask(tv.delta, tv.density, tv.cut, tv.offset)
        for tv in task_vectors
    ]
    weighted = [_weighted(tv) for tv in task_vectors]
    # new tensors: the TIES steps below overwrite them, and the TALL masks need `weighted` intact
    trimmed = [delta.clone() if keep is None else delta * keep for delta, keep in zip(weighted, keeps, strict=True)]
    del keeps
    if ties:
        mixed, divisor = disjoint_mean(trimmed, weights, "sum", with_divisor=normalize, in_place=True)
        if divisor is not None:
            mixed /= divisor
    else:
        mixed = trimmed[0]
        for delta in trimmed[1:]:
            mixed += delta
        if normalize:
            divisor = sum(weights)
            mixed /= divisor if abs(divisor) >= 1e-8 else 1.0
    del trimmed
    votes = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
    for tv, delta in zip(task_vectors, weighted, strict=True):
        votes += delta.abs() >= (mixed - delta).abs_().mul_(tv.tall_mask_lambda)
    mixed *= votes >= k
    if lambda_ != 1:
        mixed *= lambda_
    return mixed.add_(base)


def _consensus(ties: bool) -> Callable[..., torch.Tensor]:
    def merge(
        base: torch.Tensor, task_vectors: list[TaskVector], *, normalize: bool = False, k: float = 2, **params: Any
    ) -> torch.Tensor:
        return consensus(base, task_vectors, ties=ties, normalize=normalize, k=k, lambda_=params.get("lambda", 1.0))

    return merge


def _model_stock(
    base: torch.Tensor, task_vectors: list[TaskVector], *, filter_wise: bool = False, **_: Any
) -> torch.Tensor:
    return statistic_merges.model_stock(base, [tv.delta for tv in task_vectors], filter_wise)


def _sce(base: torch.Tensor, task_vectors: list[TaskVector], *, normalize: bool = True, **_: Any) -> torch.Tensor:
    """SCE with the select fraction of this tensor: the recipe's select_topk (each TaskVector's
    density), or with TADrop the mean of the models' adapted fractions (one mask for all)."""
    if not task_vectors:
        return base.clone()
    fraction = sum(tv.density for tv in task_vectors) / len(task_vectors)
    return statistic_merges.sce(base, [tv.delta for tv in task_vectors], fraction, normalize)


def _arcee_fusion(base: torch.Tensor, task_vectors: list[TaskVector], **_: Any) -> torch.Tensor:
    if not task_vectors:
        return base.clone()
    if len(task_vectors) != 1:
        raise ValueError(f"arcee_fusion merges one model into the base (got {len(task_vectors)})")
    return statistic_merges.arcee_fusion(base, task_vectors[0].delta)


def slerp(base: torch.Tensor, models: list[ModelTensor], *, t: float, **_: Any) -> torch.Tensor:
    """SLERP from the base (t = 0) to the one other model (t = 1): interpolation.slerp."""
    return interpolation.slerp(t, base, models[0].tensor)


def nuslerp(
    base: torch.Tensor | None,
    models: list[ModelTensor],
    *,
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
    **_: Any,
) -> torch.Tensor:
    """NuSLERP of two models at t = w1 / (w0 + w1): of their tensors, or with a base of their task
    vectors, base + nuslerp(t, x0 - base, x1 - base) (interpolation.nuslerp)."""
    t = interpolation.nuslerp_t([m.weight for m in models])
    options = dict(flatten=nuslerp_flatten, row_wise=nuslerp_row_wise)
    if base is None:
        return interpolation.nuslerp(t, models[0].tensor, models[1].tensor, **options)
    return base + interpolation.nuslerp(t, models[0].tensor - base, models[1].tensor - base, **options)


def multislerp(
    base: torch.Tensor | None,
    models: list[ModelTensor],
    *,
    normalize_weights: bool = True,
    eps: float = 1e-8,
    **_: Any,
) -> torch.Tensor:
    """Multi-SLERP of the models (of their task vectors with a base): interpolation.multislerp."""
    return interpolation.multislerp(
        [m.tensor for m in models], [m.weight for m in models], base, normalize_weights=normalize_weights, eps=eps
    )


def karcher(
    base: torch.Tensor | None, models: list[ModelTensor], *, max_iter: int = 10, tol: float = 1e-5, **_: Any
) -> torch.Tensor:
    """The Karcher mean of the base (as one more model, as in mergekit, where it is an input like
    any other) and the models: interpolation.karcher."""
    tensors = [m.tensor for m in models] if base is None else [base, *(m.tensor for m in models)]
    return interpolation.karcher(tensors, max_iter=int(max_iter), tol=tol)


def nearswap(base: torch.Tensor, models: list[ModelTensor], *, t: float, **_: Any) -> torch.Tensor:
    """NearSwap of the base toward the one other model: interpolation.nearswap."""
    return interpolation.nearswap(t, base, models[0].tensor)


# ---------------------------------------------------------------- the registry

WEIGHT = ParamSpec("weight", 1.0, "scale of this model's task vector (or tensor, for linear)", per_model=True)
DENSITY = ParamSpec(
    "density", 1.0, "fraction of task-vector entries kept (1 - drop ratio)", per_model=True, low=0.0, high=1.0
)
GAMMA = ParamSpec(
    "gamma", 0.01, "fraction of the largest entries removed as outliers", per_model=True, low=0.0, high=1.0
)
LAMBDA = ParamSpec("lambda", 1.0, "scale of the merged task vector", low=-10.0, high=10.0)
INT8_MASK = ParamSpec(
    "int8_mask", False, "accepted for mergekit compatibility; no effect (masks are boolean)", kind="bool"
)
EPSILON = ParamSpec(
    "epsilon",
    0.15,
    "DELLA: keep probabilities run from density - epsilon (smallest |delta| of a row) "
    "to density + epsilon (largest), as in mergekit",
    per_model=True,
    low=0.0,
    high=0.5,
)
ALPHA = ParamSpec("lambda", 1.0, "scale of the merged task vector (the papers' alpha)", low=-10.0, high=10.0)
RANK_SHARE = ParamSpec(
    "density",
    EQUAL_SPLIT,
    "fraction of the rank budget this task keeps in each 2-D tensor "
    "(TSV-M: of min(m, n); Iso-CTS: of the task-specific budget); "
    "default 1/T (T = models merged into the tensor), the papers' equal split; "
    "scaled down if the tasks' total exceeds the budget",
    per_model=True,
    low=0.0,
    high=1.0,
)
EXACT_SVD = ParamSpec(
    "exact_svd",
    False,
    "SVD hosts: full float32 SVDs as the papers' code (true), or the fast route (false): randomized top-k and Gram "
    "eigendecompositions in float64, checked converged to float32 level (see docs/speed.md)",
    kind="bool",
)
COMMON_SPACE = ParamSpec(
    "common_space_fraction",
    0.8,
    "Iso-CTS: share of the rank given to the common subspace of the summed task matrices (paper: 0.8)",
    low=0.0,
    high=1.0,
)
TALL_LAMBDA = ParamSpec(
    "tall_mask_lambda",
    0.4,
    "lambda_t of this task's TALL mask |tau_t| >= lambda_t |tau_MTL - tau_t| "
    "(paper tunes it in 0.2-0.6 on validation data; 0.4 is the middle)",
    per_model=True,
    low=0.0,
    high=10.0,
)
CONSENSUS_K = ParamSpec(
    "k",
    2,
    "consensus: keep entries selected by the TALL masks of at least k tasks "
    "(paper: 2; 0 = no consensus, tau_MTL unchanged)",
    low=0.0,
    high=1000.0,
)


FILTER_WISE = ParamSpec(
    "filter_wise",
    False,
    "Model Stock: one interpolation ratio per row (slice along the last dimension) instead of per tensor",
    kind="bool",
)
SELECT_TOPK = ParamSpec(
    "select_topk",
    1.0,
    "SCE: fraction of the entries of largest variance across the models kept (1 = all); TADrop adapts it per tensor",
    low=0.0,
    high=1.0,
)
SCE_NORMALIZE = ParamSpec(
    "normalize",
    True,
    "SCE: divide each entry by the summed coefficients of the models kept there (mergekit); false: the plain "
    "coefficient-weighted sum",
    kind="bool",
)
SLERP_T = ParamSpec(
    "t",
    REQUIRED,
    "interpolation factor: 0 = the base, 1 = the other model; may be a gradient over the layers",
)
INTERPOLATION_WEIGHT = ParamSpec(
    "weight", 1.0, "this model's share of the interpolation (relative to the others')", per_model=True
)
NUSLERP_FLATTEN = ParamSpec(
    "nuslerp_flatten", True, "interpolate whole tensors (true), or vector by vector (false)", kind="bool"
)
NUSLERP_ROW_WISE = ParamSpec(
    "nuslerp_row_wise",
    False,
    "with nuslerp_flatten: false, the vectors along dim 0 (a matrix's columns, mergekit's naming), "
    "else along the last dim (its rows)",
    kind="bool",
)
MULTISLERP_NORMALIZE = ParamSpec(
    "normalize_weights", True, "divide the weights by their sum (barycentric weights)", kind="bool"
)
MULTISLERP_EPS = ParamSpec("eps", 1e-8, "added to norms before dividing by them", low=0.0, high=1.0)
KARCHER_MAX_ITER = ParamSpec("max_iter", 10, "most iterations of the Riemannian mean", kind="int", low=0, high=10000)
KARCHER_TOL = ParamSpec(
    "tol", 1e-5, "stop when the tangent step is shorter; norms and angles below it count as zero", low=0.0, high=1.0
)
NEARSWAP_T = ParamSpec(
    "t",
    REQUIRED,
    "entries within t of the base's take the other model's value; farther ones move toward it by t",
    low=0.0,
)


def _normalize(default: bool) -> ParamSpec:
    return ParamSpec("normalize", default, "divide the merged task vector by the sum of the weights", kind="bool")


def _rescale(default: bool) -> ParamSpec:
    return ParamSpec(
        "rescale",
        default,
        "after a drop, rescale survivors: true/paper = 1/density (the papers), "
        "l1/l2/linf = match that norm (mergekit), false",
        kind="rescale",
    )


def _gta_params(normalize: bool, rescale: bool, *extra: ParamSpec) -> tuple[ParamSpec, ...]:
    return (WEIGHT, DENSITY, *extra, _normalize(normalize), LAMBDA, _rescale(rescale), INT8_MASK)


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in [
        MergeMethod(
            "passthrough",
            passthrough,
            "one model's tensors as they are (times `scale`): slices of models stacked into a deeper one",
            "https://github.com/arcee-ai/mergekit",
            params=(
                ParamSpec(
                    "scale",
                    1.0,
                    "multiply this model's tensor (mergekit's passthrough scale; 1: a copy)",
                    per_model=True,
                ),
            ),
            elementwise=True,
            weight_name="scale",
            model_count=(1, 1),
        ),
        MergeMethod(
            "linear",
            linear,
            "weighted average of the models (model soup)",
            "https://arxiv.org/abs/2203.05482",
            params=(WEIGHT, _normalize(True)),
            elementwise=True,
        ),
        _gta_method(
            "task_arithmetic",
            GtaSteps(None, None),
            "base + lambda * sum of weighted task vectors",
            "https://arxiv.org/abs/2212.04089",
            params=(
                WEIGHT,
                ParamSpec(
                    "density",
                    1.0,
                    "ignored, as in mergekit (use magnitude_prune to trim)",
                    per_model=True,
                    low=0.0,
                    high=1.0,
                ),
                _normalize(False),
                LAMBDA,
                INT8_MASK,
            ),
            elementwise=True,
        ),
        _gta_method(
            "magnitude_prune",
            GtaSteps("magnitude", None),
            "trim each task vector to its largest entries, then task arithmetic",
            "https://arxiv.org/abs/2306.01708",
            params=_gta_params(False, False),
            sliced_trims=True,
        ),
        _gta_method(
            "ties",
            GtaSteps("magnitude", "sum"),
            "trim, elect sign, disjoint mean (TIES-Merging)",
            "https://arxiv.org/abs/2306.01708",
            params=_gta_params(True, False),
            sliced_trims=True,
        ),
        _gta_method(
            "dare_linear",
            GtaSteps("random", None),
            "random drop and rescale (DARE), then task arithmetic",
            "https://arxiv.org/abs/2311.03099",
            params=_gta_params(False, True),
            sliced_trims=True,
        ),
        _gta_method(
            "dare_ties",
            GtaSteps("random", "sum"),
            "random drop and rescale (DARE), then TIES sign election",
            "https://arxiv.org/abs/2311.03099",
            params=_gta_params(False, True),
            sliced_trims=True,
        ),
        _gta_method(
            "breadcrumbs",
            GtaSteps("breadcrumbs", None),
            "drop outliers and small entries (Model Breadcrumbs), then task arithmetic",
            "https://arxiv.org/abs/2312.06795",
            params=_gta_params(False, False, GAMMA),
        ),
        _gta_method(
            "breadcrumbs_ties",
            GtaSteps("breadcrumbs", "sum"),
            "Model Breadcrumbs with TIES sign election",
            "https://arxiv.org/abs/2312.06795",
            params=_gta_params(False, False, GAMMA),
        ),
        _gta_method(
            "della",
            GtaSteps("della", "sum"),
            "magnitude-ranked random drop and rescale (DELLA MAGPRUNE), TIES sign election, disjoint mean",
            "https://arxiv.org/abs/2406.11617",
            params=_gta_params(True, True, EPSILON),
            sliced_trims=True,
            whole_rows=True,
        ),
        _gta_method(
            "della_linear",
            GtaSteps("della", None),
            "magnitude-ranked random drop and rescale (DELLA MAGPRUNE), then task arithmetic",
            "https://arxiv.org/abs/2406.11617",
            params=_gta_params(False, True, EPSILON),
            sliced_trims=True,
            whole_rows=True,
        ),
        MergeMethod(
            "tsv_m",
            _subspace(subspace.tsv_merge, True),
            "Task Singular Vectors: each task's top singular triplets, decorrelated (Procrustes), summed",
            "https://arxiv.org/abs/2412.00081",
            sparsifier="rank",
            params=(WEIGHT, RANK_SHARE, ALPHA, EXACT_SVD),
        ),
        MergeMethod(
            "iso_c",
            _subspace(subspace.iso_c_merge, False),
            "Iso-C: sum of task vectors with a flat (isotropic) singular spectrum",
            "https://arxiv.org/abs/2502.04959",
            params=(WEIGHT, ALPHA, EXACT_SVD),
        ),
        MergeMethod(
            "iso_cts",
            _subspace(subspace.iso_cts_merge, True),
            "Iso-CTS: common subspace of the sum plus task-specific directions, flat spectrum",
            "https://arxiv.org/abs/2502.04959",
            sparsifier="rank",
            params=(WEIGHT, RANK_SHARE, COMMON_SPACE, ALPHA, EXACT_SVD),
        ),
        MergeMethod(
            "consensus_ta",
            _consensus(False),
            "Consensus merging: task arithmetic kept where the TALL masks of at least k tasks agree",
            "https://arxiv.org/abs/2405.07813",
            sparsifier="magnitude",
            params=(
                WEIGHT,
                ParamSpec(
                    "density",
                    1.0,
                    "fraction of each task vector kept by a magnitude trim before the sum (1 = no trim, the paper)",
                    per_model=True,
                    low=0.0,
                    high=1.0,
                ),
                TALL_LAMBDA,
                CONSENSUS_K,
                _normalize(False),
                LAMBDA,
            ),
            sliced_trims=True,
        ),
        MergeMethod(
            "consensus_ties",
            _consensus(True),
            "Consensus merging: TIES kept where the TALL masks of at least k tasks agree",
            "https://arxiv.org/abs/2405.07813",
            sparsifier="magnitude",
            params=(
                WEIGHT,
                ParamSpec(
                    "density",
                    0.2,
                    "fraction of each task vector kept by the TIES trim (authors' code: top 20%)",
                    per_model=True,
                    low=0.0,
                    high=1.0,
                ),
                TALL_LAMBDA,
                CONSENSUS_K,
                ParamSpec("normalize", False, "TIES disjoint mean instead of the authors' disjoint sum", kind="bool"),
                LAMBDA,
            ),
            sliced_trims=True,
        ),
        MergeMethod(
            "model_stock",
            _model_stock,
            "Model Stock: towards the models' average by a ratio set by the angle between their task vectors",
            "https://arxiv.org/abs/2403.19522",
            params=(FILTER_WISE,),
            model_count=(2, None),
            no_tadrop="model_stock drops no entries (it interpolates between the base and the models' average)",
        ),
        MergeMethod(
            "sce",
            _sce,
            "SCE: keep the entries of largest variance across the models, weight each model by its squared "
            "task vector, erase minority signs",
            "https://arxiv.org/abs/2408.07990",
            sparsifier="variance",
            params=(SELECT_TOPK, SCE_NORMALIZE, INT8_MASK),
            density_param="select_topk",
        ),
        MergeMethod(
            "arcee_fusion",
            _arcee_fusion,
            "Arcee Fusion: keep the model's changes whose importance (|delta| x KL of the rows' softmax) is an "
            "outlier (>= median + 1.5 IQR)",
            "https://arcee.ai",
            model_count=(1, 1),
            no_tadrop="arcee_fusion keeps the entries above its own importance threshold (median + 1.5 IQR): "
            "it has no kept fraction for TADrop to set",
        ),
        MergeMethod(
            "slerp",
            slerp,
            "spherical interpolation of the base and one other model, whole tensors (SLERP)",
            "https://en.wikipedia.org/wiki/Slerp",
            params=(SLERP_T,),
            interpolates=True,
            model_count=(1, 1),
        ),
        MergeMethod(
            "nuslerp",
            nuslerp,
            "SLERP of two models (of their task vectors, with a base), whole tensors or vector by vector",
            "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
            params=(INTERPOLATION_WEIGHT, NUSLERP_FLATTEN, NUSLERP_ROW_WISE),
            interpolates=True,
            base_optional=True,
            model_count=(2, 2),
        ),
        MergeMethod(
            "multislerp",
            multislerp,
            "barycentric SLERP of any number of models (of their task vectors, with a base)",
            "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
            params=(INTERPOLATION_WEIGHT, MULTISLERP_NORMALIZE, MULTISLERP_EPS),
            interpolates=True,
            base_optional=True,
        ),
        MergeMethod(
            "karcher",
            karcher,
            "Karcher (Riemannian) mean of the models' directions, scaled by their mean norm",
            "https://arxiv.org/abs/2603.04972",
            params=(KARCHER_MAX_ITER, KARCHER_TOL),
            interpolates=True,
            base_optional=True,
        ),
        MergeMethod(
            "nearswap",
            nearswap,
            "take the other model's entries where they are near the base's (NearSwap)",
            "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
            params=(NEARSWAP_T,),
            interpolates=True,
            model_count=(1, 1),
            elementwise=True,
        ),
    ]
}
