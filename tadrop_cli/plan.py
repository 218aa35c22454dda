"""Pass 1 of a merge: the plan, i.e. the drop ratio of every (model, tensor).

With TADrop off every tensor gets the host's ratio (1 - density) and nothing is read.
With TADrop on, each task-vector tensor is measured (one tensor name at a time), then each
model's tensors get their ratios together, by its `allocation`:

- `strength` (default): a score per tensor, normalised within its `scope` group (the model,
  a tensor kind across layers, or a layer), p_t = p + strength * (1 - 2 s_t) and a common
  shift for the budget (tadrop.adaptive_ratios).
- `mass`, `mass_reverse`, `global`: a magnitude profile per tensor (histogram of |tau| with
  float64 mass per bucket, compressed: tadrop.MagnitudeProfile, <= 12 KB per (model, tensor)),
  and a kept COUNT per tensor that meets the model's uniform kept count exactly. The count
  enters pass 2 as the row's `kept`: Plan.density returns a density d with
  kept_count(n, d) == kept, which is what every magnitude host keeps (sparsify.kept_count); a
  random host takes d as its keep probability.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np

from . import kernels
from .checkpoint import Checkpoint, mapped_slices, read_all_float32, read_float32
from .cpu_share import fit_torch_threads
from .devices import on_cpu
from .errors import BadInput
from .layout import Layout, ModelInput, TensorJob
from .lazy import torch
from .recipe import TadropSettings
from .sparsify import MAGNITUDE_BUCKETS, kept_count
from .tadrop import (
    HoyerSums,
    MagnitudeProfile,
    adaptive_ratios,
    global_allocation,
    kept_above_level,
    kept_for_mass,
    magnitude_profile,
    mass_allocation,
    mass_reverse_allocation,
    normalize_scores,
    tensor_score,
    threshold_value,
)
from .tensor_names import LAYER_NUMBER, layer_of

# hosts whose drop is random: survivors are rescaled by 1 / (1 - p_t), which max_rescale bounds
RANDOM_SPARSIFIERS = ("random", "della")


@dataclass
class RatioRow:
    """Why one (model, tensor) gets its drop ratio."""

    model: str
    tensor: str
    numel: int
    base_ratio: float  # the host's ratio p = 1 - density
    ratio: float  # the ratio applied
    reason: str  # adaptive[: how] | uniform | excluded | small | zero delta | no sparsification
    score: float | None = None
    normalized: float | None = None
    group: str | None = None  # the scope group its score was normalised in (scope kind or layer)
    kept: int | None = None  # entries kept, where an allocation set a count (mass, mass_reverse, global)


# RatioRow and ModelSummary fields left out of the JSON while None (plans of the default family read as before)
_OPTIONAL_FIELDS = ("group", "kept", "allocation", "scope", "mass_fraction", "threshold")


@dataclass
class ModelSummary:
    model: str
    statistic: str | None
    tensors: int
    adaptive_tensors: int
    mean_base_ratio: float  # element-weighted, over every merged tensor
    mean_ratio: float
    min_ratio: float
    max_ratio: float
    shift: float
    budget_met: bool
    allocation: str | None = None  # with TADrop: strength | mass | mass_reverse | global
    scope: str | None = None  # strength allocation: model | kind | layer
    mass_fraction: float | None = None  # mass, mass_reverse: the common fraction f of each tensor's mass
    threshold: float | None = None  # global: the model-wide |tau| threshold (at bucket resolution)


def _without_unset(record: RatioRow | ModelSummary) -> dict:
    """The record's fields as a dict, those of _OPTIONAL_FIELDS left out while None. (Its fields
    are scalars: dataclasses.asdict's deep copy of each took most of the time of saving a plan.)"""
    values = ((name, getattr(record, name)) for name in _field_names(type(record)))
    return {name: value for name, value in values if not (value is None and name in _OPTIONAL_FIELDS)}


@functools.cache
def _field_names(kind: type) -> tuple[str, ...]:
    return tuple(field.name for field in fields(kind))


def density_for_count(kept: int, numel: int) -> float:
    """A density d with kept_count(numel, d) == kept (sparsify.kept_count): kept / numel, raised by
    an ulp where the product rounds below."""
    if kept >= numel:
        return 1.0
    density = kept / numel
    while kept_count(numel, density) < kept:
        density = math.nextafter(density, 1.0)
    return density


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
        if row.kept is not None:
            return density_for_count(row.kept, row.numel)
        return recipe_density if row.ratio == row.base_ratio else 1.0 - row.ratio

    def to_json(self) -> dict:
        return {
            "models": [_without_unset(m) for m in self.models],
            "tensors": [_without_unset(r) for r in self.rows],
        }

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        return cls([RatioRow(**r) for r in data["tensors"]], [ModelSummary(**m) for m in data["models"]])


@dataclass(frozen=True)
class _TensorSettings:
    adaptive: bool
    reason: str
    strength: float
    min_ratio: float
    max_ratio: float
    rescale_cap: float | None = None  # a random host's max_rescale bound where it is below max_ratio


def glob_matches(name: str, pattern: str) -> bool:
    """A TADrop glob (exclude, overrides' filter) matches case-insensitively: `*norm*` is meant
    to catch BERT's LayerNorm as well as Llama's norm."""
    return fnmatch.fnmatchcase(name.lower(), pattern.lower())


@functools.lru_cache(maxsize=64)
def _any_glob(patterns: tuple[str, ...]) -> re.Pattern:
    """One compiled pattern that matches a lowercased name where glob_matches does for any of
    `patterns`: one match per tensor instead of one per pattern."""
    return re.compile("|".join(f"(?:{fnmatch.translate(pattern.lower())})" for pattern in patterns) or "(?!)")


def _rescale_cap(settings: TadropSettings, sparsifier: str | None, base_ratio: float) -> float | None:
    """The highest ratio a random host may get: 1 - 1 / max_rescale, but never below the host's own
    ratio (the user chose that rescale for every tensor). None for other hosts."""
    if sparsifier not in RANDOM_SPARSIFIERS:
        return None
    return max(1.0 - 1.0 / settings.max_rescale, base_ratio)


def _settings_for(
    settings: TadropSettings, name: str, numel: int, sparsifier: str | None = None, base_ratio: float = 0.0
) -> _TensorSettings:
    override = next((o for o in settings.overrides if glob_matches(name, o.filter)), None)
    strength = settings.strength if override is None or override.strength is None else override.strength
    low = settings.min_ratio if override is None or override.min_ratio is None else override.min_ratio
    high = settings.max_ratio if override is None or override.max_ratio is None else override.max_ratio
    cap = _rescale_cap(settings, sparsifier, base_ratio)
    if cap is not None and cap < high:
        high, low = cap, min(low, cap)
    else:
        cap = None
    if (override is not None and override.enabled is False) or _any_glob(tuple(settings.exclude)).match(name.lower()):
        return _TensorSettings(False, "excluded", strength, low, high, cap)
    if numel < settings.min_numel:
        return _TensorSettings(False, "small", strength, low, high, cap)
    return _TensorSettings(True, "adaptive", strength, low, high, cap)


def _fixed_ratio(settings: TadropSettings | None, base_ratio: float) -> float:
    return 0.0 if settings is not None and settings.excluded_ratio == "none" else base_ratio


def scope_group(name: str, scope: str) -> str | None:
    """The group a tensor's score is normalised in: None (the whole model), its kind (the name with
    its layer number as {}: every layer's query matrices of one stack together), or its layer, named
    by its module path ("model.layers.3", "encoder.block.3"): each stack of numbered layers apart, so
    an encoder's block 3 and a decoder's block 3 (T5, BART, Whisper) or a vision and a text tower's
    layer 7 (CLIP) are two groups (tensor_names.layer_of); tensors outside numbered layers form one
    group, "no layer"."""
    if scope == "model":
        return None
    match = LAYER_NUMBER.search(name)
    if scope == "kind":  # the stack's name stays in the kind: encoder.block.{}... vs decoder.block.{}...
        return name if match is None else name[: match.start(1)] + "{}" + name[match.end(1) :]
    if scope == "layer":
        located = layer_of(name)
        return "no layer" if located is None else f"{located[0]}{located[1]}"
    raise ValueError(f"unknown scope {scope!r}")


@dataclass
class _Entry:
    """A (model, tensor) that TADrop adapts, while pass 1 runs."""

    row: RatioRow
    settings: _TensorSettings
    density: float  # the host's kept fraction, as the recipe gives it
    profile: MagnitudeProfile | None = None


# hosts whose kept set is not each model's own count of entries, with what they keep instead
_NOT_COUNTED = {
    "rank": "singular directions",
    "variance": "one selection for all models (the entries of largest variance across them)",
}


def check_allocations(layout: Layout) -> None:
    """The count allocations set kept entries: they need a host that drops entries."""
    method = layout.recipe.method
    for model in layout.models:
        if model.tadrop is not None and model.tadrop.allocation != "strength" and method.sparsifier in _NOT_COUNTED:
            raise BadInput(
                f"tadrop.allocation: {model.tadrop.allocation} sets kept entries, but {method.name} keeps "
                f"{_NOT_COUNTED[method.sparsifier]} ({model.label}); use allocation: strength"
            )


def build_plan(layout: Layout, device: str, on_tensor: Callable[[TensorJob], None] = lambda job: None) -> Plan:
    """Measure every task-vector tensor that TADrop adapts, and fix every drop ratio."""
    check_allocations(layout)
    method = layout.recipe.method
    rows: dict[tuple[int, str], RatioRow] = {}
    pending: dict[int, list[_Entry]] = {j: [] for j in range(len(layout.models))}
    densities = _RecipeDensities(layout)

    measured: list[tuple[TensorJob, list[tuple[int, ModelInput, _Entry]], list[tuple[int, ModelInput, _Entry]]]] = []
    for job in layout.jobs:
        sparsifies = _sparsifies(method.sparsifier, job)
        to_measure: list[tuple[int, ModelInput, _Entry]] = []
        for j in job.contributors:
            model = layout.models[j]
            # the rank methods' default density is "1/T": the papers' equal split
            density = densities.of(j, job) if sparsifies else 1.0
            base_ratio = 1.0 - density if sparsifies else 0.0
            row = RatioRow(model.label, job.name, job.out.numel, base_ratio, base_ratio, "uniform")
            rows[(j, job.name)] = row
            if not sparsifies:
                row.reason = "no sparsification"
            elif model.tadrop is not None:
                tensor_settings = _settings_for(model.tadrop, job.name, row.numel, method.sparsifier, base_ratio)
                row.reason = tensor_settings.reason
                if tensor_settings.adaptive:
                    to_measure.append((j, model, _Entry(row, tensor_settings, density)))
                else:
                    row.ratio = _fixed_ratio(model.tadrop, base_ratio)
        measured.append((job, _scored(to_measure), to_measure))

    batched = _batched_scores(layout, device, [(job, scored) for job, scored, _ in measured])
    for job, scored, to_measure in measured:
        profiled = [(j, model, entry) for j, model, entry in to_measure if model.tadrop.allocation != "strength"]
        if (scored and job.name not in batched or profiled) and on_cpu(device):
            fit_torch_threads()  # where PyTorch measures (no-op until it is loaded)
        if scored:
            scores = _tensor_scores(layout, job, device, [(j, model) for j, model, _ in scored], batched)
            for j, _, entry in scored:
                entry.row.score = scores[j]
                if entry.row.score is None:
                    entry.row.reason = "zero delta"
                else:
                    pending[j].append(entry)
        if profiled:
            profiles = _profiles(layout, job, device, [(j, model) for j, model, _ in profiled])
            for j, _, entry in profiled:
                entry.profile = profiles[j]
                if entry.profile.nonzero == 0:
                    entry.row.reason = "zero delta"
                else:
                    pending[j].append(entry)
        on_tensor(job)

    summaries: dict[int, dict] = {}
    unadapted: list[str] = []  # models whose every adapted tensor has strength 0 (the default)
    for j, entries in pending.items():
        settings = layout.models[j].tadrop
        if settings is None:
            continue
        if not entries:
            summaries[j] = _family(settings)
        elif settings.allocation == "strength":
            summaries[j] = _strength_ratios(entries, settings)
        else:
            summaries[j] = _count_ratios(entries, settings)
        if settings.allocation == "strength" and entries and all(e.settings.strength == 0 for e in entries):
            unadapted.append(layout.models[j].label)
            continue
        pinned = _pinned_note(layout.models[j].label, entries, settings)
        if pinned:
            layout.notes.append(pinned)
    if unadapted:
        layout.notes.append(_strength_zero_note(unadapted, len(layout.models)))

    ordered = [rows[key] for key in sorted(rows, key=lambda k: k[0])]
    _check_finite(ordered)
    return Plan(ordered, [_summarize(layout, j, ordered, summaries.get(j, {})) for j in range(len(layout.models))])


class _RecipeDensities:
    """Each model's density for a tensor as the recipe gives it (the host's, before TADrop):
    looked up once per model and model count where the parameters are the same for every
    tensor (Layout.uniform_parameters), else per tensor."""

    def __init__(self, layout: Layout):
        self.layout, self.uniform = layout, layout.uniform_parameters()
        self._known: dict[tuple[int, int], float] = {}

    def of(self, j: int, job: TensorJob) -> float:
        key = (j, len(job.contributors))
        if self.uniform and key in self._known:
            return self._known[key]
        method = self.layout.recipe.method
        given = self.layout.model_parameter(self.layout.models[j], method.density_param, job.name)
        self._known[key] = density = method.density_value(given, len(job.contributors))
        return density


def _strength_zero_note(labels: list[str], models: int) -> str:
    """Strength 0, the default, keeps every ratio uniform: said, so that `tadrop:` on is not
    mistaken for an adaptive merge."""
    which = "every model" if len(labels) == models else ", ".join(labels)
    return (
        f"tadrop: strength 0 (the default) for {which}: every ratio stays the host's uniform ratio, as no "
        "strength beat it on the quality benchmarks (docs/tadrop.md); set tadrop.strength (-1..1) to adapt"
    )


def _pinned_note(label: str, entries: list[_Entry], settings: TadropSettings) -> str | None:
    """A note where TADrop moved no ratio of a model although it was asked to: with the budget kept,
    no tensor can drop more than the uniform ratio when a random host's max_rescale caps the drop
    ratio at it (DARE at density 0.1 with max_rescale 10), so none can drop less either."""
    if not entries or any(abs(e.row.ratio - e.row.base_ratio) > 1e-12 for e in entries):
        return None
    if all(e.settings.rescale_cap is not None and e.settings.rescale_cap <= e.row.base_ratio for e in entries):
        return (
            f"tadrop: {label}: every ratio stays uniform: max_rescale {settings.max_rescale:g} caps this random "
            f"host's drop ratio at 1 - 1/{settings.max_rescale:g}, which the uniform ratio already reaches "
            f"(raise tadrop.max_rescale to let the ratios move)"
        )
    return f"tadrop: {label}: every ratio stays uniform (the settings leave the ratios no room to move)"


def _family(settings: TadropSettings) -> dict:
    """The summary fields that say which member of the family a model used."""
    return {"allocation": settings.allocation, "scope": settings.scope if settings.allocation == "strength" else None}


def _strength_ratios(entries: list[_Entry], settings: TadropSettings) -> dict:
    """p_t = p + strength * (1 - 2 s_t) + shift, s_t normalised within each scope group."""
    groups = [scope_group(e.row.tensor, settings.scope) for e in entries]
    normalized = [0.0] * len(entries)
    members_of: dict[str | None, list[int]] = {}  # each group's entries, in order (one pass, not one per group)
    for i, group in enumerate(groups):
        members_of.setdefault(group, []).append(i)
    for members in members_of.values():
        for i, s in zip(
            members, normalize_scores([entries[i].row.score for i in members], settings.normalize), strict=True
        ):
            normalized[i] = s
    result = adaptive_ratios(
        normalized,
        [e.row.base_ratio for e in entries],
        [e.row.numel for e in entries],
        strength=[e.settings.strength for e in entries],
        min_ratio=[e.settings.min_ratio for e in entries],
        max_ratio=[e.settings.max_ratio for e in entries],
        preserve_budget=settings.preserve_budget,
    )
    for entry, group, s, ratio in zip(entries, groups, normalized, result.ratios, strict=True):
        entry.row.normalized, entry.row.ratio, entry.row.group = s, ratio, group
        how = [] if group is None else [f"normalised within {settings.scope} {group}"]
        if entry.settings.rescale_cap is not None and ratio >= entry.settings.rescale_cap:
            how.append(f"held at {entry.settings.rescale_cap:.4g} by max_rescale {settings.max_rescale:g}")
        entry.row.reason = "adaptive" + (": " + "; ".join(how) if how else "")
    return {**_family(settings), "shift": result.shift, "budget_met": result.budget_met}


def _fewest_kept(numel: int, max_ratio: float) -> int:
    """The fewest entries a tensor may keep: ceil((1 - max_ratio) n), so its ratio is <= max_ratio."""
    wanted = (1.0 - max_ratio) * numel
    return min(numel, math.ceil(wanted - 1e-9 * max(1.0, wanted)))


def _count_ratios(entries: list[_Entry], settings: TadropSettings) -> dict:
    """Kept counts by the mass, mass_reverse or global allocation, at the model's uniform kept count."""
    profiles = [e.profile for e in entries]
    uniform = [kept_count(e.row.numel, e.density) for e in entries]
    highs = [kept_count(e.row.numel, 1.0 - e.settings.min_ratio) for e in entries]
    lows = [min(h, _fewest_kept(e.row.numel, e.settings.max_ratio)) for e, h in zip(entries, highs, strict=True)]
    summary = _family(settings)
    if settings.allocation == "mass":
        result = mass_allocation(profiles, sum(uniform), lows, highs)
        summary["mass_fraction"] = result.parameter
        raw = [kept_for_mass(p, result.parameter) for p in profiles]
        how = (
            f"mass {settings.mass_norm}: the fewest entries holding f={result.parameter:.6g} "
            f"of its {settings.mass_norm.upper()} mass"
        )
    elif settings.allocation == "mass_reverse":
        result = mass_reverse_allocation(profiles, uniform, lows, highs)
        summary["mass_fraction"] = result.parameter
        raw = result.kept
        how = (
            f"mass_reverse {settings.mass_norm}: 2 x uniform - the entries holding f={result.parameter:.6g} of its "
            f"{settings.mass_norm.upper()} mass, shift {result.shift:.4g}"
        )
    elif settings.allocation == "global":
        result = global_allocation(profiles, sum(uniform), lows, highs)
        summary["threshold"] = threshold_value(result.parameter)
        raw = [kept_above_level(p, result.parameter) for p in profiles]
        how = f"global: entries with |tau| above the model-wide threshold {summary['threshold']:.6g}"
    else:
        raise ValueError(f"unknown allocation {settings.allocation!r}")
    for entry, kept, wanted, low, high in zip(entries, result.kept, raw, lows, highs, strict=True):
        entry.row.kept, entry.row.ratio = kept, 1.0 - kept / entry.row.numel
        bound = ""
        if kept == low and wanted < low:
            capped = " (max_rescale)" if entry.settings.rescale_cap is not None else ""
            bound = f"; held at max_ratio {entry.settings.max_ratio:.4g}{capped}"
        elif kept == high and wanted > high:
            bound = f"; held at min_ratio {entry.settings.min_ratio:.4g}"
        entry.row.reason = f"adaptive: {how}{bound}"
    return {**summary, "shift": result.shift, "budget_met": result.budget_met}


def _check_finite(rows: list[RatioRow]) -> None:
    """No NaN or Inf reaches the plan (its JSON would not be JSON): name the tensor instead."""
    for row in rows:
        for key in ("score", "normalized", "ratio"):
            value = getattr(row, key)
            if value is not None and not math.isfinite(value):
                raise BadInput(
                    f"{row.model}: tensor {row.tensor}: its TADrop {key} is not finite ({value}); check the weights"
                )


# Hoyer scores (the default statistic) are summed over slices of this many entries, so that
# scoring needs a few slices' memory, not the tensor's; the other statistics see whole tensors.
SCORE_SLICE_ELEMENTS = 1 << 20
GPU_SCORE_SLICE_ELEMENTS = 1 << 24  # on a GPU, fewer launches and waits (see tensor_merge.GPU_CHUNK_ELEMENTS)
# Tensors up to this size are scored whole by address (no numpy view per input); on the CPU, those
# whose every scored model uses Hoyer's statistic are scored many to a kernel call (_batched_scores).
SMALL_SCORE_ELEMENTS = 1 << 16
SCORE_BATCH_TENSORS = 4096


def _scored(to_measure: list[tuple[int, ModelInput, _Entry]]) -> list[tuple[int, ModelInput, _Entry]]:
    """The (model, tensor) entries whose ratio comes from a score (the `strength` allocation)."""
    return [(j, model, entry) for j, model, entry in to_measure if model.tadrop.allocation == "strength"]


def _batched_scores(
    layout: Layout, device: str, measured: list[tuple[TensorJob, list[tuple[int, ModelInput, _Entry]]]]
) -> dict[str, dict[int, float | None]]:
    """The Hoyer scores of small tensors (SMALL_SCORE_ELEMENTS), SCORE_BATCH_TENSORS to a kernel
    call (kernels.hoyer_sums_batch): a model of many small tensors (an MoE's experts) then pays
    ~microseconds a tensor instead of a call and its Python around it. Each tensor's scores are
    the bits _scores gives it alone. A tensor with a NaN or Inf entry is left out: _scores then
    names the input at fault, or the overflowing difference."""
    if not on_cpu(device) or not kernels.available():
        return {}
    groups: dict[tuple[str, tuple[int, ...]], list[tuple[str, list[int]]]] = {}
    for job, scored in measured:
        models = tuple(j for j, _, _ in scored)
        addresses = _batchable(layout, job, models, [model for _, model, _ in scored]) if models else None
        if addresses is not None:
            key = (layout.reference.tensors[job.name].dtype, models)
            groups.setdefault(key, []).append((job.name, addresses))
    scores: dict[str, dict[int, float | None]] = {}
    for (dtype, models), tensors in groups.items():
        checkpoints = [layout.reference, *(layout.models[j].checkpoint for j in models)]
        for first in range(0, len(tensors), SCORE_BATCH_TENSORS):
            rows = tensors[first : first + SCORE_BATCH_TENSORS]
            chunk = [name for name, _ in rows]
            try:
                sums, non_finite = kernels.hoyer_sums_batch(
                    dtype,
                    [base for _, (base, *_) in rows],
                    [tuned for _, (_, *tuned) in rows],
                    [layout.reference.tensors[name].numel for name in chunk],
                )
            finally:
                for checkpoint in checkpoints:
                    checkpoint.unmap_whole(chunk)
            for name, tensor_sums, bad in zip(chunk, sums.tolist(), non_finite.tolist(), strict=True):
                if not bad:
                    numel = layout.reference.tensors[name].numel
                    scores[name] = {
                        j: _hoyer_score(numel, l1, l2) for j, (l1, l2) in zip(models, tensor_sums, strict=True)
                    }
    return scores


def _batchable(layout: Layout, job: TensorJob, models: tuple[int, ...], inputs: list[ModelInput]) -> list[int] | None:
    """The addresses of a tensor's inputs (the base first) where _batched_scores can score it:
    small, Hoyer's statistic for every model, and every input's entries in the kernels' dtypes,
    all one dtype, mapped as stored. None where it cannot."""
    small = 0 < job.out.numel <= min(SMALL_SCORE_ELEMENTS, SCORE_SLICE_ELEMENTS)
    if not small or any(m.tadrop.statistic != "hoyer" for m in inputs):
        return None
    checkpoints = [layout.reference, *(layout.models[j].checkpoint for j in models)]
    if not kernels.supports([c.tensors[job.name].dtype for c in checkpoints], len(models)):
        return None
    addresses = [c.address(job.name) for c in checkpoints]
    return None if None in addresses else addresses


def _hoyer_score(numel: int, l1: float, l2_squared: float) -> float | None:
    """A whole tensor's Hoyer score from its sums (as HoyerSums has it)."""
    sums = HoyerSums()
    sums.add_sums(numel, l1, l2_squared)
    return sums.score()


def _scores(
    layout: Layout, job: TensorJob, device: str, models: list[tuple[int, ModelInput]]
) -> dict[int, float | None]:
    """Each model's score of this tensor's task vector (None: all zeros)."""
    scores: dict[int, float | None] = {}
    sliced = {j: HoyerSums() for j, model in models if model.tadrop.statistic == "hoyer"}
    step = SCORE_SLICE_ELEMENTS if on_cpu(device) else GPU_SCORE_SLICE_ELEMENTS
    checkpoints = [layout.reference, *(layout.models[j].checkpoint for j in sliced)]
    with_kernels = on_cpu(device) and kernels.supports([c.tensors[job.name].dtype for c in checkpoints], len(sliced))
    for start in range(0, job.out.numel if sliced else 0, step):
        stop = min(start + step, job.out.numel)
        if with_kernels and _add_sums_with_kernels(checkpoints, job.name, start, stop, list(sliced.values())):
            continue
        base, *tuned = read_all_float32(checkpoints, job.name, device, start, stop)
        for sums, tensor in zip(sliced.values(), tuned, strict=True):
            sums.add(tensor.sub_(base))
    scores.update({j: sums.score() for j, sums in sliced.items()})
    whole = [(j, model) for j, model in models if j not in sliced]
    if whole:
        base = read_float32(layout.reference, job.name, device)
        for j, model in whole:
            scores[j] = tensor_score(
                read_float32(model.checkpoint, job.name, device).sub_(base),
                model.tadrop.statistic,
                model.tadrop.topmass_fraction,
            )
    for j, score in scores.items():
        if score is not None and not math.isfinite(score):  # finite inputs (the reads check) whose difference is not
            raise _overflow(layout, j, job)
    return scores


def _tensor_scores(
    layout: Layout,
    job: TensorJob,
    device: str,
    models: list[tuple[int, ModelInput]],
    batched: dict[str, dict[int, float | None]],
) -> dict[int, float | None]:
    """Each model's score of this tensor: from a batch where _batched_scores scored it, else now."""
    return batched[job.name] if job.name in batched else _scores(layout, job, device, models)


def _profiles(
    layout: Layout, job: TensorJob, device: str, models: list[tuple[int, ModelInput]]
) -> dict[int, MagnitudeProfile]:
    """Each model's magnitude profile of this tensor's task vector, counted slice by slice: the
    histogram of |tau|'s top 16 bits (sparsify.magnitude_histogram's buckets), with the float64
    sum of |tau| (mass_norm l1) or tau^2 (l2) per bucket for the mass allocations. A model-wide
    trim needs counts only: the CPU kernels count those from the stored entries."""
    powers = {j: _mass_power(model.tadrop) for j, model in models}
    counts = {j: np.zeros(MAGNITUDE_BUCKETS, dtype=np.int64) for j, _ in models}
    masses = {j: np.zeros(MAGNITUDE_BUCKETS, dtype=np.float64) for j, power in powers.items() if power is not None}
    counted = [j for j, power in powers.items() if power is None]
    checkpoints = [layout.reference, *(layout.models[j].checkpoint for j in counted)]
    with_kernels = on_cpu(device) and kernels.supports([c.tensors[job.name].dtype for c in checkpoints], len(counted))
    step = SCORE_SLICE_ELEMENTS if on_cpu(device) else GPU_SCORE_SLICE_ELEMENTS
    for start in range(0, job.out.numel, step):
        stop = min(start + step, job.out.numel)
        by_kernels = {
            j for j in counted if with_kernels and _count_with_kernels(layout, job.name, start, stop, j, counts[j])
        }
        in_torch = [j for j in powers if j not in by_kernels]
        if not in_torch:
            continue
        checkpoints_read = [layout.reference, *(layout.models[j].checkpoint for j in in_torch)]
        base, *tuned = read_all_float32(checkpoints_read, job.name, device, start, stop)
        for j, tensor in zip(in_torch, tuned, strict=True):
            delta = tensor.sub_(base).reshape(-1)
            buckets = (delta.view(torch.int32) & 0x7FFFFFFF) >> 16
            slice_counts = _bincount(buckets)
            if kernels.has_non_finite(slice_counts):  # finite inputs (checked by the read) whose difference is not
                raise _overflow(layout, j, job)
            counts[j] += slice_counts
            if j in masses:
                magnitudes = delta.double().abs_()
                masses[j] += _bincount(buckets, magnitudes if powers[j] == 1 else magnitudes.square_())
    return {j: magnitude_profile(counts[j], masses.get(j)) for j in powers}


def _mass_power(settings: TadropSettings) -> int | None:
    """The power q of a profile's mass sum |tau|^q: none for a model-wide trim (counts only)."""
    return None if settings.allocation == "global" else 1 if settings.mass_norm == "l1" else 2


def _overflow(layout: Layout, j: int, job: TensorJob) -> BadInput:
    return BadInput(f"{layout.models[j].label}: tensor {job.name}: the task vector (model - base) overflows float32")


def _bincount(buckets: torch.Tensor, weights: torch.Tensor | None = None) -> np.ndarray:
    """Entries (or the float64 sum of `weights`) per magnitude bucket, as numpy."""
    return torch.bincount(buckets, weights=weights, minlength=MAGNITUDE_BUCKETS).cpu().numpy()


def _count_with_kernels(layout: Layout, name: str, start: int, stop: int, j: int, counts: np.ndarray) -> bool:
    """Add one slice's magnitude histogram of model j's task vector, counted by the CPU kernels from
    the stored entries; False (nothing added) where an entry or a difference is not finite: the
    PyTorch path then names the input or the overflow."""
    with mapped_slices([layout.reference, layout.models[j].checkpoint], name, start, stop) as (base, tuned):
        slice_counts = kernels.magnitude_histogram(base, tuned)
    if kernels.has_non_finite(slice_counts):
        return False
    counts += slice_counts
    return True


def _add_sums_with_kernels(
    checkpoints: list[Checkpoint], name: str, start: int, stop: int, sums: list[HoyerSums]
) -> bool:
    """Add one slice's Hoyer sums of each model's task vector (checkpoints[0] is the base), from
    the stored entries; False (nothing added) when an entry is NaN or Inf: the caller's PyTorch
    path then names the input at fault, or the overflowing difference."""
    addresses = (
        [checkpoint.address(name) for checkpoint in checkpoints] if stop - start <= SMALL_SCORE_ELEMENTS else [None]
    )
    if start == 0 and stop == checkpoints[0].tensors[name].numel and None not in addresses:
        # a small tensor whole, by address: a numpy view per input would cost more than its sums
        try:
            results, non_finite = kernels.hoyer_sums_at(
                checkpoints[0].tensors[name].dtype, addresses[0], addresses[1:], stop
            )
        finally:
            for checkpoint in checkpoints:
                checkpoint.unmap(name, start, stop)
    else:
        with mapped_slices(checkpoints, name, start, stop) as (base, *tuned):
            results, non_finite = kernels.hoyer_sums(base, tuned)
    if non_finite:
        return False
    for model_sums, (l1, l2_squared) in zip(sums, results, strict=True):
        model_sums.add_sums(stop - start, l1, l2_squared)
    return True


def _sparsifies(sparsifier: str | None, job: TensorJob) -> bool:
    """Whether the method's drop (its `sparsifier`) applies to this tensor: a rank budget
    only to 2-D tensors (the SVD-based methods average every other tensor)."""
    if sparsifier == "rank":
        return len(job.out.shape) == 2
    return sparsifier is not None


def _summarize(layout: Layout, j: int, rows: list[RatioRow], family: dict) -> ModelSummary:
    model = layout.models[j]
    mine = [r for r in rows if r.model == model.label]
    total = sum(r.numel for r in mine) or 1
    scored = model.tadrop is not None and model.tadrop.allocation == "strength"
    return ModelSummary(
        model=model.label,
        statistic=model.tadrop.statistic if scored else None,
        tensors=len(mine),
        adaptive_tensors=sum(r.reason.startswith("adaptive") for r in mine),
        mean_base_ratio=sum(r.numel * r.base_ratio for r in mine) / total,
        mean_ratio=sum(r.numel * r.ratio for r in mine) / total,
        min_ratio=min((r.ratio for r in mine), default=0.0),
        max_ratio=max((r.ratio for r in mine), default=0.0),
        shift=family.get("shift", 0.0),
        budget_met=family.get("budget_met", True),
        allocation=family.get("allocation"),
        scope=family.get("scope"),
        mass_fraction=family.get("mass_fraction"),
        threshold=family.get("threshold"),
    )
