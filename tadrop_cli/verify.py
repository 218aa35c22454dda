"""Reading a checkpoint back: `tadrop verify`, and the engine's check of each shard it writes."""

from __future__ import annotations

from pathlib import Path

from . import kernels
from .checkpoint import Checkpoint, TensorInfo, all_finite, mapped_slices, open_checkpoint
from .dtypes import FLOATS, ITEMSIZE, dtype_name
from .errors import BadInput, WriteError
from .shards import Shard

# Large safetensors tensors are read back in slices of this many entries: memory stays at a
# slice whatever the tensor
VERIFY_SLICE_ELEMENTS = 1 << 22


def verify_tensors(checkpoint: Checkpoint) -> int:
    """Read every tensor back and refuse damage, NaN and Inf; returns the bytes read.

    Raises BadInput naming the first file or tensor at fault.
    """
    total = 0
    checked = _checked_in_runs(checkpoint)
    for name, info in checkpoint.tensors.items():
        if name in checked:
            pass
        elif info.offset >= 0 and kernels.supports([info.dtype], 1):  # the kernels check the file's pages as they are
            for start in range(0, info.numel, VERIFY_SLICE_ELEMENTS):
                with mapped_slices([checkpoint], name, start, min(start + VERIFY_SLICE_ELEMENTS, info.numel)) as (
                    entries,
                ):
                    if kernels.non_finite(entries):
                        raise BadInput(f"{info.file}: tensor {name} contains NaN or Inf")
        else:
            _verify_with_torch(checkpoint, name)
        total += info.nbytes
    return total


# Small tensors lying one after another in a file, of one dtype, are checked together (one kernel
# call per run of them, not one per tensor) in runs of up to this many bytes.
RUN_BYTES = 1 << 20


def _checked_in_runs(checkpoint: Checkpoint) -> set[str]:
    """The small safetensors tensors found finite in runs (kernels.non_finite over the bytes of
    several tensors stored one after another, in one dtype): the others are checked one by one
    in verify_tensors, which also names a tensor of a run that holds a NaN or Inf."""
    if type(checkpoint).mapped is not Checkpoint.mapped or not kernels.available():
        return set()
    stored = sorted(
        (info.file, info.offset, name, info)
        for name, info in checkpoint.tensors.items()
        if info.offset >= 0 and info.dtype in kernels.DTYPE_CODES and info.nbytes <= RUN_BYTES
    )
    checked: set[str] = set()
    run: list[tuple[str, TensorInfo]] = []
    for file, offset, name, info in stored:
        if run and (
            run[-1][1].file != file
            or run[-1][1].dtype != info.dtype
            or run[-1][1].offset + run[-1][1].nbytes != offset
            or offset + info.nbytes - run[0][1].offset > RUN_BYTES
        ):
            checked.update(_finite_run(checkpoint, run))
            run = []
        run.append((name, info))
    checked.update(_finite_run(checkpoint, run))
    return checked


def _finite_run(checkpoint: Checkpoint, run: list[tuple[str, TensorInfo]]) -> list[str]:
    """The names of a run of tensors stored one after another, if all their entries are finite
    (else none: each is then checked, and named, alone)."""
    if len(run) < 2:
        return []
    first, last = run[0], run[-1]
    count = (last[1].offset + last[1].nbytes - first[1].offset) // ITEMSIZE[first[1].dtype]
    with mapped_slices([checkpoint], first[0], 0, count) as (entries,):  # from the first tensor's start, on
        found = kernels.non_finite(entries)
    return [] if found else [name for name, _ in run]


def _verify_with_torch(checkpoint: Checkpoint, name: str) -> None:
    info = checkpoint.tensors[name]
    if (
        info.offset >= 0 and info.numel > VERIFY_SLICE_ELEMENTS
    ):  # safetensors: read straight from the file, a slice at a time
        parts = (
            checkpoint.read(name, start, min(start + VERIFY_SLICE_ELEMENTS, info.numel))
            for start in range(0, info.numel, VERIFY_SLICE_ELEMENTS)
        )
    else:
        tensor = checkpoint.read(name)
        if tuple(tensor.shape) != info.shape or dtype_name(tensor.dtype) != info.dtype:
            raise BadInput(
                f"{info.file}: tensor {name} reads back as {tensor.dtype} {tuple(tensor.shape)}, "
                f"header says {info.dtype} {info.shape}"
            )
        parts = (tensor,)
    for part in parts:  # every tensor is read, to find truncation; float ones are checked
        if info.dtype in FLOATS and not all_finite(part):
            raise BadInput(f"{info.file}: tensor {name} contains NaN or Inf")


def verify_checkpoint(reference: str) -> dict:
    """Open a checkpoint (index, shards, headers), read every tensor, refuse NaN/Inf."""
    checkpoint = open_checkpoint(reference)
    try:
        total = verify_tensors(checkpoint)
        return {"checkpoint": reference, "tensors": len(checkpoint.tensors), "bytes": total, "ok": True}
    finally:
        checkpoint.close()


def verify_written_shard(path: Path, shard: Shard) -> None:
    """The engine's check of a shard it has just written: the planned tensors, readable and finite.

    A failure here is a write fault (the bytes on disk are not what was computed): WriteError.
    """
    try:
        checkpoint = open_checkpoint(str(path))
    except BadInput as error:
        raise WriteError(f"{path}: the written shard does not read back ({error})") from None
    try:
        planned = {t.name: (t.dtype, t.shape) for t in shard.tensors}
        found = {name: (info.dtype, info.shape) for name, info in checkpoint.tensors.items()}
        if found != planned:
            raise WriteError(f"{path}: the written shard's header differs from the plan")
        verify_tensors(checkpoint)
    except BadInput as error:
        raise WriteError(f"the written output failed verification: {error}") from None
    finally:
        checkpoint.close()
