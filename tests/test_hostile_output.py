"""A hostile or unlucky file system around the output: links planted where tadrop works, inputs that
change between a merge and its resume, damaged finished shards, two merges to one output, an
--overwrite onto a folder that holds no model, output paths no merge could use, single-file inputs,
resuming a published merge, dry runs of an existing output, and an input cut short (SIGBUS).

The promise under test: nothing is ever written through a link tadrop did not create, nothing that is
not a model output is ever removed, a published output is always one merge's complete, verified
result of the inputs as they are, and bad places fail at once with one line and exit 2.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, basic_recipe, fine_tune, tiny_state, write_checkpoint, write_recipe
from safetensors.torch import save_file
from test_faults import (
    TESTS,
    fault_recipe,
    install_hooks,
    interrupt,
    invoke,
    leftovers,  # noqa: F401
    previous,
    setup,
    tree,
)

from tadrop_cli import journal as journal_module
from tadrop_cli import run

__all__ = ["previous", "setup"]  # fixtures, used by name


def staging_of(target: Path) -> Path:
    return target.parent / f".{target.name}.tadrop-partial"


def one_line_error(result, code: int = 2) -> str:
    text = f"exit {result.exit_code}; stderr {result.stderr!r}; {result.exception!r}"
    assert result.exit_code == code, text
    assert "Traceback" not in result.output and "internal error" not in result.stderr, text
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    return lines[0]


def interrupted_after(recipe: Path, point: str, monkeypatch, *extra: str) -> None:
    with monkeypatch.context() as patch:
        install_hooks(point, interrupt, patch.setattr)
        result = invoke("merge", recipe, "--quiet", *extra)
    assert result.exit_code == 130, f"{point} never reached? {result.stderr}"


def victim_folder(root: Path) -> tuple[Path, dict]:
    """Someone's folder of documents, and its state."""
    victim = root / "documents"
    victim.mkdir(parents=True)
    (victim / "thesis.txt").write_text("years of work")
    (victim / "model.safetensors").write_text("not mine to replace")  # same names as tadrop's files
    (victim / "progress.json").write_text("{}")
    return victim, tree(victim)


# ---------------------------------------------------------------- links planted where tadrop works


def test_a_staging_folder_that_is_a_link_is_refused(setup, tmp_path):
    recipe, target, _ = setup
    victim, before = victim_folder(tmp_path)
    target.parent.mkdir(parents=True)
    staging_of(target).symlink_to(victim, target_is_directory=True)
    line = one_line_error(invoke("merge", recipe, "--quiet"))
    assert str(staging_of(target)) in line and "link" in line
    assert tree(victim) == before, "the merge wrote through the planted link"
    assert staging_of(target).is_symlink() and not os.path.lexists(target)


def test_a_staging_folder_that_is_not_tadrops_is_refused_not_emptied(setup, tmp_path):
    recipe, target, _ = setup
    staging = staging_of(target)
    staging.mkdir(parents=True)
    (staging / "thesis.txt").write_text("years of work")
    before = tree(staging)
    for args in (["--quiet"], ["--resume", "--quiet"], ["--dry-run"]):
        line = one_line_error(invoke("merge", recipe, *args))
        assert str(staging) in line and "not a tadrop partial merge" in line
        assert tree(staging) == before
    assert not os.path.lexists(target)


@pytest.mark.parametrize(
    "planted", ["progress.json.tmp", "model-00004-of-00005.safetensors", "model.safetensors.index.json", "config.json"]
)
def test_files_in_the_staging_folder_are_never_opened_through_links(setup, tmp_path, monkeypatch, planted):
    """A link planted in the staging folder while the merge runs (a journal's temporary, a shard not
    written yet, the index, a config file) is never written through: each file is created new."""
    recipe, target, reference = setup
    secret = tmp_path / "elsewhere.txt"
    secret.write_text("untouched")
    with monkeypatch.context() as patch:
        install_hooks("marked:3", lambda: (staging_of(target) / planted).symlink_to(secret), patch.setattr)
        result = invoke("merge", recipe, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert secret.read_text() == "untouched"
    assert tree(target) == reference


def test_a_lock_file_that_is_a_link_is_refused(setup, tmp_path):
    recipe, target, _ = setup
    secret = tmp_path / "elsewhere.txt"
    secret.write_text("untouched")
    target.parent.mkdir(parents=True)
    lock = target.parent / f".{target.name}.tadrop-lock"
    lock.symlink_to(secret)
    line = one_line_error(invoke("merge", recipe, "--quiet"))
    assert str(lock) in line
    assert secret.read_text() == "untouched" and lock.is_symlink() and not os.path.lexists(target)


def test_an_output_that_is_a_dangling_link_is_refused(setup, tmp_path):
    recipe, target, _ = setup
    target.parent.mkdir(parents=True)
    nowhere = tmp_path / "nowhere"
    target.symlink_to(nowhere)
    for extra in ([], ["--overwrite"], ["--dry-run"]):
        line = one_line_error(invoke("merge", recipe, "--quiet", *extra))
        assert str(target) in line and "link" in line
    assert not os.path.lexists(nowhere) and target.is_symlink()


def test_overwrite_never_replaces_through_a_link(setup, previous, tmp_path):
    """An output that is a link to a folder (here a previous output) is not replaced through the link."""
    recipe, target, _ = setup
    moved = tmp_path / "moved"
    target.rename(moved)
    target.symlink_to(moved, target_is_directory=True)
    line = one_line_error(invoke("merge", recipe, "--overwrite", "--quiet"))
    assert str(target) in line and "link" in line
    assert tree(moved) == previous and target.is_symlink()


def test_an_output_left_in_the_staging_folder_by_an_interrupted_publish_is_removed(setup, previous, tmp_path):
    """Killed between the atomic swap and moving the old output aside, a publish leaves the old output
    (a model output, no journal) at the staging name: the next run removes it, with a note."""
    recipe, target, reference = setup
    staging_of(target).mkdir()
    for name in previous:
        (staging_of(target) / name).write_bytes((target / name).read_bytes())
    result = invoke("merge", recipe, "--overwrite", "--json")
    assert result.exit_code == 0, result.stderr
    assert any("interrupted publish" in note for note in json.loads(result.stdout)["notes"])
    assert tree(target) == reference and leftovers(target.parent, target.name) == []


# ---------------------------------------------------------------- --resume trusts nothing it cannot prove


def changed_fine_tune(path: Path, seed: int = 77) -> None:
    """Rewrite a fine-tune with the same tensor names and shapes and other values."""
    file = path / "model.safetensors"
    save_file(fine_tune(tiny_state(), seed), str(file), metadata={"format": "pt"})


def test_resume_refuses_changed_inputs_and_a_rerun_starts_over(setup, tiny_models, tmp_path, monkeypatch):
    recipe, target, reference = setup
    interrupted_after(recipe, "marked:2", monkeypatch)
    changed_fine_tune(tiny_models["ft1"])
    line = one_line_error(invoke("merge", recipe, "--resume", "--quiet"))
    assert str(tiny_models["ft1"] / "model.safetensors") in line and "without --resume" in line
    assert not target.exists()
    result = invoke("merge", recipe, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["resumed_shards"] == 0
    assert any("discarded" in note and "model.safetensors" in note for note in summary["notes"]), summary["notes"]
    fresh = tmp_path / "fresh"
    assert invoke("merge", recipe, "--output", fresh, "--quiet").exit_code == 0
    assert tree(target) == tree(fresh) != reference  # all of it from the new inputs


def test_an_input_changed_during_the_merge_is_never_published(setup, tiny_models, monkeypatch):
    recipe, target, _ = setup
    with monkeypatch.context() as patch:
        install_hooks("marked:2", lambda: changed_fine_tune(tiny_models["ft2"]), patch.setattr)
        result = invoke("merge", recipe, "--quiet")
    line = one_line_error(result)
    assert str(tiny_models["ft2"] / "model.safetensors") in line and "during the merge" in line
    assert not target.exists() and leftovers(target.parent, target.name) == []


@pytest.mark.parametrize("damage", ["nan", "zeros", "one-bit"])
def test_a_damaged_finished_shard_is_redone(setup, monkeypatch, damage):
    """Same size and header, other data: the journal's checksum finds it; it is redone and a note says so."""
    recipe, target, reference = setup
    interrupted_after(recipe, "marked:3", monkeypatch)
    shard = staging_of(target) / "model-00002-of-00005.safetensors"
    data = bytearray(shard.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    if damage == "nan":
        data[header : header + 64] = torch.full((16,), math.nan).numpy().tobytes()
    elif damage == "zeros":
        data[header:] = bytes(len(data) - header)
    else:
        data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    result = invoke("merge", recipe, "--resume", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["resumed_shards"] == 2
    notes = summary["notes"]
    assert any("model-00002-of-00005.safetensors" in note and "redone" in note for note in notes), notes
    assert tree(target) == reference


def test_a_changed_saved_plan_starts_over(setup, monkeypatch):
    recipe, target, reference = setup
    interrupted_after(recipe, "marked:3", monkeypatch)
    plan = staging_of(target) / "plan.json"
    plan.write_text(plan.read_text().replace("0.", "0.1", 1))
    result = invoke("merge", recipe, "--resume", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["resumed_shards"] == 0
    assert tree(target) == reference


def test_file_identity_samples_a_large_file(tmp_path, monkeypatch):
    """Small files are hashed whole; a large one by its header and evenly spread blocks, with size and
    modification time (a change that keeps both and misses every block is not seen: documented)."""
    monkeypatch.setattr(journal_module, "FULL_HASH_BYTES", 1 << 16)
    monkeypatch.setattr(journal_module, "SAMPLE_BYTES", 1 << 12)
    monkeypatch.setattr(journal_module, "SAMPLES", 8)
    file = tmp_path / "big.safetensors"
    size = 1 << 20
    file.write_bytes((64).to_bytes(8, "little") + b"{" * 64 + bytes(size - 72))
    first = journal_module.file_identity(file)
    assert first["hashed"] == "sampled" and first["size"] == size

    def poke(offset: int) -> dict:
        stat = file.stat()
        data = bytearray(file.read_bytes())
        data[offset] ^= 0xFF
        file.write_bytes(bytes(data))
        os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the modification time put back
        identity = journal_module.file_identity(file)
        data[offset] ^= 0xFF
        file.write_bytes(bytes(data))
        os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        return identity

    step = (size - (1 << 12)) / 7
    assert poke(20)["sha256"] != first["sha256"]  # the header
    assert poke(int(3 * step) + 100)["sha256"] != first["sha256"]  # a sampled block
    assert poke(size - 1)["sha256"] != first["sha256"]  # the last block
    assert poke(int(step / 2))["sha256"] == first["sha256"]  # between blocks: the documented limit
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 1000)
    assert journal_module.file_identity(small)["hashed"] == "whole"


# ---------------------------------------------------------------- two merges to one output

RACE_WRAPPER = """\
import os, sys, time
sys.path.insert(0, {tests!r})
from tadrop_cli import cli, staging
def delayed(original):
    def call(*args, **kwargs):
        if not os.path.exists({marker!r}):
            open({marker!r}, "w").close()
            time.sleep(float(os.environ["PUBLISH_DELAY"]))
        return original(*args, **kwargs)
    return call
os.rename = delayed(os.rename)  # the move into place, with the journal already gone
if hasattr(staging, "_renameat2"):
    staging._renameat2 = delayed(staging._renameat2)
sys.argv = ["tadrop", *sys.argv[1:]]
cli.main()
"""


def test_a_second_merge_while_the_first_publishes_is_refused(setup, tmp_path):
    """The lock (beside the target, not inside the folder being renamed) is held until the output is in
    place: a second merge started while the first moves its output into place stops with one line and
    touches nothing."""
    recipe, target, reference = setup
    marker = tmp_path / "publishing"
    script = tmp_path / "race_wrapper.py"
    script.write_text(RACE_WRAPPER.format(tests=str(TESTS), marker=str(marker)))
    first = subprocess.Popen(
        [sys.executable, str(script), "merge", str(recipe), "--quiet"],
        cwd=REPO,
        env={**os.environ, "PUBLISH_DELAY": "4"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 90
    while not marker.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), first.communicate()
    second = invoke("merge", recipe, "--quiet", "--overwrite")
    line = one_line_error(second)
    assert "another tadrop merge" in line and str(target) in line
    _, stderr = first.communicate(timeout=90)
    assert first.returncode == 0, stderr
    assert tree(target) == reference and leftovers(target.parent, target.name) == []


# ---------------------------------------------------------------- --overwrite replaces only a model output


@pytest.mark.parametrize("content", ["documents", "a-subfolder", "a-link", "weights-without-index"])
def test_overwrite_refuses_a_folder_that_holds_no_model(setup, tmp_path, content):
    recipe, target, _ = setup
    target.mkdir(parents=True)
    if content == "documents":
        (target / "thesis.txt").write_text("years of work")
    elif content == "a-subfolder":  # a model folder with more in it: replacing would delete the rest
        save_file({"x": torch.ones(2)}, str(target / "model.safetensors"))
        (target / "model.safetensors.index.json").write_text("{}")
        (target / "photos").mkdir()
        (target / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    elif content == "a-link":
        (target / "thesis.txt").symlink_to(tmp_path / "recipe.yaml")
    else:  # someone's safetensors, neither indexed nor tadrop's
        save_file({"x": torch.ones(2)}, str(target / "weights.safetensors"))
    before = tree(target)
    for extra in (["--overwrite"], ["--overwrite", "--dry-run"], []):
        line = one_line_error(invoke("merge", recipe, "--quiet", *extra))
        assert str(target) in line
        assert tree(target) == before
    assert leftovers(target.parent, target.name) == []


@pytest.mark.parametrize("content", ["empty", "indexed", "tadrop-single-file"])
def test_overwrite_replaces_a_model_output(setup, tmp_path, tiny_models, content):
    recipe, target, reference = setup
    if content == "tadrop-single-file":
        single = write_recipe(tmp_path, basic_recipe(tiny_models, target), "single.yaml")
        assert invoke("merge", single, "--quiet").exit_code == 0
        assert (target / "model.safetensors").is_file()
    elif content == "indexed":
        write_checkpoint(target, tiny_state(), shards=2)
    else:
        target.mkdir(parents=True)
    result = invoke("merge", recipe, "--overwrite", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert tree(target) == reference


# ---------------------------------------------------------------- places no merge could use: refused before it starts


def _no_merge(*args, **kwargs):
    raise AssertionError("the merge started")


LONG = "x" * 300


@pytest.mark.parametrize(
    "case",
    [
        "dangling-parent",
        "dot",
        "old-is-a-link",
        "parent-is-a-file",
        "link-loop",
        "output-is-a-link-loop",
        "long-name",
        "long-path",
        "nul",
        "no-such-user",
        "dotdot",
        "name-too-long-for-staging",
    ],
)
def test_an_unusable_output_is_refused_before_merging(setup, previous, tmp_path, monkeypatch, case):
    recipe, target, _ = setup
    extra = ["--overwrite"]
    output = None
    culprit = None
    if case == "dangling-parent":
        (tmp_path / "gone").symlink_to(tmp_path / "never-made")
        output = tmp_path / "gone" / "merged"
        culprit = str(tmp_path / "gone")
    elif case == "dot":
        output = Path(".")
    elif case == "dotdot":
        (tmp_path / "elsewhere" / "sub").mkdir(parents=True)
        output = tmp_path / "elsewhere" / "sub" / ".."
    elif case == "old-is-a-link":
        (tmp_path / "keep").mkdir()
        (tmp_path / "keep" / "file.txt").write_text("keep")
        (target.parent / f".{target.name}.tadrop-old").symlink_to(tmp_path / "keep", target_is_directory=True)
        culprit = f".{target.name}.tadrop-old"
    elif case == "parent-is-a-file":
        (tmp_path / "plain").write_text("a file")
        output = tmp_path / "plain" / "merged"
        culprit = str(tmp_path / "plain")
    elif case == "link-loop":
        (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
        (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
        output = tmp_path / "loop-a" / "merged"
    elif case == "output-is-a-link-loop":
        (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
        (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
        output = tmp_path / "loop-a"
    elif case == "long-name":
        output = tmp_path / LONG / "merged"
    elif case == "name-too-long-for-staging":
        output = tmp_path / ("y" * 245)
    elif case == "long-path":
        output = tmp_path.joinpath(*["d" * 200] * 25)
    elif case == "nul":
        data = yaml.safe_load(recipe.read_text())
        data["output"]["path"] = str(tmp_path / "a\x00b")
        recipe = write_recipe(tmp_path, data, "nul.yaml")
        culprit = "NUL"
    else:
        output = Path("~no-such-user-tadrop/x")
        culprit = "~no-such-user-tadrop"
    args = ["merge", recipe, "--quiet", *extra, *(["--output", output] if output is not None else [])]
    before = tree(tmp_path)
    monkeypatch.setattr(run, "_merge_into", _no_merge)
    line = one_line_error(invoke(*args))
    if culprit:
        assert culprit in line, line
    assert tree(tmp_path) == before
    assert tree(target) == previous


# ---------------------------------------------------------------- single-file inputs


def test_single_file_inputs_with_the_output_beside_them(tmp_path):
    folder = tmp_path / "zoo"
    folder.mkdir()
    base = tiny_state()
    files = {"base": folder / "base.safetensors"}
    save_file(base, str(files["base"]))
    for i in range(2):
        files[f"ft{i}"] = folder / f"ft{i}.safetensors"
        save_file(fine_tune(base, i), str(files[f"ft{i}"]))
    recipe = write_recipe(tmp_path, basic_recipe(files, folder / "merged"))
    result = invoke("merge", recipe, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert (folder / "merged" / "model.safetensors").is_file()
    for output, word in ((folder / "base.safetensors", "input"), (folder, "holds the input")):
        line = one_line_error(invoke("merge", recipe, "--quiet", "--overwrite", "--output", output))
        assert word in line and str(output) in line
    assert all(file.is_file() for file in files.values())


# ---------------------------------------------------------------- resume messages


def test_resume_of_a_published_merge_says_it_is_complete(setup, tiny_models, tmp_path):
    recipe, target, reference = setup
    assert invoke("merge", recipe, "--quiet").exit_code == 0
    result = invoke("merge", recipe, "--resume", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert any("already complete" in note for note in summary["notes"]), summary["notes"]
    assert tree(target) == reference and leftovers(target.parent, target.name) == []
    other = write_recipe(tmp_path, fault_recipe(tiny_models, target, seed=5), "other.yaml")
    line = one_line_error(invoke("merge", other, "--resume", "--quiet"))
    assert "output exists" in line
    assert tree(target) == reference


def test_resume_refuses_a_journal_of_an_older_tadrop(setup, monkeypatch):
    recipe, target, reference = setup
    interrupted_after(recipe, "marked:2", monkeypatch)
    older = {"recipe_digest": "x", "completed": ["model-00001-of-00005.safetensors"]}
    (staging_of(target) / "progress.json").write_text(json.dumps(older))
    line = one_line_error(invoke("merge", recipe, "--resume", "--quiet"))
    assert "older tadrop" in line and "without --resume" in line
    result = invoke("merge", recipe, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["resumed_shards"] == 0, result.stderr
    assert tree(target) == reference


# ---------------------------------------------------------------- dry runs


def test_a_dry_run_notes_an_existing_output(setup, previous, tmp_path):
    recipe, target, _ = setup
    before = tree(tmp_path)
    for extra, words in (([], "needs --overwrite"), (["--overwrite"], "would replace")):
        result = invoke("merge", recipe, "--dry-run", "--json", *extra)
        assert result.exit_code == 0, result.stderr
        summary = json.loads(result.stdout)
        assert any(words in note and str(target) in note for note in summary["notes"]), summary["notes"]
        assert summary["shards"] == 5 and len(summary["shard_files"]) == 5
    assert tree(tmp_path) == before


def test_dry_run_and_merge_report_shards_alike(setup, tmp_path):
    recipe, target, _ = setup
    dry = json.loads(invoke("merge", recipe, "--dry-run", "--json").stdout)
    done = json.loads(invoke("merge", recipe, "--json", "--quiet").stdout)
    assert dry["shards"] == done["shards"] == 5
    assert dry["shard_files"] == done["shard_files"] == sorted(p.name for p in target.glob("model-*.safetensors"))


# ---------------------------------------------------------------- an input cut short during a mapped merge

SIGBUS_WRAPPER = """\
import os, sys, time
sys.path.insert(0, {tests!r})
from tadrop_cli import cli, shards
original = shards.ShardWriter.write
def write(self, name, tensor):
    time.sleep(0.2)
    original(self, name, tensor)
shards.ShardWriter.write = write
sys.argv = ["tadrop", *sys.argv[1:]]
cli.main()
"""


def test_an_input_cut_short_during_a_mapped_merge(tiny_models, tmp_path):
    """The CPU kernels read mapped pages: a cut-short input ends the process (SIGBUS) or, where the
    pages read were still there, is found before publishing. Either way nothing is published, no shard
    of the run counts as finished for the changed input, and a resume refuses until the input is back."""
    from tadrop_cli import kernels

    if not kernels.available():
        pytest.skip("the C kernels were not built: no mapped merge")
    target = tmp_path / "out" / "merged"
    data = basic_recipe(tiny_models, target, method="task_arithmetic")
    data["output"]["shard_size"] = "30KB"
    recipe = write_recipe(tmp_path, data)
    reference = tmp_path / "reference"
    assert invoke("merge", recipe, "--output", reference, "--quiet").exit_code == 0
    script = tmp_path / "sigbus_wrapper.py"
    script.write_text(SIGBUS_WRAPPER.format(tests=str(TESTS)))
    victim = tiny_models["ft1"] / "model.safetensors"
    original, stat = victim.read_bytes(), victim.stat()
    proc = subprocess.Popen(
        [sys.executable, str(script), "merge", str(recipe), "--quiet"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    journal = staging_of(target) / "progress.json"
    deadline = time.monotonic() + 90
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if len(json.loads(journal.read_text())["shards"]) >= 1:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "the merge finished before the input could be cut"
    with open(victim, "r+b") as handle:
        handle.truncate(200)
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode in (-signal.SIGBUS, 2), (proc.returncode, stderr)
    assert not os.path.lexists(target)
    if proc.returncode == 2:
        assert str(victim) in stderr and "Traceback" not in stderr, stderr
    line = one_line_error(invoke("merge", recipe, "--resume", "--quiet"))
    assert str(victim) in line
    victim.write_bytes(original)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    result = invoke("merge", recipe, "--resume", "--json")
    assert result.exit_code == 0, result.stderr
    assert tree(target) == tree(reference)


def test_the_identity_of_an_input_that_is_not_a_regular_file_is_refused(tmp_path):
    """A FIFO where an input file was (swapped in after the headers were read) fails at once, never blocks."""
    from tadrop_cli.errors import BadInput

    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(BadInput, match="not a regular file"):
        journal_module.file_identity(fifo)


def test_a_tampered_journal_never_removes_or_publishes_other_files(setup, tmp_path, monkeypatch):
    """Names in the journal that are no planned shard (a path out of the folder, a stray file) are
    neither removed outside the staging folder nor published."""
    recipe, target, reference = setup
    interrupted_after(recipe, "marked:2", monkeypatch)
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    journal_path = staging_of(target) / "progress.json"
    journal = json.loads(journal_path.read_text())
    journal["shards"]["../../outside.txt"] = {"size": 4, "crc32": 0}
    journal["shards"]["stray.txt"] = {"size": 4, "crc32": 0}
    journal_path.write_text(json.dumps(journal))
    (staging_of(target) / "stray.txt").write_text("stray")
    result = invoke("merge", recipe, "--resume", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert outside.read_text() == "keep"
    assert tree(target) == reference


# ---------------------------------------------------------------- an output of many tensors


def test_an_output_whose_header_is_over_a_megabyte_is_known_as_tadrops(tmp_path):
    """A single-file output of many tensors has a safetensors header over 1 MB: --overwrite still
    knows it for tadrop's (its metadata) and replaces it, and --resume finds it complete (its
    recipe digest), where reading only the first MB of the header saw no model."""
    state = {f"model.layers.{i // 64}.mlp.experts.{i % 64}.{'w' * 150}.weight": torch.ones(1) for i in range(6000)}
    base = write_checkpoint(tmp_path / "base", state)
    tuned = write_checkpoint(tmp_path / "ft", {name: value * 2 for name, value in state.items()})
    target = tmp_path / "out"
    recipe = write_recipe(tmp_path, basic_recipe({"base": base, "ft": tuned}, target, method="task_arithmetic"))
    assert invoke("merge", recipe, "--quiet").exit_code == 0
    data = (target / "model.safetensors").read_bytes()
    assert int.from_bytes(data[:8], "little") > 1 << 20 and not (target / "model.safetensors.index.json").exists()
    again = invoke("merge", recipe, "--resume", "--json")
    assert again.exit_code == 0, again.stderr
    assert any("already complete" in note for note in json.loads(again.stdout)["notes"]), again.stdout
    replaced = invoke("merge", recipe, "--overwrite", "--quiet")
    assert replaced.exit_code == 0, replaced.stderr
    assert (target / "model.safetensors").read_bytes() == data
