"""`tadrop verify`: read every tensor of a checkpoint back and check it is finite."""

from __future__ import annotations

import torch

from .checkpoint import MERGEABLE_DTYPES, open_checkpoint
from .errors import BadInput


def verify_checkpoint(reference: str) -> dict:
    """Open a checkpoint (index, shards, headers), read every tensor, refuse NaN/Inf.

    Raises BadInput naming the first file or tensor at fault.
    """
    checkpoint = open_checkpoint(reference)
    try:
        total = 0
        for name, info in checkpoint.tensors.items():
            tensor = checkpoint.read(name)
            if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
                raise BadInput(f"{info.file}: tensor {name} reads back as {tensor.dtype} {tuple(tensor.shape)}, header says {info.dtype} {info.shape}")
            if info.dtype in MERGEABLE_DTYPES and not bool(torch.isfinite(tensor).all()):
                raise BadInput(f"{info.file}: tensor {name} contains NaN or Inf")
            total += info.nbytes
        return {"checkpoint": reference, "tensors": len(checkpoint.tensors), "bytes": total, "ok": True}
    finally:
        checkpoint.close()
