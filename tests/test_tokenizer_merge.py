"""Tokenizer merges (mergekit's tokenizer_source / tokenizer:): the output vocabulary, its files, and the
embedding and lm_head rows aligned by token before merging, against reference.aligned_vocabulary_rows
(an independent float64 re-derivation of mergekit 0.1.5's PermutedVocabulary, row by row).

The models: tiny LlamaForCausalLM with word-level tokenizers built here. base: a b c d; model_a: the
same plus added tokens <x> <y>; model_b: a b e c (e new, c at another id than in the base)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_recipe
from reference import TV, _gta_ref, aligned_vocabulary_rows
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tadrop_cli.cli import app

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCABULARY_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
WEIGHTS = {"model_a": 0.5, "model_b": 0.7}


def make_model(folder: Path, words: list[str], added: tuple[str, ...] = (), seed: int = 0) -> Path:
    """A LlamaForCausalLM (untied, hidden 16) whose vocabulary is its tokenizer's: <unk> <s> </s> words added."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True)
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.add_tokens(list(added))
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # embeddings of a scale the merge's differences show in
        model.model.embed_tokens.weight.normal_()
        model.lm_head.weight.normal_()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizer_models")
    return {
        "base": make_model(root / "base", ["a", "b", "c", "d"], seed=0),
        "model_a": make_model(root / "model_a", ["a", "b", "c", "d"], ("<x>", "<y>"), seed=1),
        "model_b": make_model(root / "model_b", ["a", "b", "e", "c"], seed=2),
    }


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def recipe_for(models: dict[str, Path], out: Path, method: str = "task_arithmetic", **extra) -> dict:
    parameters = {"density": 0.5} if method == "ties" else {}
    return {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models[name]), "parameters": {"weight": weight, **parameters}}
            for name, weight in WEIGHTS.items()
        ],
        "dtype": "float32",
        "output": {"path": str(out)},
        **extra,
    }


def merge(tmp_path: Path, recipe: dict) -> Path:
    result = invoke("merge", write_recipe(tmp_path, recipe), "--quiet")
    assert result.exit_code == 0, f"{result.stdout}\n{result.stderr}\n{result.exception!r}"
    return Path(recipe["output"]["path"])


def vocabulary_of(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True).get_vocab()


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def aligned_inputs(
    models: dict[str, Path], output: dict[str, int], rows: int, name: str, base: int | None = 0, rules=None
) -> list[np.ndarray]:
    """Each of base, model_a, model_b's tensor `name`, aligned to `output` by the reference."""
    inputs = [
        (vocabulary_of(models[m]), len(vocabulary_of(models[m])), tensors_of(models[m])[name].double().numpy())
        for m in ("base", "model_a", "model_b")
    ]
    return aligned_vocabulary_rows(output, rows, inputs, base, rules)


def task_arithmetic(aligned: list[np.ndarray]) -> np.ndarray:
    base, a, b = aligned
    return base + WEIGHTS["model_a"] * (a - base) + WEIGHTS["model_b"] * (b - base)


def assert_rows(out: Path, expected: dict[str, np.ndarray]) -> None:
    merged = tensors_of(out)
    for name, rows in expected.items():
        assert tuple(merged[name].shape) == rows.shape, name
        np.testing.assert_allclose(merged[name].double().numpy(), rows, atol=2e-6, rtol=0, err_msg=name)


def loads_with_vocab_size(out: Path, rows: int) -> None:
    """The output loads in transformers, with `rows` embedding rows and that vocab_size."""
    from transformers import AutoModelForCausalLM

    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.get_input_embeddings().weight.shape[0] == rows
    assert model.get_output_embeddings().weight.shape[0] == rows


# ---------------------------------------------------------------- sources


def test_union_has_every_models_tokens_and_rows_aligned_by_token(models, tmp_path):
    out = merge(tmp_path, recipe_for(models, tmp_path / "out", tokenizer_source="union"))
    output = vocabulary_of(out)
    assert set(output) == set(vocabulary_of(models["base"])) | {"<x>", "<y>", "e"}
    assert {output[t] for t in ("<unk>", "<s>", "</s>", "a", "b", "c", "d")} == set(range(7))  # the base's ids kept
    assert_rows(out, {name: task_arithmetic(aligned_inputs(models, output, 10, name)) for name in VOCABULARY_TENSORS})
    loads_with_vocab_size(out, 10)
    # the other tensors are merged as always
    base, a, b = (tensors_of(models[m])["model.norm.weight"].double() for m in ("base", "model_a", "model_b"))
    np.testing.assert_allclose(
        tensors_of(out)["model.norm.weight"].double().numpy(), (base + 0.5 * (a - base) + 0.7 * (b - base)).numpy()
    )
    assert "c" in output and vocabulary_of(models["model_b"])["c"] != output["c"]  # c was re-indexed for model_b


def test_union_token_rows_follow_mergekits_rules(models, tmp_path):
    """Spot checks of the rules themselves, on the merged rows: <x> is model_a's alone (its row is every
    model's, so the merge gives model_a's row); e is model_b's alone; c is everyone's (each keeps its own)."""
    out = merge(tmp_path, recipe_for(models, tmp_path / "out", tokenizer_source="union"))
    output, merged = vocabulary_of(out), tensors_of(out)["model.embed_tokens.weight"].double()
    own = {m: tensors_of(models[m])["model.embed_tokens.weight"].double() for m in ("base", "model_a", "model_b")}
    a_vocab, b_vocab = vocabulary_of(models["model_a"]), vocabulary_of(models["model_b"])
    torch.testing.assert_close(merged[output["<x>"]], own["model_a"][a_vocab["<x>"]], atol=1e-6, rtol=0)
    torch.testing.assert_close(merged[output["e"]], own["model_b"][b_vocab["e"]], atol=1e-6, rtol=0)
    base_c = own["base"][vocabulary_of(models["base"])["c"]]
    c = base_c + 0.5 * (own["model_a"][a_vocab["c"]] - base_c) + 0.7 * (own["model_b"][b_vocab["c"]] - base_c)
    torch.testing.assert_close(merged[output["c"]], c, atol=1e-6, rtol=0)


def test_base_source_keeps_the_base_vocabulary_and_its_files(models, tmp_path):
    out = merge(tmp_path, recipe_for(models, tmp_path / "out", tokenizer_source="base"))
    output = vocabulary_of(out)
    assert output == vocabulary_of(models["base"])
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the base's own files, as they are
        assert (out / name).read_bytes() == (models["base"] / name).read_bytes()
    assert_rows(out, {name: task_arithmetic(aligned_inputs(models, output, 7, name)) for name in VOCABULARY_TENSORS})
    loads_with_vocab_size(out, 7)


def test_tokenizer_block_with_a_model_as_source(models, tmp_path):
    recipe = recipe_for(models, tmp_path / "out", tokenizer={"source": str(models["model_b"])})
    out = merge(tmp_path, recipe)
    output = vocabulary_of(out)
    assert output == vocabulary_of(models["model_b"])
    assert_rows(out, {name: task_arithmetic(aligned_inputs(models, output, 7, name)) for name in VOCABULARY_TENSORS})
    loads_with_vocab_size(out, 7)


def test_pad_to_multiple_of_adds_rows_of_each_models_mean(models, tmp_path):
    recipe = recipe_for(models, tmp_path / "out", tokenizer={"source": "union", "pad_to_multiple_of": 8})
    out = merge(tmp_path, recipe)
    output = vocabulary_of(out)
    assert len(output) == 10
    expected = {name: task_arithmetic(aligned_inputs(models, output, 16, name)) for name in VOCABULARY_TENSORS}
    assert_rows(out, expected)
    assert not np.allclose(expected["lm_head.weight"][12], 0)  # the padding is not zeros
    loads_with_vocab_size(out, 16)


def test_tokens_with_sources_and_force(models, tmp_path):
    tokens = {
        "<x>": {"source": str(models["model_a"]), "force": True},
        "a": {"source": {"kind": "zero"}, "force": True},
        "e": {"source": {"kind": "model_token", "model": str(models["base"]), "token": "c"}},
        "b": {"source": {"kind": "model_token", "model": str(models["model_b"]), "token_id": 5}, "force": True},
        "<new>": {"source": {"kind": "model_token", "model": str(models["model_b"]), "token": "e"}},
    }
    out = merge(tmp_path, recipe_for(models, tmp_path / "out", tokenizer={"source": "union", "tokens": tokens}))
    output = vocabulary_of(out)
    assert output["<new>"] == 10  # added after the union's tokens
    rules = {
        "<x>": {"source": ("model", 1), "force": True},
        "a": {"source": ("zero",), "force": True},
        "e": {"source": ("row", 0, vocabulary_of(models["base"])["c"])},
        "b": {"source": ("row", 2, 5), "force": True},
        "<new>": {"source": ("row", 2, vocabulary_of(models["model_b"])["e"])},
    }
    expected = {
        name: task_arithmetic(aligned_inputs(models, output, 11, name, rules=rules)) for name in VOCABULARY_TENSORS
    }
    assert_rows(out, expected)
    assert np.allclose(expected["model.embed_tokens.weight"][output["a"]], 0)  # forced zeros for every model
    loads_with_vocab_size(out, 11)


def test_linear_without_a_base_averages_tokens_of_several_models(models, tmp_path):
    recipe = recipe_for(models, tmp_path / "out", "linear", tokenizer_source="union")
    del recipe["base_model"]
    recipe["models"].insert(0, {"model": str(models["base"]), "parameters": {"weight": 0.2}})
    out = merge(tmp_path, recipe)
    output = vocabulary_of(out)
    for name in VOCABULARY_TENSORS:
        aligned = aligned_inputs(models, output, 10, name, base=None)
        expected = (0.2 * aligned[0] + 0.5 * aligned[1] + 0.7 * aligned[2]) / 1.4
        assert_rows(out, {name: expected})


def test_ties_by_the_kernels_sees_aligned_rows(models, tmp_path):
    """TIES (the CPU kernels' magnitude trim and sign election) over the aligned tensors."""
    out = merge(tmp_path, recipe_for(models, tmp_path / "out", "ties", tokenizer_source="union"))
    output = vocabulary_of(out)
    for name in VOCABULARY_TENSORS:
        base, a, b = aligned_inputs(models, output, 10, name)
        tvs = [TV(a - base, weight=0.5, density=0.5), TV(b - base, weight=0.7, density=0.5)]
        assert_rows(out, {name: _gta_ref("ties")(base, tvs)})


def test_tadrop_pass_one_and_a_resume_read_the_aligned_tensors(models, tmp_path):
    recipe = recipe_for(models, tmp_path / "out", "ties", tokenizer_source="union", tadrop={"min_numel": 0})
    out = merge(tmp_path, recipe)
    assert tensors_of(out)["model.embed_tokens.weight"].shape[0] == 10
    plan = invoke("plan", write_recipe(tmp_path, recipe, "plan.yaml"), "--json")
    assert plan.exit_code == 0, plan.stderr
    assert "model.embed_tokens.weight" in plan.stdout


def test_same_tokenizers_need_no_alignment(models, tmp_path):
    """base source, every model with the base's vocabulary: the merge reads the files as without a
    tokenizer merge (no view), and gives the same tensors."""
    recipe = recipe_for(models, tmp_path / "plain")
    same = make_model(tmp_path / "same", ["a", "b", "c", "d"], seed=5)
    recipe["models"] = [{"model": str(same), "parameters": {"weight": 0.5}}]
    plain = merge(tmp_path, recipe)
    with_source = merge(tmp_path, {**recipe, "tokenizer_source": "base", "output": {"path": str(tmp_path / "tok")}})
    for name, tensor in tensors_of(plain).items():
        assert torch.equal(tensor, tensors_of(with_source)[name]), name


def test_dry_run_checks_the_tokenizers(models, tmp_path):
    recipe = recipe_for(models, tmp_path / "out", tokenizer_source="union")
    result = invoke("merge", write_recipe(tmp_path, recipe), "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    assert not (tmp_path / "out").exists()
    notes = json.loads(result.stdout)["notes"]
    assert (
        "tokenizer: union: 10 tokens (+3 against the base); lm_head.weight, model.embed_tokens.weight aligned by token"
        in notes
    )


def test_bf16_models_merge_in_their_dtype(models, tmp_path):
    bf16 = {}
    for name, folder in models.items():
        copy = tmp_path / name
        copy.mkdir()
        for file in folder.iterdir():
            if file.suffix == ".safetensors":
                save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(file)).items()}, str(copy / file.name))
            else:
                (copy / file.name).write_bytes(file.read_bytes())
        bf16[name] = copy
    recipe = recipe_for(bf16, tmp_path / "out", tokenizer_source="union")
    del recipe["dtype"]
    out = merge(tmp_path, recipe)
    merged = tensors_of(out)
    assert merged["model.embed_tokens.weight"].dtype == torch.bfloat16
    output = vocabulary_of(out)
    expected = task_arithmetic(aligned_inputs(bf16, output, 10, "lm_head.weight"))
    np.testing.assert_allclose(merged["lm_head.weight"].double().numpy(), expected, atol=2e-2, rtol=1e-2)


# ---------------------------------------------------------------- bad input


def refused(tmp_path: Path, recipe: dict, *culprits: str) -> str:
    result = invoke("merge", write_recipe(tmp_path, recipe))
    assert result.exit_code == 2, f"{result.stdout}\n{result.stderr}\n{result.exception!r}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for culprit in culprits:
        assert culprit in lines[0], lines[0]
    assert not Path(recipe["output"]["path"]).exists()
    return lines[0]


def test_unknown_tokenizer_source_is_refused(models, tmp_path):
    refused(tmp_path, recipe_for(models, tmp_path / "out", tokenizer_source="unoin"), "unoin", "tokenizer source")


def test_union_needs_every_models_tokenizer(models, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.safetensors", "config.json"):
        (bare / name).write_bytes((models["model_a"] / name).read_bytes())
    recipe = recipe_for(models, tmp_path / "out", tokenizer_source="union")
    recipe["models"][0]["model"] = str(bare)
    refused(tmp_path, recipe, str(bare), "no tokenizer files", "union")


def test_base_source_takes_the_bases_tokenizer_for_a_model_without_one(models, tmp_path):
    """As mergekit: a model without tokenizer files is assumed to have the base's tokenizer."""
    bare = tmp_path / "bare"
    bare.mkdir()
    state = tensors_of(models["model_a"])
    state = {k: (v[:7].clone() if k in VOCABULARY_TENSORS else v) for k, v in state.items()}
    save_file(state, str(bare / "model.safetensors"))
    config = json.loads((models["model_a"] / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "vocab_size": 7}))
    recipe = recipe_for(models, tmp_path / "out", tokenizer_source="base")
    recipe["models"][0]["model"] = str(bare)
    out = merge(tmp_path, recipe)
    assert vocabulary_of(out) == vocabulary_of(models["base"])


def test_embedding_rows_must_match_the_tokenizer(models, tmp_path):
    short = tmp_path / "short"
    short.mkdir()
    for file in models["model_a"].iterdir():
        (short / file.name).write_bytes(file.read_bytes())
    state = tensors_of(models["model_a"])
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:8].clone()
    save_file(state, str(short / "model.safetensors"))
    recipe = recipe_for(models, tmp_path / "out", tokenizer_source="union")
    recipe["models"][0]["model"] = str(short)
    refused(tmp_path, recipe, str(short), "model.embed_tokens.weight", "8 rows")


def test_tokenizer_ids_beyond_the_rows_are_refused(models, tmp_path):
    """No config vocab_size to cut the tokenizer by: a token id past the last row is an error."""
    short = tmp_path / "short"
    short.mkdir()
    for file in models["model_a"].iterdir():
        if file.name != "config.json":
            (short / file.name).write_bytes(file.read_bytes())
    state = {k: (v[:8].clone() if k in VOCABULARY_TENSORS else v) for k, v in tensors_of(models["model_a"]).items()}
    save_file(state, str(short / "model.safetensors"))
    recipe = recipe_for(models, tmp_path / "out", tokenizer_source="union")
    recipe["models"][0]["model"] = str(short)
    refused(tmp_path, recipe, str(short), "8 rows", "'<y>'")


@pytest.mark.parametrize(
    ("tokenizer", "culprits"),
    [
        ({"source": "union", "tokens": {"z": {"source": "elsewhere"}}}, ("tokenizer.tokens.z.source", "elsewhere")),
        (
            {"source": "union", "tokens": {"z": {"source": {"kind": "model_token", "model": "BASE", "token": "q"}}}},
            ("tokenizer.tokens.z.source", "'q'"),
        ),
        (
            {"source": "union", "tokens": {"z": {"source": {"kind": "model_token", "model": "BASE", "token_id": 99}}}},
            ("tokenizer.tokens.z.source", "99"),
        ),
        ({"source": "union", "tokens": {"e": {"source": "BASE"}}}, ("tokenizer.tokens.e.source", "'e'")),
        ({"source": "union", "tokens": {"z": {"source": {"kind": "model_token", "model": "BASE"}}}}, ("token_id",)),
        ({"source": "union", "pad_to_multiple_of": -8}, ("pad_to_multiple_of",)),
        ({"source": "union", "tokenz": {}}, ("tokenz", "unknown key")),
    ],
)
def test_bad_tokens_are_refused(models, tmp_path, tokenizer, culprits):
    text = json.dumps(tokenizer).replace("BASE", str(models["base"]))
    refused(tmp_path, recipe_for(models, tmp_path / "out", tokenizer=json.loads(text)), *culprits)


def test_tokenizer_source_and_block_together_are_refused(models, tmp_path):
    recipe = recipe_for(models, tmp_path / "out", tokenizer_source="base", tokenizer={"source": "union"})
    refused(tmp_path, recipe, "tokenizer_source", "not both")


def test_base_without_tokenizer_files_is_refused(models, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.safetensors", "config.json"):
        (bare / name).write_bytes((models["base"] / name).read_bytes())
    recipe = recipe_for(models, tmp_path / "out", tokenizer_source="base")
    recipe["base_model"] = str(bare)
    refused(tmp_path, recipe, str(bare), "no tokenizer files")


def test_tokenizer_files_are_inputs_a_resume_checks(models, tmp_path):
    """A resumed merge keeps finished shards only if its inputs are unchanged: with a tokenizer merge the rows
    depend on every model's tokenizer files, so those count as inputs."""
    from tadrop_cli.layout import build_layout
    from tadrop_cli.recipe import load_recipe
    from tadrop_cli.run import _input_files

    layout = build_layout(
        load_recipe(write_recipe(tmp_path, recipe_for(models, tmp_path / "out", tokenizer_source="union")))
    )
    try:
        files = {str(file) for file in _input_files(layout)}
    finally:
        layout.close()
    for name in models:
        assert str(models[name] / "tokenizer.json") in files
        assert str(models[name] / "model.safetensors") in files


# ---------------------------------------------------------------- streaming: rows by blocks


def aligned_layout(models: dict[str, Path], tmp_path: Path, **tokenizer):
    from tadrop_cli.layout import build_layout
    from tadrop_cli.recipe import load_recipe

    recipe = recipe_for(models, tmp_path / "out", tokenizer={"source": "union", **tokenizer})
    return build_layout(load_recipe(write_recipe(tmp_path, recipe)))


def test_a_slice_of_an_aligned_tensor_reads_only_its_rows(models, tmp_path, monkeypatch):
    """Entries of two rows of model_b's aligned lm_head read two rows of model_b's stored lm_head and
    nothing else: not every model's whole tensor (the memory promise: a block's rows, not the vocabulary)."""
    from tadrop_cli.checkpoint import Checkpoint

    read_entries = []
    real_read, real_mapped, real_rows = Checkpoint.read, Checkpoint.mapped, Checkpoint.read_rows

    def counting_read(self, name, start=None, stop=None, pinned=False):
        read_entries.append((self.label, (self.tensors[name].numel if stop is None else stop) - (start or 0)))
        return real_read(self, name, start, stop, pinned)

    def counting_mapped(self, name, start, stop):
        read_entries.append((self.label, stop - start))
        return real_mapped(self, name, start, stop)

    def counting_rows(self, name, rows):
        read_entries.append((self.label, len(rows) * self.tensors[name].shape[1]))
        return real_rows(self, name, rows)

    layout = aligned_layout(models, tmp_path)
    try:
        for method, spy in (("read", counting_read), ("mapped", counting_mapped), ("read_rows", counting_rows)):
            monkeypatch.setattr(Checkpoint, method, spy)
        model_b = next(m.checkpoint for m in layout.models if m.label == str(models["model_b"]))
        hidden = model_b.tensors["lm_head.weight"].shape[1]
        rows = model_b.read("lm_head.weight", 0, 2 * hidden)  # <unk> and <s>: model_b's own rows 0 and 1
    finally:
        layout.close()
    assert read_entries == [(str(models["model_b"]), 2 * hidden)]
    stored = tensors_of(models["model_b"])["lm_head.weight"]
    assert torch.equal(rows, stored[:2].reshape(-1))


@pytest.mark.parametrize("block_entries", [1 << 20, 16, 40])
def test_blockwise_reads_equal_the_whole_aligned_tensor(models, tmp_path, monkeypatch, block_entries):
    """Every model's aligned tensor read whole matches the float64 reference (own rows exactly, defaults
    and padding to float32 rounding), and any range of its entries read alone (a slice the kernels or
    PyTorch ask for, cutting rows anywhere) gives the same bits as that range of the whole; also with the
    padding mean's pass cut into blocks of a row or a few."""
    from tadrop_cli import aligned_checkpoint

    monkeypatch.setattr(aligned_checkpoint, "BLOCK_ENTRIES", block_entries)
    layout = aligned_layout(models, tmp_path, pad_to_multiple_of=8)
    try:
        checkpoints = [layout.reference, *(m.checkpoint for m in layout.models)]
        output = layout.tokenizer.vocabulary
        for name in VOCABULARY_TENSORS:
            expected = aligned_inputs(models, output, 16, name)
            for checkpoint, reference in zip(checkpoints, expected, strict=True):
                whole = checkpoint.read(name)
                assert tuple(whole.shape) == reference.shape
                np.testing.assert_allclose(whole.double().numpy(), reference, atol=1e-6, rtol=0)
                flat = whole.reshape(-1)
                for start, stop in [(0, 1), (5, 37), (16, 48), (150, 200), (159, 161), (100, flat.numel())]:
                    assert torch.equal(checkpoint.read(name, start, stop), flat[start:stop]), (name, start, stop)
                    stored = checkpoint.mapped(name, start, stop)
                    assert torch.equal(stored.to_torch(), flat[start:stop])
    finally:
        layout.close()


def test_merges_in_slices_that_cut_rows_give_the_bits_of_a_whole_tensor_merge(models, tmp_path, monkeypatch):
    """TIES by the kernels with slices of 40 entries (rows of 16: slices start and end mid-row) writes the
    same bytes as with the tensor in one slice, and a padded vocabulary too."""
    from tadrop_cli import tensor_merge

    extra = {"tokenizer": {"source": "union", "pad_to_multiple_of": 8}}
    whole = merge(tmp_path, recipe_for(models, tmp_path / "whole", "ties", **extra))
    monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", 40)
    sliced = merge(tmp_path, recipe_for(models, tmp_path / "sliced", "ties", **extra))
    assert (whole / "model.safetensors").read_bytes() == (sliced / "model.safetensors").read_bytes()


def test_the_dry_runs_time_estimate_counts_building_the_merged_tokenizer(models, tmp_path, monkeypatch):
    """A real merge builds the merged tokenizer again (~14 s for a 33.5k-token union): the dry run,
    which has just built it, adds the seconds that took. Here the build is made 3 s slower."""
    import time

    from tadrop_cli import layout

    path = write_recipe(tmp_path, recipe_for(models, tmp_path / "out", tokenizer_source="union"))

    def estimate() -> float:
        result = invoke("merge", path, "--dry-run", "--json")
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)["estimated_seconds"]

    quick = estimate()
    original = layout.merged_vocabulary
    monkeypatch.setattr(layout, "merged_vocabulary", lambda *a: time.sleep(3) or original(*a))
    assert estimate() >= quick + 2.9


def test_the_dry_runs_memory_estimate_covers_a_tokenizer_merges_peak(models, tmp_path):
    """A tokenizer merge's process holds torch, transformers and the tokenizers besides the merge's buffers:
    the dry run's peak covers the real merge's (measured by the merge itself, in its own process), within 2x.
    (It counted a kernels merge's 100 MB runtime: about a third of the real peak.)"""
    from conftest import run_cli

    path = write_recipe(tmp_path, recipe_for(models, tmp_path / "out", "ties", tokenizer_source="union"))
    dry = run_cli("merge", str(path), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    real = run_cli("merge", str(path), "--json", "--quiet")
    assert real.returncode == 0, real.stderr
    estimated, peak = json.loads(dry.stdout)["estimated_peak_memory_bytes"], json.loads(real.stdout)["peak_rss_bytes"]
    assert peak <= estimated <= 2 * peak, (estimated, peak)


@pytest.mark.parametrize(
    "fmt, dtype", [("safetensors", torch.float32), ("safetensors", torch.bfloat16), ("bin", torch.float16)]
)
def test_read_rows_gathers_rows_in_any_order(tmp_path, fmt, dtype):
    """Checkpoint.read_rows (the alignment's gather): runs, scattered rows, repeats and the last row, as
    stored, in the order asked, from a safetensors file (pread per run) and a PyTorch file (read())."""
    from conftest import write_checkpoint

    from tadrop_cli.checkpoint import open_checkpoint

    table = torch.randn(50, 12, generator=torch.Generator().manual_seed(7))
    folder = write_checkpoint(
        tmp_path / "m", {"embed.weight": table, "bias": table[:, 0].clone()}, fmt=fmt, dtype=dtype
    )
    checkpoint = open_checkpoint(str(folder))
    try:
        for rows in ([3, 4, 5, 6], [49, 0, 7, 8, 2, 7, 30, 31], [10], []):
            index = np.array(rows, dtype=np.int64)
            for name, stored in (("embed.weight", table.to(dtype)), ("bias", table[:, 0].to(dtype))):
                got = checkpoint.read_rows(name, index)
                expected = stored[index].reshape(len(rows), stored[0].numel())
                assert got.shape == tuple(expected.shape)
                assert torch.equal(torch.from_numpy(got.view(np.uint8)).view(dtype).reshape(expected.shape), expected)
    finally:
        checkpoint.close()
