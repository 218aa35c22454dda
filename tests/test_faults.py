"""Faults: merges killed at every stage, resume, disk full and write errors, dry runs, verification.

A kill never leaves a finished-looking model at the output path (the target is either what it
was before, or the complete, correct output), `--resume` finishes byte-identical to an
uninterrupted run, and a failed write cleans up after itself.

Kills land at exact points through hooks on the writer (`install_hooks`), used two ways:
in this process, raising KeyboardInterrupt where the SIGINT handler would (cheap, so every
point is tried); and in real `python -m tadrop_cli` processes run through a small wrapper
(`fault_wrapper.py`, written to the test's tmp folder) that sends itself SIGINT, SIGTERM or
SIGKILL at the point, or that only slows the writer down so that the test can signal it from
outside while it runs.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import REPO, basic_recipe, fine_tune, tiny_state, write_checkpoint, write_recipe
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tadrop_cli import kernels
from tadrop_cli import shards as shards_module
from tadrop_cli import staging as staging_module
from tadrop_cli.cli import app

TESTS = Path(__file__).resolve().parent
SHARD_SIZE = (
    "30KB"  # the tiny models make 9 tensors in 5 shards: [embed] [attn, bias] [mlp, norm] [attn, bias] [mlp, norm]
)


# ---------------------------------------------------------------- helpers


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def tree(root: Path) -> dict[str, str]:
    """Every path under root (hidden ones included) with a digest of its bytes."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        state[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return state


def looks_finished(folder: Path) -> bool:
    return folder.is_dir() and (
        (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists()
    )


def leftovers(parent: Path, name: str) -> list[str]:
    """Hidden work folders of tadrop beside the target."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.tadrop"))


def fault_recipe(models: dict[str, Path], target: Path, seed: int = 3) -> dict:
    """DARE-TIES (random drops: tests the seeding) with TADrop (a pass 1 and a saved plan), several shards."""
    recipe = basic_recipe(models, target, method="dare_ties")
    recipe["tadrop"] = {"strength": 0.3}
    recipe["seed"] = seed
    recipe["output"]["shard_size"] = SHARD_SIZE
    return recipe


@pytest.fixture
def setup(tiny_models, tmp_path):
    """(recipe path, target, reference tree of an uninterrupted run)."""
    target = tmp_path / "out" / "merged"
    recipe = write_recipe(tmp_path, fault_recipe(tiny_models, target))
    reference = tmp_path / "reference"
    result = invoke("merge", recipe, "--output", reference, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert len(list(reference.glob("model-*.safetensors"))) == 5
    return recipe, target, tree(reference)


@pytest.fixture
def previous(tiny_models, tmp_path, setup):
    """An earlier, different output already at the target (another seed), for --overwrite."""
    _, target, _ = setup
    other = write_recipe(tmp_path, fault_recipe(tiny_models, target, seed=99), "previous.yaml")
    result = invoke("merge", other, "--quiet")
    assert result.exit_code == 0, result.stderr
    return tree(target)


def install_hooks(point: str, action: Callable[[], None], setattr_: Callable = setattr, slow: float = 0.0) -> None:
    """Call `action` at `point` ("NAME:N": the Nth time the merge reaches NAME).

    NAME: score (pass 1, before scoring a tensor for TADrop), write / wrote (before / after
    appending a tensor to a shard), marked (after a shard is journaled complete), index
    (before writing the index), copy (before copying a config file), publish (before the
    move into place), exchanged (after the new output is swapped with the old one),
    renamed-old (after the old output is moved aside), renamed (after the new output is
    moved into place). `slow` sleeps before each tensor write.
    """
    from tadrop_cli import plan, shards, staging

    counts: dict[str, int] = {}

    def fire(name: str) -> None:
        counts[name] = counts.get(name, 0) + 1
        if point == f"{name}:{counts[name]}":
            action()

    def wrap(owner, attr, before: str | None = None, after: str | None = None, when=lambda *a: True):
        original = getattr(owner, attr)

        def hooked(*args, **kwargs):
            if before and when(*args):
                fire(before)
            result = original(*args, **kwargs)
            if after and when(*args):
                fire(after if isinstance(after, str) else after(*args))
            return result

        setattr_(owner, attr, hooked)

    original_write = shards.ShardWriter.write

    def write(self, name, tensor):
        fire("write")
        if slow:
            time.sleep(slow)
        original_write(self, name, tensor)
        fire("wrote")

    setattr_(shards.ShardWriter, "write", write)
    wrap(plan, "_tensor_scores", before="score")
    wrap(staging.StagingFolder, "mark_complete", after="marked")
    wrap(staging.StagingFolder, "write_json", before="index", when=lambda self, name, data: name.endswith("index.json"))
    wrap(staging.StagingFolder, "copy_in", before="copy")
    wrap(staging.StagingFolder, "publish", before="publish")
    wrap(staging, "exchange_paths", after="exchanged")
    wrap(os, "rename", after=lambda src, dst: "renamed-old" if str(dst).endswith(".tadrop-old") else "renamed")


WRAPPER = """\
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even when started in the background
sys.path.insert(0, {tests!r})
from test_faults import install_hooks
from tadrop_cli import cli
point, name = os.environ.get("FAULT_POINT", ""), os.environ.get("FAULT_SIGNAL", "SIGKILL")
install_hooks(point, lambda: os.kill(os.getpid(), getattr(signal, name)), slow=float(os.environ.get("FAULT_SLOW", "0")))
sys.argv = ["tadrop", *sys.argv[1:]]
cli.main()
"""


def wrapper(tmp_path: Path) -> Path:
    path = tmp_path / "fault_wrapper.py"
    path.write_text(WRAPPER.format(tests=str(TESTS)))
    return path


def start(tmp_path: Path, args: list, point: str = "", sig: str = "SIGKILL", slow: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "FAULT_POINT": point, "FAULT_SIGNAL": sig, "FAULT_SLOW": str(slow)}
    return subprocess.Popen(
        [sys.executable, str(wrapper(tmp_path)), *map(str, args)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def check_killed(returncode: int, stderr: str, sig: str) -> None:
    if sig == "SIGKILL":
        assert returncode == -signal.SIGKILL, (returncode, stderr)
    else:
        assert returncode == 130, (returncode, stderr)
        assert "Traceback" not in stderr, stderr
        assert "interrupted" in stderr and "--resume" in stderr, stderr


def check_target_after_kill(target: Path, before: dict | None, reference: dict) -> None:
    """Nothing finished-looking at the target, unless it is exactly the complete output."""
    if target.exists() and tree(target) == reference:
        return
    if before is None:
        assert not target.exists(), (
            f"an interrupted merge left {sorted(p.name for p in target.iterdir())} at the target"
        )
    else:
        assert target.exists() and tree(target) == before, (
            "an interrupted --overwrite merge damaged or removed the previous output"
        )


def resume_and_compare(recipe: Path, target: Path, reference: dict, *extra: str) -> None:
    result = invoke("merge", recipe, "--resume", "--quiet", *extra)
    assert result.exit_code == 0, f"{result.stderr}\n{result.exception!r}"
    assert tree(target) == reference, "the resumed merge differs from an uninterrupted one"
    assert leftovers(target.parent, target.name) == []


def interrupt() -> None:
    raise KeyboardInterrupt  # what the SIGINT / SIGTERM handlers do, at an exact point


# ---------------------------------------------------------------- kills, in this process, at every point

POINTS = [
    "score:1",
    "score:3",
    *(f"write:{i}" for i in range(1, 10)),
    "wrote:2",
    "wrote:4",
    "wrote:9",
    *(f"marked:{i}" for i in range(1, 6)),
    "index:1",
    "copy:1",
    "publish:1",
]


@pytest.mark.parametrize("point", POINTS)
def test_interrupt_at_every_point_then_resume(setup, monkeypatch, point):
    recipe, target, reference = setup
    with monkeypatch.context() as patch:
        install_hooks(point, interrupt, patch.setattr)
        result = invoke("merge", recipe, "--quiet")
    assert result.exit_code == 130, f"{point} never reached? {result.stderr}"
    assert "interrupted" in result.stderr
    check_target_after_kill(target, None, reference)
    assert not looks_finished(target)
    assert leftovers(target.parent, target.name) == [f".{target.name}.tadrop-partial"]  # kept for --resume
    resume_and_compare(recipe, target, reference)


@pytest.mark.parametrize(
    "point", ["write:1", "wrote:4", "marked:3", "index:1", "publish:1", "exchanged:1", "renamed-old:1"]
)
def test_interrupted_overwrite_keeps_the_previous_output(setup, previous, monkeypatch, point):
    recipe, target, reference = setup
    with monkeypatch.context() as patch:
        install_hooks(point, interrupt, patch.setattr)
        result = invoke("merge", recipe, "--overwrite", "--quiet")
    assert result.exit_code == 130, f"{point} never reached? {result.stderr}"
    check_target_after_kill(target, previous, reference)
    resume_and_compare(recipe, target, reference, "--overwrite")


@pytest.mark.parametrize("point", ["renamed-old:1", "renamed:1"])
def test_interrupted_overwrite_without_an_atomic_exchange(setup, previous, monkeypatch, point):
    """Where the system cannot swap two folders atomically, an interruption between the two
    renames puts the previous output back."""
    recipe, target, reference = setup
    with monkeypatch.context() as patch:
        patch.setattr(staging_module, "exchange_paths", lambda *args, **kwargs: False)
        install_hooks(point, interrupt, patch.setattr)
        result = invoke("merge", recipe, "--overwrite", "--quiet")
    assert result.exit_code == 130, f"{point} never reached? {result.stderr}"
    check_target_after_kill(target, previous, reference)
    resume_and_compare(recipe, target, reference, "--overwrite")


def test_rerun_without_resume_resumes_what_the_journal_proves(setup, monkeypatch):
    """Same recipe, inputs, version and device, checksums verified: the finished shards are kept, and a note says so."""
    recipe, target, reference = setup
    with monkeypatch.context() as patch:
        install_hooks("marked:2", interrupt, patch.setattr)
        assert invoke("merge", recipe, "--quiet").exit_code == 130
    result = invoke("merge", recipe, "--quiet", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["resumed_shards"] == 2
    assert any("resumed 2 finished shard" in note for note in summary["notes"]), summary["notes"]
    assert tree(target) == reference


def test_resume_reports_the_shards_it_kept(setup, monkeypatch):
    recipe, target, reference = setup
    with monkeypatch.context() as patch:
        install_hooks("marked:3", interrupt, patch.setattr)
        assert invoke("merge", recipe, "--quiet").exit_code == 130
    result = invoke("merge", recipe, "--resume", "--quiet", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["resumed_shards"] == 3
    assert tree(target) == reference


def test_resume_with_nothing_to_resume_is_a_normal_merge(setup):
    recipe, target, reference = setup
    resume_and_compare(recipe, target, reference)


def test_resume_refuses_a_partial_merge_of_another_recipe(setup, tiny_models, tmp_path, monkeypatch):
    recipe, target, reference = setup
    with monkeypatch.context() as patch:
        install_hooks("marked:2", interrupt, patch.setattr)
        assert invoke("merge", recipe, "--quiet").exit_code == 130
    changed = write_recipe(tmp_path, fault_recipe(tiny_models, target, seed=4), "changed.yaml")
    result = invoke("merge", changed, "--resume")
    assert result.exit_code == 2, result.stderr
    assert "resume" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not target.exists()
    del result  # the failed run's traceback holds its staging lock in this process; a real process exits
    gc.collect()
    resume_and_compare(recipe, target, reference)  # the partial merge was left alone


def test_a_second_merge_to_the_same_output_is_refused(setup):
    """While a merge holds the output's staging folder, another one stops with a message and touches nothing."""
    import fcntl

    recipe, target, reference = setup
    target.parent.mkdir(parents=True)
    with open(target.parent / f".{target.name}.tadrop-lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = tree(target.parent)
        result = invoke("merge", recipe, "--quiet")
        assert result.exit_code == 2, result.stderr
        assert "another" in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert tree(target.parent) == before
    del result
    gc.collect()
    resume_and_compare(recipe, target, reference)


def test_resume_does_not_publish_a_damaged_finished_shard(setup, monkeypatch):
    """A shard the journal lists as finished but that was damaged since is rewritten or refused, never published."""
    recipe, target, reference = setup
    with monkeypatch.context() as patch:
        install_hooks("marked:3", interrupt, patch.setattr)
        assert invoke("merge", recipe, "--quiet").exit_code == 130
    shard = target.parent / f".{target.name}.tadrop-partial" / "model-00002-of-00005.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    result = invoke("merge", recipe, "--resume", "--quiet")
    if result.exit_code == 0:
        assert tree(target) == reference, "--resume published a damaged shard"
    else:
        assert not looks_finished(target)


# ---------------------------------------------------------------- real processes, real signals

# Each real process costs ~2 s of CPU (importing torch), so a few points here; every point is tried in-process above.
REAL_POINTS = [("SIGKILL", "wrote:3")]


@pytest.mark.parametrize("sig,point", REAL_POINTS, ids=[f"{s}@{p}" for s, p in REAL_POINTS])
def test_real_process_killed_at_a_point(setup, tmp_path, sig, point):
    recipe, target, reference = setup
    proc = start(tmp_path, ["merge", recipe, "--quiet"], point, sig)
    _, stderr = proc.communicate(timeout=120)
    check_killed(proc.returncode, stderr, sig)
    check_target_after_kill(target, None, reference)
    assert not looks_finished(target)
    resume_and_compare(recipe, target, reference)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_real_process_signalled_from_outside(setup, tmp_path, sig):
    """Signal a running merge (slowed down to ~1.5 s) from outside once two shards are done."""
    recipe, target, reference = setup
    proc = start(tmp_path, ["merge", recipe, "--quiet"], slow=0.15)
    journal = target.parent / f".{target.name}.tadrop-partial" / "progress.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(json.loads(journal.read_text())["shards"]) >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "the merge finished before it could be signalled"
    proc.send_signal(getattr(signal, sig))
    _, stderr = proc.communicate(timeout=60)
    check_killed(proc.returncode, stderr, sig)
    check_target_after_kill(target, None, reference)
    assert not looks_finished(target)
    resume_and_compare(recipe, target, reference)


@pytest.mark.parametrize("point", ["renamed-old:1"])
def test_real_process_killed_during_overwrite(setup, previous, tmp_path, point):
    recipe, target, reference = setup
    proc = start(tmp_path, ["merge", recipe, "--overwrite", "--quiet"], point, "SIGKILL")
    _, stderr = proc.communicate(timeout=120)
    check_killed(proc.returncode, stderr, "SIGKILL")
    check_target_after_kill(target, previous, reference)
    resume_and_compare(recipe, target, reference, "--overwrite")


# ---------------------------------------------------------------- disk full, write errors


class _Disk:
    """Counts the bytes the writer writes; raises ENOSPC once `limit` would be passed."""

    def __init__(self, limit: float = math.inf):
        self.limit = limit
        self.written = 0
        self.events: list[tuple[str, int]] = []  # (file name, offset where its first write started)

    def open(self, file, mode="r", *args, **kwargs):
        handle = open(file, mode, *args, **kwargs)
        if "w" not in mode and "a" not in mode:
            return handle
        disk = self

        class Full:
            def __init__(self):
                self._started = False

            def write(self, data):
                if not self._started:
                    disk.events.append((Path(file).name, disk.written))
                    self._started = True
                size = len(data) if not isinstance(data, memoryview) else data.nbytes
                if disk.written + size > disk.limit:
                    room = int(disk.limit - disk.written)
                    if room > 0:
                        handle.write(data[:room])
                        disk.written += room
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                disk.written += size
                return handle.write(data)

            def __getattr__(self, name):
                return getattr(handle, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                handle.close()

        return Full()


def patch_writes(patch, disk: _Disk) -> None:
    """Every file tadrop writes goes through `disk`: the shards' and the staging folder's open()."""
    for module in (shards_module, staging_module):
        patch.setattr(module, "open", disk.open, raising=False)


def _write_points(recipe: Path, target: Path, monkeypatch) -> list[int]:
    """Byte counts at which each file's writing starts, and mid-way through each shard."""
    disk = _Disk()
    with monkeypatch.context() as patch:
        patch_writes(patch, disk)
        assert invoke("merge", recipe, "--quiet", "--output", target.parent / "probe").exit_code == 0
    starts = [offset for _, offset in disk.events]
    ends = starts[1:] + [disk.written]
    points = set(starts)
    points |= {(a + b) // 2 for (name, a), b in zip(disk.events, ends, strict=True) if name.endswith(".safetensors")}
    points.add(disk.written - 1)
    shutil.rmtree(target.parent / "probe")
    return sorted(points)


def check_write_failure(result, target: Path, before_parent: dict, words: tuple[str, ...]) -> None:
    text = f"exit {result.exit_code}; stderr {result.stderr!r}; {result.exception!r}"
    assert result.exit_code == 1, text
    assert result.exception is None or isinstance(result.exception, SystemExit), text
    assert "Traceback" not in result.output, text
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    assert any(word in lines[0] for word in words), text
    assert tree(target.parent) == before_parent, (
        f"temporary files left behind: {sorted(set(tree(target.parent)) ^ set(before_parent))}\n{text}"
    )


@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_disk_full_at_every_write(setup, tiny_models, tmp_path, monkeypatch, overwrite):
    recipe, target, reference = setup
    target.parent.mkdir(parents=True, exist_ok=True)
    points = _write_points(recipe, target, monkeypatch)
    if overwrite:
        invoke("merge", write_recipe(tmp_path, fault_recipe(tiny_models, target, seed=99), "previous.yaml"), "--quiet")
    assert len(points) >= 12
    failures = []
    for limit in points:
        before = tree(target.parent)
        disk = _Disk(limit)
        with monkeypatch.context() as patch:
            patch_writes(patch, disk)
            result = invoke("merge", recipe, *(["--overwrite"] if overwrite else []))
        try:
            check_write_failure(result, target, before, ("no space left",))
        except AssertionError as error:
            where = disk.events[-1][0] if disk.events else "?"
            failures.append(f"disk full after {limit} bytes (writing {where}): {str(error).splitlines()[0]}")
            shutil.rmtree(target.parent / f".{target.name}.tadrop-partial", ignore_errors=True)
    assert not failures, f"{len(failures)} of {len(points)} disk-full points failed:\n" + "\n".join(failures)
    resume_and_compare(recipe, target, reference, *(["--overwrite"] if overwrite else []))


@pytest.mark.parametrize("call", [1, 2, 4, 7])
def test_fsync_error(setup, monkeypatch, call):
    """An I/O error on flushing a shard or the journal stops the merge with a message and no leftovers."""
    recipe, target, reference = setup
    target.parent.mkdir(parents=True, exist_ok=True)
    before = tree(target.parent)
    calls = []
    real = os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) == call:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", fsync)
        result = invoke("merge", recipe)
    check_write_failure(result, target, before, ("write failed", "Input/output error"))


def test_config_copy_fails(setup, monkeypatch):
    recipe, target, reference = setup
    target.parent.mkdir(parents=True, exist_ok=True)
    before = tree(target.parent)

    def copyfileobj(src, dst, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(shutil, "copyfileobj", copyfileobj)
        result = invoke("merge", recipe)
    check_write_failure(result, target, before, ("no space left",))


def test_real_full_tmpfs(setup, tmp_path):
    """A real small filesystem that fills up mid-merge (needs root and mount; skipped otherwise)."""
    recipe, _, reference = setup
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("cannot run mount")
    if done.returncode != 0:
        pytest.skip(f"mount not permitted: {done.stderr.decode().strip()}")
    try:
        target = mnt / "merged"
        before = tree(mnt)
        result = invoke("merge", recipe, "--output", target)
        check_write_failure(result, target, before, ("no space left",))
        assert list(mnt.iterdir()) == []
    finally:
        # A failed run's traceback (kept by the test runner) can hold a deleted file open on the mount.
        result = None
        gc.collect()
        if subprocess.run(["umount", str(mnt)], capture_output=True, timeout=20).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=20)


# ---------------------------------------------------------------- verification after writing, `tadrop verify`


@pytest.mark.parametrize("damage", ["nan", "short"])
def test_output_is_verified_before_publishing(setup, monkeypatch, damage):
    """A writer that writes wrong bytes (NaN, or too few) must not publish a finished-looking model."""
    recipe, target, _ = setup
    real = shards_module.tensor_bytes

    def tensor_bytes(tensor):  # a tensor, or the CPU kernels' Stored entries
        tensor = tensor if isinstance(tensor, torch.Tensor) else tensor.to_torch()
        if tensor.numel() == 96 * 64:  # the mlp weights
            if damage == "nan":
                return real(torch.full_like(tensor, math.nan))
            return real(tensor)[:-8]
        return real(tensor)

    with monkeypatch.context() as patch:
        patch.setattr(shards_module, "tensor_bytes", tensor_bytes)
        result = invoke("merge", recipe, "--quiet")
    assert result.exit_code != 0, "a damaged output was published"
    assert not looks_finished(target) and not target.exists()
    assert "Traceback" not in result.output
    assert leftovers(target.parent, target.name) == []


def test_verify_a_good_checkpoint(setup, tiny_models):
    recipe, target, _ = setup
    assert invoke("merge", recipe, "--quiet").exit_code == 0
    for checkpoint in (target, tiny_models["base"], tiny_models["base"] / "model.safetensors"):
        result = invoke("verify", checkpoint, "--json")
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["tensors"] == 9


def _verify_bad(path: Path, *culprits: str) -> None:
    result = invoke("verify", path)
    assert result.exit_code == 2, f"{result.stderr}\n{result.exception!r}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    for culprit in culprits:
        assert culprit in lines[0], result.stderr


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("with_kernels", [True, False])
def test_verify_names_a_tensor_with_nan_or_inf(tmp_path, monkeypatch, value, dtype, with_kernels):
    """Found by the CPU kernels (safetensors F32/F16/BF16) and by PyTorch (the rest, or without the kernels)."""
    if with_kernels and not kernels.available():
        pytest.skip("the C kernels were not built")
    if not with_kernels:
        monkeypatch.setattr(kernels, "_library", lambda: None)
    state = tiny_state()
    state["model.layers.1.attn.weight"][5, 5] = value
    folder = write_checkpoint(tmp_path / "ckpt", state, dtype=dtype, shards=2)
    _verify_bad(folder, "model.layers.1.attn.weight")
    assert invoke("verify", write_checkpoint(tmp_path / "clean", tiny_state(), dtype=dtype, shards=2)).exit_code == 0


@pytest.mark.parametrize("damage", ["truncated", "missing-shard", "garbage-header", "empty-index"])
def test_verify_names_a_damaged_file(tmp_path, damage):
    folder = write_checkpoint(tmp_path / "ckpt", tiny_state(), shards=3)
    shard = folder / "model-00002-of-00003.safetensors"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-500])
        _verify_bad(folder, shard.name)
    elif damage == "missing-shard":
        shard.unlink()
        _verify_bad(folder, shard.name)
    elif damage == "garbage-header":
        shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{{{{{{{{{{{{{{{{" + b"\x00" * 64)
        _verify_bad(folder, shard.name)
    else:
        (folder / "model.safetensors.index.json").write_text("")
        _verify_bad(folder, "model.safetensors.index.json")


def test_verify_a_missing_path(tmp_path):
    _verify_bad(tmp_path / "nowhere", "nowhere")


def test_verify_an_output_with_a_nan_written_by_someone_else(setup):
    recipe, target, _ = setup
    assert invoke("merge", recipe, "--quiet").exit_code == 0
    shard = target / "model-00005-of-00005.safetensors"
    state = load_file(str(shard))
    name = next(n for n in state if n.endswith("mlp.weight"))
    state[name][0, 0] = math.nan
    save_file(state, str(shard), metadata={"format": "pt"})
    _verify_bad(target, name)


# ---------------------------------------------------------------- dry runs


def test_dry_run_reports_without_writing(setup, tmp_path):
    recipe, target, reference = setup
    before = tree(tmp_path)
    result = invoke("merge", recipe, "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    assert tree(tmp_path) == before, "the dry run wrote something"
    summary = json.loads(result.stdout)
    shards = sorted(name for name in reference if name.startswith("model-"))
    assert sorted(summary["shard_files"]) == shards and summary["shards"] == len(shards)
    assert summary["tensors"] == 9 and summary["output"] == str(target) and summary["tadrop"] is True
    data_bytes = sum(
        sum(t.numel() * t.element_size() for t in load_file(str(tmp_path / "reference" / s)).values()) for s in shards
    )
    assert summary["bytes_to_write"] == data_bytes
    assert summary["bytes_to_read"] >= 4 * data_bytes  # base + three models, at least once
    assert summary["estimated_peak_memory_bytes"] > 0 and summary["estimated_seconds"] >= 0
    assert isinstance(summary["notes"], list)
    human = invoke("merge", recipe, "--dry-run")
    assert human.exit_code == 0 and "dry run" in human.stderr and "shard" in human.stderr, human.stderr
    assert tree(tmp_path) == before


def test_dry_run_reads_no_tensor_data(setup, monkeypatch):
    from tadrop_cli import checkpoint

    recipe, _, _ = setup

    def refuse(*args, **kwargs):
        raise AssertionError("the dry run read tensor data")

    monkeypatch.setattr(checkpoint.Checkpoint, "read", refuse)  # every tensor read goes through it
    result = invoke("merge", recipe, "--dry-run", "--json")
    assert result.exit_code == 0, f"{result.stderr}\n{result.exception!r}"
    assert json.loads(result.stdout)["tensors"] == 9


@pytest.mark.parametrize(
    "problem", ["shape", "missing-shard", "truncated", "dtype", "bad-policy", "output-not-a-model"]
)
def test_dry_run_validates(tiny_models, tmp_path, problem):
    target = tmp_path / "merged"
    recipe = fault_recipe(tiny_models, target)
    ft1 = tiny_models["ft1"] / "model.safetensors"
    if problem == "shape":
        state = load_file(str(ft1))
        state["model.layers.0.attn.weight"] = torch.zeros(32, 128)
        save_file(state, str(ft1))
        culprit = "model.layers.0.attn.weight"
    elif problem == "missing-shard":
        folder = write_checkpoint(tmp_path / "sharded", fine_tune(tiny_state(), 9), shards=3)
        (folder / "model-00003-of-00003.safetensors").unlink()
        recipe["models"][0]["model"] = str(folder)
        culprit = "model-00003-of-00003.safetensors"
    elif problem == "truncated":
        ft1.write_bytes(ft1.read_bytes()[:-64])
        culprit = str(ft1)
    elif problem == "dtype":
        state = load_file(str(ft1))
        state["model.embed.weight"] = state["model.embed.weight"].to(torch.float8_e5m2)
        save_file(state, str(ft1))
        culprit = "model.embed.weight"
    elif problem == "bad-policy":
        recipe["policies"] = {"shape_mismatch": "average"}
        culprit = "shape_mismatch"
    else:  # an existing output is a note in a dry run (test_hostile_output); one no merge may replace is refused
        target.mkdir()
        (target / "notes.txt").write_text("mine")
        culprit = str(target)
    path = write_recipe(tmp_path, recipe)
    before = tree(tmp_path)
    result = invoke("merge", path, "--dry-run", "--json")
    assert result.exit_code == 2, f"{result.stderr}\n{result.exception!r}"
    assert culprit in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == ""
    assert tree(tmp_path) == before
