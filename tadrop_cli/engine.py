"""The streaming engine: layout, pass 1 (the plan), pass 2 (merge and write), publish.

Only one tensor name's worth of inputs is held at a time: the base tensor and one
task vector per model, in float32 on the chosen device. The result is cast once to
the output dtype and appended to its shard. On a CPU the compiled kernels (kernels.py)
merge the generalized-task-arithmetic hosts slice by slice from the files' mapped pages,
and such a merge never imports torch.
"""

from __future__ import annotations

import ctypes
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Protocol

import numpy as np

from . import __version__, interrupts, kernels
from .checkpoint import all_finite, mapped_slices, read_all_float32
from .cpu_share import fit_torch_threads
from .devices import choose_device, on_cpu
from .dtypes import Stored, torch_dtype
from .errors import BadInput
from .lazy import is_torch_tensor, torch, torch_imported
from .layout import Layout, TensorJob, build_layout, tensor_seed
from .methods import TaskVector
from .plan import Plan, build_plan
from .recipe import Recipe, recipe_digest
from .sparsify import KEEP_NOTHING, MAGNITUDE_BUCKETS, TopKCut, boundary_bucket, bucket_histogram, cut_from_bucket_counts, kept_count, magnitude_histogram
from .verify import verify_written_shard
from .writer import (STAGING_SUFFIX, ExistingOutput, OutputTensor, StagingFolder, beside, changed_inputs,
                     check_output_parents, check_output_path, check_work_names, existing_output, index_json,
                     inputs_identity, plan_shards, recorded_recipe_digest, refuse_existing)


class Progress(Protocol):
    """What the engine reports; the CLI draws it (or not)."""

    def start(self, phase: str, total_tensors: int, total_bytes: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...  # one more tensor done, of nbytes (slices part() gave included)
    def part(self, nbytes: int) -> None: ...  # nbytes more of the current tensor done (one slice)
    def finish(self) -> None: ...


class NoProgress:
    def start(self, phase: str, total_tensors: int, total_bytes: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def part(self, nbytes: int) -> None:
        pass

    def finish(self) -> None:
        pass


def reporting_slices(merged: torch.Tensor | Stored | Iterator[torch.Tensor | Stored], progress: Progress):
    """merge_tensor's result, where it comes in slices with each slice reported to `progress` as it
    is made: the bar then moves through a large tensor instead of standing still."""
    if is_torch_tensor(merged) or isinstance(merged, Stored):
        return merged
    return _reported(merged, progress)


def _reported(slices: Iterator[torch.Tensor | Stored], progress: Progress) -> Iterator[torch.Tensor | Stored]:
    for part in slices:
        yield part
        progress.part(part.array.nbytes if isinstance(part, Stored) else part.numel() * part.element_size())


@dataclass
class MergeOptions:
    output: Optional[Path] = None  # overrides the recipe's output.path
    overwrite: bool = False
    resume: bool = False
    device: Optional[str] = None  # overrides the recipe's device


def output_path(recipe: Recipe, options: MergeOptions) -> Path:
    """The output folder, from --output or the recipe; a path no merge could use is refused here."""
    path = options.output or (Path(recipe.output.path) if recipe.output.path else None)
    if path is None:
        raise BadInput("output.path: no output folder (set output.path in the recipe or pass --output)")
    if "\x00" in str(path):
        shown = str(path).replace("\x00", "\\0")
        raise BadInput(f"output.path: {shown}: the output path contains a NUL byte")
    try:
        target = Path(path).expanduser()
    except (RuntimeError, KeyError, ValueError):  # ~name of no user
        raise BadInput(f"output.path: {path}: cannot expand '{Path(path).parts[0]}' (no such user)") from None
    check_output_path(target)
    return target


def _protected_inputs(layout: Layout) -> Iterator[tuple[str, Path, bool]]:
    """(label, path, is a folder) of what an output must stay out of: each checkpoint's folder, and
    every weight file (a single-file input protects the file, not the folder it lies in)."""
    for checkpoint in [layout.reference, *(m.checkpoint for m in layout.models)]:
        if checkpoint.folder:
            yield checkpoint.label, checkpoint.folder, True
        for file in dict.fromkeys(info.file for info in checkpoint.tensors.values()):
            yield checkpoint.label, file, False


def check_output_location(layout: Layout, target: Path) -> ExistingOutput:
    """Everything about the output's place that can be known before merging, so that no merge fails at
    its end: the parents, an output inside an input (or holding one), tadrop's own names beside the
    target, and what is at the target now (returned: refuse_existing decides with --overwrite)."""
    check_output_parents(target)
    existing = existing_output(target)  # before resolving: a link at the target is refused, never followed
    try:
        resolved = target.resolve()
    except (OSError, RuntimeError) as error:  # a loop of links
        raise BadInput(f"{target}: cannot resolve the output path ({error})") from None
    for label, path, folder in _protected_inputs(layout):
        path = path.resolve()
        if folder and (resolved == path or resolved.is_relative_to(path)):
            raise BadInput(f"{target}: output inside the input {label}; choose another output folder")
        if resolved == path or path.is_relative_to(resolved):  # --overwrite would delete the input
            raise BadInput(f"{target}: output folder holds the input {label}; choose another output folder")
    check_work_names(target)
    return existing


# Large tensors are merged in slices of this many entries (flattened) where the method allows
# (MergeMethod.sliceable): memory then grows with the slice, not the tensor, and each slice's
# intermediate results stay in the CPU's cache.
CHUNK_ELEMENTS = 1 << 20
# On a GPU, cache reuse matters less than the launches and waits that every slice costs, and
# memory is plentiful: 64 MB per float32 input keeps most tensors whole, and then a trim reads
# its inputs once instead of three times (two sweeps for the cut, then the merge).
GPU_CHUNK_ELEMENTS = 1 << 24


def chunk_elements(device: str) -> int:
    return CHUNK_ELEMENTS if on_cpu(device) else GPU_CHUNK_ELEMENTS


def merge_tensor(layout: Layout, plan: Plan, job: TensorJob, device: str) -> torch.Tensor | Stored | Iterator[torch.Tensor | Stored]:
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
    if _kernels_merge(layout, job, device):
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
        return (_merge_entries(layout, job, inputs.in_rows(row), settings, cuts).reshape(-1)
                for inputs in _read_slices(layout, job, device, slices, job.contributors))
    return _merge_entries(layout, job, _read_inputs(layout, job, device, None, None, job.contributors), _task_settings(layout, plan, job))


def _row_length(job: TensorJob) -> int:
    """Entries per row (dim 0) of the tensor; a 1-D tensor is one row."""
    return job.out.numel // job.out.shape[0] if len(job.out.shape) > 1 else job.out.numel


@dataclass
class _Inputs:
    """The base's and some models' entries [start, stop) of one tensor (all of it when start is
    None), in float32; `tuned` is model j's fine-tuned tensor until `task_vectors` subtracts."""

    start: Optional[int]
    base: torch.Tensor
    tuned: dict[int, torch.Tensor]

    def in_rows(self, length: int) -> "_Inputs":
        """The same entries as rows of `length` (a slice of whole rows, for row-wise methods)."""
        if length <= 1:
            return self
        return _Inputs(self.start, self.base.view(-1, length), {j: t.view(-1, length) for j, t in self.tuned.items()})

    def task_vectors(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(j, model j's task vector), computed in place of the fine-tuned entries."""
        for j, tensor in self.tuned.items():
            yield j, tensor.sub_(self.base)


def _read_inputs(layout: Layout, job: TensorJob, device: str, start: Optional[int], stop: Optional[int], models: Iterable[int]) -> _Inputs:
    models = list(models)
    base, *tuned = read_all_float32([layout.reference, *(layout.models[j].checkpoint for j in models)], job.name, device, start, stop)
    return _Inputs(start, base, dict(zip(models, tuned)))


def _read_slices(layout: Layout, job: TensorJob, device: str, slices: list[tuple[int, int]], models: Iterable[int]) -> Iterator[_Inputs]:
    """Each slice's inputs in turn. (Reading the next slice in a helper thread was tried: on
    two cores it competes with torch's own two threads and was ~15% slower.)"""
    models = list(models)
    for start, stop in slices:
        yield _read_inputs(layout, job, device, start, stop, models)


def _kernels_merge(layout: Layout, job: TensorJob, device: str) -> bool:
    """Whether the compiled CPU kernels merge this tensor: a generalized-task-arithmetic host
    whose drop, mix and rescale they know, on the CPU, with inputs of one dtype."""
    steps = layout.recipe.method.gta
    if not on_cpu(device) or steps is None or steps.sparsifier not in (None, "magnitude", "random") or steps.consensus not in (None, "sum"):
        return False
    if not layout.recipe.method.sliceable(layout.method_parameters(job.name)):
        return False  # rescale l1/l2/linf: a norm of the whole tensor
    checkpoints = [layout.reference, *(layout.models[j].checkpoint for j in job.contributors)]
    return kernels.supports([c.tensors[job.name].dtype for c in checkpoints], len(job.contributors))


@contextmanager
def _stored_inputs(layout: Layout, job: TensorJob, start: int, stop: int, models: Iterable[int]) -> Iterator[tuple[Stored, dict[int, Stored]]]:
    """Entries [start, stop) of the base's and some models' tensor, flattened, as stored: views
    of the files' pages (checkpoint.mapped_slices), let go of on leaving."""
    models = list(models)
    with mapped_slices([layout.reference, *(layout.models[j].checkpoint for j in models)], job.name, start, stop) as (base, *tuned):
        yield base, dict(zip(models, tuned))


def _merge_with_kernels(layout: Layout, plan: Plan, job: TensorJob, slices: list[tuple[int, int]]) -> Iterator[torch.Tensor | Stored]:
    """The merge of one tensor by the CPU kernels, slice by slice (flattened, output dtype): the
    same bits as methods.generalized_task_arithmetic over the slices."""
    steps, params = layout.recipe.method.gta, layout.method_parameters(job.name)
    settings = _task_settings(layout, plan, job)
    cuts = _magnitude_cuts(layout, plan, job, "cpu", slices, stored=True) if steps.sparsifier == "magnitude" else {}
    rescale = params.get("rescale", False) in (True, "paper")
    sum_of_weights = sum(settings[j]["weight"] for j in job.contributors)
    sum_of_weights = sum_of_weights if abs(sum_of_weights) >= 1e-8 else 1.0  # as generalized_task_arithmetic
    out_dtype = job.out.dtype if job.out.dtype in kernels.DTYPE_CODES else "F32"  # float64 outputs: cast below
    for start, stop in slices:
        with _stored_inputs(layout, job, start, stop, job.contributors) as (base, tuned):
            models = [_model_slice(steps.sparsifier, settings[j], cuts.get(j), rescale, start, base, entries) for j, entries in tuned.items()]
            merged, non_finite = kernels.merge_slice(base, models, start, steps.consensus is not None, bool(params["normalize"]),
                                                     sum_of_weights, float(params.get("lambda", 1.0)), out_dtype)
        if non_finite:  # NaN/Inf in an input or the result: PyTorch redoes the slice, and names the input or refuses the result
            inputs = _read_inputs(layout, job, "cpu", start, stop, job.contributors)
            yield _merge_entries(layout, job, inputs, settings, cuts).reshape(-1)
            continue
        yield merged if merged.dtype == job.out.dtype else merged.to_torch().to(torch_dtype(job.out.dtype))


def _model_slice(sparsifier: Optional[str], settings: dict, cut: Optional[TopKCut], rescale: bool, start: int,
                 base: Stored, entries: Stored) -> kernels.ModelSlice:
    """One model's part in a slice's kernel merge: its weight and its drop (as sparsify_task_vector)."""
    model, density = kernels.ModelSlice(entries, settings["weight"]), settings["density"]
    if sparsifier == "magnitude" and density < 1:
        model.drop, model.threshold, model.ties_before = kernels.DROP_BY_MAGNITUDE, cut.threshold, kernels.ties_kept_before(cut, start, base, entries)
    elif sparsifier == "random" and density < 1:
        model.drop, model.seed, model.limit = kernels.DROP_AT_RANDOM, settings["seed"], kernels.random_keep_limit(density)
    if model.drop != kernels.DROP_NOTHING and rescale and density > 0:
        model.rescale_by = density
    return model


def _density(layout: Layout, plan: Plan, job: TensorJob, j: int) -> float:
    """Model j's kept fraction for this tensor: the recipe's, or TADrop's."""
    model = layout.models[j]
    recipe_density = layout.recipe.method.density_value(layout.model_parameter(model, "density", job.name, missing=1.0), len(job.contributors))
    return plan.density(model.label, job.name, recipe_density)


def _histograms(layout: Layout, job: TensorJob, device: str, slices: list[tuple[int, int]], models: Iterable[int],
                buckets: Optional[dict[int, int]], stored: bool) -> Iterator[tuple[int, int, np.ndarray]]:
    """(slice, model, histogram of its task vector there) for every slice and model: the
    magnitude histogram, or with `buckets` the bucket histogram of each model's bucket. With
    `stored`, the CPU kernels count from the stored entries (one pass, no float32 copies)."""
    models = list(models)
    if not stored:
        for s, inputs in enumerate(_read_slices(layout, job, device, slices, models)):
            for j, delta in inputs.task_vectors():
                yield s, j, (magnitude_histogram(delta) if buckets is None else bucket_histogram(delta, buckets[j])).cpu().numpy()
        return
    for s, (start, stop) in enumerate(slices):
        with _stored_inputs(layout, job, start, stop, models) as (base, tuned):
            if buckets is not None:
                counts = {j: kernels.bucket_histogram(base, entries, buckets[j]) for j, entries in tuned.items()}
            else:
                counts = {j: kernels.magnitude_histogram(base, entries) for j, entries in tuned.items()}
        for j, model_counts in counts.items():
            if buckets is None and kernels.has_non_finite(model_counts):  # NaN/Inf in an input (this names it), or an overflowed difference
                read_all_float32([layout.reference, layout.models[j].checkpoint], job.name, "cpu", start, stop)
            yield s, j, model_counts


def _magnitude_cuts(layout: Layout, plan: Plan, job: TensorJob, device: str, slices: list[tuple[int, int]],
                    stored: bool = False) -> dict[int, TopKCut]:
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
    for s, j, counts in _histograms(layout, job, device, slices, todo, {j: bucket for j, (bucket, _) in buckets.items()}, stored):
        bucket_counts[j][s] = counts
    for j, k in todo.items():
        bucket, larger = buckets[j]
        cuts[j] = cut_from_bucket_counts(bucket, [start for start, _ in slices], bucket_counts[j], k - larger)
    return cuts


def _task_settings(layout: Layout, plan: Plan, job: TensorJob) -> dict[int, dict]:
    """Each contributing model's TaskVector parameters for this tensor (looked up once per tensor,
    not once per slice)."""
    settings = {}
    for j in job.contributors:
        model = layout.models[j]
        settings[j] = dict(
            weight=float(layout.model_parameter(model, "weight", job.name)),
            density=_density(layout, plan, job, j),
            seed=tensor_seed(layout.recipe.seed, model.label, job.name),
            gamma=float(layout.model_parameter(model, "gamma", job.name, missing=0.0)),
            epsilon=float(layout.model_parameter(model, "epsilon", job.name, missing=0.0)),
            tall_mask_lambda=float(layout.model_parameter(model, "tall_mask_lambda", job.name, missing=0.0)),
        )
    return settings


def _merge_entries(layout: Layout, job: TensorJob, inputs: _Inputs, settings: dict[int, dict], cuts: Optional[dict[int, TopKCut]] = None) -> torch.Tensor:
    """The merge of one tensor, or of one slice of it (`cuts`: the trimmed models' whole-tensor
    cuts), cast to the output dtype, on the CPU."""
    task_vectors = [TaskVector(delta=delta, offset=inputs.start or 0, cut=(cuts or {}).get(j), **settings[j]) for j, delta in inputs.task_vectors()]
    merged = layout.recipe.method.merge(inputs.base, task_vectors, **layout.method_parameters(job.name))
    result = merged.to(torch_dtype(job.out.dtype))
    if not all_finite(result):
        raise BadInput(f"tensor {job.name}: the merge produced NaN or Inf (in {job.out.dtype}); check the weights and lambda")
    return result.cpu()


def uniform_plan(layout: Layout) -> Plan:
    """The plan without TADrop: no tensor data needs reading."""
    return build_plan(layout, "cpu")


def _needs_scores(layout: Layout) -> bool:
    return layout.recipe.method.sparsifier is not None and any(m.tadrop is not None for m in layout.models)


def make_plan(layout: Layout, device: str, progress: Progress) -> Plan:
    if not _needs_scores(layout):
        return uniform_plan(layout)
    progress.start("scoring", len(layout.jobs), sum(j.out.nbytes for j in layout.jobs))
    plan = build_plan(layout, device, on_tensor=lambda job: progress.advance(job.out.nbytes))
    progress.finish()
    return plan


def _peak_memory() -> dict[str, int]:
    peak = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch_imported() and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
    return peak


def _ratio_summary(plan: Plan) -> list[dict]:
    return [
        {"model": m.model, "statistic": m.statistic, "adaptive_tensors": m.adaptive_tensors, "mean_base_ratio": round(m.mean_base_ratio, 6),
         "mean_ratio": round(m.mean_ratio, 6), "min_ratio": round(m.min_ratio, 6), "max_ratio": round(m.max_ratio, 6), "budget_met": m.budget_met}
        for m in plan.models
    ]


def _metadata(recipe: Recipe, digest: str) -> dict[str, str]:
    return {"format": "pt", "tadrop_version": __version__, "merge_method": recipe.merge_method, "recipe_sha256": digest}


def reuse_freed_memory() -> None:
    """Ask glibc to keep freed buffers of up to 16 MB (slices) for reuse instead of unmapping them.

    By default each buffer over 128 kB is mapped afresh and unmapped when freed, so every
    slice's temporaries page-fault in again: on virtual machines that costs several times
    the arithmetic done on them. Peak memory barely moves: the same few buffers are reused.
    A no-op where the C library has no mallopt (macOS) or ignores it (musl). A setting of the
    whole process: the CLI makes it; a program that calls run_merge may.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 16 << 20)  # M_MMAP_THRESHOLD: larger buffers (whole large tensors) are still mapped
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD: keep this much free memory in the heap
    except (OSError, AttributeError):
        pass


def _input_files(layout: Layout) -> list[Path]:
    return [info.file for checkpoint in [layout.reference, *(m.checkpoint for m in layout.models)] for info in checkpoint.tensors.values()]


def _sources(layout: Layout, device: str) -> dict:
    """What a merge's shards depend on besides the recipe: tadrop's version, the device and the inputs'
    identities (size, modification time, content hash: writer.file_identity)."""
    return {"tadrop_version": __version__, "device": str(device), "inputs": inputs_identity(_input_files(layout))}


def _check_inputs_unchanged(layout: Layout, recorded: dict) -> None:
    """Refuse to publish shards made from inputs that changed during the merge."""
    changes = changed_inputs(recorded, inputs_identity(_input_files(layout)))
    if changes:
        raise BadInput(f"input {changes[0]} during the merge; nothing was published: run the merge again")


def run_merge(recipe: Recipe, options: MergeOptions, progress: Progress = NoProgress()) -> dict:
    """Merge as the recipe says; returns the summary. The output appears only when complete.

    A partial merge left by an interrupted run of the same recipe, inputs, tadrop version and device
    is resumed (its finished shards checked against their journaled checksums), with or without
    --resume; with --resume, a partial merge that cannot be resumed is refused instead of discarded.
    """
    started = time.perf_counter()
    device = choose_device(options.device or recipe.device)
    target = output_path(recipe, options)
    layout = build_layout(recipe)
    try:
        existing = check_output_location(layout, target)
        digest = recipe_digest(recipe)
        if options.resume and existing.exists and not options.overwrite and _already_published(target, digest):
            summary = _already_complete(layout, target)
        else:
            refuse_existing(target, existing, options.overwrite)
            staging = StagingFolder(target, digest, _sources(layout, device))
            done = staging.open(resume=options.resume)
            published = False
            try:
                summary = _merge_into(layout, staging, done, device, digest, progress, options)
                _check_inputs_unchanged(layout, staging.sources["inputs"])
                with interrupts.held():  # never cut in two: a signal meanwhile is raised once it is done
                    staging.publish(overwrite=options.overwrite)
                    published = True
            except (KeyboardInterrupt, SystemExit) as stop:
                if published:
                    stop.published = str(target)  # the CLI says the output is complete
                else:
                    stop.finished_shards = staging.keep_for_resume()  # the CLI says what a run again keeps
                raise
            except BaseException:
                if not published:
                    staging.discard()
                raise
    finally:
        layout.close()
    summary.update(output=str(target), seconds=round(time.perf_counter() - started, 3), device=str(device),
                   cpu_kernels=on_cpu(device) and kernels.available(), **_peak_memory())
    return summary


def _already_published(target: Path, digest: str) -> bool:
    """The output at the target is this recipe's (its recorded recipe SHA-256), and no partial merge waits."""
    return recorded_recipe_digest(target) == digest and not beside(target, STAGING_SUFFIX).exists()


def _already_complete(layout: Layout, target: Path) -> dict:
    """The summary of a --resume that finds the merge already published."""
    shards = plan_shards([job.out for job in layout.jobs], layout.recipe.output.shard_size)
    return {
        "method": layout.recipe.merge_method, "tadrop": _needs_scores(layout), "tensors": len(layout.jobs),
        "shards": len(shards), "shard_files": [s.file_name for s in shards], "resumed_shards": len(shards),
        "bytes_written": 0, "copied_files": [], "ratios": [],
        "notes": [*layout.notes, f"{target} is already complete: its recorded recipe SHA-256 is this recipe's; "
                                 "nothing to do"],
    }


def _merge_into(layout: Layout, staging: StagingFolder, done: dict[str, dict], device: str, digest: str,
                progress: Progress, options: MergeOptions) -> dict:
    shards = plan_shards([job.out for job in layout.jobs], layout.recipe.output.shard_size)
    metadata = _metadata(layout.recipe, digest)
    saved = staging.saved_plan() if done else None
    finished = staging.finished_shards(shards, metadata) if saved else set()
    if done and not saved:
        staging.notes.append(f"the saved plan in {staging.path} is missing or changed: the merge starts over")
    plan = Plan.from_json(saved) if saved else make_plan(layout, device, progress)
    if not saved:
        staging.save_plan(plan.to_json())
    if finished and not options.resume:
        staging.notes.append(f"resumed {len(finished)} finished shard(s) of an interrupted merge of this recipe "
                             f"(same inputs, tadrop version and device; checksums verified)")

    jobs = {job.name: job for job in layout.jobs}
    todo = [s for s in shards if s.file_name not in finished]
    progress.start("merging", sum(len(s.tensors) for s in todo), sum(s.nbytes for s in todo))
    for shard in todo:
        writer = staging.shard_writer(shard, metadata)
        for tensor in shard.tensors:
            writer.write(tensor.name, reporting_slices(merge_tensor(layout, plan, jobs[tensor.name], device), progress))
            progress.advance(tensor.nbytes)
        writer.close()
        verify_written_shard(staging.path / shard.file_name, shard)
        staging.mark_complete(shard.file_name)
    progress.finish()

    if len(shards) > 1:
        staging.write_json("model.safetensors.index.json", index_json(shards, {"tadrop_version": __version__, "recipe_sha256": digest}))
    copied = []
    for file in layout.config_files:  # from the base, or the first model of a linear merge
        staging.copy_in(file)
        copied.append(file.name)
    for file, relative in layout.module_files:  # a sentence-transformers base's module folders (1_Pooling/...)
        staging.copy_in(file, relative)
        copied.append(relative)

    return {
        "method": layout.recipe.merge_method,
        "tadrop": _needs_scores(layout),
        "tensors": len(layout.jobs),
        "shards": len(shards),
        "shard_files": [s.file_name for s in shards],
        "resumed_shards": len(shards) - len(todo),
        "bytes_written": sum(s.nbytes for s in shards),
        "copied_files": copied,
        "ratios": _ratio_summary(plan),
        "notes": [*layout.notes, *staging.notes],
    }


def plan_only(recipe: Recipe, device_name: Optional[str] = None, progress: Progress = NoProgress()) -> tuple[Layout, Plan]:
    """Pass 1 alone, for `tadrop plan`."""
    device = choose_device(device_name or recipe.device)
    layout = build_layout(recipe)
    try:
        return layout, make_plan(layout, device, progress)
    finally:
        layout.close()


def _runtime_bytes(layout: Layout, device: str) -> int:
    """The process's own memory: ~100 MB where the CPU kernels merge every tensor (torch is then
    never imported), ~300 MB with torch."""
    merged = [job for job in layout.jobs if job.mergeable and job.contributors and not job.copy_base]
    return (100 if all(_kernels_merge(layout, job, device) for job in merged) else 300) * 2**20


def _dry_run_output_notes(target: Path, existing: ExistingOutput, overwrite: bool) -> list[str]:
    """An existing output is a note in a dry run (it writes nothing), unless no merge may replace it."""
    if not existing.exists:
        return []
    if existing.refusal:
        refuse_existing(target, existing, overwrite)
    if overwrite:
        return [f"{target} exists: the merge would replace it (only once the new output is complete)"]
    return [f"{target} exists: a real merge needs --overwrite to replace it"]


def dry_run(recipe: Recipe, options: MergeOptions) -> dict:
    """Validate everything that can be checked from headers, and estimate the cost."""
    device = choose_device(options.device or recipe.device)
    target = output_path(recipe, options)
    layout = build_layout(recipe)
    try:
        existing = check_output_location(layout, target)
        notes = _dry_run_output_notes(target, existing, options.overwrite)
        outputs: list[OutputTensor] = [job.out for job in layout.jobs]
        shards = plan_shards(outputs, recipe.output.shard_size)
        method = layout.recipe.method
        passes = 2 if _needs_scores(layout) else 1
        bytes_to_read, peak_entries, work = 0, 0, 0
        for job in layout.jobs:
            if not job.mergeable:  # copied from the reference as stored
                bytes_to_read += layout.reference.tensors[job.name].nbytes
                continue
            models = [layout.reference, *(layout.models[i].checkpoint for i in job.contributors)]
            nbytes = sum(c.tensors[job.name].nbytes for c in models if job.name in c)
            sliced = job.out.numel > chunk_elements(device) and method.sliceable(layout.method_parameters(job.name))
            sweeps = passes + (2 if sliced and method.sparsifier == "magnitude" else 0)  # the trim's two sweeps
            bytes_to_read += nbytes * sweeps
            # the base, one float32 task vector per model and a few working buffers, of the
            # tensor or of one slice of it
            peak_entries = max(peak_entries, (len(models) + 4) * (chunk_elements(device) if sliced else job.out.numel))
            work += 4 * job.out.numel * len(models) * sweeps
        return {
            "output": str(target),
            "method": recipe.merge_method,
            "device": str(device),
            "tadrop": passes == 2,
            "tensors": len(outputs),
            "shards": len(shards),
            "shard_files": [s.file_name for s in shards],
            "bytes_to_write": sum(s.nbytes for s in shards),
            "bytes_to_read": bytes_to_read,
            "estimated_peak_memory_bytes": 4 * peak_entries + _runtime_bytes(layout, device),
            # a rough figure: reading from cache at ~2 GB/s and the float32 arithmetic at ~2 GB/s per pass
            "estimated_seconds": round(bytes_to_read / 2e9 + work / 2e9, 1),
            "notes": [*layout.notes, *notes],
        }
    finally:
        layout.close()
