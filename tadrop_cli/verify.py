"""Reading a checkpoint back: `tadrop verify`, and the engine's check of each shard it writes."""

from __future__ import annotations

from pathlib import Path

from . import kernels
from .checkpoint import Checkpoint, all_finite, mapped_slices, open_checkpoint
from .dtypes import FLOATS, dtype_name
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
    for name, info in checkpoint.tensors.items():
        if info.offset >= 0 and kernels.supports([info.dtype], 1):  # the kernels check the file's pages as they are
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
