"""Files opened only as what they are: regular files and folders reached without a link, files
created new (O_EXCL | O_NOFOLLOW) in an opened folder, trees removed without following links, and
OSErrors described in one line. The building blocks of the output's checks, the journal and the
staging folder. No maths here.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def creating_in(folder_fd: int) -> Callable[[str, int], int]:
    """An `opener` for open(): creates the file in the opened folder, never through a link and never
    over anything already there (the caller removes a stale file first)."""
    return lambda name, flags: os.open(name, flags | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644, dir_fd=folder_fd)


def open_regular(name: str | Path, folder_fd: int | None = None) -> int:
    """A read-only descriptor of a regular file, never through a link; OSError otherwise."""
    fd = os.open(name, os.O_RDONLY | O_NOFOLLOW | O_CLOEXEC | os.O_NONBLOCK, dir_fd=folder_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(name))
    return fd


def open_input(path: Path) -> int:
    """A read-only descriptor of an input file (links followed: inputs may be links, e.g. into the
    Hugging Face cache), refused unless it is a regular file (a FIFO would block)."""
    fd = os.open(path, os.O_RDONLY | O_CLOEXEC | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd


def read_regular(name: str, folder_fd: int | None = None, limit: int = 64 << 20) -> bytes:
    """Up to `limit` bytes of a regular file, never read through a link."""
    fd = open_regular(name, folder_fd)
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
