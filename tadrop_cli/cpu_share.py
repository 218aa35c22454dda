"""How many threads the CPU kernels use: as many cores as other work leaves idle.

The kernels' OpenMP threads wait for each other at the end of every parallel loop. On a machine
where other processes keep the cores busy, a thread that the scheduler does not run holds up
the others (which spin, taking the cores from it): merges ran 3-7x slower with two threads
than with one (docs/speed.md, "A busy machine"). So before each kernel call kernels.py asks
`CpuShare.threads()` (and before each tensor PyTorch computes on the CPU, fit_torch_threads()).
At most every `interval` seconds it looks at how busy the cores this process may run on were
since its last look (/proc/stat), less this process's own CPU time, and gives the number of
cores left idle: at least 1, at most `limit`.

Where /proc/stat cannot be read (not Linux), the count stays at `limit`. The result of every
kernel is the same whatever the count (the reductions are over fixed blocks, in order).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import lru_cache

from .lazy import torch, torch_imported

_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal (not idle, iowait)


def allowed_cpus() -> set[int]:
    """The cores this process may run on."""
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def busy_seconds(cpus: set[int], stat_text: str, ticks_per_second: float) -> float:
    """Seconds that the cores `cpus` have spent busy since boot, from the text of /proc/stat."""
    busy = 0
    for line in stat_text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit() or int(name[3:]) not in cpus:
            continue
        fields = rest.split()
        busy += sum(int(fields[i]) for i in _BUSY_FIELDS if i < len(fields))
    return busy / ticks_per_second


def idle_cores(others_busy_seconds: float, wall_seconds: float, cores: int) -> int:
    """The whole cores left idle by others who kept `others_busy_seconds` of CPU busy over
    `wall_seconds` on `cores` cores (rounded to the nearest, at least 1)."""
    others = max(0.0, others_busy_seconds / wall_seconds)
    return max(1, min(cores, int(cores - others + 0.5)))


def runnable_others() -> int | None:
    """The tasks that are runnable right now, less the one asking (/proc/loadavg's 4th field)."""
    try:
        with open("/proc/loadavg") as handle:
            running = int(handle.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - 1)


def _read_stat() -> str | None:
    try:
        with open("/proc/stat") as handle:
            return handle.read()
    except OSError:
        return None


class CpuShare:
    """The kernels' thread count on a shared machine (see the module's docstring)."""

    def __init__(
        self,
        limit: int,
        interval: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        read_stat: Callable[[], str | None] = _read_stat,
        own_cpu: Callable[[], float] = time.process_time,
    ) -> None:
        self.limit = max(1, limit)
        self._interval, self._clock, self._read_stat, self._own_cpu = interval, clock, read_stat, own_cpu
        self._cpus = allowed_cpus()
        self._ticks = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
        self._last: tuple[float, float, float] | None = None  # (wall, cores' busy, own CPU) seconds
        self._threads: int | None = None

    def _sample(self) -> tuple[float, float, float] | None:
        text = self._read_stat()
        if text is None:
            return None
        return self._clock(), busy_seconds(self._cpus, text, self._ticks), self._own_cpu()

    def threads(self) -> int:
        if self.limit == 1:
            return 1
        if self._threads is None:  # the first call: how many tasks are runnable now is all there is to go on
            others = runnable_others()
            self._threads = self.limit if others is None else max(1, min(self.limit, len(self._cpus) - others))
            self._last = self._sample()
            return self._threads
        if self._last is None or self._clock() - self._last[0] < self._interval:
            return self._threads
        now = self._sample()
        if now is None:
            return self._threads
        wall, busy, own = (b - a for a, b in zip(self._last, now, strict=True))
        self._last = now
        if wall > 0:
            self._threads = min(self.limit, idle_cores(busy - own, wall, len(self._cpus)))
        return self._threads


@lru_cache(maxsize=1)
def torch_thread_limit() -> int:
    """PyTorch's CPU thread count as this process found it, before fit_torch_threads() adapted it:
    the user's OMP_NUM_THREADS, or the cores'. (Looked up once, at the first call.)"""
    return torch.get_num_threads()


@lru_cache(maxsize=1)
def _torch_share() -> CpuShare | None:
    """What sets PyTorch's CPU thread count: None where the user fixed it with OMP_NUM_THREADS."""
    limit = torch_thread_limit()
    return None if os.environ.get("OMP_NUM_THREADS") or limit <= 1 else CpuShare(limit)


def fit_torch_threads() -> None:
    """Before PyTorch computes on the CPU: its intra-op threads are the idle cores, as the kernels'
    are (on a busy machine its default count ran 5x slower than one thread). Imports nothing: where
    torch is not loaded yet there is nothing to fit, and the next tensor is."""
    if not torch_imported():
        return
    share = _torch_share()
    if share is not None:
        threads = share.threads()
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
