"""Security: pickles that run code are refused (and the code never runs), index paths and links
cannot escape a checkpoint's folder, and tokens never reach the output or the terminal."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import basic_recipe, fine_tune, run_cli, tiny_state, write_checkpoint, write_recipe
from typer.testing import CliRunner

from tadrop_cli.cli import app

SECRET = "secret-value-7d1f9c"


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
        for p in sorted(root.rglob("*"))
    }


def refused(result_code: int, stderr: str, stdout: str, *culprits: str) -> None:
    assert result_code == 2, f"exit {result_code}: {stderr}"
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert "Traceback" not in stderr + stdout
    for culprit in culprits:
        assert culprit in lines[0], stderr


# ---------------------------------------------------------------- pickles that run code


class Payload:
    """Unpickling this runs a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class ExecPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def plant(folder: Path, marker: Path, how: str) -> Path:
    """A checkpoint whose weight file runs code when unpickled unsafely. Returns the file."""
    folder.mkdir(parents=True, exist_ok=True)
    state = fine_tune(tiny_state(), 4)
    (folder / "config.json").write_text("{}")
    if how == "torch-save":
        state["model.layers.0.mlp.weight"] = Payload(f"touch {marker}")
        file = folder / "pytorch_model.bin"
        torch.save(state, file)
    elif how == "plain-pickle":
        file = folder / "pytorch_model.bin"
        file.write_bytes(pickle.dumps({"state_dict": {**state, "evil": Payload(f"touch {marker}")}}, protocol=2))
    elif how == "exec-pt":
        file = folder / "weights.pt"
        torch.save({"model": ExecPayload(marker), **state}, file)
    elif how == "bin-index":
        torch.save({k: v for k, v in state.items() if "layers.1" not in k}, folder / "pytorch_model-00001-of-00002.bin")
        torch.save(
            {**{k: v for k, v in state.items() if "layers.1" in k}, "x": Payload(f"touch {marker}")},
            folder / "pytorch_model-00002-of-00002.bin",
        )
        weight_map = {
            k: ("pytorch_model-00002-of-00002.bin" if "layers.1" in k else "pytorch_model-00001-of-00002.bin")
            for k in state
        }
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
        file = folder / "pytorch_model-00002-of-00002.bin"
    else:
        raise AssertionError(how)
    return file


def test_pickle_payload_in_the_base_real_process(tiny_models, tmp_path):
    marker = tmp_path / "MARKER"
    file = plant(tmp_path / "evil-base", marker, "torch-save")
    recipe = basic_recipe(tiny_models, tmp_path / "merged")
    recipe["base_model"] = str(tmp_path / "evil-base")
    proc = run_cli("merge", str(write_recipe(tmp_path, recipe)))
    assert not marker.exists(), "the pickle's code ran"
    refused(proc.returncode, proc.stderr, proc.stdout, str(file))
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("how", ["torch-save", "plain-pickle", "exec-pt", "bin-index"])
@pytest.mark.parametrize("command", ["merge", "dry-run", "plan", "verify"])
def test_pickle_payload_is_refused(tiny_models, tmp_path, how, command):
    marker = tmp_path / "MARKER"
    file = plant(tmp_path / "evil", marker, how)
    reference = str(file) if how == "exec-pt" else str(tmp_path / "evil")
    recipe = basic_recipe(tiny_models, tmp_path / "merged")
    recipe["models"][1]["model"] = reference
    recipe["tadrop"] = {}
    path = write_recipe(tmp_path, recipe)
    args = {
        "merge": ["merge", path],
        "dry-run": ["merge", path, "--dry-run"],
        "plan": ["plan", path],
        "verify": ["verify", reference],
    }[command]
    result = invoke(*args)
    assert not marker.exists(), "the pickle's code ran"
    refused(result.exit_code, result.stderr, result.stdout, str(file))
    assert not (tmp_path / "merged").exists()


def test_a_plain_bin_checkpoint_still_loads(tiny_models, tmp_path):
    """Control: the refusal is about code in the pickle, not about .bin files."""
    folder = write_checkpoint(tmp_path / "plain-bin", fine_tune(tiny_state(), 4), fmt="bin")
    recipe = basic_recipe(tiny_models, tmp_path / "merged")
    recipe["models"][1]["model"] = str(folder)
    result = invoke("merge", write_recipe(tmp_path, recipe), "--quiet")
    assert result.exit_code == 0, result.stderr


# ---------------------------------------------------------------- paths and links out of a checkpoint's folder


def _sharded(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "sharded", fine_tune(tiny_state(), 6), shards=2)


def _point_index(folder: Path, old: str, new: str, index_name: str = "model.safetensors.index.json") -> None:
    index = folder / index_name
    data = json.loads(index.read_text())
    data["weight_map"] = {k: (new if v == old else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "escape", ["../ft0/model.safetensors", "ABSOLUTE", "./../ft0/model.safetensors", "sub/../../ft0/model.safetensors"]
)
def test_index_path_cannot_escape(tiny_models, tmp_path, escape):
    folder = _sharded(tmp_path)
    escape = str(tiny_models["ft0"] / "model.safetensors") if escape == "ABSOLUTE" else escape
    _point_index(folder, "model-00002-of-00002.safetensors", escape)
    (folder / "sub").mkdir()
    recipe = basic_recipe(tiny_models, tmp_path / "merged")
    recipe["models"][2]["model"] = str(folder)
    path = write_recipe(tmp_path, recipe)
    before = tree(tmp_path)
    result = invoke("merge", path)
    refused(result.exit_code, result.stderr, result.stdout, "model.safetensors.index.json", "outside")
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    "layout", ["index-names-a-link", "weights-file-is-a-link", "link-in-a-subfolder", "link-chain"]
)
def test_links_out_of_the_folder_are_refused(tiny_models, tmp_path, layout):
    outside = tmp_path / "elsewhere"
    write_checkpoint(outside, fine_tune(tiny_state(), 8))
    if layout == "weights-file-is-a-link":
        folder = tmp_path / "linked"
        folder.mkdir()
        (folder / "model.safetensors").symlink_to(outside / "model.safetensors")
        culprit = "model.safetensors"
    else:
        folder = _sharded(tmp_path)
        shard = folder / "model-00002-of-00002.safetensors"
        shard.unlink()
        if layout == "index-names-a-link":
            shard.symlink_to(outside / "model.safetensors")
            culprit = shard.name
        elif layout == "link-in-a-subfolder":
            (folder / "sub").mkdir()
            (folder / "sub" / "shard.safetensors").symlink_to(outside / "model.safetensors")
            _point_index(folder, shard.name, "sub/shard.safetensors")
            culprit = "sub/shard.safetensors"
        else:  # a link to a link inside the folder, that one pointing out
            (folder / "hop.safetensors").symlink_to(outside / "model.safetensors")
            shard.symlink_to(folder / "hop.safetensors")
            culprit = "safetensors"
    recipe = basic_recipe(tiny_models, tmp_path / "merged")
    recipe["models"][0]["model"] = str(folder)
    result = invoke("merge", write_recipe(tmp_path, recipe))
    refused(result.exit_code, result.stderr, result.stdout, culprit)
    assert not (tmp_path / "merged").exists()


def test_a_config_file_linked_out_of_the_base_is_not_copied(tiny_models, tmp_path):
    """Config/tokenizer files are copied from the base: a link to a secret elsewhere must not be."""
    secret = tmp_path / "home" / ".cache" / "huggingface" / "token"
    secret.parent.mkdir(parents=True)
    secret.write_text(SECRET)
    (tiny_models["base"] / "tokenizer_config.json").symlink_to(secret)
    recipe = basic_recipe(tiny_models, tmp_path / "merged")
    result = invoke("merge", write_recipe(tmp_path, recipe), "--quiet")
    out = tmp_path / "merged"
    leaked = (
        [p.name for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()] if out.exists() else []
    )
    assert leaked == [], f"the secret behind a link was copied into the output: {leaked}"
    refused(result.exit_code, result.stderr, result.stdout, "tokenizer_config.json")


def test_links_inside_the_folder_are_fine(tiny_models, tmp_path):
    """Control: a link that stays inside the folder is not an escape."""
    folder = _sharded(tmp_path)
    shard = folder / "model-00002-of-00002.safetensors"
    (folder / "blobs").mkdir()
    shard.rename(folder / "blobs" / "abc123")
    shard.symlink_to(Path("blobs") / "abc123")
    recipe = basic_recipe(tiny_models, tmp_path / "merged")
    recipe["models"][0]["model"] = str(folder)
    result = invoke("merge", write_recipe(tmp_path, recipe), "--quiet")
    assert result.exit_code == 0, result.stderr


def test_hugging_face_cache_layout_loads(tmp_path):
    """The Hugging Face cache stores snapshot files as links to ../../blobs/<hash>; those are the
    repository's own files, not an escape, so a hub model merges."""
    base = tiny_state()
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    for repo, state in (("tiny-base", base), ("tiny-ft", fine_tune(base, 2))):
        repo_dir = tmp_path / "hf" / "hub" / f"models--acme--{repo}"
        staging = write_checkpoint(tmp_path / "build" / repo, state)
        snapshot = repo_dir / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (repo_dir / "blobs").mkdir()
        for file in staging.iterdir():
            blob = hashlib.sha256(file.read_bytes()).hexdigest()
            shutil.copyfile(file, repo_dir / "blobs" / blob)
            (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / blob)
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text(commit)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": SECRET}
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": "acme/tiny-base",
        "models": [{"model": "acme/tiny-ft", "parameters": {"weight": 1.0}}],
        "output": {"path": str(tmp_path / "out")},
    }
    proc = run_cli("merge", str(write_recipe(tmp_path, recipe)), "--json", env=env)
    assert SECRET not in proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "config.json").is_file()


# ---------------------------------------------------------------- tokens and secrets


def _assert_no_secret(root: Path, *texts: str) -> None:
    for text in texts:
        assert SECRET not in text, "a token was printed"
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert SECRET.encode() not in path.read_bytes(), f"a token was written into {path}"


def test_token_never_printed_or_written_real_process(tiny_models, tmp_path):
    env = {"HF_TOKEN": SECRET, "HUGGING_FACE_HUB_TOKEN": SECRET, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    recipe = basic_recipe(tiny_models, tmp_path / "merged", method="dare_ties")
    recipe["tadrop"] = {}
    recipe["models"].append({"model": "acme/private-model"})  # a hub id: not cached, offline: a clean error
    failing = run_cli("merge", str(write_recipe(tmp_path, recipe, "hub.yaml")), "--json", env=env)
    assert failing.returncode == 2, failing.stderr
    assert "acme/private-model" in failing.stderr
    recipe["models"].pop()
    recipe["output"]["shard_size"] = "40KB"
    done = run_cli("merge", str(write_recipe(tmp_path, recipe)), "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    _assert_no_secret(tmp_path / "merged", failing.stdout, failing.stderr, done.stdout, done.stderr)


def test_token_never_in_other_commands_or_partial_output(tiny_models, tmp_path, monkeypatch):
    from tadrop_cli import staging

    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", SECRET)
    recipe = basic_recipe(tiny_models, tmp_path / "out" / "merged", method="ties")
    recipe["tadrop"] = {}
    recipe["output"]["shard_size"] = "40KB"
    path = write_recipe(tmp_path, recipe)
    texts = []
    for args in (
        ["merge", path, "--dry-run", "--json"],
        ["merge", path, "--dry-run"],
        ["plan", path, "--json"],
        ["plan", path, "--csv"],
        ["plan", path],
        ["methods", "--json"],
        ["verify", tiny_models["base"], "--json"],
    ):
        result = invoke(*args)
        assert result.exit_code == 0, (args, result.stderr)
        texts += [result.stdout, result.stderr]

    def stop(self, file_name):  # interrupt after the first shard: the partial output stays on disk for --resume
        raise KeyboardInterrupt

    monkeypatch.setattr(staging.StagingFolder, "mark_complete", stop)
    result = invoke("merge", path)
    assert result.exit_code == 130
    texts += [result.stdout, result.stderr]
    assert (tmp_path / "out" / ".merged.tadrop-partial").is_dir()
    monkeypatch.undo()
    monkeypatch.setenv("HF_TOKEN", SECRET)
    result = invoke("merge", path, "--resume", "--json")
    assert result.exit_code == 0, result.stderr
    texts += [result.stdout, result.stderr]
    _assert_no_secret(tmp_path / "out", *texts)
