"""Pass 1 of a merge: the plan, i.e. the drop ratio of every (model, tensor).

With TADrop off every tensor gets the host's ratio (1 - density) and nothing is read.
With TADrop on, each task-vector tensor is scored (one tensor name at a time), the
scores are normalised per model, and ratios are set around the host's ratio.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from . import kernels
from .checkpoint import Checkpoint, mapped_slices, read_all_float32, read_float32
from .devices import on_cpu
from .layout import Layout, ModelInput, TensorJob
from .recipe import TadropSettings
from .tadrop import HoyerSums, adaptive_ratios, normalize_scores, tensor_score


@dataclass
class RatioRow:
    """Why one (model, tensor) gets its drop ratio."""

    model: str
    tensor: str
    numel: int
    base_ratio: float  # the host's ratio p = 1 - density
    ratio: float  # the ratio applied
    reason: str  # adaptive | uniform | excluded | small | zero delta | no sparsification
    score: Optional[float] = None
    normalized: Optional[float] = None


@dataclass
class ModelSummary:
    model: str
    statistic: Optional[str]
    tensors: int
    adaptive_tensors: int
    mean_base_ratio: float  # element-weighted, over every merged tensor
    mean_ratio: float
    min_ratio: float
    max_ratio: float
    shift: float
    budget_met: bool


@dataclass
class Plan:
    rows: list[RatioRow]
    models: list[ModelSummary]

    def __post_init__(self) -> None:
        self._lookup = {(row.model, row.tensor): row for row in self.rows}

    def ratio(self, model: str, tensor: str) -> float:
        return self._lookup[(model, tensor)].ratio

    def density(self, model: str, tensor: str, recipe_density: float) -> float:
        """The fraction to keep. Where the plan left the host's ratio alone, the recipe's
        density is returned as written: 1 - (1 - d) can lose an ulp, and mergekit's
        int(d * n) count would then keep one entry fewer."""
        row = self._lookup[(model, tensor)]
        return recipe_density if row.ratio == row.base_ratio else 1.0 - row.ratio

    def to_json(self) -> dict:
        return {"models": [asdict(m) for m in self.models], "tensors": [asdict(r) for r in self.rows]}

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        return cls([RatioRow(**r) for r in data["tensors"]], [ModelSummary(**m) for m in data["models"]])


@dataclass(frozen=True)
class _TensorSettings:
    adaptive: bool
    reason: str
    strength: float
    min_ratio: float
    max_ratio: float


def _settings_for(settings: TadropSettings, name: str, numel: int) -> _TensorSettings:
    override = next((o for o in settings.overrides if fnmatch.fnmatchcase(name, o.filter)), None)
    strength = settings.strength if override is None or override.strength is None else override.strength
    low = settings.min_ratio if override is None or override.min_ratio is None else override.min_ratio
    high = settings.max_ratio if override is None or override.max_ratio is None else override.max_ratio
    if (override is not None and override.enabled is False) or any(fnmatch.fnmatchcase(name, p) for p in settings.exclude):
        return _TensorSettings(False, "excluded", strength, low, high)
    if numel < settings.min_numel:
        return _TensorSettings(False, "small", strength, low, high)
    return _TensorSettings(True, "adaptive", strength, low, high)


def _fixed_ratio(settings: Optional[TadropSettings], base_ratio: float) -> float:
    return 0.0 if settings is not None and settings.excluded_ratio == "none" else base_ratio


def build_plan(layout: Layout, device: str, on_tensor: Callable[[TensorJob], None] = lambda job: None) -> Plan:
    """Score every task-vector tensor that TADrop adapts, and fix every drop ratio."""
    method = layout.recipe.method
    rows: dict[tuple[int, str], RatioRow] = {}
    pending: dict[int, list[tuple[RatioRow, _TensorSettings]]] = {j: [] for j in range(len(layout.models))}

    for job in layout.jobs:
        sparsifies = _sparsifies(method.sparsifier, job)
        to_score: list[tuple[int, ModelInput, RatioRow, _TensorSettings]] = []
        for j in job.contributors:
            model = layout.models[j]
            # the rank methods' default density is "1/T": the papers' equal split
            base_ratio = 1.0 - method.density_value(layout.model_parameter(model, "density", job.name), len(job.contributors)) if sparsifies else 0.0
            row = RatioRow(model.label, job.name, job.out.numel, base_ratio, base_ratio, "uniform")
            rows[(j, job.name)] = row
            if not sparsifies:
                row.reason = "no sparsification"
            elif model.tadrop is not None:
                tensor_settings = _settings_for(model.tadrop, job.name, row.numel)
                row.reason = tensor_settings.reason
                if tensor_settings.adaptive:
                    to_score.append((j, model, row, tensor_settings))
                else:
                    row.ratio = _fixed_ratio(model.tadrop, base_ratio)
        if to_score:
            scores = _scores(layout, job, device, [(j, model) for j, model, _, _ in to_score])
            for j, model, row, tensor_settings in to_score:
                row.score = scores[j]
                if row.score is None:
                    row.reason = "zero delta"
                else:
                    pending[j].append((row, tensor_settings))
        on_tensor(job)

    shifts: dict[int, tuple[float, bool]] = {}
    for j, entries in pending.items():
        if not entries:
            continue
        settings = layout.models[j].tadrop
        normalized = normalize_scores([row.score for row, _ in entries], settings.normalize)
        result = adaptive_ratios(
            normalized,
            [row.base_ratio for row, _ in entries],
            [row.numel for row, _ in entries],
            strength=[s.strength for _, s in entries],
            min_ratio=[s.min_ratio for _, s in entries],
            max_ratio=[s.max_ratio for _, s in entries],
            preserve_budget=settings.preserve_budget,
        )
        for (row, _), s, ratio in zip(entries, normalized, result.ratios):
            row.normalized, row.ratio = s, ratio
        shifts[j] = (result.shift, result.budget_met)

    ordered = [rows[key] for key in sorted(rows, key=lambda k: k[0])]
    return Plan(ordered, [_summarize(layout, j, ordered, shifts.get(j, (0.0, True))) for j in range(len(layout.models))])


# Hoyer scores (the default statistic) are summed over slices of this many entries, so that
# scoring needs a few slices' memory, not the tensor's; the other statistics see whole tensors.
SCORE_SLICE_ELEMENTS = 1 << 20
GPU_SCORE_SLICE_ELEMENTS = 1 << 24  # on a GPU, fewer launches and waits (see engine.GPU_CHUNK_ELEMENTS)


def _scores(layout: Layout, job: TensorJob, device: str, models: list[tuple[int, ModelInput]]) -> dict[int, Optional[float]]:
    """Each model's score of this tensor's task vector (None: all zeros)."""
    scores: dict[int, Optional[float]] = {}
    sliced = {j: HoyerSums() for j, model in models if model.tadrop.statistic == "hoyer"}
    step = SCORE_SLICE_ELEMENTS if on_cpu(device) else GPU_SCORE_SLICE_ELEMENTS
    checkpoints = [layout.reference, *(layout.models[j].checkpoint for j in sliced)]
    with_kernels = on_cpu(device) and kernels.supports([c.tensors[job.name].dtype for c in checkpoints], len(sliced))
    for start in range(0, job.out.numel if sliced else 0, step):
        stop = min(start + step, job.out.numel)
        if with_kernels and _add_sums_with_kernels(checkpoints, job.name, start, stop, list(sliced.values())):
            continue
        base, *tuned = read_all_float32(checkpoints, job.name, device, start, stop)
        for sums, tensor in zip(sliced.values(), tuned):
            sums.add(tensor.sub_(base))
    scores.update({j: sums.score() for j, sums in sliced.items()})
    whole = [(j, model) for j, model in models if j not in sliced]
    if whole:
        base = read_float32(layout.reference, job.name, device)
        for j, model in whole:
            scores[j] = tensor_score(read_float32(model.checkpoint, job.name, device).sub_(base), model.tadrop.statistic, model.tadrop.topmass_fraction)
    return scores


def _add_sums_with_kernels(checkpoints: list[Checkpoint], name: str, start: int, stop: int, sums: list[HoyerSums]) -> bool:
    """Add one slice's Hoyer sums of each model's task vector (checkpoints[0] is the base), from
    the stored entries; False (nothing added) when an entry is NaN or Inf: the caller's PyTorch
    path then names the input at fault, or sums an overflowed difference as it does."""
    with mapped_slices(checkpoints, name, start, stop) as (base, *tuned):
        results, non_finite = kernels.hoyer_sums(base, tuned)
    if non_finite:
        return False
    for model_sums, (l1, l2_squared) in zip(sums, results):
        model_sums.add_sums(stop - start, l1, l2_squared)
    return True


def _sparsifies(sparsifier: Optional[str], job: TensorJob) -> bool:
    """Whether the method's drop (its `sparsifier`) applies to this tensor: a rank budget
    only to 2-D tensors (the SVD-based methods average every other tensor)."""
    if sparsifier == "rank":
        return len(job.out.shape) == 2
    return sparsifier is not None


def _summarize(layout: Layout, j: int, rows: list[RatioRow], shift: tuple[float, bool]) -> ModelSummary:
    model = layout.models[j]
    mine = [r for r in rows if r.model == model.label]
    total = sum(r.numel for r in mine) or 1
    return ModelSummary(
        model=model.label,
        statistic=model.tadrop.statistic if model.tadrop else None,
        tensors=len(mine),
        adaptive_tensors=sum(r.reason == "adaptive" for r in mine),
        mean_base_ratio=sum(r.numel * r.base_ratio for r in mine) / total,
        mean_ratio=sum(r.numel * r.ratio for r in mine) / total,
        min_ratio=min((r.ratio for r in mine), default=0.0),
        max_ratio=max((r.ratio for r in mine), default=0.0),
        shift=shift[0],
        budget_met=shift[1],
    )
