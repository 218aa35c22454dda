"""What a partial merge records to be resumed: the identity of each input file (size, modification
time, content hash), the journal's file names and format, and the CRC-32 of a finished shard.
The staging folder (staging.py) writes the journal; this module says what it holds and reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

from .errors import BadInput
from .safe_files import open_input, read_own

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
    fd = open_input(path)  # BadInput naming it where it is not a regular file, or cannot be opened
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


JOURNAL = "progress.json"
PLAN = "plan.json"
JOURNAL_FORMAT = "tadrop-journal-2"


def read_journal(folder_fd: int) -> dict | None:
    """The journal in an opened staging folder; {"format": "older"} for an older tadrop's (no checksums);
    None where there is none, or it is not tadrop's."""
    try:
        data = json.loads(read_own(JOURNAL, folder_fd))
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


def crc32_of(fd: int) -> int:
    """The CRC-32 of a whole file, read in 4 MB blocks."""
    crc, offset, block = 0, 0, bytearray(4 << 20)
    view = memoryview(block)
    while count := os.preadv(fd, [view], offset):
        crc = zlib.crc32(view[:count], crc)
        offset += count
    return crc
