"""PEFT LoRA adapters as models (issue 13): `model+adapter` (mergekit's syntax) and an adapter
folder alone (applied to base_model) read as base + scale * B @ A, tensor by tensor. Checked
against an independent float64 reference (reference.lora_merged, from the adapter's files) and,
where peft is installed, against peft's own merge_and_unload(); refusals end in one line, exit 2."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import basic_recipe, run_cli, tiny_llama_config, tiny_state, write_checkpoint, write_recipe
from reference import dora_merged, lora_merged, lora_scale
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file
from test_bad_input import merge_bad, ok

from tadrop_cli import tensor_merge
from tadrop_cli.checkpoint import open_checkpoint
from tadrop_cli.errors import BadInput
from tadrop_cli.lora import base_note, read_config

transformers = pytest.importorskip("transformers")

LORA_KEY = re.compile(
    r"^base_model\.model\.(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.default)?(?:\.(weight|bias))?$"
)


def load_output(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def merge(tmp_path: Path, recipe: dict, name: str = "recipe.yaml", *extra: str) -> tuple[dict, dict]:
    """(output tensors, the --json summary) of a merge run in this process."""
    summary = ok("merge", write_recipe(tmp_path, recipe, name), "--overwrite", *extra)
    return load_output(Path(recipe["output"]["path"])), summary


def adapter_recipe(base: Path, model: str, output: Path, method: str = "task_arithmetic", **extra) -> dict:
    """A merge whose output is the adapted model itself: task arithmetic, weight 1, no drop."""
    recipe = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": model, "parameters": {"weight": 1.0}}],
        "output": {"path": str(output)},
    }
    recipe.update(extra)
    return recipe


def reference_model(base_folder: Path, adapter: Path) -> dict[str, np.ndarray]:
    """The adapted model in float64, from the files alone: each LoRA pair's W + scale * B @ A
    (transposed for embeddings and fan_in_fan_out), full tensors in place of the base's."""
    base = {k: v.astype(np.float64) for k, v in load_numpy(str(next(base_folder.glob("*.safetensors")))).items()}
    config = json.loads((adapter / "adapter_config.json").read_text())
    saved = load_numpy(str(adapter / "adapter_model.safetensors"))
    factors: dict[str, dict[str, np.ndarray]] = {}
    for key, value in saved.items():
        found = LORA_KEY.match(key)
        if found is None:
            name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
            base[name] = value.astype(np.float64)
        else:
            factors.setdefault(found[1], {})[found[2][-1] + (found[3] or "")] = value
    out = dict(base)
    for module, parts in factors.items():
        r = next(
            (v for k, v in config.get("rank_pattern", {}).items() if re.match(rf"(.*\.)?({k})$", module)), config["r"]
        )
        alpha = next(
            (v for k, v in config.get("alpha_pattern", {}).items() if re.match(rf"(.*\.)?({k})$", module)),
            config["lora_alpha"],
        )
        scale = lora_scale(alpha, r, config.get("use_rslora", False))
        a = parts.get("Aweight", parts.get("A"))
        b = parts.get("Bweight", parts.get("B"))
        transposed = "A" in parts or config.get("fan_in_fan_out", False)
        out[f"{module}.weight"] = lora_merged(base[f"{module}.weight"], a, b, scale, transposed)
        if "rweight" in parts or "r" in parts:  # lora_magnitude_vector: DoRA
            out[f"{module}.weight"] = dora_merged(
                out[f"{module}.weight"], parts.get("r", parts.get("rweight")), transposed
            )
        if "Bbias" in parts:
            out[f"{module}.bias"] = base[f"{module}.bias"] + scale * parts["Bbias"].astype(np.float64)
    return out


def assert_matches(got: dict[str, torch.Tensor], want: dict, atol: float = 2e-6) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        expected = torch.as_tensor(np.asarray(tensor, dtype=np.float64))
        torch.testing.assert_close(got[name].double(), expected, atol=atol, rtol=1e-6, msg=name)


# ---------------------------------------------------------------- models built with transformers and peft


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama") / "base"
    transformers.LlamaForCausalLM(tiny_llama_config(attention_bias=True)).save_pretrained(folder)
    return folder


def make_adapter(base: Path, folder: Path, **settings) -> Path:
    """A real PEFT adapter of `base`: random A and B (a trained adapter's are not zero), and any
    modules_to_save changed."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(len(folder.name))
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **settings))
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "modules_to_save" in name or "lora_B" in name and name.endswith("bias"):
                parameter.add_(torch.randn_like(parameter))
            elif "lora_magnitude_vector" in name:  # DoRA's magnitudes start as the base's norms
                parameter.mul_(1 + 0.2 * torch.randn_like(parameter))
    wrapped.save_pretrained(folder)
    return folder


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """peft's merge_and_unload() of the adapter into its base, as a state dict."""
    peft = pytest.importorskip("peft")
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {name: tensor.detach().clone() for name, tensor in merged.state_dict().items()}


LLAMA_ADAPTERS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"]),
    "rslora": dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "o_proj", "down_proj"]),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "up_proj"],
        rank_pattern={"k_proj": 2, "layers.1.mlp.up_proj": 6},
        alpha_pattern={"layers.0.self_attn.q_proj": 3},
    ),
    "lora_bias": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_bias=True),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj", "embed_tokens"]),
}


@pytest.fixture(scope="module")
def llama_adapters(llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(llama, root / name, **settings) for name, settings in LLAMA_ADAPTERS.items()}


@pytest.mark.parametrize("kind", sorted(LLAMA_ADAPTERS))
@pytest.mark.parametrize("syntax", ["folder", "plus"])
def test_adapter_reads_as_peft_merge_and_unload(tmp_path, llama, llama_adapters, kind, syntax):
    """Both syntaxes give the adapted model: equal to the float64 reference from the files, and
    to peft's merge_and_unload() (the same float32 operations, to their rounding)."""
    adapter = llama_adapters[kind]
    model = str(adapter) if syntax == "folder" else f"{llama}+{adapter}"
    got, summary = merge(tmp_path, adapter_recipe(llama, model, tmp_path / "out"))
    assert_matches(got, reference_model(llama, adapter))
    assert_matches(got, peft_merged(llama, adapter), atol=1e-6)
    base = load_output(llama)
    changed = {name for name in base if not torch.equal(base[name], got[name])}
    assert changed and all(re.search(r"(proj|embed_tokens|lm_head)\.(weight|bias)$", n) for n in changed)
    assert not any("lacks" in note or "skipped" in note for note in summary["notes"])


@pytest.mark.parametrize("dora", [False, True])
def test_fan_in_fan_out_adapter_of_gpt2(tmp_path, dora):
    """GPT-2's Conv1D stores weights as (in, out): PEFT's fan_in_fan_out adds (B @ A)^T (and DoRA
    norms each column)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=16, vocab_size=64)
    base = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(base)
    adapter = make_adapter(
        base, tmp_path / "gpt2-adapter", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], use_dora=dora
    )
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    got, _ = merge(tmp_path, adapter_recipe(base, f"{base}+{adapter}", tmp_path / "out"))
    want = peft_merged(base, adapter)
    changed = [name for name in want if name.endswith(("c_attn.weight", "c_proj.weight"))]
    assert len(changed) == 6
    for name in changed:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0)
    assert_matches(got, reference_model(base, adapter))


def test_tadrop_sees_the_adapters_task_vectors(tmp_path, llama, llama_adapters):
    """TIES with TADrop over two adapters gives what it gives over the two models peft makes of
    them: pass 1 scores the adapters' task vectors (base + B @ A - base), pass 2 merges them."""
    materialized = {}
    for kind in ("plain", "patterns"):
        folder = tmp_path / f"{kind}-merged"
        model = transformers.AutoModelForCausalLM.from_pretrained(llama)
        model.load_state_dict(peft_merged(llama, llama_adapters[kind]))
        model.save_pretrained(folder)
        materialized[kind] = folder

    def recipe(models: list[str], out: str) -> dict:
        return {
            "merge_method": "ties",
            "base_model": str(llama),
            "models": [{"model": m, "parameters": {"weight": 0.7, "density": 0.5}} for m in models],
            "tadrop": {"min_numel": 256, "strength": 0.3},
            "output": {"path": str(tmp_path / out)},
        }

    adapters = [str(llama_adapters["plain"]), f"{llama}+{llama_adapters['patterns']}"]
    got, summary = merge(tmp_path, recipe(adapters, "from-adapters"), "a.yaml")
    want, expected = merge(tmp_path, recipe([str(p) for p in materialized.values()], "from-models"), "b.yaml")
    assert_matches(got, {name: t.numpy() for name, t in want.items()}, atol=1e-6)
    fields = ("adaptive_tensors", "mean_ratio", "min_ratio", "max_ratio")
    plans = [[tuple(row[f] for f in fields) for row in result["ratios"]] for result in (summary, expected)]
    assert plans[0] == plans[1]
    assert all(adaptive > 2 and low < high for adaptive, _, low, high in plans[0])  # the adapted tensors' own ratios


# ---------------------------------------------------------------- adapters written by hand (no peft needed)


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], config: dict, fmt: str = "safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    named = {f"base_model.model.{key}": value.contiguous() for key, value in tensors.items()}
    if fmt == "safetensors":
        save_file(named, str(folder / "adapter_model.safetensors"))
    else:
        torch.save(named, folder / "adapter_model.bin")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return folder


def hand_tensors(seed: int = 0, rank: int = 4) -> dict[str, torch.Tensor]:
    """LoRA factors for the tiny model of conftest: an attention matrix, an MLP matrix with a
    lora_bias, the embedding (lora_embedding_A/B)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.attn.lora_A.weight": torch.randn(rank, 64, generator=g),
        "model.layers.0.attn.lora_B.weight": torch.randn(64, rank, generator=g),
        "model.layers.1.mlp.lora_A.weight": torch.randn(rank, 64, generator=g),
        "model.layers.1.mlp.lora_B.weight": torch.randn(96, rank, generator=g),
        "model.layers.1.mlp.lora_B.bias": torch.randn(96, generator=g),
        "model.embed.lora_embedding_A": torch.randn(rank, 128, generator=g),
        "model.embed.lora_embedding_B": torch.randn(64, rank, generator=g),
    }


@pytest.fixture
def tiny(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "base", tiny_state())


def test_hand_written_adapter_equals_reference(tmp_path, tiny):
    adapter = write_adapter(tmp_path / "adapter", hand_tensors(), {"r": 4, "lora_alpha": 6})
    got, _ = merge(tmp_path, adapter_recipe(tiny, str(adapter), tmp_path / "out"))
    assert_matches(got, reference_model(tiny, adapter), atol=1e-5)
    base = load_output(tiny)
    torch.testing.assert_close(  # spelled out once: scale 6 / 4, the embedding transposed
        got["model.embed.weight"],
        base["model.embed.weight"]
        + 1.5 * (hand_tensors()["model.embed.lora_embedding_B"] @ hand_tensors()["model.embed.lora_embedding_A"]).T,
    )


def test_delta_adds_to_a_tensor_the_adapter_saved_whole(tmp_path, tiny):
    """An embedding saved whole (save_embedding_layers: `...embed.base_layer.weight`, e.g. after
    new tokens were trained) and adapted too: PEFT loads the saved tensor, then adds B @ A to it."""
    tensors = hand_tensors()
    tensors["model.embed.base_layer.weight"] = tiny_state()["model.embed.weight"] + 1.0
    adapter = write_adapter(tmp_path / "adapter", tensors, {"r": 4, "lora_alpha": 8})
    got, _ = merge(tmp_path, adapter_recipe(tiny, str(adapter), tmp_path / "out"))
    assert_matches(got, reference_model(tiny, adapter), atol=1e-5)
    factors = hand_tensors()
    torch.testing.assert_close(
        got["model.embed.weight"],
        tiny_state()["model.embed.weight"]
        + 1.0
        + 2.0 * (factors["model.embed.lora_embedding_B"] @ factors["model.embed.lora_embedding_A"]).T,
    )


def test_fan_in_fan_out_by_hand(tmp_path, tiny):
    g = torch.Generator().manual_seed(3)
    factors = {"model.layers.0.mlp.lora_A.weight": torch.randn(2, 96, generator=g)}
    factors["model.layers.0.mlp.lora_B.weight"] = torch.randn(64, 2, generator=g)
    adapter = write_adapter(tmp_path / "adapter", factors, {"r": 2, "lora_alpha": 2, "fan_in_fan_out": True})
    got, _ = merge(tmp_path, adapter_recipe(tiny, str(adapter), tmp_path / "out"))
    assert_matches(got, reference_model(tiny, adapter), atol=1e-5)


def test_bin_adapter_with_default_names_reads_the_same(tmp_path, tiny):
    """adapter_model.bin (unpickled weights-only) and PEFT's `.default` names give the same model."""
    tensors = hand_tensors()
    plain = write_adapter(tmp_path / "plain", tensors, {"r": 4, "lora_alpha": 8})
    renamed = {re.sub(r"\.(lora_[AB]|lora_embedding_[AB])", r".\1.default", k): v for k, v in tensors.items()}
    assert "model.layers.0.attn.lora_A.default.weight" in renamed
    other = write_adapter(tmp_path / "other", renamed, {"r": 4, "lora_alpha": 8}, fmt="bin")
    want, _ = merge(tmp_path, adapter_recipe(tiny, str(plain), tmp_path / "a"), "a.yaml")
    got, _ = merge(tmp_path, adapter_recipe(tiny, f"{tiny}+{other}", tmp_path / "b"), "b.yaml")
    assert all(torch.equal(got[name], want[name]) for name in want)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_merged_in_slices_equals_whole(tmp_path, monkeypatch, dtype, dora):
    """A tensor merged in slices reads only the rows of B @ A each slice needs (float32 base: the C
    kernels, through mapped(); bfloat16: PyTorch), and gives the whole tensor's merge, up to the
    float32 rounding of the product: a BLAS computes B[rows] @ A in another order than B @ A on
    some CPUs (an AMD EPYC here: 1 ulp in ~0.3% of the entries, 1.9e-6 on entries of 16-32)."""
    base = write_checkpoint(tmp_path / "base", tiny_state(), dtype=dtype)
    tensors = dora_tensors() if dora else hand_tensors()
    adapter = write_adapter(tmp_path / "adapter", tensors, {"r": 4, "lora_alpha": 8, "use_dora": dora})
    recipe = adapter_recipe(base, str(adapter), tmp_path / "whole", method="dare_linear", parameters={"density": 0.6})
    whole, _ = merge(tmp_path, recipe, "a.yaml")
    monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", 1000)  # not a multiple of a row: slices cut rows
    recipe["output"]["path"] = str(tmp_path / "sliced")
    sliced, _ = merge(tmp_path, recipe, "b.yaml")
    for name in whole:
        torch.testing.assert_close(sliced[name], whole[name], atol=1e-6, rtol=3e-7, msg=name)  # 2.5 ulps
    assert not torch.equal(whole["model.layers.1.mlp.weight"], load_output(base)["model.layers.1.mlp.weight"])


def dora_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """hand_tensors with DoRA magnitudes: per row for the attention and MLP matrices, per column
    (embedding dimension) for the embedding."""
    g = torch.Generator().manual_seed(100 + seed)
    tensors = hand_tensors(seed)
    for module, outputs in (("model.layers.0.attn", 64), ("model.layers.1.mlp", 96), ("model.embed", 64)):
        tensors[f"{module}.lora_magnitude_vector"] = 1 + torch.rand(outputs, generator=g)
    return tensors


@pytest.mark.parametrize("dora", [False, True])
def test_slices_of_an_adapted_tensor_equal_the_whole(tmp_path, tiny, dora):
    """Any cut of a tensor into slices (rows cut in two, a norm per row or per column for DoRA)
    reads the entries of the whole, which equal the float64 reference."""
    tensors = dora_tensors() if dora else hand_tensors()
    adapter = write_adapter(tmp_path / "adapter", tensors, {"r": 4, "lora_alpha": 8, "use_dora": dora})
    reference = reference_model(tiny, adapter)
    model = open_checkpoint(str(adapter), adapter_base=str(tiny))
    try:
        for name in ("model.layers.0.attn.weight", "model.layers.1.mlp.weight", "model.embed.weight"):
            whole = model.read(name)
            cuts = [0, 1, 63, 100, 2000, 2001, whole.numel()]
            parts = [model.read(name, start, stop) for start, stop in zip(cuts, cuts[1:], strict=False)]
            torch.testing.assert_close(torch.cat(parts), whole.reshape(-1), atol=1e-6, rtol=1e-6, msg=name)
            expected = torch.as_tensor(reference[name])
            torch.testing.assert_close(whole.double(), expected, atol=1e-5, rtol=1e-6, msg=name)
            assert model.mapped(name, 5, 77).array.tolist() == model.read(name, 5, 77).tolist()
    finally:
        model.close()
    if dora:  # the scaled outputs have the magnitudes as their norms
        rows = torch.as_tensor(reference["model.layers.1.mlp.weight"]).norm(dim=1)
        torch.testing.assert_close(rows, tensors["model.layers.1.mlp.lora_magnitude_vector"].double())
        columns = torch.as_tensor(reference["model.embed.weight"]).norm(dim=0)
        torch.testing.assert_close(columns, tensors["model.embed.lora_magnitude_vector"].double())


def test_adapter_config_is_an_input_of_the_merge(tmp_path, tiny):
    """A resumed merge checks adapter_config.json too: lora_alpha changes the model."""
    adapter = write_adapter(tmp_path / "adapter", hand_tensors(), {"r": 4, "lora_alpha": 8})
    model = open_checkpoint(f"{tiny}+{adapter}")
    try:
        files = {file.name for file in model.input_files()}
    finally:
        model.close()
    assert files == {"model.safetensors", "adapter_model.safetensors", "adapter_config.json"}


def test_notes_say_which_base_the_adapter_was_applied_to(tmp_path, tiny):
    adapter = write_adapter(
        tmp_path / "adapter", hand_tensors(), {"r": 4, "lora_alpha": 8, "base_model_name_or_path": "org/other"}
    )
    summary = ok("merge", write_recipe(tmp_path, adapter_recipe(tiny, str(adapter), tmp_path / "o")), "--dry-run")
    assert any("names base org/other; applied to" in note for note in summary["notes"])


def test_base_named_by_the_adapter_is_checked():
    config = read_config_from({"r": 4, "base_model_name_or_path": "meta-llama/Llama-3-8B"})
    assert base_note(config, "a", "meta-llama/Llama-3-8B") is None
    assert base_note(config, "a", "meta-llama/llama-3-8b@main") is None
    assert base_note(config, "a", "/somewhere/Llama-3-8B") is None  # a local copy of the same name
    assert "applied to /models/llama" in base_note(config, "a", "/models/llama")  # unknowable: said
    with pytest.raises(BadInput, match="base_model_name_or_path is meta-llama/Llama-3-8B.*mistralai/Mistral-7B"):
        base_note(config, "a", "mistralai/Mistral-7B")


def read_config_from(settings: dict, tmp: Path | None = None):
    import tempfile

    folder = Path(tempfile.mkdtemp()) if tmp is None else tmp
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **settings}))
    return read_config(folder)


# ---------------------------------------------------------------- refusals: one line, exit 2


@pytest.fixture
def recipe(tiny_models, tmp_path) -> dict:
    return basic_recipe(tiny_models, tmp_path / "merged")


@pytest.mark.parametrize(
    "change,culprits",
    [
        ({"use_dora": True}, ("my-adapter", "use_dora is set", "lora_magnitude_vector")),
        ({"peft_type": "IA3"}, ("adapter_config.json", "IA3", "LoRA adapters only")),
        ({"init_lora_weights": "pissa_niter_4"}, ("adapter_config.json", "pissa_niter_4", "changes the base")),
        ({"r": 8}, ("my-adapter", "rank 4", "r = 8")),
        ({"rank_pattern": {"attn": 2}}, ("my-adapter", "rank 4", "r = 2")),
        ({"lora_alpha": "x"}, ("adapter_config.json", "lora_alpha")),
        ({"rank_pattern": {"(": 2}}, ("adapter_config.json", "rank_pattern", "regular expression")),
        ({"trainable_token_indices": [1, 2]}, ("adapter_config.json", "trainable_token_indices")),
        ({"kasa_config": {"r": 4}}, ("adapter_config.json", "kasa_config", "KaSA")),
    ],
)
def test_adapter_config_refused(tmp_path, recipe, change, culprits):
    adapter = write_adapter(tmp_path / "my-adapter", hand_tensors(), {"r": 4, "lora_alpha": 8, **change})
    recipe["models"][0]["model"] = str(adapter)
    merge_bad(tmp_path, recipe, *culprits)


@pytest.mark.parametrize(
    "edit,culprits",
    [
        (lambda t: t.pop("model.layers.0.attn.lora_B.weight"), ("model.layers.0.attn", "lora_B")),
        (
            lambda t: t.update(
                {k.replace("layers.0", "layers.7"): v.clone() for k, v in t.items() if "layers.0.attn" in k}
            ),
            ("targets model.layers.7.attn.weight", "not a tensor of"),
        ),
        (
            lambda t: t.update({"model.layers.0.attn.lora_B.weight": torch.randn(32, 4)}),
            ("do not fit", "model.layers.0.attn.weight", "[32, 4]"),
        ),
        (
            lambda t: t.update({"model.layers.0.attn.lora_magnitude_vector": torch.ones(64)}),
            ("lora_magnitude_vector", "use_dora is not set"),
        ),
        (lambda t: t.update({"lm_head.weight": torch.ones(4, 4)}), ("lm_head.weight", "not a tensor of")),
    ],
)
def test_adapter_tensors_refused(tmp_path, recipe, edit, culprits):
    """A missing factor, a target the base lacks (even one among good ones: never applied in part),
    factors of the wrong shape, DoRA's magnitudes, a full tensor of no base tensor."""
    tensors = hand_tensors()
    edit(tensors)
    adapter = write_adapter(tmp_path / "my-adapter", tensors, {"r": 4, "lora_alpha": 8})
    recipe["models"][0]["model"] = str(adapter)
    recipe["policies"] = {"missing_tensor": "skip_model", "shape_mismatch": "skip_model"}
    merge_bad(tmp_path, recipe, "my-adapter", *culprits)


def test_model_matching_no_base_tensor_in_shape_is_refused(tmp_path, recipe):
    """Every name shared, every shape other: with skip_model it used to merge as the base, silently."""
    other = write_checkpoint(
        tmp_path / "wide", {k: torch.randn(*v.shape[:-1], 2 * v.shape[-1]) for k, v in tiny_state().items()}
    )
    recipe["models"][1]["model"] = str(other)
    recipe["policies"] = {"shape_mismatch": "skip_model"}
    merge_bad(tmp_path, recipe, "wide", "none of its tensors matches", "model.embed.weight: F32 [128, 128] vs")


def test_adapter_weights_without_their_folder_are_refused(tmp_path, recipe):
    adapter = write_adapter(tmp_path / "my-adapter", hand_tensors(), {"r": 4, "lora_alpha": 8})
    recipe["models"][0]["model"] = str(adapter / "adapter_model.safetensors")
    merge_bad(tmp_path, recipe, "adapter_model.safetensors", "adapter weights", "adapter's folder")


def test_adapter_needs_a_base(tmp_path, tiny_models):
    adapter = write_adapter(tmp_path / "my-adapter", hand_tensors(), {"r": 4, "lora_alpha": 8})
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(adapter), "parameters": {"weight": 1}}, {"model": str(tiny_models["ft0"])}],
        "output": {"path": str(tmp_path / "out")},
    }
    merge_bad(tmp_path, recipe, "my-adapter", "no base model", "model+adapter")


@pytest.mark.parametrize("reference", ["{base}+{adapter}+{adapter}", "{base}+", "{base}+{missing}"])
def test_bad_plus_references(tmp_path, recipe, tiny_models, reference):
    adapter = write_adapter(tmp_path / "my-adapter", hand_tensors(), {"r": 4, "lora_alpha": 8})
    model = reference.format(base=tiny_models["base"], adapter=adapter, missing=tmp_path / "nope")
    recipe["models"][0]["model"] = model
    merge_bad(tmp_path, recipe, model)


def test_adapter_weights_linked_from_outside_are_refused(tmp_path, recipe):
    outside = write_adapter(tmp_path / "elsewhere", hand_tensors(), {"r": 4, "lora_alpha": 8})
    adapter = tmp_path / "my-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text((outside / "adapter_config.json").read_text())
    os.symlink(outside / "adapter_model.safetensors", adapter / "adapter_model.safetensors")
    recipe["models"][0]["model"] = str(adapter)
    merge_bad(tmp_path, recipe, "adapter_model.safetensors", "outside its folder")


def test_adapter_weights_fifo_is_refused(tmp_path, recipe):
    adapter = tmp_path / "my-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    os.mkfifo(adapter / "adapter_model.safetensors")
    recipe["models"][0]["model"] = str(adapter)
    merge_bad(tmp_path, recipe, "adapter_model.safetensors", "FIFO")


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_adapter_bin_pickle_is_never_run(tmp_path, recipe):
    adapter = tmp_path / "my-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with open(adapter / "adapter_model.bin", "wb") as handle:
        pickle.dump({"x": Payload()}, handle)
    recipe["models"][0]["model"] = str(adapter)
    merge_bad(tmp_path, recipe, "adapter_model.bin", "refused to load")
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_hub_adapters_offline_from_the_cache(tmp_path):
    """Adapters given as Hub ids (alone and as base+adapter) come from the cache like models; an
    adapter whose config names another Hub base is refused."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    hub = tmp_path / "hf" / "hub"

    def cached(repo: str) -> Path:
        folder = hub / f"models--acme--{repo}"
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(commit)
        return folder / "snapshots" / commit

    write_checkpoint(cached("tiny-base"), tiny_state())
    write_adapter(
        cached("tiny-lora"), hand_tensors(), {"r": 4, "lora_alpha": 8, "base_model_name_or_path": "acme/tiny-base"}
    )
    write_adapter(
        cached("odd-lora"), hand_tensors(), {"r": 4, "lora_alpha": 8, "base_model_name_or_path": "acme/odd-base"}
    )
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    recipe = {
        "merge_method": "linear",
        "base_model": "acme/tiny-base",
        "models": [
            {"model": "acme/tiny-lora", "parameters": {"weight": 1.0}},
            {"model": "acme/tiny-base+acme/tiny-lora@main", "parameters": {"weight": 1.0}},
        ],
        "output": {"path": str(tmp_path / "out")},
    }
    result = run_cli("merge", str(write_recipe(tmp_path, recipe)), "--quiet", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # the adapter's base agrees: no note
    assert_matches(load_output(tmp_path / "out"), reference_model(cached("tiny-base"), cached("tiny-lora")), atol=1e-5)
    recipe["models"][0]["model"] = "acme/odd-lora"
    result = run_cli("merge", str(write_recipe(tmp_path, recipe)), "--overwrite", env=env)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "base_model_name_or_path is acme/odd-base" in result.stderr and "acme/tiny-base" in result.stderr


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=3)
        self.point = torch.nn.Conv2d(8, 8, kernel_size=1)
        self.head = torch.nn.Linear(8, 4)


def test_conv_adapter_equals_peft(tmp_path):
    """LoRA on conv layers (a 3x3 and a 1x1 kernel): A's kernels flattened, B @ A reshaped to the
    weight's shape, as PEFT merges them."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = ConvNet()
    base = write_checkpoint(tmp_path / "base", {k: v.detach().clone() for k, v in net.state_dict().items()})
    wrapped = peft.get_peft_model(
        net, peft.LoraConfig(r=2, lora_alpha=6, target_modules=["conv", "point", "head"], init_lora_weights=False)
    )
    wrapped.save_pretrained(tmp_path / "adapter")
    want = {k: v.detach().clone() for k, v in wrapped.merge_and_unload().state_dict().items()}
    got, _ = merge(tmp_path, adapter_recipe(base, str(tmp_path / "adapter"), tmp_path / "out"))
    assert_matches(got, want, atol=1e-6)
    assert_matches(got, reference_model(base, tmp_path / "adapter"), atol=1e-5)
    assert not torch.equal(got["conv.weight"], load_output(base)["conv.weight"])


def test_dora_on_a_conv_layer_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    net = ConvNet()
    base = write_checkpoint(tmp_path / "base", {k: v.detach().clone() for k, v in net.state_dict().items()})
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["conv"], use_dora=True, init_lora_weights=False)
    peft.get_peft_model(net, config).save_pretrained(tmp_path / "dora-adapter")
    recipe = adapter_recipe(base, str(tmp_path / "dora-adapter"), tmp_path / "out")
    merge_bad(tmp_path, recipe, "dora-adapter", "DoRA on a conv layer", "conv.weight")
