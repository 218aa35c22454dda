"""End-to-end behaviour of `tadrop merge`: formats in and out, dtypes, determinism, TADrop in the engine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import basic_recipe, fine_tune, run_cli, tiny_llama_config, tiny_state, write_checkpoint, write_recipe
from reference import dare_keep
from safetensors import safe_open
from safetensors.torch import load_file

from tadrop_cli.layout import tensor_seed
from tadrop_cli.recipe import parse_recipe
from tadrop_cli.run import MergeOptions, run_merge


def load_output(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for file in files:
        state.update(load_file(str(folder / file)))
    return state


def reference_ties(base, models, weight, density):
    """TIES for uniform weights/densities, written out directly (no tadrop code)."""
    deltas = []
    for m in models:
        d = (m - base).double().reshape(-1)
        k = int(density * d.numel())
        keep = torch.zeros_like(d, dtype=torch.bool)
        keep[d.abs().argsort(descending=True)[:k]] = True
        deltas.append(d * keep * weight)
    stacked = torch.stack(deltas)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == sign
    mixed = (stacked * agree).sum(0)
    divisor = (weight * agree).sum(0)
    divisor[divisor == 0] = 1
    return (base.double().reshape(-1) + mixed / divisor).reshape(base.shape)


def test_ties_merge_matches_reference_and_copies_config(tiny_models, tmp_path):
    recipe = write_recipe(tmp_path, basic_recipe(tiny_models, tmp_path / "out"))
    result = run_cli("merge", str(recipe), "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["tensors"] == 9 and summary["shards"] == 1
    out = load_output(tmp_path / "out")
    base = load_file(str(tiny_models["base"] / "model.safetensors"))
    models = [load_file(str(tiny_models[f"ft{i}"] / "model.safetensors")) for i in range(3)]
    for name in base:
        expected = reference_ties(base[name], [m[name] for m in models], 0.6, 0.4)
        torch.testing.assert_close(out[name].double(), expected, atol=1e-5, rtol=0)
    assert (tmp_path / "out" / "config.json").read_text() == (tiny_models["base"] / "config.json").read_text()
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt" and metadata["merge_method"] == "ties" and len(metadata["recipe_sha256"]) == 64


@pytest.mark.parametrize("in_shards,out_shard_size", [(1, "20KB"), (3, "5GB"), (3, "30KB")])
def test_sharded_input_and_output_give_the_same_tensors(tmp_path, in_shards, out_shard_size):
    base = tiny_state()
    models = {"base": write_checkpoint(tmp_path / "base", base, shards=in_shards)}
    for i in range(2):
        models[f"ft{i}"] = write_checkpoint(tmp_path / f"ft{i}", fine_tune(base, i), shards=in_shards)
    plain = {"base": write_checkpoint(tmp_path / "pbase", base)}
    for i in range(2):
        plain[f"ft{i}"] = write_checkpoint(tmp_path / f"pft{i}", fine_tune(base, i))
    sharded_recipe = basic_recipe(models, tmp_path / "sharded")
    sharded_recipe["output"]["shard_size"] = out_shard_size
    plain_recipe = basic_recipe(plain, tmp_path / "plain")
    for recipe in (sharded_recipe, plain_recipe):
        run_merge(parse_recipe(recipe), MergeOptions())
    sharded, single = load_output(tmp_path / "sharded"), load_output(tmp_path / "plain")
    assert sharded.keys() == single.keys()
    for name in single:
        assert torch.equal(sharded[name], single[name]), name
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    if out_shard_size == "5GB":
        assert not index.exists()
    else:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert len(set(weight_map.values())) > 1 and set(weight_map) == set(single)
        for name, file in weight_map.items():  # every shard holds what the index says
            with safe_open(str(tmp_path / "sharded" / file), "pt") as f:
                assert name in f.keys()


def test_written_bytes_are_handed_to_the_disk_as_the_merge_goes(tmp_path, monkeypatch):
    """Every WRITEBACK_BYTES, the writer starts writing what it appended (sync_file_range):
    ranges that follow each other from the file's start, each at least that long, all
    written before the file is closed; the file is the one written without it."""
    from tadrop_cli import shards

    models = {"base": write_checkpoint(tmp_path / "base", tiny_state())}
    models.update({f"ft{i}": write_checkpoint(tmp_path / f"ft{i}", fine_tune(tiny_state(), i)) for i in range(2)})
    calls = []
    monkeypatch.setattr(shards, "WRITEBACK_BYTES", 10_000)
    monkeypatch.setattr(
        shards,
        "_sync_file_range",
        lambda: lambda fd, start, length, flags: calls.append((os.fstat(fd).st_size, start, length, flags)),
    )
    run_merge(parse_recipe(basic_recipe(models, tmp_path / "out")), MergeOptions())
    monkeypatch.setattr(shards, "_sync_file_range", lambda: None)
    run_merge(parse_recipe(basic_recipe(models, tmp_path / "plain")), MergeOptions())
    written = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert written == (tmp_path / "plain" / "model.safetensors").read_bytes()
    assert len(calls) >= 3 and calls[0][1] == 0
    for (size, start, length, flags), following in zip(calls, calls[1:] + [None], strict=True):
        assert length >= 10_000 and flags == 2 and size >= start + length  # flushed to the file before
        assert following is None or following[1] == start + length
    assert (
        len(written) - (calls[-1][1] + calls[-1][2]) < 10_000 + 96 * 64 * 4
    )  # the rest: less than the threshold plus a tensor


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16", "float16", None])
def test_dtypes_in_and_out(tmp_path, in_dtype, out_dtype):
    base = tiny_state()
    models = {"base": write_checkpoint(tmp_path / "base", base, dtype=in_dtype)}
    models["ft0"] = write_checkpoint(tmp_path / "ft0", fine_tune(base, 0), dtype=in_dtype)
    recipe = basic_recipe(models, tmp_path / "out", method="task_arithmetic")
    recipe["models"][0]["parameters"] = {"weight": 0.5}
    if out_dtype:
        recipe["output"]["dtype"] = out_dtype
    run_merge(parse_recipe(recipe), MergeOptions())
    out = load_output(tmp_path / "out")
    expected_dtype = getattr(torch, out_dtype) if out_dtype else in_dtype
    b = load_file(str(models["base"] / "model.safetensors"))
    f = load_file(str(models["ft0"] / "model.safetensors"))
    for name, tensor in out.items():
        assert tensor.dtype == expected_dtype
        # maths in float32 from the stored values, one cast at the end
        expected = (b[name].float() + 0.5 * (f[name].float() - b[name].float())).to(expected_dtype)
        assert torch.equal(tensor, expected), name


def test_mergekit_dtype_key_sets_the_output_dtype(tiny_models, tmp_path):
    recipe = basic_recipe(tiny_models, tmp_path / "out", dtype="bfloat16")
    run_merge(parse_recipe(recipe), MergeOptions())
    assert all(t.dtype == torch.bfloat16 for t in load_output(tmp_path / "out").values())


def test_pytorch_bin_input_matches_safetensors_input(tmp_path):
    base = tiny_state()
    st = {
        "base": write_checkpoint(tmp_path / "sbase", base),
        "ft0": write_checkpoint(tmp_path / "sft0", fine_tune(base, 0)),
    }
    pt = {
        "base": write_checkpoint(tmp_path / "bbase", base, fmt="bin"),
        "ft0": write_checkpoint(tmp_path / "bft0", fine_tune(base, 0), fmt="bin"),
    }
    run_merge(parse_recipe(basic_recipe(st, tmp_path / "a")), MergeOptions())
    run_merge(parse_recipe(basic_recipe(pt, tmp_path / "b")), MergeOptions())
    a, b = load_output(tmp_path / "a"), load_output(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_single_file_sources(tmp_path):
    base = tiny_state()
    write_checkpoint(tmp_path / "base", base)
    write_checkpoint(tmp_path / "ft0", fine_tune(base, 0))
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(tmp_path / "base" / "model.safetensors"), "parameters": {"weight": 1.0}},
            {"model": str(tmp_path / "ft0" / "model.safetensors"), "parameters": {"weight": 3.0}},
        ],
        "output": {"path": str(tmp_path / "out")},
    }
    run_merge(parse_recipe(recipe), MergeOptions())
    out = load_output(tmp_path / "out")
    ft = fine_tune(base, 0)
    for name in base:
        torch.testing.assert_close(out[name], (base[name] + 3 * ft[name]) / 4, atol=1e-6, rtol=0)


def test_hub_reference_resolves_offline_from_the_cache(tmp_path, monkeypatch):
    """A repo id is fetched through huggingface_hub; offline, it comes from the local cache."""
    base = tiny_state()
    commit = "0123456789abcdef0123456789abcdef01234567"
    for repo, state in (("tiny-base", base), ("tiny-ft", fine_tune(base, 1))):
        repo_dir = tmp_path / "hf" / "hub" / f"models--acme--{repo}"
        write_checkpoint(repo_dir / "snapshots" / commit, state)
        (repo_dir / "refs").mkdir(parents=True)
        (repo_dir / "refs" / "main").write_text(commit)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": "acme/tiny-base",
        "models": [{"model": "acme/tiny-ft@main", "parameters": {"weight": 1.0}}],
        "output": {"path": str(tmp_path / "out")},
    }
    result = run_cli("merge", str(write_recipe(tmp_path, recipe)), "--quiet", env=env)
    assert result.returncode == 0, result.stderr
    out = load_output(tmp_path / "out")
    ft = fine_tune(base, 1)
    assert all(torch.equal(out[k], ft[k]) for k in base)
    assert (tmp_path / "out" / "config.json").exists()
    missing = {**recipe, "models": [{"model": "acme/not-cached"}], "output": {"path": str(tmp_path / "out2")}}
    result = run_cli("merge", str(write_recipe(tmp_path, missing, "missing.yaml")), env=env)
    assert result.returncode == 2
    assert "acme/not-cached" in result.stderr and "Traceback" not in result.stderr


def test_dare_is_seeded_per_tensor_and_independent_of_model_order(tiny_models, tmp_path):
    recipe = basic_recipe(tiny_models, tmp_path / "a", method="dare_linear", seed=7)
    reordered = basic_recipe(tiny_models, tmp_path / "b", method="dare_linear", seed=7)
    reordered["models"] = list(reversed(reordered["models"]))
    other_seed = basic_recipe(tiny_models, tmp_path / "c", method="dare_linear", seed=8)
    for r in (recipe, reordered, other_seed):
        run_merge(parse_recipe(r), MergeOptions())
    a, b, c = (load_output(tmp_path / x) for x in "abc")
    name = "model.layers.0.mlp.weight"
    torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)  # sums in another order: rounding only
    assert not torch.allclose(a[name], c[name])
    # the mask of each (model, tensor) is exactly the documented stream
    base = load_file(str(tiny_models["base"] / "model.safetensors"))[name]
    expected = base.clone()
    for i in range(3):
        label = str(tiny_models[f"ft{i}"])
        delta = load_file(str(tiny_models[f"ft{i}"] / "model.safetensors"))[name] - base
        keep = torch.from_numpy(dare_keep(tuple(delta.shape), 0.4, tensor_seed(7, label, name)))
        expected += 0.6 * delta * keep / 0.4
    torch.testing.assert_close(a[name], expected, atol=1e-5, rtol=0)


def test_tadrop_in_the_engine_keeps_budget_and_protects_concentrated_tensors(tiny_models, tmp_path):
    recipe = basic_recipe(tiny_models, tmp_path / "out", tadrop={"statistic": "kurtosis", "strength": 0.3})
    result = run_cli("plan", str(write_recipe(tmp_path, recipe)), "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    ft0 = str(tiny_models["ft0"])
    rows = [r for r in plan["tensors"] if r["model"] == ft0]
    adaptive = [r for r in rows if r["reason"] == "adaptive"]
    assert len(adaptive) == 5  # 2 mlp + 2 attn + embed; norms and biases are excluded
    assert all(r["ratio"] == pytest.approx(0.6) for r in rows if r["reason"] == "excluded")
    weighted = sum(r["numel"] * r["ratio"] for r in adaptive) / sum(r["numel"] for r in adaptive)
    assert weighted == pytest.approx(0.6, abs=1e-3)
    # the fixture gives ft0 sparse, heavy deltas on odd-sorted tensors and dense ones on even: compare them
    sparse_like = [r for r in adaptive if r["score"] > 10]
    dense_like = [r for r in adaptive if r["score"] < 1]
    assert sparse_like and dense_like
    assert max(r["ratio"] for r in sparse_like) < min(r["ratio"] for r in dense_like)
    # the merge applies exactly these ratios: count surviving entries of ft0 via a one-model TIES
    single = basic_recipe(
        {"base": tiny_models["base"], "ft0": tiny_models["ft0"]},
        tmp_path / "one",
        method="magnitude_prune",
        tadrop={"statistic": "kurtosis", "strength": 0.3},
    )
    single["models"][0]["parameters"] = {"weight": 1.0, "density": 0.4}
    run_merge(parse_recipe(single), MergeOptions())
    out = load_output(tmp_path / "one")
    base = load_file(str(tiny_models["base"] / "model.safetensors"))
    plan_one = json.loads(run_cli("plan", str(write_recipe(tmp_path, single, "one.yaml")), "--json").stdout)
    ft = load_file(str(tiny_models["ft0"] / "model.safetensors"))
    for row in plan_one["tensors"]:
        changed = int((out[row["tensor"]] != base[row["tensor"]]).sum())
        nonzero = int((ft[row["tensor"]] != base[row["tensor"]]).sum())
        assert changed == min(nonzero, int((1 - row["ratio"]) * row["numel"])), row["tensor"]


def test_zero_delta_tensor_is_left_alone_and_reported(tmp_path):
    base = tiny_state()
    ft = fine_tune(base, 0)
    ft["model.layers.0.attn.weight"] = base["model.layers.0.attn.weight"].clone()
    models = {"base": write_checkpoint(tmp_path / "base", base), "ft0": write_checkpoint(tmp_path / "ft0", ft)}
    recipe = basic_recipe(models, tmp_path / "out", tadrop={})
    plan = json.loads(run_cli("plan", str(write_recipe(tmp_path, recipe)), "--json").stdout)
    row = next(r for r in plan["tensors"] if r["tensor"] == "model.layers.0.attn.weight")
    assert row["reason"] == "zero delta" and row["score"] is None
    run_merge(parse_recipe(recipe), MergeOptions())
    assert torch.equal(load_output(tmp_path / "out")["model.layers.0.attn.weight"], base["model.layers.0.attn.weight"])


def test_tadrop_off_gives_mergekit_uniform_masks(tiny_models, tmp_path):
    """Without a tadrop block every tensor is pruned at 1 - density (mergekit's behaviour)."""
    recipe = basic_recipe(tiny_models, tmp_path / "out")
    plan = json.loads(run_cli("plan", str(write_recipe(tmp_path, recipe)), "--json").stdout)
    assert all(r["ratio"] == pytest.approx(0.6) for r in plan["tensors"]) and len(plan["tensors"]) == 27
    assert all(r["reason"] == "uniform" for r in plan["tensors"])


def test_filtered_and_gradient_parameters(tiny_models, tmp_path):
    recipe = basic_recipe(tiny_models, tmp_path / "out", method="magnitude_prune")
    recipe["models"] = [
        {
            "model": str(tiny_models["ft0"]),
            "parameters": {
                "weight": [0.0, 1.0],  # gradient over layers 0..1
                "density": [{"filter": "mlp", "value": 0.1}, {"value": 1.0}],
            },
        }
    ]
    run_merge(parse_recipe(recipe), MergeOptions())
    out = load_output(tmp_path / "out")
    base = load_file(str(tiny_models["base"] / "model.safetensors"))
    ft = load_file(str(tiny_models["ft0"] / "model.safetensors"))
    assert torch.equal(out["model.layers.0.attn.weight"], base["model.layers.0.attn.weight"])  # weight 0 at layer 0
    torch.testing.assert_close(
        out["model.layers.1.attn.weight"], ft["model.layers.1.attn.weight"]
    )  # weight 1, density 1
    changed = int((out["model.layers.1.mlp.weight"] != base["model.layers.1.mlp.weight"]).sum())
    nonzero = int((ft["model.layers.1.mlp.weight"] != base["model.layers.1.mlp.weight"]).sum())
    assert changed == min(nonzero, int(0.1 * 96 * 64)) and changed > 0
    torch.testing.assert_close(out["model.embed.weight"], base["model.embed.weight"])  # outside layers: first value (0)


def test_transformers_loads_the_merged_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = tiny_llama_config()
    torch.manual_seed(0)
    base_model = transformers.LlamaForCausalLM(config)
    base_model.save_pretrained(tmp_path / "base", safe_serialization=True)
    for i in range(2):
        torch.manual_seed(i + 1)
        with torch.no_grad():
            for p in base_model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        base_model.save_pretrained(tmp_path / f"ft{i}", safe_serialization=True)
    recipe = {
        "merge_method": "ties",
        "base_model": str(tmp_path / "base"),
        "models": [
            {"model": str(tmp_path / f"ft{i}"), "parameters": {"weight": 0.5, "density": 0.5}} for i in range(2)
        ],
        "tadrop": {"min_numel": 512},
        "output": {"path": str(tmp_path / "merged"), "dtype": "bfloat16", "shard_size": "40KB"},
    }
    result = run_cli("merge", str(write_recipe(tmp_path, recipe)), "--quiet")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "merged" / "model.safetensors.index.json").exists()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    written = load_output(tmp_path / "merged")
    loaded = merged.state_dict()
    assert set(written) == set(loaded)
    for name, tensor in written.items():
        assert torch.equal(loaded[name].to(torch.bfloat16), tensor), name
    logits = merged(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 96) and torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
@pytest.mark.parametrize(
    "fmt,dtype", [("safetensors", torch.float32), ("safetensors", torch.bfloat16), ("bin", torch.float32)]
)
def test_elementwise_methods_merge_in_slices_exactly_as_whole(tmp_path, monkeypatch, method, fmt, dtype):
    """Slicing a large tensor (tensor_merge.CHUNK_ELEMENTS) gives the bytes of the whole-tensor merge,
    including a last slice shorter than the others."""
    from tadrop_cli import tensor_merge

    base = tiny_state()
    models = {"base": write_checkpoint(tmp_path / "base", base, fmt=fmt, dtype=dtype)}
    models.update(
        {f"ft{i}": write_checkpoint(tmp_path / f"ft{i}", fine_tune(base, i), fmt=fmt, dtype=dtype) for i in range(3)}
    )
    raw = basic_recipe(
        models, tmp_path / "whole", method=method, parameters={"lambda": 0.7} if method != "linear" else {}
    )
    for entry in raw["models"]:
        entry["parameters"].pop("density")
    recipe = parse_recipe(raw)
    whole = run_merge(recipe, MergeOptions())
    monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", 1000)  # 96 x 64 = 6144 entries: 7 slices, the last of 144
    sliced = run_merge(recipe, MergeOptions(output=tmp_path / "sliced"))
    assert whole["tensors"] == sliced["tensors"] == 9
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == (
        tmp_path / "sliced" / "model.safetensors"
    ).read_bytes()


def test_a_nan_in_a_later_slice_is_refused(tmp_path, monkeypatch):
    from tadrop_cli import tensor_merge
    from tadrop_cli.errors import BadInput

    base = tiny_state()
    models = {"base": write_checkpoint(tmp_path / "base", base)}
    bad = fine_tune(base, 1)
    bad["model.layers.0.mlp.weight"].view(-1)[5000] = float("nan")
    models.update(
        {"ft0": write_checkpoint(tmp_path / "ft0", fine_tune(base, 0)), "ft1": write_checkpoint(tmp_path / "ft1", bad)}
    )
    monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", 1000)
    recipe = parse_recipe(basic_recipe(models, tmp_path / "out", method="task_arithmetic"))
    with pytest.raises(BadInput, match="model.layers.0.mlp.weight"):
        run_merge(recipe, MergeOptions())
    assert not (tmp_path / "out").exists()
