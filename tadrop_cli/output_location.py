"""Where the output goes, checked before anything is written: usable paths, tadrop's work names
beside the target (`.NAME.tadrop-partial`, `-old`, `-lock`), what an existing output is and
whether --overwrite may replace it, and the recipe digest a published output records.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput
from .journal import read_journal
from .safe_files import open_folder, open_own, read_own

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


HEADER_LIMIT = 100_000_000  # the longest safetensors header read (the safetensors library's own limit)


def _safetensors_metadata(name: str, folder_fd: int) -> dict:
    """The `__metadata__` of a safetensors file's header, read whole by its length: a header of many
    tensors is longer than any fixed first read (20,000 tensors: ~2 MB). ValueError or OSError
    where there is no such header."""
    fd = open_own(name, folder_fd)
    try:
        first = os.pread(fd, 8, 0)
        length = struct.unpack("<Q", first)[0] if len(first) == 8 else -1
        if not 0 < length <= HEADER_LIMIT:
            raise ValueError(f"{name}: no safetensors header")
        header = json.loads(os.pread(fd, length, 8))
    finally:
        os.close(fd)
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise ValueError(f"{name}: no metadata in its header")
    return metadata


def _made_by_tadrop(name: str, folder_fd: int) -> bool:
    """A safetensors file whose header's metadata names tadrop's version."""
    try:
        return "tadrop_version" in _safetensors_metadata(name, folder_fd)
    except (OSError, ValueError, RecursionError):  # RecursionError: nested too deep
        return False


def _module_folder(name: str, folder_fd: int) -> bool:
    """A sentence-transformers module folder as tadrop copies one ("1_Pooling"): regular files only."""
    if not re.fullmatch(r"\d+_\w+", name):
        return False
    try:
        fd = open_folder(name, folder_fd)
    except OSError:
        return False
    try:
        return all(entry.is_file(follow_symlinks=False) for entry in os.scandir(fd))
    finally:
        os.close(fd)


def not_a_model_output(folder_fd: int) -> str | None:
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
        fd = open_folder(name, parent_fd)
    except OSError as error:
        raise BadInput(f"{target}: cannot read the existing output ({error.strerror or error})") from None
    try:
        return ExistingOutput(True, not_a_model_output(fd))
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
            fd = open_folder(staging)
        except OSError as error:
            raise BadInput(f"{staging}: cannot read ({error.strerror or error})") from None
        try:
            if read_journal(fd) is None and not_a_model_output(fd) is not None:
                raise BadInput(not_ours(staging))
        except OSError as error:
            raise BadInput(f"{staging}: cannot read ({error.strerror or error})") from None
        finally:
            os.close(fd)


def not_ours(staging: Path) -> str:
    return (
        f"{staging}: exists but is not a tadrop partial merge (no valid journal); "
        "remove it yourself, or choose another output"
    )


def recorded_recipe_digest(folder: Path) -> str | None:
    """The recipe SHA-256 that tadrop wrote into an output (index metadata, or the single shard's header)."""
    try:
        fd = open_folder(folder)
    except OSError:
        return None
    try:
        try:
            return json.loads(read_own("model.safetensors.index.json", fd))["metadata"]["recipe_sha256"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            pass
        try:
            return _safetensors_metadata("model.safetensors", fd)["recipe_sha256"]
        except (OSError, ValueError, KeyError, RecursionError):
            return None
    finally:
        os.close(fd)
