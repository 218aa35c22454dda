"""Reading checkpoints: one tensor at a time, from any supported source.

Sources: a folder (one or sharded safetensors, or PyTorch .bin/.pt), a single
.safetensors/.bin/.pt file, or a Hugging Face repo id `org/name[@revision]`.
No maths here: tensors come out in their stored dtype.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from .devices import on_cpu
from .dtypes import ITEMSIZE, Stored, dtype_name, numpy_dtype, set_sizes, torch_dtype
from .errors import BadInput
from .lazy import torch
from .safe_files import check_regular, open_input

# Files copied from the base so that the output loads like the base (never code: no *.py).
CONFIG_FILE_PATTERN = re.compile(
    r"^(config\.json|generation_config\.json|preprocessor_config\.json|processor_config\.json|"
    r"tokenizer(_config)?\.json|special_tokens_map\.json|added_tokens\.json|vocab\.(txt|json)|merges\.txt|"
    r"tokenizer\.model|spiece\.model|sentencepiece\.bpe\.model|chat_template\.(jinja|json)|modules\.json|"
    r"sentence_bert_config\.json|config_sentence_transformers\.json)$"
)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.txt", "*.model", "*.jinja"]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors' name for it: "BF16", "F32", ...
    shape: tuple[int, ...]
    file: Path
    offset: int = -1  # where the bytes start in a safetensors file (-1: a PyTorch file)
    # asked for per tensor and pass: computed once, when made (dtypes.set_sizes)
    numel: int = field(init=False, repr=False, compare=False)
    nbytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_sizes(self)


class Checkpoint:
    """The tensors of one model, with their headers known up front and data read on demand."""

    def __init__(self, label: str, folder: Path | None, tensors: dict[str, TensorInfo], torch_state: dict[Path, dict]):
        self.label = label
        self.folder = folder  # where config/tokenizer files live, if any
        self.tensors = tensors
        self._fds: dict[Path, int] = {}  # open safetensors files
        self._maps: dict[Path, mmap.mmap] = {}  # the same, mapped (see mapped())
        self._map_views: dict[Path, np.ndarray] = {}  # each mapping as bytes, for address() ...
        self._map_starts: dict[Path, tuple[int, int]] = {}  # ... and the address of its first byte, its size
        self._to_release: dict[Path, tuple[int, int]] = {}  # pages done with, not yet let go of (see unmap())
        self._torch_state = torch_state  # lazily loaded (mmapped) PyTorch state dicts, per file
        self.notes: list[str] = []  # what opening it found worth telling (an adapter's base, ...)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str, start: int | None = None, stop: int | None = None, pinned: bool = False) -> torch.Tensor:
        """The stored tensor as a fresh CPU tensor in its stored dtype; with `start`/`stop`, only
        entries [start, stop) of its flattened form, as a 1-D tensor. BadInput if the file is damaged.
        `pinned`: read safetensors data into page-locked memory, which a GPU copies from
        asynchronously (torch caches such buffers for reuse).

        safetensors data is read with pread into a new buffer rather than through a
        memory map: mapped pages would stay in the process's resident memory until the
        file is closed, so peak memory would grow with the model's size.
        """
        info = self.tensors[name]
        whole = start is None and stop is None
        start, stop = start or 0, info.numel if stop is None else stop
        try:
            if info.offset < 0:
                stored = self._torch_file(info.file)[name]
                return stored if whole else stored.reshape(-1)[start:stop]
            flat = self._pread(info, start, stop, pinned)
            return flat.reshape(info.shape) if whole else flat
        except (RuntimeError, OSError) as error:
            raise BadInput(f"{info.file}: cannot read tensor {name}: {error}") from None

    def _pread(self, info: TensorInfo, start: int, stop: int, pinned: bool = False) -> torch.Tensor:
        if info.file not in self._fds:
            self._fds[info.file] = open_input(info.file)
        itemsize = ITEMSIZE[info.dtype]
        size, offset = (stop - start) * itemsize, info.offset + start * itemsize
        buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
        view = memoryview(buffer.numpy()) if size else memoryview(b"")
        _read_into(self._fds[info.file], view, offset)
        return buffer.view(torch_dtype(info.dtype))

    def read_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` (any order; rows are the first axis) of a stored tensor, as stored: a fresh
        numpy array (len(rows), entries per row). Each run of consecutive rows is read in one piece:
        from a safetensors file by pread straight into the result (not through a mapping: a page
        fault maps the pages around it too, so scattered rows would bring in many times their size);
        otherwise by read(). BadInput if the file is damaged."""
        info = self.tensors[name]
        length = info.numel // info.shape[0] if info.shape else 1
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        gathered = np.empty((len(rows), length), dtype=numpy_dtype(info.dtype))
        if not len(rows):
            return gathered
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
        starts, ends = np.concatenate(([0], breaks)).tolist(), np.concatenate((breaks, [len(rows)])).tolist()
        firsts = ordered[starts].tolist()
        try:
            if info.offset >= 0:  # one pread per run (scattered rows: one per row, ~2 us each)
                if info.file not in self._fds:
                    self._fds[info.file] = open_input(info.file)
                fd, row_bytes = self._fds[info.file], length * ITEMSIZE[info.dtype]
                buffer = memoryview(gathered.reshape(-1).view(np.uint8))
                for start, end, first in zip(starts, ends, firsts, strict=True):
                    _read_into(fd, buffer[start * row_bytes : end * row_bytes], info.offset + first * row_bytes)
            else:
                for start, end, first in zip(starts, ends, firsts, strict=True):
                    entries = self.read(name, first * length, (first + end - start) * length)
                    gathered[start:end] = Stored.from_torch(entries).array.reshape(end - start, length)
        except (RuntimeError, OSError) as error:
            raise BadInput(f"{info.file}: cannot read tensor {name}: {error}") from None
        result = np.empty_like(gathered)
        result[order] = gathered
        return result

    def mapped(self, name: str, start: int, stop: int) -> Stored:
        """Entries [start, stop) of a stored tensor, flattened, as stored, without a copy: a
        numpy view of the file's pages in the page cache (a PyTorch file's tensor is read as
        by read()). Read it, never write it, and call unmap() for the range when done: pages
        touched through the view count in this process's resident memory until then.

        For the CPU kernels, which read the stored entries once each: a copy first (read())
        would cost as much as their whole merge. The header was checked against the file's
        size when the checkpoint was opened; a file cut short while a merge reads it ends the
        process (SIGBUS) before anything is published.
        """
        info = self.tensors[name]
        if info.offset < 0:
            return Stored.from_torch(self.read(name, start, stop))
        try:
            if info.file not in self._maps:
                with os.fdopen(open_input(info.file), "rb") as handle:
                    # copy-on-write: a writable buffer (torch takes it without a warning),
                    # whose pages are the page cache's until written, which never happens
                    self._maps[info.file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
            entries = np.frombuffer(
                self._maps[info.file],
                dtype=numpy_dtype(info.dtype),
                count=stop - start,
                offset=info.offset + start * ITEMSIZE[info.dtype],
            )
            return Stored(info.dtype, entries)
        except (OSError, ValueError) as error:
            raise BadInput(f"{info.file}: cannot read tensor {name}: {error}") from None

    def address(self, name: str) -> int | None:
        """The memory address of a stored tensor's entries in its file's mapped pages, for the CPU
        kernels (as mapped() of all of it, without a numpy view per tensor); None where the
        entries are not a file's bytes as stored (a PyTorch file, or a checkpoint whose mapped()
        makes them: a view, an adapter's merge, an aligned vocabulary). The same rules as
        mapped(): read only, and unmap_whole() when done."""
        info = self.tensors[name]
        if info.offset < 0 or type(self).mapped is not Checkpoint.mapped:
            return None
        mapping = self._map_starts.get(info.file)
        if mapping is None:
            self.mapped(name, 0, 0)  # maps the file (a BadInput naming it where it cannot)
            view = self._map_views[info.file] = np.frombuffer(self._maps[info.file], dtype=np.uint8)
            mapping = self._map_starts[info.file] = (view.ctypes.data, view.size)
        if info.offset + info.nbytes > mapping[1]:  # a file cut short since it was opened (as mapped() refuses)
            raise BadInput(f"{info.file}: cannot read tensor {name}: the file ends before its entries")
        return mapping[0] + info.offset

    def unmap(self, name: str, start: int, stop: int) -> None:
        """Let go of the pages of entries [start, stop) that mapped() brought in (they stay in
        the page cache; a view still in use reads them again).

        Pages are let go of in runs of RELEASE_BYTES: the ranges of consecutive calls that
        touch or overlap are joined first, so that a model of many small tensors makes one
        madvise per run instead of one per tensor (and does not fault each page in again
        for every tensor it holds)."""
        info = self.tensors[name]
        itemsize = ITEMSIZE[info.dtype]
        self._let_go(info.file, info.offset + start * itemsize, info.offset + stop * itemsize)

    def unmap_whole(self, names: list[str]) -> None:
        """unmap() of every entry of each of these tensors (read through address()), in one
        run per stretch of the file they cover together."""
        infos = sorted((self.tensors[name] for name in names), key=lambda info: (info.file, info.offset))
        run: tuple[Path, int, int] | None = None
        for info in infos:
            first, end = info.offset, info.offset + info.nbytes
            if run is not None and run[0] == info.file and first <= run[2] + mmap.PAGESIZE:
                run = (run[0], run[1], max(run[2], end))
                continue
            if run is not None:
                self._let_go(*run)
            run = (info.file, first, end)
        if run is not None:
            self._let_go(*run)

    def _let_go(self, file: Path, start_byte: int, end_byte: int) -> None:
        """unmap()'s work on the bytes [start_byte, end_byte) of a mapped file."""
        mapping = self._maps.get(file)
        if mapping is None or not hasattr(mapping, "madvise"):
            return
        first = start_byte // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(len(mapping), -(-end_byte // mmap.PAGESIZE) * mmap.PAGESIZE)
        pending = self._to_release.pop(file, None)
        if pending is not None and first <= pending[1] and end >= pending[0]:
            first, end = min(first, pending[0]), max(end, pending[1])
        elif pending is not None:
            _release(mapping, *pending)
        if end - first >= RELEASE_BYTES:
            _release(mapping, first, end)
        elif end > first:
            self._to_release[file] = (first, end)

    def _torch_file(self, file: Path) -> dict:
        if file not in self._torch_state:
            self._torch_state[file] = load_torch_state(file)
        return self._torch_state[file]

    def input_files(self) -> list[Path]:
        """Every file its tensors are read from (a merge resumes only if none changed)."""
        return list(dict.fromkeys(info.file for info in self.tensors.values()))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for file, (first, end) in self._to_release.items():
            _release(self._maps[file], first, end)
        self._to_release.clear()
        self._map_starts.clear()
        self._map_views.clear()  # before closing the mappings they view
        for mapping in self._maps.values():
            try:
                mapping.close()
            except BufferError:  # a view is still alive: the mapping closes when it goes
                pass
        self._maps.clear()
        self._torch_state.clear()


# Checkpoint.unmap lets go of mapped pages in runs of at least this many bytes (or at close).
RELEASE_BYTES = 1 << 20


def _release(mapping: mmap.mmap, first: int, end: int) -> None:
    """Drop the mapped pages [first, end) from this process (they stay in the page cache)."""
    mapping.madvise(mmap.MADV_DONTNEED, first, end - first)


@contextmanager
def mapped_slices(checkpoints: list[Checkpoint], name: str, start: int, stop: int) -> Iterator[list[Stored]]:
    """Checkpoint.mapped of the same entries [start, stop) of one tensor in each checkpoint; their
    pages are let go of (Checkpoint.unmap) on leaving, whatever happens inside."""
    try:
        yield [checkpoint.mapped(name, start, stop) for checkpoint in checkpoints]
    finally:
        for checkpoint in checkpoints:
            checkpoint.unmap(name, start, stop)


def _read_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from the file at `offset`; pread may return less than asked for."""
    done, size = 0, len(view)
    while done < size:
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            raise OSError(f"file ends {size - done} bytes early")
        done += count


# ---------------------------------------------------------------- opening input files


def descriptor_path(fd: int, path: Path) -> str:
    """A name for an open descriptor that libraries which take a path (safetensors, torch.load)
    open as the very file checked, where the system has one (Linux's /proc); else the path."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else str(path)


def read_text_file(path: Path) -> str:
    """A small text file (an index, modules.json, a recipe), refusing anything not a regular file."""
    with os.fdopen(open_input(path), "rb") as handle:
        data = handle.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not a UTF-8 text file") from None


def _refuse_duplicates(where: str) -> Callable[[list[tuple[str, Any]]], dict]:
    def pairs_to_dict(pairs: list[tuple[str, Any]]) -> dict:
        result = dict(pairs)  # at C speed: a header has an object per tensor
        if len(result) != len(pairs):
            seen = set()
            for key, _ in pairs:
                if key in seen:
                    raise BadInput(f"{where}: key {key!r} appears twice in one JSON object")
                seen.add(key)
        return result

    return pairs_to_dict


def parse_json(text: str | bytes, where: str) -> Any:
    """JSON from an input file: a key given twice in one object, or nesting deeper than Python
    can follow, is a BadInput naming `where` (json.loads would keep the last value, or overflow)."""
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicates(where))
    except RecursionError:
        raise BadInput(f"{where}: JSON nested too deeply to read") from None
    except (ValueError, TypeError) as error:
        raise BadInput(f"{where}: not valid JSON ({error})") from None


# ---------------------------------------------------------------- safetensors


def _safetensors_file(file: Path) -> dict[str, TensorInfo]:
    """The headers of one safetensors file. The safetensors library validates the file
    (header, dtypes, offsets against the file size); tadrop reads the offsets itself, and refuses
    a tensor named twice (the library keeps one of them)."""
    try:
        with os.fdopen(open_input(file), "rb") as raw:
            with safe_open(descriptor_path(raw.fileno(), file), framework="numpy") as handle:  # "pt" would import torch
                names = list(handle.keys())
            header_size = struct.unpack("<Q", raw.read(8))[0]
            header_bytes = raw.read(header_size)
    except SafetensorError as error:
        raise BadInput(f"{file}: not a valid safetensors file ({error})") from None
    except (OSError, struct.error) as error:
        raise BadInput(f"{file}: cannot read the header ({error})") from None
    header = parse_json(header_bytes, f"{file}: header")
    infos = {}
    for name in names:
        entry = header[name]
        dtype = entry["dtype"]
        if dtype not in ITEMSIZE:
            raise BadInput(
                f"{file}: tensor {name} has dtype {dtype}, which tadrop does not support "
                f"(supported: {', '.join(ITEMSIZE)})"
            )
        infos[name] = TensorInfo(name, dtype, tuple(entry["shape"]), file, 8 + header_size + entry["data_offsets"][0])
    return infos


# torch.load(weights_only=True) could be made to run code before this version (CVE-2025-32434)
SAFE_TORCH_LOAD = (2, 6)


def parse_version(text: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string such as '2.6.0+cpu' or '2.7.0.dev20250101'."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(part) for part in match.groups() if part is not None) if match else (0,)


def torch_version() -> tuple[int, ...]:
    return parse_version(torch.__version__)


def _refusal_reason(error: Exception) -> str:
    """What torch's weights-only loader refused, in a few words. Its own message runs to many
    lines and ends by suggesting weights_only=False, which would let the pickle run code."""
    text = str(error)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"Unsupported operand (\d+)", text)
    if found:
        what = found.group(1)
        return (
            f"it needs {what}, which a weights-only load does not allow"
            if not what.isdigit()
            else f"pickle operation {what} is not allowed"
        )
    first = next((line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line), "")
    return f"{type(error).__name__}: {first[:160]}" if first else type(error).__name__


def _unpickle(file: Path) -> Any:
    """torch.load(weights_only=True) of a regular file, its warnings kept to itself."""
    with os.fdopen(open_input(file), "rb") as handle, warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # torch's warnings (TypedStorage, sparse invariants...) are not the user's business
        source = descriptor_path(handle.fileno(), file)
        try:
            return torch.load(source, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            handle.seek(0)
            return torch.load(handle, map_location="cpu", weights_only=True)  # legacy (non-zip) format


def load_torch_state(file: Path) -> dict[str, torch.Tensor]:
    """A PyTorch state dict, unpickled with weights_only=True: code in the pickle never runs.
    Refused outright with a torch whose weights-only loader can be bypassed."""
    if torch_version() < SAFE_TORCH_LOAD:
        raise BadInput(
            f"{file}: PyTorch {torch.__version__} cannot load pickled checkpoints safely (CVE-2025-32434); "
            f"install torch>=2.6, or use safetensors weights"
        )
    try:
        state = _unpickle(file)
    except BadInput:
        raise
    except Exception as error:  # weights_only refusals come as UnpicklingError and friends
        raise BadInput(
            f"{file}: refused to load: not a plain weights-only PyTorch state dict ({_refusal_reason(error)})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise BadInput(f"{file}: not a state dict (expected a mapping of tensor names to tensors)")
    return state


def _unusable(tensor: torch.Tensor) -> str | None:
    """Why a tensor from a pickle cannot be merged as stored entries, or None."""
    if tensor.is_meta:
        return "is a meta tensor (a shape without data)"
    if tensor.layout != torch.strided:
        return f"is a sparse tensor ({str(tensor.layout).removeprefix('torch.')})"
    if tensor.is_quantized:
        return f"is quantized ({str(tensor.dtype).removeprefix('torch.')})"
    if tensor.device.type != "cpu":
        return f"is on device {tensor.device.type}"
    return None


def _torch_infos(file: Path) -> tuple[dict, dict[str, TensorInfo]]:
    state = load_torch_state(file)
    infos = {}
    for name, tensor in state.items():
        problem = _unusable(tensor)
        if problem:
            raise BadInput(f"{file}: tensor {name} {problem}; tadrop merges only dense tensors stored with their data")
        try:
            dtype = dtype_name(tensor.dtype)
        except KeyError:
            raise BadInput(f"{file}: tensor {name} has dtype {tensor.dtype}, which tadrop does not support") from None
        infos[name] = TensorInfo(name, dtype, tuple(tensor.shape), file)
    return state, infos


# ---------------------------------------------------------------- locating weight files


def link_root(folder: Path) -> Path:
    """How far links in a checkpoint folder may point: the folder itself, or for a snapshot in
    the Hugging Face cache (models--org--name/snapshots/<commit>, whose files are links to
    ../../blobs/<hash>) the repository's cache folder."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith(("models--", "datasets--")):
        return folder.parent.parent
    return folder


def _escapes(file: Path, folder: Path) -> bool:
    return not file.resolve().is_relative_to(link_root(folder).resolve())


def _inside(folder: Path, relative: str, index: Path) -> Path:
    """Resolve a shard name from an index; refuse anything that escapes the folder."""
    candidate = folder / relative
    if Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise BadInput(f"{index}: shard path {relative!r} points outside its folder")
    if not candidate.exists():
        raise BadInput(f"{index}: names shard {relative!r}, which does not exist")
    if _escapes(candidate, folder):
        raise BadInput(f"{index}: shard {relative!r} is a link that points outside its folder")
    check_regular(candidate)
    return candidate


def _index_shards(index: Path) -> list[Path]:
    data = parse_json(read_text_file(index), str(index))
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise BadInput(f"{index}: not a valid index file (expected JSON with a 'weight_map' mapping)")
    if not all(isinstance(relative, str) for relative in weight_map.values()):
        raise BadInput(f"{index}: shard names must be strings")
    # each shard once, in order of first mention: the map names one per tensor, and each name
    # is checked once (resolving links costs a few system calls)
    return list(
        dict.fromkeys(_inside(index.parent, relative, index) for relative in dict.fromkeys(weight_map.values()))
    )


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, in the order tadrop prefers formats."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if os.path.lexists(index):  # a FIFO or a dangling link is refused, not passed over
            return _index_shards(index)
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth"):
        files = sorted(p for p in folder.glob(pattern) if not p.is_dir())
        for file in files:
            if _escapes(file, folder):
                raise BadInput(f"{file}: a link that points outside its folder")
            check_regular(file)
        if files:
            return files
    raise BadInput(
        f"{folder}: no weights found (expected *.safetensors, a safetensors index, or a PyTorch .bin/.pt state dict)"
    )


def _download_from_hub(reference: str) -> Path:
    """A local snapshot of a Hugging Face repo: weights and config/tokenizer files only.

    Honours HF_TOKEN, HF_HOME, HF_HUB_OFFLINE and the local cache (through huggingface_hub).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, _, revision = reference.partition("@")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS))
        if not any(folder.glob("*.safetensors")):  # older repos: PyTorch weights only
            folder = Path(
                snapshot_download(
                    repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS + ["*.bin", "*.bin.index.json"]
                )
            )
    except RevisionNotFoundError:
        raise BadInput(f"{reference}: revision {revision!r} not found on the Hugging Face Hub") from None
    except RepositoryNotFoundError:
        raise BadInput(
            f"{reference}: no such repository on the Hugging Face Hub (or no access: set HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError:
        raise BadInput(f"{reference}: not a local path, and not in the Hugging Face cache while offline") from None
    except (HfHubHTTPError, HFValidationError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BadInput(f"{reference}: cannot fetch from the Hugging Face Hub ({first_line[:200]})") from None
    return folder


def resolve_source(reference: str) -> tuple[Path | None, list[Path]]:
    """(folder for config files, weight files) for a recipe's model reference."""
    path = Path(reference).expanduser()
    if path.is_dir():
        return path, weight_files(path)
    if path.exists():  # a file, or a FIFO, device or socket: refused before it is opened
        if path.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            raise BadInput(f"{path}: not a checkpoint (expected a folder, .safetensors, .bin or .pt)")
        check_regular(path)
        return None, [path]
    if HUB_ID.match(reference) and not reference.startswith((".", "/", "~")):
        folder = _download_from_hub(reference)
        return folder, weight_files(folder)
    raise BadInput(f"{reference}: model not found (no such file or folder)")


def open_checkpoint(reference: str, adapter_base: str | None = None) -> Checkpoint:
    """Open a checkpoint and read every header; tensor data is read later, on demand.

    A PEFT LoRA adapter opens as the model it makes of its base (lora.AdapterModel): `X+adapter`
    applies it to model X (mergekit's syntax), an adapter folder given alone to `adapter_base`
    (the recipe's base model)."""
    from . import lora  # built on this module

    split = lora.split_reference(reference)
    if split is not None:
        model, adapter = split
        folder = lora.adapter_folder(adapter, reference)
        return lora.open_adapter_model(reference, open_checkpoint(model), folder, model)
    folder, files = resolve_source(reference)
    if folder is not None and lora.is_adapter_folder(folder):
        if adapter_base is None:
            raise BadInput(
                f"{reference}: a PEFT adapter folder, with no base model to apply it to "
                f"(give it as model+adapter, as mergekit does, or set base_model)"
            )
        return lora.open_adapter_model(reference, open_checkpoint(adapter_base), folder, adapter_base)
    return _open_files(reference, folder, files)


def _open_files(reference: str, folder: Path | None, files: list[Path]) -> Checkpoint:
    tensors: dict[str, TensorInfo] = {}
    torch_state: dict[Path, dict] = {}
    for file in files:
        if file.suffix == ".safetensors":
            infos = _safetensors_file(file)
        else:
            torch_state[file], infos = _torch_infos(file)
        for name, info in infos.items():
            if name in tensors:
                raise BadInput(f"{file}: tensor {name} also appears in {tensors[name].file}")
            tensors[name] = info
    if not tensors:
        raise BadInput(f"{reference}: the checkpoint holds no tensors")
    return Checkpoint(reference, folder, tensors, torch_state)


def config_files(folder: Path | None) -> list[Path]:
    """Config, tokenizer and generation files to copy from the base folder.

    A link that points out of the folder is refused: it could carry a secret (a token
    file, say) into the output.
    """
    if folder is None:
        return []
    files = [file for file in sorted(folder.iterdir()) if file.is_file() and CONFIG_FILE_PATTERN.match(file.name)]
    for file in files:
        if _escapes(file, folder):
            raise BadInput(f"{file}: a link that points outside its folder; tadrop will not copy it into the output")
    return files


def _module_folder(folder: Path, modules: Path, entry: Any) -> Path | None:
    """The folder of one sentence-transformers module named in modules.json (None: the module
    lives in the base folder itself, or its folder is absent, as Normalize's often is)."""
    relative = entry.get("path") if isinstance(entry, dict) else None
    if not isinstance(relative, str):
        raise BadInput(f"{modules}: each module needs a 'path' string")
    if relative in ("", "."):
        return None
    if Path(relative).is_absolute() or len(Path(relative).parts) != 1 or relative == "..":
        raise BadInput(
            f"{modules}: module path {relative!r} is not a folder directly inside the base folder; "
            f"tadrop will not copy it"
        )
    candidate = folder / relative
    if not os.path.lexists(candidate):
        return None
    if candidate.is_symlink():
        raise BadInput(f"{candidate}: a module folder that is a link; tadrop will not copy it into the output")
    if not candidate.is_dir():
        raise BadInput(f"{modules}: module path {relative!r} is not a folder")
    return candidate


def module_files(folder: Path | None) -> list[tuple[Path, str]]:
    """The files of the module folders a sentence-transformers model's modules.json names
    (1_Pooling/, 2_Dense/, ...), as (file, path in the output): without them the output does not
    load as a SentenceTransformer. Never code (*.py), never a link out of the base folder, never a
    folder deeper than one level."""
    if folder is None or not os.path.lexists(folder / "modules.json"):
        return []
    modules = folder / "modules.json"
    if _escapes(modules, folder):
        raise BadInput(f"{modules}: a link that points outside its folder; tadrop will not copy it into the output")
    entries = parse_json(read_text_file(modules), str(modules))
    if not isinstance(entries, list):
        raise BadInput(f"{modules}: expected a list of modules")
    files = []
    for entry in entries:
        module = _module_folder(folder, modules, entry)
        for file in sorted(module.iterdir()) if module is not None else ():
            if file.suffix == ".py" or (file.is_dir() and not file.is_symlink()):
                continue
            if _escapes(file, folder):
                raise BadInput(
                    f"{file}: a link that points outside its folder; tadrop will not copy it into the output"
                )
            check_regular(file)
            files.append((file, f"{module.name}/{file.name}"))
    return files


def environment_token_present() -> bool:
    return bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))


def all_finite(tensor: torch.Tensor) -> bool:
    """True if no entry is NaN or Inf."""
    return first_non_finite([tensor]) is None


def first_non_finite(tensors: list[torch.Tensor]) -> int | None:
    """The index of the first tensor holding NaN or Inf, or None. A finite sum proves a tensor
    clean in one read; only a non-finite sum (NaN/Inf present, or an overflow) needs the exact
    check. The sums are looked at together: one wait for a GPU, not one per tensor."""
    if not tensors:
        return None
    sums = torch.stack([tensor.sum() for tensor in tensors])  # in their own dtype: bf16 sums 10x faster than as float32
    for i, finite in enumerate(torch.isfinite(sums).tolist()):
        if not finite and not bool(torch.isfinite(tensors[i]).all()):
            return i
    return None


# torch keeps page-locked buffers for reuse once freed, and page-locked memory cannot be paged
# out: only reads up to this many entries (a GPU slice) are pinned, so that cache stays small
# whatever the model; larger whole-tensor reads cross from ordinary memory.
PINNED_READ_ELEMENTS = 1 << 24


def read_float32(
    checkpoint: Checkpoint,
    name: str,
    device: str,
    start: int | None = None,
    stop: int | None = None,
    check: bool = True,
) -> torch.Tensor:
    """A tensor (or entries [start, stop) of it, flattened) as a fresh float32 copy on `device`;
    refuses NaN and Inf with a message naming it (`check=False`: the caller checks, see
    first_non_finite).

    For a GPU the stored bytes cross as they are, from page-locked memory and without waiting,
    and are converted there: half the bytes of a float32 copy for bf16, and the next read
    proceeds while they travel."""
    if on_cpu(device):
        stored = checkpoint.read(name, start, stop)
        # a float32 read is already a fresh buffer of ours; anything else is converted (a copy)
        fresh = stored.dtype == torch.float32 and checkpoint.tensors[name].offset >= 0
        tensor = stored.to(dtype=torch.float32, copy=not fresh)
    else:
        info = checkpoint.tensors[name]
        count = (info.numel if stop is None else stop) - (start or 0)
        stored = checkpoint.read(name, start, stop, pinned=info.offset >= 0 and count <= PINNED_READ_ELEMENTS)
        tensor = stored.to(device, non_blocking=stored.is_pinned()).to(torch.float32)
    if check and not all_finite(tensor):
        raise BadInput(f"{checkpoint.label}: tensor {name} contains NaN or Inf")
    return tensor


def read_all_float32(
    checkpoints: list[Checkpoint], name: str, device: str, start: int | None = None, stop: int | None = None
) -> list[torch.Tensor]:
    """read_float32 of one tensor (or slice) from each checkpoint, all read before any is
    checked for NaN/Inf: a GPU then waits once, and the reads overlap the copies already on
    their way. The message names the first checkpoint at fault."""
    tensors = [read_float32(checkpoint, name, device, start, stop, check=False) for checkpoint in checkpoints]
    bad = first_non_finite(tensors)
    if bad is not None:
        raise BadInput(f"{checkpoints[bad].label}: tensor {name} contains NaN or Inf")
    return tensors
