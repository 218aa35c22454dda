"""Writing the output: streamed safetensors shards in a staging folder, moved into place when complete.

The shapes and dtypes of every output tensor are known before any is computed, so
each shard's header is written first and tensors are appended one by one: no
shard is ever held in memory. Work goes to a hidden staging folder beside the
target (`.NAME.tadrop-partial`) with a journal of finished shards, so that an
interrupted merge never looks finished and can be resumed. No maths here.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .dtypes import ITEMSIZE, Stored, dtype_name
from .errors import BadInput, WriteError
from .lazy import is_torch_tensor, torch


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


def _describe_os_error(error: OSError, path: Path) -> str:
    if error.errno == errno.ENOSPC:
        return f"{path}: no space left on the device"
    return f"{path}: write failed ({error.strerror or error})"


def shard_file_size(shard: Shard, metadata: dict[str, str]) -> int:
    return len(safetensors_header(shard.tensors, metadata)) + shard.nbytes


# ---------------------------------------------------------------- files opened only as what they are

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def _creating_in(folder_fd: int) -> Callable[[str, int], int]:
    """An `opener` for open(): creates the file in the opened folder, never through a link and never
    over anything already there (the caller removes a stale file first)."""
    return lambda name, flags: os.open(name, flags | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644, dir_fd=folder_fd)


def _open_regular(name: str | Path, folder_fd: int | None = None) -> int:
    """A read-only descriptor of a regular file, never through a link; OSError otherwise."""
    fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK, dir_fd=folder_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(name))
    return fd


def _open_input(path: Path) -> int:
    """A read-only descriptor of an input file (links followed: inputs may be links, e.g. into the
    Hugging Face cache), refused unless it is a regular file (a FIFO would block)."""
    fd = os.open(path, os.O_RDONLY | _CLOEXEC | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd


def _read_regular(name: str, folder_fd: int | None = None, limit: int = 64 << 20) -> bytes:
    fd = _open_regular(name, folder_fd)
    try:
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(limit)
    finally:
        os.close(fd)


def _remove_tree(name: str, folder_fd: int) -> None:
    """Remove a folder and all it holds, by name in an opened folder, never following a link (a link
    inside is removed itself). shutil.rmtree takes dir_fd only from Python 3.11."""
    fd = _open_folder(name, folder_fd)
    try:
        for entry in os.scandir(fd):
            if entry.is_dir(follow_symlinks=False):
                _remove_tree(entry.name, fd)
            else:
                os.unlink(entry.name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=folder_fd)


def _crc32_of(fd: int) -> int:
    """The CRC-32 of a whole file, read in 4 MB blocks."""
    crc, offset, block = 0, 0, bytearray(4 << 20)
    view = memoryview(block)
    while count := os.preadv(fd, [view], offset):
        crc = zlib.crc32(view[:count], crc)
        offset += count
    return crc


# ---------------------------------------------------------------- where the output goes

STAGING_SUFFIX = ".tadrop-partial"  # the folder where the output is built
OLD_SUFFIX = ".tadrop-old"  # a replaced output, on its way out
LOCK_SUFFIX = ".tadrop-lock"  # the lock that one merge to an output holds from start to publish
NAME_MAX = 255  # bytes in one path component (Linux, macOS)
PATH_MAX = 4096  # bytes in a whole path, with its final NUL (Linux)
_LONGEST_FILE_BYTES = 64  # room for the longest name written in staging (config_sentence_transformers.json: 33)


def beside(target: Path, suffix: str) -> Path:
    """tadrop's work name beside the target: `.NAME<suffix>`."""
    return target.parent / f".{target.name}{suffix}"


def check_output_path(target: Path) -> None:
    """Refuse an output path that no file system call could use, before anything is done."""
    if target.name in ("", ".", ".."):
        raise BadInput(f"{target}: the output must be a folder's name, not '.', '..' or '/'")
    name_bytes = len(os.fsencode(target.name)) + 1 + len(STAGING_SUFFIX)
    if any(len(os.fsencode(part)) > NAME_MAX for part in target.parts) or name_bytes > NAME_MAX:
        raise BadInput(
            f"{str(target)[:80]}...: a name in the output path is too long "
            f"(at most {NAME_MAX - 1 - len(STAGING_SUFFIX)} "
            f"bytes for the output folder, {NAME_MAX} for the others)"
        )
    try:
        staging = os.path.abspath(beside(target, STAGING_SUFFIX))
    except OSError as error:  # the current folder was removed
        raise BadInput(f"{target}: cannot locate the output ({error.strerror or error})") from None
    if len(os.fsencode(staging)) + 1 + _LONGEST_FILE_BYTES >= PATH_MAX:
        raise BadInput(f"{str(target)[:80]}...: the output path is too long ({len(os.fsencode(str(target)))} bytes)")


def check_output_parents(target: Path) -> None:
    """The nearest existing folder above the target must be a folder reached without a dangling link
    or a loop of links (the rest is created)."""
    for folder in target.parents:
        try:
            info = os.stat(folder)
        except FileNotFoundError:
            if os.path.lexists(folder):
                raise BadInput(
                    f"{target}: {folder} is a link to nothing; tadrop will not create the output through it"
                ) from None
            continue
        except NotADirectoryError:
            continue  # a file further up: refused when reached
        except OSError as error:
            raise BadInput(f"{target}: cannot reach {folder} ({error.strerror or error})") from None
        if not stat.S_ISDIR(info.st_mode):
            raise BadInput(f"{target}: {folder} is not a folder")
        return


@dataclass(frozen=True)
class ExistingOutput:
    """What is at the output path now: nothing, or a folder that --overwrite may replace, or one it may not."""

    exists: bool
    refusal: str | None = None  # why --overwrite may not replace it


def _made_by_tadrop(name: str, folder_fd: int) -> bool:
    """A safetensors file whose header's metadata names tadrop's version."""
    try:
        data = _read_regular(name, folder_fd, 1 << 20)
        length = struct.unpack("<Q", data[:8])[0]
        metadata = json.loads(data[8 : 8 + length]).get("__metadata__") or {}
        return "tadrop_version" in metadata
    except (OSError, ValueError, struct.error, AttributeError, RecursionError):  # RecursionError: nested too deep
        return False


def _module_folder(name: str, folder_fd: int) -> bool:
    """A sentence-transformers module folder as tadrop copies one ("1_Pooling"): regular files only."""
    if not re.fullmatch(r"\d+_\w+", name):
        return False
    try:
        fd = _open_folder(name, folder_fd)
    except OSError:
        return False
    try:
        return all(entry.is_file(follow_symlinks=False) for entry in os.scandir(fd))
    finally:
        os.close(fd)


def _not_a_model_output(folder_fd: int) -> str | None:
    """Why the opened folder does not look like a model output that may be replaced; None where it does:
    an empty folder, or regular files only (and module folders of them) among which safetensors with an
    index or tadrop's metadata."""
    entries = list(os.scandir(folder_fd))
    for entry in entries:
        if entry.is_symlink():
            return f"holds a link ({entry.name})"
        if entry.is_dir(follow_symlinks=False):
            if _module_folder(entry.name, folder_fd):  # a sentence-transformers module's, as tadrop copies them
                continue
            return f"holds a folder ({entry.name})"
        if not entry.is_file(follow_symlinks=False):
            return f"holds {entry.name}, which is not a regular file"
    names = {entry.name for entry in entries}
    weights = sorted(name for name in names if name.endswith(".safetensors"))
    indexed = "model.safetensors.index.json" in names
    if not entries or (weights and (indexed or any(_made_by_tadrop(w, folder_fd) for w in weights))):
        return None
    return "holds no model (no safetensors with an index or tadrop's metadata)"


def _open_folder(name: str | Path, folder_fd: int | None = None) -> int:
    return os.open(name, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=folder_fd)


def existing_output(target: Path, parent_fd: int | None = None) -> ExistingOutput:
    """What is at the target (looked up in the opened parent folder where given). A link or anything but
    a folder is refused: tadrop never writes or replaces through a link it did not create."""
    name = target.name if parent_fd is not None else target
    try:
        info = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return ExistingOutput(False)
    except OSError as error:
        raise BadInput(f"{target}: cannot reach the output ({error.strerror or error})") from None
    if stat.S_ISLNK(info.st_mode):
        raise BadInput(
            f"{target}: the output is a link; tadrop never writes or replaces through a link "
            "(remove it or choose another output)"
        )
    if not stat.S_ISDIR(info.st_mode):
        raise BadInput(f"{target}: exists and is not a folder")
    try:
        fd = _open_folder(name, parent_fd)
    except OSError as error:
        raise BadInput(f"{target}: cannot read the existing output ({error.strerror or error})") from None
    try:
        return ExistingOutput(True, _not_a_model_output(fd))
    except OSError as error:
        raise BadInput(f"{target}: cannot read the existing output ({error.strerror or error})") from None
    finally:
        os.close(fd)


def refuse_existing(target: Path, existing: ExistingOutput, overwrite: bool) -> None:
    """An existing output is replaced only with --overwrite, and only if it looks like a model output."""
    if not existing.exists:
        return
    if existing.refusal:
        raise BadInput(
            f"{target}: exists and {existing.refusal}; "
            "tadrop replaces only a model output or an empty folder: choose another output"
        )
    if not overwrite:
        raise BadInput(f"{target}: output exists (use --overwrite to replace it)")


def check_work_names(target: Path) -> None:
    """tadrop's own names beside the target must be absent or what tadrop leaves there: the staging
    folder a real folder of tadrop's (see StagingFolder.open), the old output a real folder, the lock a
    regular file. Anything else (a link, say) is refused, never followed or emptied."""
    expected = {STAGING_SUFFIX: stat.S_ISDIR, OLD_SUFFIX: stat.S_ISDIR, LOCK_SUFFIX: stat.S_ISREG}
    for suffix, kind in expected.items():
        path = beside(target, suffix)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError as error:
            raise BadInput(f"{path}: cannot reach ({error.strerror or error})") from None
        if not kind(info.st_mode):
            what = "a link" if stat.S_ISLNK(info.st_mode) else "not what tadrop leaves there"
            raise BadInput(
                f"{path}: is {what}; tadrop will not use or remove it (remove it yourself, or choose another output)"
            )
    staging = beside(target, STAGING_SUFFIX)
    if staging.exists():
        try:
            fd = _open_folder(staging)
        except OSError as error:
            raise BadInput(f"{staging}: cannot read ({error.strerror or error})") from None
        try:
            if _read_journal(fd) is None and _not_a_model_output(fd) is not None:
                raise BadInput(_not_ours(staging))
        except OSError as error:
            raise BadInput(f"{staging}: cannot read ({error.strerror or error})") from None
        finally:
            os.close(fd)


def _not_ours(staging: Path) -> str:
    return (
        f"{staging}: exists but is not a tadrop partial merge (no valid journal); "
        "remove it yourself, or choose another output"
    )


def recorded_recipe_digest(folder: Path) -> str | None:
    """The recipe SHA-256 that tadrop wrote into an output (index metadata, or the single shard's header)."""
    try:
        fd = _open_folder(folder)
    except OSError:
        return None
    try:
        try:
            return json.loads(_read_regular("model.safetensors.index.json", fd))["metadata"]["recipe_sha256"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            pass
        try:
            data = _read_regular("model.safetensors", fd, 1 << 20)
            return json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])["__metadata__"]["recipe_sha256"]
        except (OSError, ValueError, KeyError, TypeError, struct.error, RecursionError):
            return None
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the identity of the inputs

FULL_HASH_BYTES = 16 << 20  # files up to this size are hashed whole
SAMPLE_BYTES = 64 << 10  # larger ones: their header and SAMPLES blocks of this size, spread evenly
SAMPLES = 32
HEADER_BYTES_LIMIT = 16 << 20  # a safetensors header longer than this is hashed in part


def _hashed_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the bytes that stand for the file's content: all of a small file; the
    safetensors header (or first MB) and evenly spread blocks of a large one."""
    if size <= FULL_HASH_BYTES:
        return [(0, size)]
    first = os.pread(fd, 8, 0)
    header = struct.unpack("<Q", first)[0] + 8 if len(first) == 8 else 0
    header = min(header if 8 < header <= size else 1 << 20, HEADER_BYTES_LIMIT)
    spread = [(size - SAMPLE_BYTES) * i // (SAMPLES - 1) for i in range(SAMPLES)]  # the last block ends at the end
    return [(0, header)] + [(offset, SAMPLE_BYTES) for offset in spread]


def file_identity(path: Path) -> dict:
    """Size, modification time and a SHA-256 of the file's content (whole up to FULL_HASH_BYTES, else of
    its header and sampled blocks): what a resumed merge checks to know its inputs did not change."""
    try:
        fd = _open_input(path)
    except OSError as error:
        raise BadInput(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        info = os.fstat(fd)
        digest = hashlib.sha256()
        for offset, length in _hashed_ranges(fd, info.st_size):
            while length > 0:
                block = os.pread(fd, min(length, 4 << 20), offset)
                if not block:
                    break
                digest.update(block)
                offset, length = offset + len(block), length - len(block)
        whole = info.st_size <= FULL_HASH_BYTES
        return {
            "size": info.st_size,
            "mtime_ns": info.st_mtime_ns,
            "sha256": digest.hexdigest(),
            "hashed": "whole" if whole else "sampled",
        }
    except OSError as error:
        raise BadInput(f"{path}: cannot read ({error.strerror or error})") from None
    finally:
        os.close(fd)


def inputs_identity(files: Iterable[Path]) -> dict[str, dict]:
    return {str(file): file_identity(file) for file in sorted(set(files))}


def changed_inputs(recorded: dict[str, dict], now: dict[str, dict]) -> list[str]:
    """The input files whose identity differs (or that were added or dropped), with what changed."""
    changes = []
    for name in sorted(set(recorded) | set(now)):
        before, after = recorded.get(name), now.get(name)
        if before is None or after is None:
            changes.append(f"{name} ({'added' if before is None else 'no longer an input'})")
        elif before != after:
            what = [key for key in ("size", "mtime_ns", "sha256") if before.get(key) != after.get(key)]
            changes.append(f"{name} ({', '.join(what) or 'identity'} changed)")
    return changes


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
            self._file = open(path.name if folder_fd is not None else path, "wb", opener=_creating_in(folder_fd))
        except OSError as error:
            raise WriteError(_describe_os_error(error, path)) from None
        self._write(safetensors_header(shard.tensors, metadata))

    def _write(self, data: bytes | memoryview) -> None:
        try:
            self._file.write(data)
        except OSError as error:
            raise WriteError(_describe_os_error(error, self.path)) from None
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
            raise WriteError(_describe_os_error(error, self.path)) from None
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
            raise WriteError(_describe_os_error(error, self.path)) from None
        if written != self._size:
            raise WriteError(f"{self.path}: wrote {written} bytes, expected {self._size}")


# ---------------------------------------------------------------- the staging folder, its journal, the lock, publishing

JOURNAL = "progress.json"
PLAN = "plan.json"
JOURNAL_FORMAT = "tadrop-journal-2"


def _read_journal(folder_fd: int) -> dict | None:
    """The journal in an opened staging folder; {"format": "older"} for an older tadrop's (no checksums);
    None where there is none, or it is not tadrop's."""
    try:
        data = json.loads(_read_regular(JOURNAL, folder_fd))
    except (OSError, ValueError, RecursionError):  # RecursionError: nested too deep, not tadrop's
        return None
    if not isinstance(data, dict):
        return None
    shards = data.get("shards")
    records = isinstance(shards, dict) and all(isinstance(record, dict) for record in shards.values())
    if data.get("format") == JOURNAL_FORMAT and records and isinstance(data.get("sources"), dict):
        return data
    if isinstance(data.get("recipe_digest"), str) and isinstance(data.get("completed"), list):
        return {"format": "older"}
    return None


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class StagingFolder:
    """The hidden folder where an output is built, its journal, the output's lock, and the move into place.

    tadrop creates the staging folder itself (mkdir) and then works only relative to descriptors it
    opened (the target's parent, the staging folder), never through a link: every file in it is created
    new with O_EXCL | O_NOFOLLOW. The journal records the recipe's digest, what the inputs were
    (tadrop's version, the device, each input file's identity) and each finished shard's size and
    CRC-32, so that a later run reuses only shards it can prove are what this merge would write. The lock
    (`.NAME.tadrop-lock` beside the target, flock) is held from open() until the output is in place.
    """

    def __init__(self, target: Path, digest: str, sources: dict):
        self.target = target
        self.path = beside(target, STAGING_SUFFIX)
        self.digest = digest
        self.sources = sources  # what a resume must find unchanged: tadrop's version, device, inputs' identities
        self.notes: list[str] = []
        self._parent: int | None = None  # the target's parent folder
        self._fd: int | None = None  # the staging folder
        self._lock: int | None = None
        self._journal: dict = {}
        self._writers: dict[str, ShardWriter] = {}

    # -- opening

    def open(self, resume: bool) -> dict[str, dict]:
        """Take the output's lock, then create the staging folder, or reopen the one an earlier run left.
        Returns the finished shards its journal lists (file name -> size and CRC-32), to be checked with
        finished_shards. With `resume`, a partial merge that cannot be resumed is refused; without, it is
        discarded, with a note."""
        self._open_parent()
        try:
            self._take_lock()
            return self._open_staging(resume)
        except BaseException:
            self._release()
            raise

    def _open_parent(self) -> None:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self._parent = os.open(self.target.parent, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
        except OSError as error:
            raise WriteError(_describe_os_error(error, self.target.parent)) from None

    def _take_lock(self) -> None:
        path = beside(self.target, LOCK_SUFFIX)
        for _ in range(3):
            try:
                flags = os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK
                fd = os.open(path.name, flags, 0o644, dir_fd=self._parent)
            except OSError as error:
                if error.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                    raise BadInput(
                        f"{path}: is not tadrop's lock file (a link or not a file); remove it yourself"
                    ) from None
                raise WriteError(_describe_os_error(error, path)) from None
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise BadInput(f"{path}: is not tadrop's lock file (not a regular file); remove it yourself")
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise BadInput(f"{self.target}: another tadrop merge is writing this output right now") from None
            except BaseException:
                os.close(fd)
                raise
            if self._lock_is_at_its_name(fd):
                self._lock = fd
                return
            os.close(fd)  # a merge that just ended removed the file we opened: lock the one at the name now
        raise BadInput(f"{self.target}: another tadrop merge is writing this output right now")

    def _lock_is_at_its_name(self, fd: int) -> bool:
        try:
            at_name = os.stat(beside(self.target, LOCK_SUFFIX).name, dir_fd=self._parent, follow_symlinks=False)
            return _same_file(at_name, os.fstat(fd))
        except FileNotFoundError:
            return False

    def _open_staging(self, resume: bool) -> dict[str, dict]:
        try:
            os.mkdir(self.path.name, 0o755, dir_fd=self._parent)
            created = True
        except FileExistsError:
            created = False
        except OSError as error:
            raise WriteError(_describe_os_error(error, self.path)) from None
        try:
            self._fd = _open_folder(self.path.name, self._parent)
        except OSError:
            raise BadInput(_not_ours(self.path)) from None
        journal = None if created else _read_journal(self._fd)
        if journal is None:
            if not created and _not_a_model_output(self._fd) is not None:
                raise BadInput(_not_ours(self.path))
            if not created and os.listdir(self._fd):
                self.notes.append(
                    f"{self.path}: held an output without a journal (left by an interrupted publish); it was removed"
                )
            self._start_over()
            return {}
        reason = self._why_not_resumable(journal)
        if reason is None:
            self._journal = journal
            self._remove_all_but(set(journal["shards"]) | {JOURNAL, PLAN})
            return dict(journal["shards"])
        if resume:
            raise BadInput(f"{self.target}: cannot resume: {reason}; run again without --resume to start over")
        if journal.get("shards"):
            self.notes.append(
                f"started over: the {len(journal['shards'])} finished shard(s) in {self.path} were discarded ({reason})"
            )
        self._start_over()
        return {}

    def _why_not_resumable(self, journal: dict) -> str | None:
        """Why the partial merge in the staging folder is not this merge's; None where it is."""
        if journal.get("format") != JOURNAL_FORMAT:
            return "it was made by an older tadrop, whose journal has no checksums"
        if journal.get("recipe_sha256") != self.digest:
            return "it was made from a different recipe"
        before = journal["sources"]
        for key in sorted((set(before) | set(self.sources)) - {"inputs"}):
            if before.get(key) != self.sources.get(key):
                return f"it was made with {key} {before.get(key)}, this merge has {self.sources.get(key)}"
        changes = changed_inputs(before.get("inputs") or {}, self.sources.get("inputs") or {})
        if changes:
            more = f" and {len(changes) - 1} more" if len(changes) > 1 else ""
            return f"input {changes[0]}{more} since it was made"
        return None

    def _start_over(self) -> None:
        """Empty the (tadrop's own) staging folder and start a new journal."""
        try:
            self._remove_all_but(set())
            self._journal = {
                "format": JOURNAL_FORMAT,
                "recipe_sha256": self.digest,
                "sources": self.sources,
                "plan_sha256": None,
                "shards": {},
            }
            self._write_journal()
        except BaseException:  # nothing of ours worth keeping yet
            self.discard()
            raise

    def _remove_all_but(self, keep: set[str]) -> None:
        for entry in os.scandir(self._fd):
            if entry.name not in keep:
                self._remove(entry.name)

    def _remove(self, name: str) -> None:
        """Remove a name in the staging folder: a file or link itself (never what it points to), a folder
        with what it holds."""
        try:
            if stat.S_ISDIR(os.stat(name, dir_fd=self._fd, follow_symlinks=False).st_mode):
                _remove_tree(name, self._fd)
            else:
                os.unlink(name, dir_fd=self._fd)
        except FileNotFoundError:
            pass
        except OSError as error:
            raise WriteError(_describe_os_error(error, self.path / name)) from None

    # -- writing

    def _write_file(self, name: str, data: bytes) -> None:
        """A new file `name` in the staging folder, flushed to the disk."""
        self._remove(name)
        try:
            with open(name, "wb", opener=_creating_in(self._fd)) as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            raise WriteError(_describe_os_error(error, self.path / name)) from None

    def _write_journal(self) -> None:
        temporary = JOURNAL + ".tmp"
        self._write_file(temporary, json.dumps(self._journal, indent=1).encode())
        try:
            os.replace(temporary, JOURNAL, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        except OSError as error:
            raise WriteError(_describe_os_error(error, self.path / JOURNAL)) from None

    def save_plan(self, data: object) -> None:
        """The TADrop plan, kept for a resume, with its digest in the journal. A new plan makes every
        shard finished before it another merge's: they are removed."""
        for name in self._journal["shards"]:
            self._remove(name)
        self._journal["shards"] = {}
        text = json.dumps(data).encode()
        self._write_file(PLAN, text)
        self._journal["plan_sha256"] = hashlib.sha256(text).hexdigest()
        self._write_journal()

    def saved_plan(self) -> object | None:
        """The plan an earlier run saved, if the journal vouches for it."""
        try:
            text = _read_regular(PLAN, self._fd)
        except OSError:
            return None
        if hashlib.sha256(text).hexdigest() != self._journal.get("plan_sha256"):
            return None
        return json.loads(text)

    def shard_writer(self, shard: Shard, metadata: dict[str, str]) -> ShardWriter:
        self._remove(shard.file_name)
        writer = ShardWriter(self.path / shard.file_name, shard, metadata, self._fd)
        self._writers[shard.file_name] = writer
        return writer

    def mark_complete(self, file_name: str) -> None:
        """Journal a shard written (closed) and verified by this run, with its size and checksum."""
        writer = self._writers.pop(file_name)
        self._journal["shards"][file_name] = {"size": writer.size, "crc32": writer.crc32}
        self._write_journal()

    def finished_shards(self, shards: list[Shard], metadata: dict[str, str]) -> set[str]:
        """The shards an earlier run finished that are still exactly what it wrote: the size, the header
        planned now and the CRC-32 the journal recorded. Others are removed, to be redone, with a note."""
        listed = self._journal.get("shards", {})
        good = {
            s.file_name
            for s in shards
            if s.file_name in listed and self._shard_matches(s, metadata, listed[s.file_name])
        }
        damaged = [s.file_name for s in shards if s.file_name in listed and s.file_name not in good]
        if damaged:
            self.notes.append(
                f"{len(damaged)} finished shard(s) changed since they were written and are redone: {', '.join(damaged)}"
            )
        if set(listed) != good:
            for entry in os.scandir(self._fd):  # names as they are in the folder, never the journal's text
                if entry.name in listed and entry.name not in good:
                    self._remove(entry.name)
            self._journal["shards"] = {name: listed[name] for name in sorted(good)}
            self._write_journal()
        return good

    def _shard_matches(self, shard: Shard, metadata: dict[str, str], record: dict) -> bool:
        header = safetensors_header(shard.tensors, metadata)
        try:
            fd = _open_regular(shard.file_name, self._fd)
        except OSError:
            return False
        try:
            size = os.fstat(fd).st_size
            if size != len(header) + shard.nbytes or size != record.get("size"):
                return False
            if os.pread(fd, len(header), 0) != header:
                return False
            return _crc32_of(fd) == record.get("crc32")
        except OSError:
            return False
        finally:
            os.close(fd)

    def write_json(self, name: str, data: object) -> None:
        self._write_file(name, json.dumps(data, indent=2).encode())

    def copy_in(self, source: Path, relative: str | None = None) -> None:
        """Copy a config file of the inputs into the output (created new, never through a link); `relative`:
        its path in the output where that is a folder one level down ("1_Pooling/config.json", a
        sentence-transformers module's; layout.module_files checked the name)."""
        folder, _, name = (relative or source.name).rpartition("/")
        if not folder:
            self._remove(name)
        try:
            folder_fd = self._subfolder(folder) if folder else self._fd
            try:
                if folder:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=folder_fd)  # a stale copy from an earlier run (a link: itself)
                with (
                    os.fdopen(_open_input(source), "rb") as original,
                    open(name, "wb", opener=_creating_in(folder_fd)) as copy,
                ):
                    shutil.copyfileobj(original, copy, 1 << 20)
                    copy.flush()
                    os.fsync(copy.fileno())
            finally:
                if folder:
                    os.close(folder_fd)
        except OSError as error:
            raise WriteError(_describe_os_error(error, self.path / (relative or source.name))) from None

    def _subfolder(self, name: str) -> int:
        """An opened folder inside the staging folder, made if absent, never reached through a link."""
        try:
            os.mkdir(name, 0o755, dir_fd=self._fd)
        except FileExistsError:
            pass
        return _open_folder(name, self._fd)

    # -- publishing

    def publish(self, overwrite: bool) -> None:
        """Move the finished output into place, still under the lock; an old output goes only once the
        new one is there.

        Replacing an output swaps the two folders in one atomic step (renameat2's RENAME_EXCHANGE) where
        the system offers it, so that even a kill at any instant leaves either the old or the new output
        at the target, never neither. A new output is moved with RENAME_NOREPLACE where offered, so that
        an output that appeared meanwhile is never replaced unasked.
        """
        ours = os.fstat(self._fd)
        try:
            here = os.stat(self.path.name, dir_fd=self._parent, follow_symlinks=False)
        except OSError:
            here = None
        if here is None or not _same_file(here, ours):
            raise WriteError(
                f"{self.path}: the staging folder was moved or replaced during the merge; nothing was published"
            )
        existing = existing_output(self.target, self._parent)
        refuse_existing(self.target, existing, overwrite)
        old = beside(self.target, OLD_SUFFIX).name
        try:
            if existing.exists:
                self._remove_old(old)
            os.fsync(self._fd)  # the folder's entries are on the disk before it is published
            for bookkeeping in (JOURNAL, PLAN):
                self._remove(bookkeeping)
            if existing.exists:
                self._swap_in(old, ours)
            else:
                self._move_in()
        except OSError as error:
            raise WriteError(_describe_os_error(error, self.target)) from None
        try:
            os.fsync(self._parent)  # the rename on the disk; the output is in place whatever this says
        except OSError:
            pass
        if existing.exists:
            try:
                _remove_tree(old, self._parent)
            except OSError:
                pass  # published; what is left of the old output goes with the next --overwrite
        self._release()

    def _remove_old(self, old: str) -> None:
        """Remove what an earlier interrupted publish left at `.NAME.tadrop-old`: only a real folder."""
        try:
            info = os.stat(old, dir_fd=self._parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(info.st_mode):
            raise BadInput(
                f"{beside(self.target, OLD_SUFFIX)}: is a link or not a folder; "
                "tadrop will not remove it (remove it yourself)"
            )
        _remove_tree(old, self._parent)

    def _swap_in(self, old: str, ours: os.stat_result) -> None:
        parent, name, staging = self._parent, self.target.name, self.path.name
        exchanged = False
        try:
            exchanged = exchange_paths(staging, name, dir_fd=parent)
        finally:  # the old output now at the staging name (even if interrupted right after the swap) goes to `old`
            try:
                swapped = not _same_file(os.stat(staging, dir_fd=parent, follow_symlinks=False), ours)
            except FileNotFoundError:
                swapped = False
            if swapped:
                exchanged = True
                os.rename(staging, old, src_dir_fd=parent, dst_dir_fd=parent)
        if exchanged:
            return
        try:  # no atomic exchange here: two renames, undone if interrupted in between
            os.rename(name, old, src_dir_fd=parent, dst_dir_fd=parent)
            os.rename(staging, name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            if _exists_at(old, parent) and not _exists_at(name, parent):
                os.rename(old, name, src_dir_fd=parent, dst_dir_fd=parent)
            raise

    def _move_in(self) -> None:
        try:
            if _renameat2(self._parent, self.path.name, self.target.name, _RENAME_NOREPLACE):
                return
        except FileExistsError:
            raise BadInput(f"{self.target}: output exists (use --overwrite to replace it)") from None
        if _exists_at(self.target.name, self._parent):
            raise BadInput(f"{self.target}: output exists (use --overwrite to replace it)")
        os.rename(self.path.name, self.target.name, src_dir_fd=self._parent, dst_dir_fd=self._parent)

    # -- ending

    def discard(self) -> None:
        """Remove this run's staging folder (only if the name still holds it) and release the lock."""
        if self._fd is not None:
            try:
                if _same_file(os.stat(self.path.name, dir_fd=self._parent, follow_symlinks=False), os.fstat(self._fd)):
                    _remove_tree(self.path.name, self._parent)
            except OSError:
                pass
        self._release()

    def keep_for_resume(self) -> int:
        """Leave the partial merge for a later run; returns how many finished shards it keeps."""
        self._release()
        return len(self._journal.get("shards", {}))

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock is not None:
            if self._lock_is_at_its_name(self._lock):  # removed while still held: no other run can hold a lock on it
                try:
                    os.unlink(beside(self.target, LOCK_SUFFIX).name, dir_fd=self._parent)
                except OSError:
                    pass
            os.close(self._lock)
            self._lock = None
        if self._parent is not None:
            os.close(self._parent)
            self._parent = None


def _exists_at(name: str, folder_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2(folder_fd: int, a: str, b: str, flags: int) -> bool:
    """Linux renameat2 of two names in one folder. False where the system or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(folder_fd, os.fsencode(a), folder_fd, os.fsencode(b), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    if code == errno.EEXIST:
        raise FileExistsError(code, os.strerror(code), b)
    raise OSError(code, os.strerror(code), b)


def exchange_paths(a: str, b: str, dir_fd: int = _AT_FDCWD) -> bool:
    """Atomically swap two names in one folder (Linux renameat2). False where the system cannot."""
    return _renameat2(dir_fd, a, b, _RENAME_EXCHANGE)


def index_json(shards: list[Shard], metadata: dict[str, str]) -> dict:
    """The HF-style `model.safetensors.index.json` for sharded output."""
    return {
        "metadata": {"total_size": sum(s.nbytes for s in shards), **metadata},
        "weight_map": {t.name: s.file_name for s in shards for t in s.tensors},
    }
