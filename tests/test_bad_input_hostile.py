"""Hostile input (issue 15): deeply nested JSON and YAML, absurd layer numbers, FIFOs and devices
where files are expected, pickles torch will not load, duplicate keys, degenerate weights. Each
ends with one line naming the culprit and exit 2: never an internal error, never a hang."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import basic_recipe, fine_tune, run_cli, tiny_state, write_checkpoint, write_recipe
from safetensors.torch import load_file, save_file
from test_bad_input import bad, invoke, merge_bad, ok

from tadrop_cli import checkpoint as checkpoint_module
from tadrop_cli import safe_files
from tadrop_cli.errors import BadInput
from tadrop_cli.tensor_names import tensor_order

DEEP = 100_000


@pytest.fixture
def recipe(tiny_models, tmp_path) -> dict:
    return basic_recipe(tiny_models, tmp_path / "merged")


@pytest.fixture(autouse=True)
def no_hang():
    """A case that hangs (a FIFO opened for reading blocks until a writer comes) fails after 60 s
    instead of stalling the suite: a writer is connected to every FIFO the test made."""
    fifos: list[Path] = []
    yield fifos
    for fifo in fifos:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass


def _safetensors_bytes(header: bytes, data: bytes = b"") -> bytes:
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data


# ---------------------------------------------------------------- nesting


def test_safetensors_header_nested_deep(tmp_path, recipe, tiny_models):
    file = tiny_models["ft1"] / "model.safetensors"
    file.write_bytes(_safetensors_bytes(b'{"__metadata__": ' + b"[" * DEEP + b"]" * DEEP + b"}"))
    merge_bad(tmp_path, recipe, str(file))


@pytest.mark.parametrize("deep", ["weight_map", "metadata", "top"])
def test_index_nested_deep(tmp_path, recipe, deep):
    folder = write_checkpoint(tmp_path / "sharded", fine_tune(tiny_state(), 7), shards=2)
    nested = "[" * DEEP + "]" * DEEP
    text = {
        "weight_map": '{"weight_map": ' + nested + "}",
        "metadata": '{"metadata": ' + nested + ', "weight_map": {}}',
        "top": nested,
    }[deep]
    (folder / "model.safetensors.index.json").write_text(text)
    recipe["models"][0]["model"] = str(folder)
    merge_bad(tmp_path, recipe, "model.safetensors.index.json", "nested")


def test_recipe_nested_deep(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("merge_method: ties\nparameters: " + "[" * DEEP + "]" * DEEP + "\n")
    bad(tmp_path, "merge", path, culprits=("recipe.yaml", "nested"))


def test_recipe_nested_deep_block_style(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("merge_method: ties\n" + "".join(" " * i + f"k{i}:\n" for i in range(3000)))
    bad(tmp_path, "merge", path, culprits=("recipe.yaml",))


# ---------------------------------------------------------------- absurd names


def _add_tensor_everywhere(tiny_models: dict[str, Path], name: str) -> None:
    for key in ("base", "ft0", "ft1", "ft2"):
        file = tiny_models[key] / "model.safetensors"
        state = load_file(str(file))
        state[name] = torch.randn(8, 8)
        save_file(state, str(file))


def test_layer_number_of_5000_digits(tmp_path, recipe, tiny_models):
    name = "model.layers.{}.mlp.weight".format("9" * 5000)
    _add_tensor_everywhere(tiny_models, name)
    line = merge_bad(tmp_path, recipe, "layer number", "5000 digits")
    assert name[:40] in line and len(line) < 400


def test_number_of_5000_digits_outside_layers_merges(tmp_path, recipe, tiny_models):
    """Only a numbered layer's number is read as a number (gradients); elsewhere digits only order."""
    name = "encoder.{}.weight".format("9" * 5000)
    _add_tensor_everywhere(tiny_models, name)
    assert ok("merge", write_recipe(tmp_path, recipe))["tensors"] == len(tiny_state()) + 1


def test_tensor_order_of_long_numbers_is_numeric_and_exact():
    """Ordering compares digits as numbers without converting them (no int() limit to meet), as before:
    by number (leading zeros ignored), then by name."""
    names = ["m.10.w", "m.9.w", "m.0010.x", "m.2.w", "top", "m.1" + "0" * 5000 + ".w", "m.9" * 1 + "9" * 4999 + ".w"]
    assert tensor_order(names) == ["top", "m.2.w", "m.9.w", "m.0010.x", "m.10.w", names[6], names[5]]


# ---------------------------------------------------------------- FIFOs and devices


def _fifo(path: Path, fifos: list[Path]) -> Path:
    os.mkfifo(path)
    fifos.append(path)
    return path


UNBLOCK = """
import os, sys, time
time.sleep(float(sys.argv[1]))
for fifo in sys.argv[2:]:
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a reader blocked in open() goes on
    except OSError:
        pass
"""


def _run_with_watchdog(fifos: list[Path], *args):
    """invoke(), with a process that unblocks a reader of the FIFOs after 20 s, so that a regression
    fails instead of hanging the suite (a thread would not do: a read in native code can hold the GIL)."""
    watchdog = subprocess.Popen([sys.executable, "-c", UNBLOCK, "20", *map(str, fifos)])
    try:
        return invoke(*args)
    finally:
        watchdog.kill()
        watchdog.wait()


def test_index_names_a_fifo(tmp_path, recipe, no_hang):
    folder = write_checkpoint(tmp_path / "sharded", fine_tune(tiny_state(), 7), shards=2)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.unlink()
    _fifo(shard, no_hang)
    recipe["models"][0]["model"] = str(folder)
    path = write_recipe(tmp_path, recipe)
    result = _run_with_watchdog(no_hang, "merge", path)
    assert result.exit_code == 2, result.stderr
    assert "model-00002-of-00002.safetensors" in result.stderr and "regular file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_model_file_is_a_fifo(tmp_path, recipe, no_hang, suffix):
    fifo = _fifo(tmp_path / f"model{suffix}", no_hang)
    recipe["models"][1]["model"] = str(fifo)
    result = _run_with_watchdog(no_hang, "merge", write_recipe(tmp_path, recipe))
    assert result.exit_code == 2, result.stderr
    assert f"model{suffix}" in result.stderr and "regular file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_model_file_is_a_link_to_a_device(tmp_path, recipe):
    link = tmp_path / "zero.safetensors"
    link.symlink_to("/dev/zero")
    recipe["models"][1]["model"] = str(link)
    merge_bad(tmp_path, recipe, "zero.safetensors", "regular file")


def test_hub_cache_link_to_a_fifo_is_refused(tmp_path, recipe, no_hang):
    """A Hugging Face cache snapshot links into blobs/: links are followed, but a target that is
    not a regular file is refused."""
    repo = tmp_path / "models--org--name"
    snapshot = repo / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    _fifo(repo / "blobs" / "feed", no_hang)
    (snapshot / "model.safetensors").symlink_to("../../blobs/feed")
    recipe["models"][1]["model"] = str(snapshot / "model.safetensors")
    result = _run_with_watchdog(no_hang, "merge", write_recipe(tmp_path, recipe))
    assert result.exit_code == 2, result.stderr
    assert "regular file" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_recipe_is_a_fifo(tmp_path, no_hang):
    fifo = _fifo(tmp_path / "recipe.yaml", no_hang)
    result = _run_with_watchdog(no_hang, "merge", fifo)
    assert result.exit_code == 2 and "recipe.yaml" in result.stderr, result.stderr


def test_open_input_refuses_a_file_swapped_for_a_fifo(tmp_path, no_hang, monkeypatch):
    """The check is made on the opened file (fstat), not only on the name before opening: the check
    before opening is made to pass, as if the file were swapped for a FIFO just after it."""
    fifo = _fifo(tmp_path / "x.safetensors", no_hang)
    monkeypatch.setattr(safe_files, "check_regular", lambda path: None)
    with pytest.raises(BadInput, match="x.safetensors: a FIFO, not a regular file"):
        safe_files.open_input(fifo)


def test_verify_a_folder_with_a_fifo_shard(tmp_path, no_hang):
    folder = write_checkpoint(tmp_path / "sharded", fine_tune(tiny_state(), 7), shards=2)
    shard = folder / "model-00001-of-00002.safetensors"
    shard.unlink()
    _fifo(shard, no_hang)
    result = _run_with_watchdog(no_hang, "verify", folder)
    assert result.exit_code == 2, result.stderr
    assert "model-00001-of-00002.safetensors" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- duplicate keys


def test_safetensors_header_duplicate_key(tmp_path, recipe, tiny_models):
    file = tiny_models["ft1"] / "model.safetensors"
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + length].rstrip(b" ")
    first = json.loads(header)
    name = next(k for k in first if k != "__metadata__")
    again = json.dumps({name: first[name]})[1:-1].encode()
    body = header[:-1] + b"," + again + b"}"
    file.write_bytes(_safetensors_bytes(body, data[8 + length :]))
    merge_bad(tmp_path, recipe, str(file), name, "twice")


def test_verify_duplicate_key(tmp_path, tiny_models):
    file = tiny_models["ft1"] / "model.safetensors"
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + length].rstrip(b" ")
    name = next(k for k in json.loads(header) if k != "__metadata__")
    body = header[:-1] + b"," + json.dumps({name: json.loads(header)[name]})[1:-1].encode() + b"}"
    file.write_bytes(_safetensors_bytes(body, data[8 + length :]))
    bad(tmp_path, "verify", file, culprits=(name, "twice"))


def test_index_duplicate_key(tmp_path, recipe):
    folder = write_checkpoint(tmp_path / "sharded", fine_tune(tiny_state(), 7), shards=2)
    index = folder / "model.safetensors.index.json"
    text = index.read_text()
    index.write_text(text[:-1] + ', "weight_map": {}}')
    recipe["models"][0]["model"] = str(folder)
    merge_bad(tmp_path, recipe, "model.safetensors.index.json", "weight_map", "twice")


def test_recipe_duplicate_key(tmp_path, recipe):
    text = yaml.safe_dump(recipe, sort_keys=False) + "merge_method: task_arithmetic\n"
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    line = bad(tmp_path, "merge", path, culprits=("recipe.yaml", "merge_method", "twice"))
    assert f"line {len(text.splitlines())}" in line


def test_recipe_duplicate_nested_key(tmp_path, recipe):
    recipe["models"][1]["parameters"] = {"weight": 0.5}
    text = yaml.safe_dump(recipe, sort_keys=False).replace("weight: 0.5\n", "weight: 0.5\n    weight: 0.9\n")
    assert "weight: 0.9" in text
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    bad(tmp_path, "merge", path, culprits=("recipe.yaml", "weight", "twice"))


# ---------------------------------------------------------------- PyTorch pickles


def _bin_model(tmp_path: Path, change) -> Path:
    state = fine_tune(tiny_state(), 3)
    change(state)
    folder = tmp_path / "odd-bin"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


ODD_TENSORS = {
    "meta": lambda s: s.__setitem__("model.layers.0.attn.weight", torch.empty(64, 64, device="meta")),
    "sparse": lambda s: s.__setitem__("model.layers.0.attn.weight", s["model.layers.0.attn.weight"].to_sparse()),
    "qint8": lambda s: s.__setitem__(
        "model.layers.0.attn.weight", torch.quantize_per_tensor(s["model.layers.0.attn.weight"], 0.1, 0, torch.qint8)
    ),
    "not-a-tensor": lambda s: s.__setitem__("model.layers.0.attn.weight", {"nested": 1}),
}


def _assert_one_clean_line(result, *culprits: str) -> str:
    assert result.exit_code == 2, f"{result.stderr}\n{result.exception!r}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for culprit in culprits:
        assert culprit in lines[0], lines[0]
    assert "weights_only=False" not in result.stderr and "weights_only = False" not in result.stderr
    assert "Warning" not in result.stderr
    return lines[0]


@pytest.mark.parametrize("kind", list(ODD_TENSORS))
@pytest.mark.parametrize("command", ["merge", "verify"])
def test_bin_with_odd_tensors(tmp_path, recipe, kind, command):
    folder = _bin_model(tmp_path, ODD_TENSORS[kind])
    recipe["models"][1]["model"] = str(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a torch warning that escaped would end the run here
        args = ("merge", write_recipe(tmp_path, recipe)) if command == "merge" else ("verify", folder)
        result = invoke(*args)
    _assert_one_clean_line(result, "pytorch_model.bin")


@pytest.mark.parametrize("kind", ["meta", "sparse", "qint8"])
def test_bin_with_odd_tensors_real_process(tmp_path, kind):
    """The real process: torch's own warnings (printed by the warnings module) must not leak."""
    folder = _bin_model(tmp_path, ODD_TENSORS[kind])
    proc = run_cli("verify", str(folder))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "pytorch_model.bin" in lines[0] and "weights_only=False" not in proc.stderr


class Custom:
    def __init__(self):
        self.value = 3


def test_pickle_with_a_custom_class_is_refused_in_one_line(tmp_path, recipe):
    folder = tmp_path / "custom"
    folder.mkdir()
    torch.save({"model.layers.0.attn.weight": torch.zeros(2), "extra": Custom()}, folder / "pytorch_model.bin")
    recipe["models"][1]["model"] = str(folder)
    line = _assert_one_clean_line(invoke("merge", write_recipe(tmp_path, recipe)), "pytorch_model.bin")
    assert "Custom" in line  # what it refused, named
    assert not line.rstrip().endswith(("(", ",", "the", "to"))


def test_old_torch_refuses_pickles(tmp_path, recipe, tiny_models, monkeypatch):
    """torch < 2.6: weights_only=True could be bypassed (CVE-2025-32434), so pickles are refused."""
    folder = write_checkpoint(tmp_path / "plain-bin", fine_tune(tiny_state(), 3), fmt="bin")
    monkeypatch.setattr(checkpoint_module, "torch_version", lambda: (2, 5, 1))
    recipe["models"][1]["model"] = str(folder)
    line = merge_bad(tmp_path, recipe, "pytorch_model.bin", "2.6")
    assert "CVE-2025-32434" in line
    monkeypatch.undo()
    ok("merge", write_recipe(tmp_path, recipe))  # control: today's torch loads it


def test_torch_version_parses_local_versions(monkeypatch):
    for text, expected in [
        ("2.6.0+cpu", (2, 6, 0)),
        ("2.13.0", (2, 13, 0)),
        ("2.5.1a0+git", (2, 5, 1)),
        ("2.7.0.dev20250101", (2, 7, 0)),
    ]:
        assert checkpoint_module.parse_version(text) == expected


# ---------------------------------------------------------------- degenerate merges


def test_linear_weights_summing_to_zero_refused(tmp_path, recipe):
    recipe["merge_method"] = "linear"
    recipe["models"] = recipe["models"][:2]
    recipe["models"][0]["parameters"] = {"weight": 1.0}
    recipe["models"][1]["parameters"] = {"weight": -1.0}
    merge_bad(tmp_path, recipe, "weight", "sum")


def test_linear_weights_summing_to_zero_without_normalize_merges(tmp_path, recipe):
    recipe["merge_method"] = "linear"
    recipe["models"] = recipe["models"][:2]
    recipe["models"][0]["parameters"] = {"weight": 1.0}
    recipe["models"][1]["parameters"] = {"weight": -1.0}
    recipe["parameters"] = {"normalize": False}
    ok("merge", write_recipe(tmp_path, recipe))


# ---------------------------------------------------------------- zero-element tensors


@pytest.mark.parametrize(
    "method",
    ["della_linear", "della", "ties", "dare_ties", "breadcrumbs_ties", "magnitude_prune", "linear", "task_arithmetic"],
)
@pytest.mark.parametrize("tadrop", [True, False], ids=["tadrop", "uniform"])
def test_zero_element_tensors_merge(tmp_path, recipe, tiny_models, method, tadrop):
    """A tensor with no entries (shape (0, 64), say) is written as it is, whatever the method."""
    if tadrop and method in ("linear", "task_arithmetic"):
        pytest.skip("no sparsifier: TADrop does not apply")
    for key in ("base", "ft0", "ft1", "ft2"):
        file = tiny_models[key] / "model.safetensors"
        state = load_file(str(file))
        state["model.layers.0.empty.weight"] = torch.zeros(0, 64)
        state["model.empty_bias"] = torch.zeros(0)
        save_file(state, str(file))
    recipe["merge_method"] = method
    if method == "linear":
        for entry in recipe["models"]:
            entry["parameters"] = {"weight": 0.5}
    if method in ("della", "della_linear"):
        recipe["parameters"] = {"epsilon": 0.05}
    if tadrop:
        recipe["tadrop"] = {"min_numel": 0}
    summary = ok("merge", write_recipe(tmp_path, recipe))
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert merged["model.layers.0.empty.weight"].shape == (0, 64) and merged["model.empty_bias"].shape == (0,)
    assert summary["tensors"] == len(tiny_state()) + 2


# ---------------------------------------------------------------- sentence-transformers folders


def _sentence_transformers_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny sentence-transformers model as it saves itself: a BERT at the top (model.safetensors,
    config, tokenizer), modules.json naming 1_Pooling/ (its config) and 2_Normalize/ (empty)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "hello", "world"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": False}))
    versions = {"__version__": {"sentence_transformers": "2.0.0"}}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(versions))
    (folder / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 16, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (folder / "1_Pooling" / "hook.py").write_text("raise SystemExit('code from a model folder ran')\n")
    (folder / "2_Normalize").mkdir()
    return folder


def _perturbed(base: Path, folder: Path, seed: int) -> Path:
    folder.mkdir()
    state = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    save_file(tuned, str(folder / "model.safetensors"))
    return folder


def test_module_files_of_a_sentence_transformers_folder(tmp_path):
    base = _sentence_transformers_folder(tmp_path / "st")
    listed = checkpoint_module.module_files(base)
    # never hook.py; an empty folder has nothing to copy
    assert [relative for _, relative in listed] == ["1_Pooling/config.json"]
    assert listed[0][0] == base / "1_Pooling" / "config.json"


@pytest.mark.parametrize("path", ["../elsewhere", "/etc", "a/b", ".."])
def test_module_path_outside_the_base_is_refused(tmp_path, path):
    base = _sentence_transformers_folder(tmp_path / "st")
    (base / "modules.json").write_text(json.dumps([{"idx": 0, "path": ""}, {"idx": 1, "path": path}]))
    with pytest.raises(checkpoint_module.BadInput, match="modules.json"):
        checkpoint_module.module_files(base)


def test_module_folder_that_is_a_link_is_refused(tmp_path):
    base = _sentence_transformers_folder(tmp_path / "st")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "token").write_text("hf_secret")
    shutil.rmtree(base / "1_Pooling")
    (base / "1_Pooling").symlink_to(secret, target_is_directory=True)
    with pytest.raises(checkpoint_module.BadInput, match="link"):
        checkpoint_module.module_files(base)


def test_module_files_deep_or_duplicate_json(tmp_path):
    base = _sentence_transformers_folder(tmp_path / "st")
    (base / "modules.json").write_text("[" * DEEP + "]" * DEEP)
    with pytest.raises(checkpoint_module.BadInput, match="nested"):
        checkpoint_module.module_files(base)
    (base / "modules.json").write_text('[{"path": "", "path": "1_Pooling"}]')
    with pytest.raises(checkpoint_module.BadInput, match="twice"):
        checkpoint_module.module_files(base)


def test_sentence_transformers_output_loads(tmp_path):
    from sentence_transformers import SentenceTransformer

    base = _sentence_transformers_folder(tmp_path / "st")
    fts = [_perturbed(base, tmp_path / f"ft{i}", i) for i in range(2)]
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(f)} for f in fts],
        "parameters": {"weight": 0.5},
        "output": {"path": str(tmp_path / "merged")},
    }
    ok("merge", write_recipe(tmp_path, recipe))
    merged = tmp_path / "merged"
    assert not (merged / "1_Pooling" / "hook.py").exists()
    # the same model assembled by hand: the base's folder with the merged weights
    expected = tmp_path / "expected"
    shutil.copytree(base, expected)
    shutil.copyfile(merged / "model.safetensors", expected / "model.safetensors")
    loaded, reference = SentenceTransformer(str(merged), device="cpu"), SentenceTransformer(str(expected), device="cpu")
    assert len(loaded) == len(reference) == 3
    got, want = loaded.encode(["hello world"]), reference.encode(["hello world"])
    assert got.tolist() == want.tolist()
    assert abs(float((torch.tensor(got) ** 2).sum()) - 1) < 1e-5  # Normalize ran
    # the output is a model output that --overwrite may replace, module folder and all
    ok("merge", write_recipe(tmp_path, recipe), "--overwrite")
    assert (merged / "1_Pooling" / "config.json").read_text() == (base / "1_Pooling" / "config.json").read_text()


# ---------------------------------------------------------------- models that are not what they seem


def test_peft_adapter_of_another_model_is_refused(tmp_path, recipe):
    """An adapter whose targets are not tensors of the base is refused, naming it, whatever the
    policies (it used to be skipped tensor by tensor: a silent no-op)."""
    adapter = tmp_path / "my-adapter"
    adapter.mkdir()
    lora = {
        "base_model.model.model.layers.0.q_proj.lora_A.weight": torch.randn(8, 64),
        "base_model.model.model.layers.0.q_proj.lora_B.weight": torch.zeros(64, 8),
    }
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    recipe["models"][1]["model"] = str(adapter)
    recipe["policies"] = {"missing_tensor": "skip_model", "shape_mismatch": "skip_model"}
    line = merge_bad(tmp_path, recipe, "my-adapter", "PEFT/LoRA adapter", "model.layers.0.q_proj.weight")
    assert "note" not in line


def test_model_sharing_no_tensor_with_the_base_is_refused(tmp_path, recipe):
    other = write_checkpoint(
        tmp_path / "other-arch", {"transformer.h.0.w": torch.randn(4, 4), "transformer.wte": torch.randn(8, 4)}
    )
    recipe["models"][1]["model"] = str(other)
    recipe["policies"] = {"missing_tensor": "skip_model"}
    merge_bad(tmp_path, recipe, "other-arch", "no tensor", "transformer.h.0.w", "model.embed.weight")


def test_a_fine_tune_without_the_base_integer_buffers_is_noted(tmp_path, recipe, tiny_models):
    file = tiny_models["base"] / "model.safetensors"
    state = load_file(str(file))
    state["model.embed.position_ids"] = torch.arange(32, dtype=torch.int64)
    save_file(state, str(file))
    file = tiny_models["ft0"] / "model.safetensors"
    state = load_file(str(file))
    state["model.embed.position_ids"] = torch.arange(32, dtype=torch.int64)
    save_file(state, str(file))
    summary = ok("merge", write_recipe(tmp_path, recipe))
    notes = [n for n in summary["notes"] if "position_ids" in n]
    assert len(notes) == 2 and all("base" in n for n in notes), summary["notes"]  # ft1 and ft2 lack it
    assert any(str(tiny_models["ft1"]) in n for n in notes) and any(str(tiny_models["ft2"]) in n for n in notes)
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert torch.equal(merged["model.embed.position_ids"], torch.arange(32))


# ---------------------------------------------------------------- parameter filters


def test_filter_star_matches_every_tensor():
    """mergekit reads filter "*" as every tensor (and any other filter as a case-sensitive substring)."""
    from tadrop_cli.parameter_values import ConditionalValue, value_for_tensor

    value = [ConditionalValue(filter="*", value=0.3)]
    assert value_for_tensor(value, "model.layers.0.mlp.weight", 0.0) == 0.3
    ordered = [ConditionalValue(filter="mlp", value=0.7), ConditionalValue(filter="*", value=0.3)]
    assert [value_for_tensor(ordered, n, None) for n in ("a.mlp.w", "a.attn.w", "a.MLP.w")] == [0.7, 0.3, 0.3]


def test_filter_star_in_a_merge(tmp_path, recipe, tiny_models):
    """weight [{filter: "*", value: 0}] for every model of a task arithmetic: the output is the base."""
    recipe["merge_method"] = "task_arithmetic"
    for entry in recipe["models"]:
        entry["parameters"] = {"weight": [{"filter": "*", "value": 0.0}]}
    ok("merge", write_recipe(tmp_path, recipe))
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base = load_file(str(tiny_models["base"] / "model.safetensors"))
    assert all(torch.equal(merged[k], base[k]) for k in base)


def test_existing_output_with_a_deeply_nested_header(tmp_path, recipe):
    """--overwrite reads the existing output's headers to see whether tadrop made it: a header nested
    too deep for Python is not tadrop's, and is refused in one line."""
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_bytes(_safetensors_bytes(b'{"__metadata__": ' + b"[" * DEEP + b"]" * DEEP + b"}"))
    merge_bad(tmp_path, recipe, str(out), "holds no model", extra=("--overwrite",))


def test_staging_journal_nested_deep_is_not_tadrops(tmp_path, recipe):
    """A journal beside the output nested too deep is treated as not tadrop's, never an internal error."""
    ok("merge", write_recipe(tmp_path, recipe), "--dry-run")
    from tadrop_cli import journal, output_location

    folder = tmp_path / "journal-here"
    folder.mkdir()
    (folder / journal.JOURNAL).write_text("[" * DEEP + "]" * DEEP)
    fd = os.open(folder, os.O_RDONLY)
    try:
        assert journal.read_journal(fd) is None
    finally:
        os.close(fd)
    (folder / "model.safetensors.index.json").write_text('{"metadata": ' + "[" * DEEP + "]" * DEEP + "}")
    assert output_location.recorded_recipe_digest(folder) is None


# ---------------------------------------------------------------- opening files: inputs and tadrop's own


def _blocking(fd: int) -> bool:
    return os.get_blocking(fd)


def test_open_input_follows_a_link_to_a_regular_file(tmp_path):
    """An input may be a link (a Hugging Face snapshot's files are): it is followed, and the descriptor
    blocks as a plain file's (the non-blocking open is only against FIFOs)."""
    target = tmp_path / "blob"
    target.write_bytes(b"weights")
    (tmp_path / "model.safetensors").symlink_to(target)
    fd = safe_files.open_input(tmp_path / "model.safetensors")
    try:
        assert os.read(fd, 100) == b"weights" and _blocking(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("folder", "a folder, not a regular file"),
        ("link to a folder", "a folder, not a regular file"),
        ("fifo", "a FIFO, not a regular file"),
        ("link to a fifo", "a FIFO, not a regular file"),
        ("dangling link", "cannot open (No such file or directory)"),
        ("character device", "a character device, not a regular file"),
    ],
)
def test_open_input_refuses_what_is_not_a_regular_file(tmp_path, no_hang, kind, message):
    """One line naming the input, exit 2's BadInput; nothing is waited on (a FIFO with no writer)."""
    path = tmp_path / "config.json"
    if kind == "folder":
        path.mkdir()
    elif kind == "link to a folder":
        (tmp_path / "d").mkdir()
        path.symlink_to(tmp_path / "d")
    elif kind == "fifo":
        _fifo(path, no_hang)
    elif kind == "link to a fifo":
        path.symlink_to(_fifo(tmp_path / "f", no_hang))
    elif kind == "dangling link":
        path.symlink_to(tmp_path / "gone")
    else:
        path.symlink_to("/dev/null")
    with pytest.raises(BadInput) as refused:
        safe_files.open_input(path)
    assert str(refused.value) == f"{path}: {message}" + (
        "; tadrop reads only regular files" if "not a" in message else ""
    )


@pytest.mark.parametrize("kind", ["link to a file", "fifo", "folder", "missing"])
def test_open_own_never_follows_a_link_nor_opens_what_is_not_a_file(tmp_path, no_hang, kind):
    """tadrop's own files (a shard being checked for a resume, the journal) are opened by name in a folder
    it made: a link there is not tadrop's (refused even to a good file), nor a FIFO or a folder; OSError,
    for the caller to decide (a resume then redoes the shard)."""
    (tmp_path / "real").write_bytes(b"x")
    name = "model.safetensors"
    if kind == "link to a file":
        (tmp_path / name).symlink_to(tmp_path / "real")
    elif kind == "fifo":
        _fifo(tmp_path / name, no_hang)
    elif kind == "folder":
        (tmp_path / name).mkdir()
    folder = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            safe_files.open_own(name, folder)
        fd = safe_files.open_own("real", folder)  # a regular file is read
        assert os.read(fd, 10) == b"x"
        os.close(fd)
    finally:
        os.close(folder)


def test_an_input_config_swapped_for_a_fifo_is_refused_as_input_not_as_a_write_failure(tmp_path, no_hang):
    """Copying a config file into the output reads an input: a FIFO there (swapped in after the layout
    listed it) is a BadInput naming that input (exit 2), not a WriteError 'write failed' about the output."""
    from tadrop_cli.errors import WriteError
    from tadrop_cli.staging import StagingFolder

    source = _fifo(tmp_path / "config.json", no_hang)
    staging = StagingFolder(tmp_path / "out", "0" * 64, {})
    staging.open(resume=False)
    try:
        with pytest.raises(BadInput, match=f"^{source}: a FIFO, not a regular file"):
            staging.copy_in(source)
    except WriteError as error:
        pytest.fail(f"refused as a write failure: {error}")
    finally:
        staging.discard()
