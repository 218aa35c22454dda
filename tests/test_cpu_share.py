"""The kernels' thread count on a busy machine (cpu_share.py), and that it never changes a result."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tadrop_cli import cpu_share, kernels
from tadrop_cli.cpu_share import CpuShare, busy_seconds, idle_cores
from tadrop_cli.dtypes import Stored

STAT = """cpu  900 0 300 5000 10 0 0 0 0 0
cpu0 400 5 100 2500 7 2 3 4 0 0
cpu1 500 0 200 2500 3 0 0 0 0 0
cpu2 1 1 1 1 1 1 1 1 0 0
intr 12345
ctxt 999
"""


def test_busy_seconds_sums_the_busy_fields_of_the_allowed_cores_only():
    # cpu0: user 400 + nice 5 + system 100 + irq 2 + softirq 3 + steal 4 (idle 2500 and iowait 7 are not busy)
    assert busy_seconds({0}, STAT, 100.0) == pytest.approx(5.14)
    assert busy_seconds({0, 1}, STAT, 100.0) == pytest.approx(5.14 + 7.0)
    assert busy_seconds({5}, STAT, 100.0) == 0.0  # the "cpu" total line is never counted


@pytest.mark.parametrize(
    "others, cores, expected",
    [(0.0, 2, 2), (0.4, 2, 2), (0.6, 2, 1), (1.0, 2, 1), (2.0, 2, 1), (7.0, 2, 1), (1.2, 8, 7), (-0.5, 4, 4)],
)
def test_idle_cores_rounds_what_others_leave_and_keeps_one(others, cores, expected):
    assert idle_cores(others * 10.0, 10.0, cores) == expected


class FakeMachine:
    """/proc/stat, the clock and this process's CPU time, moved by hand."""

    def __init__(self):
        self.wall, self.busy_ticks, self.own = 100.0, 0, 0.0

    def stat(self):
        return (
            f"cpu0 {self.busy_ticks // 2} 0 0 0 0 0 0 0\ncpu1 {self.busy_ticks - self.busy_ticks // 2} 0 0 0 0 0 0 0\n"
        )

    def run(self, seconds, others_cores, own_cores):
        self.wall += seconds
        self.busy_ticks += round((others_cores + own_cores) * seconds * 100)
        self.own += own_cores * seconds


def make_share(machine, monkeypatch, runnable_others=0):
    monkeypatch.setattr(cpu_share, "allowed_cpus", lambda: {0, 1})
    monkeypatch.setattr(cpu_share, "runnable_others", lambda: runnable_others)
    share = CpuShare(2, interval=0.2, clock=lambda: machine.wall, read_stat=machine.stat, own_cpu=lambda: machine.own)
    share._ticks = 100.0
    return share


def test_cpu_share_follows_the_load_others_put_on_the_cores(monkeypatch):
    machine = FakeMachine()
    share = make_share(machine, monkeypatch)
    assert share.threads() == 2  # nothing else runnable at the start
    machine.run(0.5, others_cores=0.0, own_cores=2.0)
    assert share.threads() == 2  # busy, but only with this process
    machine.run(0.5, others_cores=2.0, own_cores=0.0)  # two busy processes came: they hold both cores
    assert share.threads() == 1
    machine.run(0.1, others_cores=0.0, own_cores=1.0)
    assert share.threads() == 1  # under the interval: no new look
    machine.run(0.5, others_cores=0.0, own_cores=1.0)  # they left
    assert share.threads() == 2


def test_cpu_share_starts_from_the_tasks_runnable_now(monkeypatch):
    assert make_share(FakeMachine(), monkeypatch, runnable_others=3).threads() == 1
    assert make_share(FakeMachine(), monkeypatch, runnable_others=1).threads() == 1
    assert make_share(FakeMachine(), monkeypatch, runnable_others=0).threads() == 2


def test_cpu_share_without_proc_stat_keeps_the_limit(monkeypatch):
    monkeypatch.setattr(cpu_share, "runnable_others", lambda: None)
    share = CpuShare(4, read_stat=lambda: None)
    assert [share.threads() for _ in range(3)] == [4, 4, 4]


needs_kernels = pytest.mark.skipif(not kernels.available(), reason="the CPU kernels are not built")


@needs_kernels
def test_the_kernels_give_the_same_bits_with_one_thread_and_with_several():
    rng = np.random.default_rng(0)
    n = 3 * (1 << 16) + 17  # several blocks per thread, and a ragged end
    base = Stored("F32", rng.standard_normal(n).astype(np.float32))
    tuned = [Stored("F32", base.array + rng.standard_normal(n).astype(np.float32) * 0.01) for _ in range(3)]
    models = [
        kernels.ModelSlice(t, 1.0, kernels.DROP_AT_RANDOM, seed=7 + j, limit=kernels.random_keep_limit(0.3))
        for j, t in enumerate(tuned)
    ]
    library = kernels._library()
    results = []
    for threads in (1, 2, 3):
        library.tadrop_set_threads(threads)
        assert library.tadrop_max_threads() == threads
        hoyer = _with_threads_fixed(kernels.hoyer_sums, base, tuned)
        histogram = _with_threads_fixed(kernels.magnitude_histogram, base, tuned[0])
        merged, _ = _with_threads_fixed(kernels.merge_slice, base, models, 0, True, True, 3.0, 1.0)
        results.append((hoyer, histogram.tobytes(), merged.array.tobytes()))
    assert results[0] == results[1] == results[2]


def _with_threads_fixed(function, *args):
    """Call a kernel wrapper with the thread count left as set (no CpuShare in between)."""
    saved = kernels._cpu_share
    kernels._cpu_share = lambda: None
    try:
        return function(*args)
    finally:
        kernels._cpu_share = saved


@needs_kernels
def test_a_thread_count_the_user_set_is_kept(monkeypatch):
    kernels._cpu_share.cache_clear()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    try:
        assert kernels._cpu_share() is None
        monkeypatch.delenv("OMP_NUM_THREADS")
        kernels._cpu_share.cache_clear()
        assert (kernels._cpu_share() is None) == (kernels._library().tadrop_max_threads() <= 1)
    finally:
        kernels._cpu_share.cache_clear()


def test_torch_threads_follow_the_idle_cores_and_a_fixed_count_is_kept(monkeypatch):
    import torch

    saved = torch.get_num_threads()
    cpu_share._torch_share.cache_clear()
    cpu_share.torch_thread_limit.cache_clear()  # the starting limit is read again: 2, set below
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        share = cpu_share._torch_share()
        monkeypatch.setattr(share, "threads", lambda: 1)  # others hold all but one core
        cpu_share.fit_torch_threads()
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(share, "threads", lambda: 2)  # they left
        cpu_share.fit_torch_threads()
        assert torch.get_num_threads() == 2
        cpu_share._torch_share.cache_clear()
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert cpu_share._torch_share() is None
        cpu_share.fit_torch_threads()
        assert torch.get_num_threads() == 2
    finally:
        cpu_share._torch_share.cache_clear()
        cpu_share.torch_thread_limit.cache_clear()
        torch.set_num_threads(saved)


def test_fitting_torch_threads_never_imports_torch():
    code = "import sys; from tadrop_cli import cpu_share; cpu_share.fit_torch_threads(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
