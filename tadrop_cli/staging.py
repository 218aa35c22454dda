"""The staging folder: the hidden `.NAME.tadrop-partial` folder where an output is built, its
journal of finished shards, the output's lock, and the atomic move into place when complete,
so that an interrupted merge never looks finished and can be resumed. No maths here.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

from .errors import BadInput, WriteError
from .journal import JOURNAL, JOURNAL_FORMAT, PLAN, changed_inputs, crc32_of, read_journal
from .output_location import (
    LOCK_SUFFIX,
    OLD_SUFFIX,
    STAGING_SUFFIX,
    beside,
    existing_output,
    not_a_model_output,
    not_ours,
    refuse_existing,
)
from .safe_files import (
    O_CLOEXEC,
    O_DIRECTORY,
    O_NOFOLLOW,
    creating_in,
    describe_os_error,
    exists_at,
    open_folder,
    open_input,
    open_own,
    read_own,
    remove_tree,
    same_file,
)
from .shards import Shard, ShardWriter, safetensors_header


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
            self._parent = os.open(self.target.parent, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        except OSError as error:
            raise WriteError(describe_os_error(error, self.target.parent)) from None

    def _take_lock(self) -> None:
        path = beside(self.target, LOCK_SUFFIX)
        for _ in range(3):
            try:
                flags = os.O_RDWR | os.O_CREAT | O_NOFOLLOW | O_CLOEXEC | os.O_NONBLOCK
                fd = os.open(path.name, flags, 0o644, dir_fd=self._parent)
            except OSError as error:
                if error.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                    raise BadInput(
                        f"{path}: is not tadrop's lock file (a link or not a file); remove it yourself"
                    ) from None
                raise WriteError(describe_os_error(error, path)) from None
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
            return same_file(at_name, os.fstat(fd))
        except FileNotFoundError:
            return False

    def _open_staging(self, resume: bool) -> dict[str, dict]:
        try:
            os.mkdir(self.path.name, 0o755, dir_fd=self._parent)
            created = True
        except FileExistsError:
            created = False
        except OSError as error:
            raise WriteError(describe_os_error(error, self.path)) from None
        try:
            self._fd = open_folder(self.path.name, self._parent)
        except OSError:
            raise BadInput(not_ours(self.path)) from None
        journal = None if created else read_journal(self._fd)
        if journal is None:
            if not created and not_a_model_output(self._fd) is not None:
                raise BadInput(not_ours(self.path))
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
                remove_tree(name, self._fd)
            else:
                os.unlink(name, dir_fd=self._fd)
        except FileNotFoundError:
            pass
        except OSError as error:
            raise WriteError(describe_os_error(error, self.path / name)) from None

    # -- writing

    def _write_file(self, name: str, data: bytes) -> None:
        """A new file `name` in the staging folder, flushed to the disk."""
        self._remove(name)
        try:
            with open(name, "wb", opener=creating_in(self._fd)) as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            raise WriteError(describe_os_error(error, self.path / name)) from None

    def _write_journal(self) -> None:
        temporary = JOURNAL + ".tmp"
        self._write_file(temporary, json.dumps(self._journal, indent=1).encode())
        try:
            os.replace(temporary, JOURNAL, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        except OSError as error:
            raise WriteError(describe_os_error(error, self.path / JOURNAL)) from None

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
            text = read_own(PLAN, self._fd)
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
            fd = open_own(shard.file_name, self._fd)
        except OSError:
            return False
        try:
            size = os.fstat(fd).st_size
            if size != len(header) + shard.nbytes or size != record.get("size"):
                return False
            if os.pread(fd, len(header), 0) != header:
                return False
            return crc32_of(fd) == record.get("crc32")
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
                    os.fdopen(open_input(source), "rb") as original,
                    open(name, "wb", opener=creating_in(folder_fd)) as copy,
                ):
                    shutil.copyfileobj(original, copy, 1 << 20)
                    copy.flush()
                    os.fsync(copy.fileno())
            finally:
                if folder:
                    os.close(folder_fd)
        except OSError as error:
            raise WriteError(describe_os_error(error, self.path / (relative or source.name))) from None

    def _subfolder(self, name: str) -> int:
        """An opened folder inside the staging folder, made if absent, never reached through a link."""
        try:
            os.mkdir(name, 0o755, dir_fd=self._fd)
        except FileExistsError:
            pass
        return open_folder(name, self._fd)

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
        if here is None or not same_file(here, ours):
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
            raise WriteError(describe_os_error(error, self.target)) from None
        try:
            os.fsync(self._parent)  # the rename on the disk; the output is in place whatever this says
        except OSError:
            pass
        if existing.exists:
            try:
                remove_tree(old, self._parent)
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
        remove_tree(old, self._parent)

    def _swap_in(self, old: str, ours: os.stat_result) -> None:
        parent, name, staging = self._parent, self.target.name, self.path.name
        exchanged = False
        try:
            exchanged = exchange_paths(staging, name, dir_fd=parent)
        finally:  # the old output now at the staging name (even if interrupted right after the swap) goes to `old`
            try:
                swapped = not same_file(os.stat(staging, dir_fd=parent, follow_symlinks=False), ours)
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
            if exists_at(old, parent) and not exists_at(name, parent):
                os.rename(old, name, src_dir_fd=parent, dst_dir_fd=parent)
            raise

    def _move_in(self) -> None:
        try:
            if _renameat2(self._parent, self.path.name, self.target.name, _RENAME_NOREPLACE):
                return
        except FileExistsError:
            raise BadInput(f"{self.target}: output exists (use --overwrite to replace it)") from None
        if exists_at(self.target.name, self._parent):
            raise BadInput(f"{self.target}: output exists (use --overwrite to replace it)")
        os.rename(self.path.name, self.target.name, src_dir_fd=self._parent, dst_dir_fd=self._parent)

    # -- ending

    def discard(self) -> None:
        """Remove this run's staging folder (only if the name still holds it) and release the lock."""
        if self._fd is not None:
            try:
                if same_file(os.stat(self.path.name, dir_fd=self._parent, follow_symlinks=False), os.fstat(self._fd)):
                    remove_tree(self.path.name, self._parent)
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
