"""Writing the output: streamed safetensors shards in a staging folder, moved into place when complete.

The shapes and dtypes of every output tensor are known before any is computed, so
each shard's header is written first and tensors are appended one by one: no
shard is ever held in memory. Work goes to a hidden staging folder beside the
target (`.NAME.tadrop-partial`) with a journal of finished shards, so that an
interrupted merge never looks finished and can be resumed. No maths here.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from .dtypes import ITEMSIZE, Stored, dtype_name
from .errors import BadInput, WriteError
from .lazy import is_torch_tensor, torch

JOURNAL = "progress.json"


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str  # safetensors' name for it: "BF16", "F32", ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class Shard:
    file_name: str
    tensors: tuple[OutputTensor, ...]

    @property
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
        header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
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


def _fsync_write_json(path: Path, data: object) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    with open(temporary, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _describe_os_error(error: OSError, path: Path) -> str:
    if error.errno == errno.ENOSPC:
        return f"{path}: no space left on the device"
    return f"{path}: write failed ({error.strerror or error})"


def shard_file_size(shard: Shard, metadata: dict[str, str]) -> int:
    return len(safetensors_header(shard.tensors, metadata)) + shard.nbytes


def shard_is_intact(path: Path, shard: Shard, metadata: dict[str, str]) -> bool:
    """A finished shard from an earlier run still has its full size and the header planned now."""
    header = safetensors_header(shard.tensors, metadata)
    try:
        if path.stat().st_size != len(header) + shard.nbytes:
            return False
        with open(path, "rb") as handle:
            return handle.read(len(header)) == header
    except OSError:
        return False


# Written bytes are handed to the disk every this many bytes (sync_file_range), while the merge
# goes on: the fsync at the end then finds little left to write (for 337 MB, 0.01-0.03 s
# instead of ~0.1 s).
WRITEBACK_BYTES = 32 << 20


@functools.lru_cache(maxsize=1)
def _sync_file_range() -> Optional[Callable[[int, int, int, int], int]]:
    """Linux's sync_file_range, or None where the C library has none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_SYNC_FILE_RANGE_WRITE = 2  # start writing the range's dirty pages, without waiting


class ShardWriter:
    """Writes one safetensors file: header first, then each tensor in the planned order."""

    def __init__(self, path: Path, shard: Shard, metadata: dict[str, str]):
        self.path = path
        self._expected = list(shard.tensors)
        self._size = shard_file_size(shard, metadata)
        self._next = 0
        self._handed_to_disk = 0  # bytes from the start whose writing has begun
        try:
            self._file = open(path, "wb")
        except OSError as error:
            raise WriteError(_describe_os_error(error, path)) from None
        self._write(safetensors_header(shard.tensors, metadata))

    def _write(self, data: bytes | memoryview) -> None:
        try:
            self._file.write(data)
        except OSError as error:
            raise WriteError(_describe_os_error(error, self.path)) from None

    def write(self, name: str, tensor: torch.Tensor | Iterable[torch.Tensor | Stored]) -> None:
        """Append the next tensor: whole, or as its flattened slices in order (any iterable of
        tensors or Stored entries)."""
        expected = self._expected[self._next]
        whole = is_torch_tensor(tensor)
        if name != expected.name or (whole and tuple(tensor.shape) != expected.shape):
            raise RuntimeError(f"writer expected {expected} next, got {name}")
        written = 0
        for part in [tensor] if whole else tensor:
            dtype, count = (part.dtype, part.numel) if isinstance(part, Stored) else (dtype_name(part.dtype), part.numel())
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
            raise WriteError(_describe_os_error(error, self.path)) from None
        start_writing(self._file.fileno(), self._handed_to_disk, position - self._handed_to_disk, _SYNC_FILE_RANGE_WRITE)
        self._handed_to_disk = position

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
            raise WriteError(_describe_os_error(error, self.path)) from None
        if written != self._size:
            raise WriteError(f"{self.path}: wrote {written} bytes, expected {self._size}")


class StagingFolder:
    """The hidden folder where an output is built, and the move into place at the end."""

    def __init__(self, target: Path, digest: str):
        self.target = target
        self.path = target.parent / f".{target.name}.tadrop-partial"
        self.digest = digest
        self._lock_handle: Optional[object] = None

    def open(self, resume: bool) -> set[str]:
        """Create (or, with resume, reopen) the staging folder; returns the shard files already done."""
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.path.mkdir(exist_ok=True)
        except OSError as error:
            raise WriteError(_describe_os_error(error, self.path)) from None
        self._lock_handle = open(self.path / ".lock", "w")
        try:
            fcntl.flock(self._lock_handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BadInput(f"{self.target}: another tadrop merge is writing this output right now") from None
        journal = self._read_journal()
        if resume and journal.get("recipe_digest") == self.digest:
            done = {name for name in journal.get("completed", []) if (self.path / name).is_file()}
            for stale in self.path.iterdir():
                if stale.name not in done and stale.name not in (".lock", JOURNAL, "plan.json"):
                    stale.unlink()
            return done
        if resume and journal:
            raise BadInput(f"{self.target}: cannot resume: the partial merge in {self.path} was made from a different recipe")
        try:
            for stale in self.path.iterdir():
                if stale.name != ".lock":
                    stale.unlink() if stale.is_file() else shutil.rmtree(stale)
            self._write_journal([])
        except BaseException:  # nothing of ours worth keeping yet
            self.discard()
            raise
        return set()

    def _read_journal(self) -> dict:
        try:
            return json.loads((self.path / JOURNAL).read_text())
        except (OSError, ValueError):
            return {}

    def _write_journal(self, completed: list[str]) -> None:
        try:
            _fsync_write_json(self.path / JOURNAL, {"recipe_digest": self.digest, "completed": completed})
        except OSError as error:
            raise WriteError(_describe_os_error(error, self.path)) from None

    def mark_complete(self, file_name: str) -> None:
        completed = self._read_journal().get("completed", [])
        self._write_journal(sorted(set(completed) | {file_name}))

    def write_json(self, name: str, data: object) -> None:
        try:
            _fsync_write_json(self.path / name, data)
        except OSError as error:
            raise WriteError(_describe_os_error(error, self.path / name)) from None

    def read_json(self, name: str) -> Optional[object]:
        try:
            return json.loads((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def copy_in(self, source: Path) -> None:
        try:
            shutil.copyfile(source, self.path / source.name)
        except OSError as error:
            raise WriteError(_describe_os_error(error, self.path / source.name)) from None

    def publish(self, overwrite: bool) -> None:
        """Move the finished output into place; an old output goes only once the new one is there.

        Replacing an output swaps the two folders in one atomic step (renameat2's
        RENAME_EXCHANGE) where the system offers it, so that even a kill at any instant
        leaves either the old or the new output at the target, never neither.
        """
        for bookkeeping in (JOURNAL, "plan.json", ".lock"):
            (self.path / bookkeeping).unlink(missing_ok=True)
        old = None
        if self.target.exists():
            if not overwrite:
                raise BadInput(f"{self.target}: output exists (use --overwrite to replace it)")
            old = self.target.parent / f".{self.target.name}.tadrop-old"
            if old.exists():
                shutil.rmtree(old)
            if exchange_paths(self.path, self.target):
                os.rename(self.path, old)  # the old output, out from under the staging name
            else:  # no atomic exchange here: two renames, undone if interrupted in between
                try:
                    os.rename(self.target, old)
                    os.rename(self.path, self.target)
                except BaseException:
                    if old.exists() and not self.target.exists():
                        os.rename(old, self.target)
                    raise
        else:
            os.rename(self.path, self.target)
        self._release()
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        self._release()
        shutil.rmtree(self.path, ignore_errors=True)

    def keep_for_resume(self) -> None:
        self._release()

    def _release(self) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2). False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def index_json(shards: list[Shard], metadata: dict[str, str]) -> dict:
    """The HF-style `model.safetensors.index.json` for sharded output."""
    return {
        "metadata": {"total_size": sum(s.nbytes for s in shards), **metadata},
        "weight_map": {t.name: s.file_name for s in shards for t in s.tensors},
    }
