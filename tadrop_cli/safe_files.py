"""Files opened only as what they are. Two jobs, one function each:

- an input (a checkpoint's file, a config, a recipe): open_input, links followed (the user's paths,
  and a Hugging Face cache snapshot is links into its blobs; where an index's files may point is
  checked where they are listed, checkpoint.link_root), anything but a regular file refused with a
  BadInput naming it, before it is opened and again on the descriptor;
- a file tadrop wrote (the output's shards, the journal): open_own, never through a link (tadrop
  made none there), OSError otherwise, for the caller to decide (a missing journal is no error).

Also: files created new (O_EXCL | O_NOFOLLOW) in an opened folder, trees removed without following
links, and OSErrors described in one line. The building blocks of reading inputs, the output's
checks, the journal and the staging folder. No maths here.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from .errors import BadInput

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def creating_in(folder_fd: int) -> Callable[[str, int], int]:
    """An `opener` for open(): creates the file in the opened folder, never through a link and never
    over anything already there (the caller removes a stale file first)."""
    return lambda name, flags: os.open(name, flags | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644, dir_fd=folder_fd)


def open_own(name: str | Path, folder_fd: int | None = None) -> int:
    """A read-only descriptor of a file tadrop wrote, by name (in the opened folder `folder_fd`), never
    through a link (O_NOFOLLOW: a link is refused, ELOOP) and only a regular file (a FIFO is opened
    without waiting, then refused); OSError otherwise."""
    fd = os.open(name, os.O_RDONLY | O_NOFOLLOW | O_CLOEXEC | os.O_NONBLOCK, dir_fd=folder_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(name))
    return fd


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: Path) -> None:
    """Refuse (BadInput) an input path whose final target is not a regular file, before anything
    opens it: a FIFO or a device would block a reader, never end, or act on being opened. Links are
    followed (see the module's docstring)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise BadInput(f"{path}: cannot open ({error.strerror or error})") from None
    if not stat.S_ISREG(mode):
        raise BadInput(f"{path}: {_kind(mode)}, not a regular file; tadrop reads only regular files")


def open_input(path: Path) -> int:
    """A read-only descriptor of an input file, links followed; BadInput naming it unless a regular
    file. Checked before opening (check_regular), opened without blocking and checked again on the
    descriptor: a file swapped for a FIFO in between is refused too, and never waited on."""
    check_regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | O_CLOEXEC)
    except OSError as error:
        raise BadInput(f"{path}: cannot open ({error.strerror or error})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise BadInput(f"{path}: {_kind(mode)}, not a regular file; tadrop reads only regular files")
    os.set_blocking(fd, True)
    return fd


def read_own(name: str, folder_fd: int | None = None, limit: int = 64 << 20) -> bytes:
    """Up to `limit` bytes of a file tadrop wrote (open_own: never through a link)."""
    fd = open_own(name, folder_fd)
    try:
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(limit)
    finally:
        os.close(fd)


def remove_tree(name: str, folder_fd: int) -> None:
    """Remove a folder and all it holds, by name in an opened folder, never following a link (a link
    inside is removed itself). shutil.rmtree takes dir_fd only from Python 3.11."""
    fd = open_folder(name, folder_fd)
    try:
        for entry in os.scandir(fd):
            if entry.is_dir(follow_symlinks=False):
                remove_tree(entry.name, fd)
            else:
                os.unlink(entry.name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=folder_fd)


def open_folder(name: str | Path, folder_fd: int | None = None) -> int:
    """A descriptor of a folder, never reached through a link at its last name."""
    return os.open(name, os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC, dir_fd=folder_fd)


def describe_os_error(error: OSError, path: Path) -> str:
    """A write failure in one line, naming the path."""
    if error.errno == errno.ENOSPC:
        return f"{path}: no space left on the device"
    return f"{path}: write failed ({error.strerror or error})"


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether two stats are of one file (device and inode)."""
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def exists_at(name: str, folder_fd: int) -> bool:
    """Whether anything (a link included) has this name in the opened folder."""
    try:
        os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False
