"""Running a merge: the output's place, pass 1 (the plan), pass 2 into a staging folder with
its journal, the checks before publishing, the publish, and the summary; also `tadrop plan`
(plan_only) and the dry run. Each tensor's merge is tensor_merge.py's (merge_tensor); the shards,
the staging folder and the atomic publish are shards.py's and staging.py's.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from . import __version__, estimate, interrupts, kernels
from .aligned_checkpoint import AlignedCheckpoint
from .checkpoint import Checkpoint, parse_json, read_text_file
from .devices import choose_device, on_cpu
from .dtypes import Stored
from .errors import BadInput
from .journal import changed_inputs, inputs_identity
from .layout import Layout, TensorJob, build_layout
from .lazy import is_torch_tensor, torch, torch_imported
from .output_location import (
    STAGING_SUFFIX,
    ExistingOutput,
    beside,
    check_output_parents,
    check_output_path,
    check_work_names,
    existing_output,
    recorded_recipe_digest,
    refuse_existing,
)
from .plan import Plan, build_plan
from .recipe import Recipe, Step, recipe_digest
from .shards import OutputTensor, index_json, plan_shards
from .staging import StagingFolder
from .tensor_merge import chunk_elements, kernels_merge, merge_inputs, merge_tensors
from .tokenizer_files import write_tokenizer
from .verify import verify_written_shard


class Progress(Protocol):
    """What a merge reports; the CLI draws it (or not)."""

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


NO_PROGRESS = NoProgress()  # the default: report nothing


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
    output: Path | None = None  # overrides the recipe's output.path
    overwrite: bool = False
    resume: bool = False
    device: str | None = None  # overrides the recipe's device


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
    for checkpoint in [layout.reference, *(m.checkpoint for m in layout.models), *layout.opened]:
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


def peak_rss_bytes() -> int:
    """This process's peak resident memory: Linux's VmHWM (of this program's own address space), else
    getrusage's maxrss (kB on Linux), which after an exec keeps the peak of the process image replaced:
    started by Python's subprocess (vfork), that is the parent's whole resident memory."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_memory() -> dict[str, int]:
    peak = {"peak_rss_bytes": peak_rss_bytes()}
    if torch_imported() and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
    return peak


def _ratio_summary(plan: Plan) -> list[dict]:
    return [
        {
            "model": m.model,
            "statistic": m.statistic,
            "adaptive_tensors": m.adaptive_tensors,
            "mean_base_ratio": round(m.mean_base_ratio, 6),
            "mean_ratio": round(m.mean_ratio, 6),
            "min_ratio": round(m.min_ratio, 6),
            "max_ratio": round(m.max_ratio, 6),
            "budget_met": m.budget_met,
        }
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
    weights = [
        file
        for checkpoint in [layout.reference, *(m.checkpoint for m in layout.models)]
        for file in checkpoint.input_files()
    ]
    return weights + (layout.tokenizer.input_files if layout.tokenizer else [])  # a tokenizer merge's rows follow them


def _sources(layout: Layout, device: str) -> dict:
    """What a merge's shards depend on besides the recipe: tadrop's version, the device and the inputs'
    identities (size, modification time, content hash: journal.file_identity)."""
    return {"tadrop_version": __version__, "device": str(device), "inputs": inputs_identity(_input_files(layout))}


def _check_inputs_unchanged(layout: Layout, recorded: dict) -> None:
    """Refuse to publish shards made from inputs that changed during the merge."""
    changes = changed_inputs(recorded, inputs_identity(_input_files(layout)))
    if changes:
        raise BadInput(f"input {changes[0]} during the merge; nothing was published: run the merge again")


def run_merge(recipe: Recipe, options: MergeOptions, progress: Progress = NO_PROGRESS) -> dict:
    """Merge as the recipe says; returns the summary. The output appears only when complete.

    A partial merge left by an interrupted run of the same recipe, inputs, tadrop version and device
    is resumed (its finished shards checked against their journaled checksums), with or without
    --resume; with --resume, a partial merge that cannot be resumed is refused instead of discarded.
    """
    started = time.perf_counter()
    device = choose_device(options.device or recipe.device)
    target = output_path(recipe, options)
    with collection_paused():
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
                with long_lived_objects_frozen() as freeze:
                    summary = _merge_into(layout, staging, done, device, digest, progress, options, freeze)
                _check_inputs_unchanged(layout, staging.sources["inputs"])
                with interrupts.held():  # never cut in two: a signal meanwhile is raised once it is done
                    staging.publish(overwrite=options.overwrite)
                    published = True
                    interrupts.published(str(target))  # a signal until the CLI is done says so
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
    summary.update(
        output=str(target),
        seconds=round(time.perf_counter() - started, 3),
        device=str(device),
        cpu_kernels=on_cpu(device) and kernels.available(),
        **_peak_memory(),
    )
    return summary


def run_merges(steps: list[Step], options: MergeOptions, progress: Progress = NO_PROGRESS) -> dict:
    """A multi-document recipe's merges in turn (recipe.load_merges orders them). A merge whose output is
    already published from the same recipe is skipped (mergekit-multi's lazy default), unless a merge it
    reads was redone in this run: its own stale output is then replaced."""
    summaries, redone = [], set()
    for step in steps:
        step_options = replace(options, output=step.output or options.output)
        target = output_path(step.recipe, step_options)
        ours = target.exists() and _already_published(target, recipe_digest(step.recipe))
        if ours and not step.uses & redone:
            summaries.append({"name": step.name, "output": str(target), "skipped": True})
            continue
        summary = run_merge(step.recipe, replace(step_options, overwrite=options.overwrite or ours), progress)
        summaries.append({"name": step.name, "skipped": False, **summary})
        redone.add(step.name)
    return {"merges": summaries, "output": summaries[-1]["output"]}


def dry_run_merges(steps: list[Step], options: MergeOptions) -> dict:
    """The dry run of each merge of a multi-document recipe whose inputs exist now; a merge that reads
    another's output not yet written is checked when that one has been merged."""
    summaries = []
    for step in steps:
        step_options = replace(options, output=step.output or options.output)
        missing = sorted(name for name in step.uses if not _merged(steps, name, step_options))
        if missing:
            target = output_path(step.recipe, step_options)
            note = f"reads the output of {', '.join(missing)}, not merged yet: checked once it is"
            summaries.append({"name": step.name, "output": str(target), "checked": False, "notes": [note]})
            continue
        summaries.append({"name": step.name, "checked": True, **dry_run(step.recipe, step_options)})
    return {"merges": summaries, "output": summaries[-1]["output"]}


def _merged(steps: list[Step], name: str, options: MergeOptions) -> bool:
    step = next(s for s in steps if s.name == name)
    return _already_published(
        output_path(step.recipe, replace(options, output=step.output)), recipe_digest(step.recipe)
    )


def _already_published(target: Path, digest: str) -> bool:
    """The output at the target is this recipe's (its recorded recipe SHA-256), and no partial merge waits."""
    return recorded_recipe_digest(target) == digest and not beside(target, STAGING_SUFFIX).exists()


def _already_complete(layout: Layout, target: Path) -> dict:
    """The summary of a --resume that finds the merge already published."""
    shards = plan_shards([job.out for job in layout.jobs], layout.recipe.output.shard_size)
    note = f"{target} is already complete: its recorded recipe SHA-256 is this recipe's; nothing to do"
    return _summary(layout, shards, resumed=len(shards), bytes_written=0, copied=[], ratios=[], notes=[note])


def _summary(
    layout: Layout,
    shards: list,
    resumed: int,
    bytes_written: int,
    copied: list[str],
    ratios: list[dict],
    notes: list[str],
) -> dict:
    """A merge's summary (the CLI's line and --json), before the timings run_merge adds."""
    return {
        "method": layout.recipe.merge_method,
        "tadrop": _needs_scores(layout),
        "tensors": len(layout.jobs),
        "shards": len(shards),
        "shard_files": [s.file_name for s in shards],
        "resumed_shards": resumed,
        "bytes_written": bytes_written,
        "copied_files": copied,
        "ratios": ratios,
        "notes": [*layout.notes, *notes],
    }


@contextmanager
def collection_paused() -> Iterator[None]:
    """No automatic garbage collection inside: reading the inputs' headers makes a few objects per
    tensor, and a collection every few hundred of them would walk them all again (with many
    tensors, half of the layout's time); they are swept once after, and then frozen
    (long_lived_objects_frozen)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def long_lived_objects_frozen() -> Iterator[Callable[[], None]]:
    """Leave the objects alive on entering (and those the function it yields adds: the plan's) out of
    the garbage collector's sweeps until leaving. A checkpoint of many tensors makes a few
    objects per tensor (headers, jobs, plan rows) that live as long as the merge: every full
    collection walked them all, ~0.1 ms per tensor of a 5,000-tensor merge (a third of its
    time). They are still freed when no longer referred to; on leaving they are swept again.
    A program that froze objects of its own before (gc.freeze) keeps them frozen: nothing is
    frozen or unfrozen here then."""
    if gc.get_freeze_count():
        yield lambda: None
        return
    gc.freeze()
    try:
        yield gc.freeze
    finally:
        gc.unfreeze()


def _merge_into(
    layout: Layout,
    staging: StagingFolder,
    done: dict[str, dict],
    device: str,
    digest: str,
    progress: Progress,
    options: MergeOptions,
    freeze: Callable[[], None],
) -> dict:
    shards = plan_shards([job.out for job in layout.jobs], layout.recipe.output.shard_size)
    metadata = _metadata(layout.recipe, digest)
    saved = staging.saved_plan() if done else None
    finished = staging.finished_shards(shards, metadata) if saved else set()
    if done and not saved:
        staging.notes.append(f"the saved plan in {staging.path} is missing or changed: the merge starts over")
    plan = Plan.from_json(saved) if saved else make_plan(layout, device, progress)
    if not saved:
        staging.save_plan(plan.to_json())
    freeze()  # the plan's rows too (long_lived_objects_frozen)
    if finished and not options.resume:
        staging.notes.append(
            f"resumed {len(finished)} finished shard(s) of an interrupted merge of this recipe "
            f"(same inputs, tadrop version and device; checksums verified)"
        )

    jobs = {job.name: job for job in layout.jobs}
    todo = [s for s in shards if s.file_name not in finished]
    progress.start("merging", sum(len(s.tensors) for s in todo), sum(s.nbytes for s in todo))
    for shard in todo:
        writer = staging.shard_writer(shard, metadata)
        for job, merged in merge_tensors(layout, plan, [jobs[tensor.name] for tensor in shard.tensors], device):
            writer.write(job.name, reporting_slices(merged, progress))
            progress.advance(job.out.nbytes)
        writer.close()
        verify_written_shard(staging.path / shard.file_name, shard)
        staging.mark_complete(shard.file_name)
    progress.finish()

    if len(shards) > 1:
        staging.write_json(
            "model.safetensors.index.json", index_json(shards, {"tadrop_version": __version__, "recipe_sha256": digest})
        )
    copied = []
    for file in layout.config_files:  # from the base, or the first model of a linear merge
        if file.name in layout.written_files:
            continue
        if layout.json_changes.get(file.name):  # a slices merge's layer count, a recipe's chat template
            staging.write_json(file.name, changed_json(file, layout.json_changes[file.name]))
        else:
            staging.copy_in(file)
        copied.append(file.name)
    for name, text in layout.written_files.items():
        if text is not None:
            staging._write_file(name, text.encode())
            copied.append(name)
    for file, relative in layout.module_files:  # a sentence-transformers base's module folders (1_Pooling/...)
        staging.copy_in(file, relative)
        copied.append(relative)
    if layout.tokenizer is not None:  # the merged tokenizer, and config.json with its vocab_size
        copied.extend(write_tokenizer(staging, layout.tokenizer, layout.json_changes.get("config.json")))

    return _summary(
        layout,
        shards,
        resumed=len(shards) - len(todo),
        bytes_written=sum(s.nbytes for s in shards),
        copied=copied,
        ratios=_ratio_summary(plan),
        notes=staging.notes,
    )


def changed_json(file: Path, changes: dict) -> dict:
    """A JSON config file's content with some top-level keys set."""
    data = parse_json(read_text_file(file), str(file))
    if not isinstance(data, dict):
        raise BadInput(f"{file}: not a JSON object")
    return {**data, **changes}


def plan_only(recipe: Recipe, device_name: str | None = None, progress: Progress = NO_PROGRESS) -> tuple[Layout, Plan]:
    """Pass 1 alone, for `tadrop plan`."""
    device = choose_device(device_name or recipe.device)
    layout = build_layout(recipe)
    try:
        return layout, make_plan(layout, device, progress)
    finally:
        layout.close()


def _estimate_path(layout: Layout, job: TensorJob, device: str) -> str:
    """Which of estimate.PATHS merges this tensor (copies of the base count as the kernels' reads)."""
    method = layout.recipe.method
    if job.copy_base or not job.contributors or kernels_merge(layout, job, device):
        return "kernels"
    if method.param("exact_svd") is not None:
        return "svd"
    return "ranked_rows" if method.whole_rows else "torch"


def _runtime_bytes(layout: Layout, device: str) -> int:
    """The process's own memory: ~100 MB where the CPU kernels merge every tensor (torch is then
    never imported), ~300 MB with torch; a tokenizer merge's holds torch, transformers and its
    tokenizers (estimate.tokenizer_runtime_bytes)."""
    if layout.tokenizer is not None:
        return estimate.tokenizer_runtime_bytes(layout.tokenizer.loaded_tokens)
    merged = [job for job in layout.jobs if job.mergeable and job.contributors and not job.copy_base]
    return (100 if all(kernels_merge(layout, job, device) for job in merged) else 300) * 2**20


def _aligned(checkpoints: list[Checkpoint], name: str) -> bool:
    """Whether a tensor is read through a tokenizer merge's aligned views (rows assembled by blocks)."""
    return any(isinstance(c, AlignedCheckpoint) and c.aligns(name) for c in checkpoints)


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
        # a tokenizer merge's vocabulary was built just now by build_layout: the merge builds it again
        building = layout.tokenizer.build_seconds if layout.tokenizer is not None else 0.0
        bytes_to_read, peak_entries, work, seconds, uses_torch = 0, 0, 0, building, False
        for job in layout.jobs:
            if not job.mergeable:  # copied from the reference as stored
                bytes_to_read += layout.reference.tensors[job.name].nbytes
                seconds += estimate.tensor_seconds("kernels", layout.reference.tensors[job.name].nbytes, (), 1)
                continue
            models = merge_inputs(layout, job)
            nbytes = sum(c.tensors[job.name].nbytes for c in models if job.name in c)
            sliced = job.out.numel > chunk_elements(device) and method.sliceable(layout.method_parameters(job.name))
            sweeps = passes + (2 if sliced and method.sparsifier == "magnitude" else 0)  # the trim's two sweeps
            bytes_to_read += nbytes * sweeps
            # the base, one float32 task vector per model and a few working buffers, of the
            # tensor or of one slice of it
            span = chunk_elements(device) if sliced else job.out.numel
            held = (len(models) + 4) * span
            if _aligned(models, job.name):  # rows gathered by blocks (aligned_checkpoint), besides the merge's
                held += estimate.aligned_entries(len(models), span)
            peak_entries = max(peak_entries, held)
            work += 4 * job.out.numel * len(models) * sweeps
            path = _estimate_path(layout, job, device)
            uses_torch = uses_torch or path != "kernels"
            exact_svd = bool(layout.method_parameters(job.name).get("exact_svd", False))
            scoring = nbytes * (passes - 1)  # TADrop's pass 1: Hoyer sums, by the kernels where they are built
            seconds += estimate.tensor_seconds("kernels" if kernels.available() else "torch", scoring, (), 1)
            merging = nbytes * sweeps - scoring
            seconds += estimate.tensor_seconds(path, merging, job.out.shape, len(job.contributors), exact_svd)
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
            # on a CPU, the rates bench/speed measured per path (estimate.py); on a GPU a rough figure:
            # reading from cache at ~2 GB/s and the float32 arithmetic at ~2 GB/s per pass
            "estimated_seconds": estimate.rounded(estimate.merge_seconds(seconds, uses_torch))
            if on_cpu(device)
            else round(bytes_to_read / 2e9 + work / 2e9 + building, 1),
            "notes": [*layout.notes, *notes],
        }
    finally:
        layout.close()
