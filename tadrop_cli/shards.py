"""The output's shards: which tensors go in which safetensors file, their headers, and ShardWriter,
which streams one file.

The shapes and dtypes of every output tensor are known before any is computed, so each shard's
header is written first and tensors are appended one by one: no shard is ever held in memory.
No maths here.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .dtypes import Stored, dtype_name, set_sizes
from .errors import WriteError
from .lazy import is_torch_tensor, torch
from .safe_files import creating_in, describe_os_error


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str  # safetensors' name for it: "BF16", "F32", ...
    shape: tuple[int, ...]
    # asked for many times per tensor (shards, headers, progress): computed once, when made (dtypes.set_sizes)
    numel: int = field(init=False, repr=False, compare=False)
    nbytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_sizes(self)


@dataclass(frozen=True)
class Shard:
    file_name: str
    tensors: tuple[OutputTensor, ...]

    @functools.cached_property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: list[OutputTensor], max_shard_bytes: int) -> list[Shard]:
    """Split tensors, in order, into shards of at most max_shard_bytes (a larger tensor gets its own)."""
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    if len(groups) == 1:
        return [Shard("model.safetensors", tuple(groups[0]))]
    count = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{count:05d}.safetensors", tuple(g)) for i, g in enumerate(groups)]


def safetensors_header(tensors: Iterable[OutputTensor], metadata: dict[str, str]) -> bytes:
    """The 8-byte length plus the JSON header of a safetensors file holding `tensors` in order."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(body)) + body


def tensor_bytes(tensor: torch.Tensor | Stored) -> memoryview:
    """The raw little-endian bytes of a CPU tensor or of stored entries, without a copy where possible."""
    if isinstance(tensor, Stored):
        return memoryview(tensor.array).cast("B") if tensor.numel else memoryview(b"")
    flat = tensor.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def shard_file_size(shard: Shard, metadata: dict[str, str]) -> int:
    return len(safetensors_header(shard.tensors, metadata)) + shard.nbytes


# Written bytes are handed to the disk every this many bytes (sync_file_range), while the merge
# goes on: the fsync at the end then finds little left to write (for 337 MB, 0.01-0.03 s
# instead of ~0.1 s).
WRITEBACK_BYTES = 32 << 20


@functools.lru_cache(maxsize=1)
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range, or None where the C library has none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_SYNC_FILE_RANGE_WRITE = 2  # start writing the range's dirty pages, without waiting


class ShardWriter:
    """Writes one safetensors file: header first, then each tensor in the planned order. The file is
    created new (never through a link, never over a file already there), in `folder_fd` when given,
    and the CRC-32 of every byte written is kept (`crc32`) for the journal."""

    def __init__(self, path: Path, shard: Shard, metadata: dict[str, str], folder_fd: int | None = None):
        self.path = path
        self._expected = list(shard.tensors)
        self._size = shard_file_size(shard, metadata)
        self._next = 0
        self._handed_to_disk = 0  # bytes from the start whose writing has begun
        self.crc32 = 0
        try:
            self._file = open(path.name if folder_fd is not None else path, "wb", opener=creating_in(folder_fd))
        except OSError as error:
            raise WriteError(describe_os_error(error, path)) from None
        self._write(safetensors_header(shard.tensors, metadata))

    def _write(self, data: bytes | memoryview) -> None:
        try:
            self._file.write(data)
        except OSError as error:
            raise WriteError(describe_os_error(error, self.path)) from None
        self.crc32 = zlib.crc32(data, self.crc32)  # from the bytes as handed over, while they are in the cache

    def write(self, name: str, tensor: torch.Tensor | Iterable[torch.Tensor | Stored]) -> None:
        """Append the next tensor: whole, or as its flattened slices in order (any iterable of
        tensors or Stored entries)."""
        expected = self._expected[self._next]
        whole = is_torch_tensor(tensor)
        if name != expected.name or (whole and tuple(tensor.shape) != expected.shape):
            raise RuntimeError(f"writer expected {expected} next, got {name}")
        written = 0
        for part in [tensor] if whole else tensor:
            dtype, count = (
                (part.dtype, part.numel) if isinstance(part, Stored) else (dtype_name(part.dtype), part.numel())
            )
            if dtype != expected.dtype:
                raise RuntimeError(f"writer expected {expected} next, got {name} in {dtype}")
            self._write(tensor_bytes(part))
            written += count
            self._start_writeback()
        if written != expected.numel:
            raise RuntimeError(f"writer expected {expected.numel} entries of {name}, got {written}")
        self._next += 1

    def _start_writeback(self) -> None:
        """Start writing what was appended since the last call, once it reaches WRITEBACK_BYTES.
        Advisory: a failure shows at close(), in fsync."""
        position = self._file.tell()
        start_writing = _sync_file_range()
        if start_writing is None or position - self._handed_to_disk < WRITEBACK_BYTES:
            return
        try:
            self._file.flush()
        except OSError as error:
            raise WriteError(describe_os_error(error, self.path)) from None
        start_writing(
            self._file.fileno(), self._handed_to_disk, position - self._handed_to_disk, _SYNC_FILE_RANGE_WRITE
        )
        self._handed_to_disk = position

    @property
    def size(self) -> int:
        return self._size

    @property
    def complete(self) -> bool:
        return self._next == len(self._expected)

    def close(self) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            written = self._file.tell()
            self._file.close()
        except OSError as error:
            raise WriteError(describe_os_error(error, self.path)) from None
        if written != self._size:
            raise WriteError(f"{self.path}: wrote {written} bytes, expected {self._size}")


def index_json(shards: list[Shard], metadata: dict[str, str]) -> dict:
    """The HF-style `model.safetensors.index.json` for sharded output."""
    return {
        "metadata": {"total_size": sum(s.nbytes for s in shards), **metadata},
        "weight_map": {t.name: s.file_name for s in shards for t in s.tensors},
    }
