"""The element types tadrop reads and writes, named as safetensors names them ("BF16", "F32").

Checkpoints, layouts and shard writers speak these names; PyTorch and numpy types appear only
where entries are computed. `Stored` holds entries as a file stores them, in a numpy array,
for the compiled kernels: a CPU merge by the kernels then never needs torch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .lazy import torch

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOATS = ("F64", "F32", "F16", "BF16")  # the mergeable ones
# numpy has no bfloat16: BF16 entries are held as their 16-bit patterns
_NUMPY = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NUMPY_DTYPES = {name: np.dtype(kind) for name, kind in _NUMPY.items()}  # made once: np.dtype() costs ~1 us a call
_TORCH_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def set_sizes(tensor) -> None:
    """Set a frozen header record's `numel` and `nbytes` from its `shape` and `dtype`, once, when it
    is made (checkpoint.TensorInfo, shards.OutputTensor: asked for many times per tensor; a
    functools.cached_property's first access costs more under Python 3.11)."""
    numel = math.prod(tensor.shape)
    object.__setattr__(tensor, "numel", numel)
    object.__setattr__(tensor, "nbytes", numel * ITEMSIZE[tensor.dtype])


def torch_dtype(name: str):
    """The torch.dtype of a safetensors dtype name."""
    return getattr(torch, _TORCH_NAMES[name])


@functools.lru_cache(maxsize=1)
def _names_by_torch_dtype() -> dict:
    return {torch_dtype(name): name for name in _TORCH_NAMES}


def dtype_name(dtype) -> str:
    """The safetensors name of a torch.dtype; KeyError for one tadrop does not handle."""
    return _names_by_torch_dtype()[dtype]


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype that holds a safetensors dtype's entries (BF16: uint16 bit patterns)."""
    return _NUMPY_DTYPES[name]


@dataclass(frozen=True)
class Stored:
    """Entries as a file stores them: their safetensors dtype name and a 1-D numpy array of them."""

    dtype: str
    array: np.ndarray

    @property
    def numel(self) -> int:
        return self.array.size

    @classmethod
    def from_torch(cls, tensor) -> Stored:
        """A CPU tensor's entries, flattened, without a copy where it is contiguous."""
        name = dtype_name(tensor.dtype)
        flat = tensor.contiguous().reshape(-1)
        return cls(
            name,
            flat.view(torch.uint8).numpy().view(numpy_dtype(name)) if flat.numel() else np.empty(0, numpy_dtype(name)),
        )

    def to_torch(self):
        """The entries as a 1-D CPU tensor sharing their memory."""
        return torch.from_numpy(self.array.view(np.uint8)).view(torch_dtype(self.dtype))


def float32_of(entries: np.ndarray, name: str) -> np.ndarray:
    """Stored entries (their numpy array, any shape) as float32 values, as torch converts them."""
    if name == "F32":
        return entries.astype(np.float32)  # a copy: the caller may hold a view of a file's pages
    converted = Stored(name, entries.reshape(-1)).to_torch().to(torch.float32).numpy()
    return converted.reshape(entries.shape)


def stored_from_float32(values: np.ndarray, name: str) -> np.ndarray:
    """float32 values (any shape) as entries of dtype `name` (their numpy array), rounded as torch
    casts (round to nearest even)."""
    flat = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(-1)).to(torch_dtype(name))
    return Stored.from_torch(flat).array.reshape(values.shape)
