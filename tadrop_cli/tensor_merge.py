"""Merging one tensor: whole or in slices, by the compiled CPU kernels or by PyTorch.

`merge_tensor` gives one output tensor of a merge (pass 2), in its output dtype, on the CPU.
Only one tensor name's worth of inputs is held at a time: the base tensor and one task vector
per model, in float32 on the chosen device (or, for the kernels, one slice of each as stored).
On a CPU the compiled kernels (kernels.py) merge the generalized-task-arithmetic hosts slice by
slice from the files' mapped pages, and such a merge never imports torch. A magnitude trim in
slices finds each model's whole-tensor top-k cut first, in two histogram sweeps. Running a
whole merge (the output folder, staging, publishing, the summary) is run.py's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from . import kernels
from .checkpoint import Checkpoint, all_finite, mapped_slices, read_all_float32
from .cpu_share import fit_torch_threads
from .devices import on_cpu
from .dtypes import Stored, torch_dtype
from .errors import BadInput
from .interpolation import AntipodalMean
from .layout import Layout, TensorJob, tensor_seed
from .lazy import torch
from .methods import ModelTensor, TaskVector
from .plan import Plan
from .sparsify import (
    KEEP_NOTHING,
    MAGNITUDE_BUCKETS,
    TopKCut,
    boundary_bucket,
    bucket_histogram,
    cut_from_bucket_counts,
    cut_of_keys,
    kept_count,
    magnitude_histogram,
)

# Large tensors are merged in slices of this many entries (flattened) where the method allows
# (MergeMethod.sliceable): memory then grows with the slice, not the tensor, and each slice's
# intermediate results stay in the CPU's cache.
CHUNK_ELEMENTS = 1 << 20
# On a GPU, cache reuse matters less than the launches and waits that every slice costs, and
# memory is plentiful: 64 MB per float32 input keeps most tensors whole, and then a trim reads
# its inputs once instead of three times (two sweeps for the cut, then the merge).
GPU_CHUNK_ELEMENTS = 1 << 24
# A magnitude trim of a tensor of at most this many entries (one slice) finds its cut by one
# selection (sparsify.cut_of_keys) instead of two histogram sweeps, whose fixed cost (tables
# of 2^15 and 2^16 counts) is ~50x a tiny tensor's merge.
SMALL_CUT = 1 << 14
NON_FINITE_KEYS = 0x7F800000  # magnitude keys from here on are Inf and NaN
# Consecutive tensors of at most SMALL_CUT entries that the CPU kernels merge are merged
# together, in one kernel call per run of them (merge_tensors): up to this many entries (all
# the run's tensors together) and this many tensors, so that memory stays at one slice's.
BATCH_ENTRIES = CHUNK_ELEMENTS
BATCH_TENSORS = 4096


def chunk_elements(device: str) -> int:
    return CHUNK_ELEMENTS if on_cpu(device) else GPU_CHUNK_ELEMENTS


def merge_tensor(
    layout: Layout, plan: Plan, job: TensorJob, device: str
) -> torch.Tensor | Stored | Iterator[torch.Tensor | Stored]:
    """The output tensor for one job, in its output dtype, on the CPU; for a large tensor that
    the method can merge in slices, its flattened slices one after another (an iterator). The
    CPU kernels give Stored entries (dtypes.Stored), the PyTorch code tensors."""
    if not job.mergeable:
        return layout.reference.read(job.name)
    if job.copy_base or not job.contributors:
        kept = layout.reference.read(job.name)
        if not all_finite(kept):
            raise BadInput(f"{layout.reference.label}: tensor {job.name} contains NaN or Inf")
        return kept.to(torch_dtype(job.out.dtype))
    numel, method, chunk = job.out.numel, layout.recipe.method, chunk_elements(device)
    if method.interpolates:
        return _interpolate(layout, job, device)
    if kernels_merge(layout, job, device):
        slices = [(start, min(start + chunk, numel)) for start in range(0, numel, chunk)]
        return _merge_with_kernels(layout, plan, job, slices)
    if on_cpu(device):
        fit_torch_threads()
    if numel > chunk and method.sliceable(layout.method_parameters(job.name)):
        row = _row_length(job) if method.whole_rows else 1
        step = max(1, chunk // row) * row  # whole rows per slice, for a method that ranks within rows (DELLA)
        slices = [(start, min(start + step, numel)) for start in range(0, numel, step)]
        cuts = _magnitude_cuts(layout, plan, job, device, slices) if method.sparsifier == "magnitude" else {}
        settings = _task_settings(layout, plan, job)
        return (
            _merge_entries(layout, job, inputs.in_rows(row), settings, cuts).reshape(-1)
            for inputs in _read_slices(layout, job, device, slices, job.contributors)
        )
    return _merge_entries(
        layout, job, _read_inputs(layout, job, device, None, None, job.contributors), _task_settings(layout, plan, job)
    )


def merge_tensors(
    layout: Layout, plan: Plan, jobs: Iterable[TensorJob], device: str
) -> Iterator[tuple[TensorJob, torch.Tensor | Stored | Iterable[torch.Tensor | Stored]]]:
    """(job, merge_tensor(job)) for each job in turn (a shard's tensors), the same results;
    where several tensors in a row are small ones that the CPU kernels merge, they are merged
    in batches, one kernel call per batch (_merge_batch) instead of the ~50 Python calls of a
    tensor's own merge. Each result is to be used (written) before the next is asked for."""
    batchable = _batch_check(layout, device)
    batch: list[TensorJob] = []
    entries = 0
    for job in jobs:
        if batchable is not None and batchable(job):
            if batch and (len(batch) == BATCH_TENSORS or entries + job.out.numel > BATCH_ENTRIES):
                yield from _merge_batch(layout, plan, batch, device)
                batch, entries = [], 0
            batch.append(job)
            entries += job.out.numel
            continue
        if batch:
            yield from _merge_batch(layout, plan, batch, device)
            batch, entries = [], 0
        yield job, merge_tensor(layout, plan, job, device)
    if batch:
        yield from _merge_batch(layout, plan, batch, device)


def _batch_check(layout: Layout, device: str):
    """A test of whether a job goes into a batch (_merge_batch), or None where none does: a
    kernel host (kernels_merge) with one value of each parameter for every tensor, and a job
    of 1 to SMALL_CUT entries whose inputs are all stored in one dtype as safetensors bytes
    (Checkpoint.address), with an F32/F16/BF16 output."""
    method = layout.recipe.method
    steps = method.gta
    if (
        not on_cpu(device)
        or not kernels.available()
        or method.interpolates
        or steps is None
        or steps.sparsifier not in (None, "magnitude", "random")
        or steps.consensus not in (None, "sum")
        or not layout.uniform_parameters()
        or not layout.jobs
        or not method.sliceable(layout.method_parameters(layout.jobs[0].name))
    ):
        return None
    reference, models = layout.reference, layout.models
    largest = min(SMALL_CUT, chunk_elements(device))  # one slice, cut by selection (_merge_with_kernels)

    def batchable(job: TensorJob) -> bool:
        if not job.mergeable or job.copy_base or not job.contributors or job.out.dtype not in kernels.DTYPE_CODES:
            return False
        if not 0 < job.out.numel <= largest or len(job.contributors) > kernels.MAX_MODELS:
            return False
        name = job.name
        dtype = reference.tensors[name].dtype
        if dtype not in kernels.DTYPE_CODES or reference.address(name) is None:
            return False
        for j in job.contributors:
            checkpoint = models[j].checkpoint
            if checkpoint.tensors[name].dtype != dtype or checkpoint.address(name) is None:
                return False
        return True

    return batchable


def _merge_batch(
    layout: Layout, plan: Plan, jobs: list[TensorJob], device: str
) -> Iterator[tuple[TensorJob, Iterable[Stored] | torch.Tensor | Stored | Iterator[torch.Tensor | Stored]]]:
    """The merges of small tensors by the CPU kernels, batched (kernels.BatchMerge): those of
    one stored dtype, output dtype and set of models in one call, each tensor with its own
    weights, densities, seeds and cuts, as _merge_with_kernels merges it alone (the same bits).
    A tensor with a NaN or Inf in a task vector or its result is merged again alone, by
    merge_tensor, which names the input or refuses the result as it always does."""
    steps = layout.recipe.method.gta
    params = layout.method_parameters(jobs[0].name)  # Layout.uniform_parameters: every tensor's
    lambda_, normalize = float(params.get("lambda", 1.0)), bool(params["normalize"])
    rescale = params.get("rescale", False) in (True, "paper")
    lookups = _BatchLookups(layout, plan)
    groups: dict[tuple, tuple[kernels.BatchMerge, list[int]]] = {}
    for position, job in enumerate(jobs):
        name, contributors = job.name, tuple(job.contributors)
        key = (layout.reference.tensors[name].dtype, job.out.dtype, contributors)
        if key not in groups:
            groups[key] = (kernels.BatchMerge(key[0], key[1], len(contributors), steps.consensus is not None), [])
        batch, members = groups[key]
        weights = [lookups.weight(j) for j in contributors]
        sum_of_weights = sum(weights)
        sum_of_weights = sum_of_weights if abs(sum_of_weights) >= 1e-8 else 1.0  # as generalized_task_arithmetic
        models = [
            _batch_model(steps.sparsifier, lookups, job, j, weight, rescale)
            for j, weight in zip(contributors, weights, strict=True)
        ]
        batch.add(layout.reference.address(name), job.out.numel, sum_of_weights, lambda_, normalize, models)
        members.append(position)
    results: list = [None] * len(jobs)
    for batch, members in groups.values():
        out, starts, non_finite, _ = batch.run()
        for position, start, flagged in zip(members, starts, non_finite, strict=True):
            job = jobs[position]
            results[position] = None if flagged else (Stored(job.out.dtype, out[start : start + job.out.numel]),)
    names = [job.name for job in jobs]
    for checkpoint in [layout.reference, *(model.checkpoint for model in layout.models)]:
        checkpoint.unmap_whole([name for name in names if name in checkpoint.tensors])
    for job, result in zip(jobs, results, strict=True):
        yield job, (merge_tensor(layout, plan, job, device) if result is None else result)


class _BatchLookups:
    """A batch's parameter lookups: each model's weight and recipe density once (the parameters
    are the same for every tensor: Layout.uniform_parameters), the plan's density per tensor."""

    def __init__(self, layout: Layout, plan: Plan):
        self.layout, self.plan = layout, plan
        self._weights: dict[int, float] = {}
        self._densities: dict[tuple[int, int], float] = {}

    def weight(self, j: int) -> float:
        if j not in self._weights:
            layout = self.layout
            model, name = layout.models[j], layout.jobs[0].name
            self._weights[j] = float(layout.model_parameter(model, layout.recipe.method.weight_name, name, missing=1.0))
        return self._weights[j]

    def density(self, job: TensorJob, j: int) -> float:
        """_density's value: the recipe's density (one per model and model count), or TADrop's."""
        key = (j, len(job.contributors))
        if key not in self._densities:
            layout, method = self.layout, self.layout.recipe.method
            given = layout.model_parameter(layout.models[j], method.density_param, layout.jobs[0].name, missing=1.0)
            self._densities[key] = method.density_value(given, len(job.contributors))
        return self.plan.density(self.layout.models[j].label, job.name, self._densities[key])


def _batch_model(
    sparsifier: str | None, lookups: _BatchLookups, job: TensorJob, j: int, weight: float, rescale: bool
) -> tuple[int, float, int, int, int, float | None, int]:
    """Model j's part in a batch's merge of one tensor (kernels.BatchMerge.add): _model_slice's
    settings, with a magnitude trim's kept count for the kernel to cut by."""
    layout = lookups.layout
    density = lookups.density(job, j)
    drop, seed, limit, kept = kernels.DROP_NOTHING, 0, 0, kernels.NO_CUT
    if sparsifier == "magnitude" and density < 1:
        drop, kept = kernels.DROP_BY_MAGNITUDE, kept_count(job.out.numel, density)
    elif sparsifier == "random" and density < 1:
        drop, limit = kernels.DROP_AT_RANDOM, kernels.random_keep_limit(density)
        seed = tensor_seed(layout.recipe.seed, layout.models[j].label, job.name)
    rescale_by = density if drop != kernels.DROP_NOTHING and rescale and density > 0 else None
    return layout.models[j].checkpoint.address(job.name), weight, drop, seed, limit, rescale_by, kept


def _interpolate(layout: Layout, job: TensorJob, device: str) -> torch.Tensor | Iterator[torch.Tensor]:
    """The merge of one tensor by a method that interpolates the models' own tensors (slerp,
    nuslerp, multislerp, karcher, nearswap), by PyTorch: whole, or where the method is elementwise
    and the tensor large, slice by slice (flattened)."""
    if on_cpu(device):
        fit_torch_threads()
    numel, chunk = job.out.numel, chunk_elements(device)
    if numel > chunk and layout.recipe.method.sliceable(layout.method_parameters(job.name)):
        return (
            _interpolate_entries(layout, job, device, start, min(start + chunk, numel)).reshape(-1)
            for start in range(0, numel, chunk)
        )
    return _interpolate_entries(layout, job, device, None, None)


def _interpolate_entries(
    layout: Layout, job: TensorJob, device: str, start: int | None, stop: int | None
) -> torch.Tensor:
    """An interpolating method's merge of one tensor (or of entries [start, stop) of it), cast to
    the output dtype, on the CPU. The base is read only where the recipe has one (merge_inputs)."""
    tensors = read_all_float32(merge_inputs(layout, job), job.name, device, start, stop)
    base = tensors.pop(0) if layout.recipe.base_model is not None else None
    models = [
        ModelTensor(tensor, float(layout.model_parameter(layout.models[j], "weight", job.name, missing=1.0)))
        for j, tensor in zip(job.contributors, tensors, strict=True)
    ]
    del tensors
    try:
        merged = layout.recipe.method.merge(base, models, **layout.method_parameters(job.name))
    except AntipodalMean as error:
        raise BadInput(f"tensor {job.name}: {layout.recipe.method.name}: {error}; give other weights") from None
    result = merged.to(torch_dtype(job.out.dtype))
    if not all_finite(result):
        raise BadInput(f"tensor {job.name}: the merge produced NaN or Inf (in {job.out.dtype}); check the parameters")
    return result.cpu()


def merge_inputs(layout: Layout, job: TensorJob) -> list[Checkpoint]:
    """The checkpoints a merge of one (mergeable) tensor reads: the base (the layout's reference) and
    each contributing model. An interpolating method without a base reads the models alone: the
    reference is then the first model, not one more input."""
    models = [layout.models[j].checkpoint for j in job.contributors]
    if layout.recipe.method.interpolates and layout.recipe.base_model is None:
        return models
    return [layout.reference, *models]


def _row_length(job: TensorJob) -> int:
    """Entries per row (dim 0) of the tensor; a 1-D tensor is one row."""
    return job.out.numel // job.out.shape[0] if len(job.out.shape) > 1 else job.out.numel


@dataclass
class _Inputs:
    """The base's and some models' entries [start, stop) of one tensor (all of it when start is
    None), in float32; `tuned` is model j's fine-tuned tensor until `task_vectors` subtracts."""

    start: int | None
    base: torch.Tensor
    tuned: dict[int, torch.Tensor]

    def in_rows(self, length: int) -> _Inputs:
        """The same entries as rows of `length` (a slice of whole rows, for row-wise methods)."""
        if length <= 1:
            return self
        return _Inputs(self.start, self.base.view(-1, length), {j: t.view(-1, length) for j, t in self.tuned.items()})

    def task_vectors(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(j, model j's task vector), computed in place of the fine-tuned entries."""
        for j, tensor in self.tuned.items():
            yield j, tensor.sub_(self.base)


def _read_inputs(
    layout: Layout, job: TensorJob, device: str, start: int | None, stop: int | None, models: Iterable[int]
) -> _Inputs:
    models = list(models)
    base, *tuned = read_all_float32(
        [layout.reference, *(layout.models[j].checkpoint for j in models)], job.name, device, start, stop
    )
    return _Inputs(start, base, dict(zip(models, tuned, strict=True)))


def _read_slices(
    layout: Layout, job: TensorJob, device: str, slices: list[tuple[int, int]], models: Iterable[int]
) -> Iterator[_Inputs]:
    """Each slice's inputs in turn. (Reading the next slice in a helper thread was tried: on
    two cores it competes with torch's own two threads and was ~15% slower.)"""
    models = list(models)
    for start, stop in slices:
        yield _read_inputs(layout, job, device, start, stop, models)


def kernels_merge(layout: Layout, job: TensorJob, device: str) -> bool:
    """Whether the compiled CPU kernels merge this tensor: a generalized-task-arithmetic host
    whose drop, mix and rescale they know, on the CPU, with inputs of one dtype."""
    steps = layout.recipe.method.gta
    if (
        not on_cpu(device)
        or steps is None
        or steps.sparsifier not in (None, "magnitude", "random")
        or steps.consensus not in (None, "sum")
    ):
        return False
    if not layout.recipe.method.sliceable(layout.method_parameters(job.name)):
        return False  # rescale l1/l2/linf: a norm of the whole tensor
    checkpoints = [layout.reference, *(layout.models[j].checkpoint for j in job.contributors)]
    return kernels.supports([c.tensors[job.name].dtype for c in checkpoints], len(job.contributors))


@contextmanager
def _stored_inputs(
    layout: Layout, job: TensorJob, start: int, stop: int, models: Iterable[int]
) -> Iterator[tuple[Stored, dict[int, Stored]]]:
    """Entries [start, stop) of the base's and some models' tensor, flattened, as stored: views
    of the files' pages (checkpoint.mapped_slices), let go of on leaving."""
    models = list(models)
    with mapped_slices([layout.reference, *(layout.models[j].checkpoint for j in models)], job.name, start, stop) as (
        base,
        *tuned,
    ):
        yield base, dict(zip(models, tuned, strict=True))


def _merge_with_kernels(
    layout: Layout, plan: Plan, job: TensorJob, slices: list[tuple[int, int]]
) -> Iterator[torch.Tensor | Stored]:
    """The merge of one tensor by the CPU kernels, slice by slice (flattened, output dtype): the
    same bits as methods.generalized_task_arithmetic over the slices."""
    steps, params = layout.recipe.method.gta, layout.method_parameters(job.name)
    settings = _task_settings(layout, plan, job)
    by_selection = steps.sparsifier == "magnitude" and len(slices) == 1 and job.out.numel <= SMALL_CUT
    trim_in_sweeps = steps.sparsifier == "magnitude" and not by_selection
    cuts = _magnitude_cuts(layout, plan, job, "cpu", slices, stored=True) if trim_in_sweeps else {}
    rescale = params.get("rescale", False) in (True, "paper")
    sum_of_weights = sum(settings[j]["weight"] for j in job.contributors)
    sum_of_weights = sum_of_weights if abs(sum_of_weights) >= 1e-8 else 1.0  # as generalized_task_arithmetic
    out_dtype = job.out.dtype if job.out.dtype in kernels.DTYPE_CODES else "F32"  # float64 outputs: cast below
    for start, stop in slices:
        with _stored_inputs(layout, job, start, stop, job.contributors) as (base, tuned):
            if by_selection:  # one small slice: the cuts from the entries at hand, with no second mapping
                cuts = _cuts_by_selection(layout, job, settings, base, tuned)
            models = [
                _model_slice(steps.sparsifier, settings[j], cuts.get(j), rescale, start, base, entries)
                for j, entries in tuned.items()
            ]
            merged, non_finite = kernels.merge_slice(
                base,
                models,
                start,
                steps.consensus is not None,
                bool(params["normalize"]),
                sum_of_weights,
                float(params.get("lambda", 1.0)),
                out_dtype,
            )
        if (
            non_finite
        ):  # NaN/Inf in an input or the result: PyTorch redoes the slice, and names the input or refuses the result
            inputs = _read_inputs(layout, job, "cpu", start, stop, job.contributors)
            yield _merge_entries(layout, job, inputs, settings, cuts).reshape(-1)
            continue
        yield merged if merged.dtype == job.out.dtype else merged.to_torch().to(torch_dtype(job.out.dtype))


def _model_slice(
    sparsifier: str | None,
    settings: dict,
    cut: TopKCut | None,
    rescale: bool,
    start: int,
    base: Stored,
    entries: Stored,
) -> kernels.ModelSlice:
    """One model's part in a slice's kernel merge: its weight and its drop (as sparsify_task_vector)."""
    model, density = kernels.ModelSlice(entries, settings["weight"]), settings["density"]
    if sparsifier == "magnitude" and density < 1:
        model.drop, model.threshold, model.ties_before = (
            kernels.DROP_BY_MAGNITUDE,
            cut.threshold,
            kernels.ties_kept_before(cut, start, base, entries),
        )
    elif sparsifier == "random" and density < 1:
        model.drop, model.seed, model.limit = (
            kernels.DROP_AT_RANDOM,
            settings["seed"],
            kernels.random_keep_limit(density),
        )
    if model.drop != kernels.DROP_NOTHING and rescale and density > 0:
        model.rescale_by = density
    return model


def _density(layout: Layout, plan: Plan, job: TensorJob, j: int) -> float:
    """Model j's kept fraction for this tensor: the recipe's, or TADrop's."""
    model = layout.models[j]
    method = layout.recipe.method
    recipe_density = method.density_value(
        layout.model_parameter(model, method.density_param, job.name, missing=1.0), len(job.contributors)
    )
    return plan.density(model.label, job.name, recipe_density)


def _histograms(
    layout: Layout,
    job: TensorJob,
    device: str,
    slices: list[tuple[int, int]],
    models: Iterable[int],
    buckets: dict[int, int] | None,
    stored: bool,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(slice, model, histogram of its task vector there) for every slice and model: the
    magnitude histogram, or with `buckets` the bucket histogram of each model's bucket. With
    `stored`, the CPU kernels count from the stored entries (one pass, no float32 copies)."""
    models = list(models)
    if not stored:
        for s, inputs in enumerate(_read_slices(layout, job, device, slices, models)):
            for j, delta in inputs.task_vectors():
                yield (
                    s,
                    j,
                    (magnitude_histogram(delta) if buckets is None else bucket_histogram(delta, buckets[j]))
                    .cpu()
                    .numpy(),
                )
        return
    for s, (start, stop) in enumerate(slices):
        with _stored_inputs(layout, job, start, stop, models) as (base, tuned):
            if buckets is not None:
                counts = {j: kernels.bucket_histogram(base, entries, buckets[j]) for j, entries in tuned.items()}
            else:
                counts = {j: kernels.magnitude_histogram(base, entries) for j, entries in tuned.items()}
        for j, model_counts in counts.items():
            if buckets is None and kernels.has_non_finite(
                model_counts
            ):  # NaN/Inf in an input (this names it), or an overflowed difference
                read_all_float32([layout.reference, layout.models[j].checkpoint], job.name, "cpu", start, stop)
            yield s, j, model_counts


def _magnitude_cuts(
    layout: Layout, plan: Plan, job: TensorJob, device: str, slices: list[tuple[int, int]], stored: bool = False
) -> dict[int, TopKCut]:
    """Each trimmed model's top-k cut of this tensor, from two sweeps over its slices: a
    histogram of |delta|'s top 16 bits, then of the boundary bucket's low 16 bits (see
    sparsify.top_k_cut, which does the same on slices in memory). `stored`: see _histograms."""
    numel = job.out.numel
    kept = {j: kept_count(numel, d) for j in job.contributors if (d := _density(layout, plan, job, j)) < 1}
    cuts = {j: KEEP_NOTHING for j, k in kept.items() if k <= 0}
    todo = {j: k for j, k in kept.items() if k > 0}
    if not todo:
        return cuts
    # the counts are allocated before the sweeps: small buffers kept from inside a sweep would
    # sit between the slices' freed temporaries and fragment the heap (it grew by ~600 MB)
    histograms = {j: np.zeros(MAGNITUDE_BUCKETS, dtype=np.int64) for j in todo}
    for _, j, counts in _histograms(layout, job, device, slices, todo, None, stored):
        histograms[j] += counts
    buckets = {j: boundary_bucket(histograms[j], k) for j, k in todo.items()}
    bucket_counts = {j: np.zeros((len(slices), 1 << 16), dtype=np.int32) for j in todo}
    for s, j, counts in _histograms(
        layout, job, device, slices, todo, {j: bucket for j, (bucket, _) in buckets.items()}, stored
    ):
        bucket_counts[j][s] = counts
    for j, k in todo.items():
        bucket, larger = buckets[j]
        cuts[j] = cut_from_bucket_counts(bucket, [start for start, _ in slices], bucket_counts[j], k - larger)
    return cuts


def _cuts_by_selection(
    layout: Layout, job: TensorJob, settings: dict[int, dict], base: Stored, tuned: dict[int, Stored]
) -> dict[int, TopKCut]:
    """Each trimmed model's top-k cut of a tensor of one small slice, whose stored entries are at
    hand: by one selection over its magnitudes (sparsify.cut_of_keys), the cut _magnitude_cuts
    finds in two histogram sweeps. NaN/Inf in an input is named, as by _histograms."""
    cuts = {}
    for j, entries in tuned.items():
        density = settings[j]["density"]
        if density >= 1:
            continue  # nothing dropped
        k = kept_count(job.out.numel, density)
        if k <= 0:
            cuts[j] = KEEP_NOTHING
            continue
        keys = kernels.magnitude_keys(base, entries)
        if np.count_nonzero(keys >= NON_FINITE_KEYS):  # NaN/Inf in an input (this names it), or an overflow
            read_all_float32([layout.reference, layout.models[j].checkpoint], job.name, "cpu", 0, job.out.numel)
        cuts[j] = cut_of_keys(keys, k)
    return cuts


def _task_settings(layout: Layout, plan: Plan, job: TensorJob) -> dict[int, dict]:
    """Each contributing model's TaskVector parameters for this tensor (looked up once per tensor,
    not once per slice)."""
    method = layout.recipe.method
    # the optional parameters the method has (the others are 0.0): looked up only where they can be set
    optional = [name for name in ("gamma", "epsilon", "tall_mask_lambda") if method.param(name) is not None]
    settings = {}
    for j in job.contributors:
        model = layout.models[j]
        settings[j] = dict(
            weight=float(layout.model_parameter(model, layout.recipe.method.weight_name, job.name, missing=1.0)),
            density=_density(layout, plan, job, j),
            seed=tensor_seed(layout.recipe.seed, model.label, job.name),
            gamma=0.0,
            epsilon=0.0,
            tall_mask_lambda=0.0,
        )
        for name in optional:
            settings[j][name] = float(layout.model_parameter(model, name, job.name, missing=0.0))
    return settings


def _merge_entries(
    layout: Layout,
    job: TensorJob,
    inputs: _Inputs,
    settings: dict[int, dict],
    cuts: dict[int, TopKCut] | None = None,
) -> torch.Tensor:
    """The merge of one tensor, or of one slice of it (`cuts`: the trimmed models' whole-tensor
    cuts), cast to the output dtype, on the CPU."""
    task_vectors = [
        TaskVector(delta=delta, offset=inputs.start or 0, cut=(cuts or {}).get(j), **settings[j])
        for j, delta in inputs.task_vectors()
    ]
    merged = layout.recipe.method.merge(inputs.base, task_vectors, **layout.method_parameters(job.name))
    result = merged.to(torch_dtype(job.out.dtype))
    if not all_finite(result):
        raise BadInput(
            f"tensor {job.name}: the merge produced NaN or Inf (in {job.out.dtype}); check the weights and lambda"
        )
    return result.cpu()
