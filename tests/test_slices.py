"""mergekit's `slices:` recipes: output layers stacked from layer ranges of models, each slice merged
layer by layer with the recipe's method; passthrough stacks (frankenmerges); TADrop in a slices
recipe; the output's layer count; bad slices refused in one line. References are computed here
tensor by tensor (float64 numpy, tests/reference.py), from a source map written out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import run_cli
from reference import TV, generalized_task_arithmetic
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

LAYERS = 4
MODELS = ("model_a", "model_b", "model_c")


def _llama(folder: Path, state: dict | None, seed: int, layers: int = LAYERS) -> dict[str, torch.Tensor]:
    """A tiny LlamaForCausalLM with random weights (the base), or `state` plus a random change (a fine-tune)."""
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    if state is not None:
        g = torch.Generator().manual_seed(100 + seed)
        model.load_state_dict({k: v + torch.randn(v.shape, generator=g) * 0.02 for k, v in state.items()})
    model.save_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llamas")
    base = _llama(root / "base", None, 0)
    paths = {"base": root / "base"}
    for i, name in enumerate(MODELS):
        _llama(root / name, base, i + 1)
        paths[name] = root / name
    return paths


def _weights(folder: Path) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in load_file(str(folder / "model.safetensors")).items()}


def _recipe(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _merge(tmp_path: Path, data: dict, out: str = "out") -> Path:
    result = run_cli("merge", str(_recipe(tmp_path, data)), str(tmp_path / out), "--quiet")
    assert result.returncode == 0, result.stderr
    return tmp_path / out


def _layer_name(name: str, layer: int) -> str:
    """The same tensor in another layer: model.layers.K.x -> model.layers.<layer>.x."""
    parts = name.split(".")
    parts[2] = str(layer)
    return ".".join(parts)


def _loads_with_layers(folder: Path, layers: int) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == layers and len(model.model.layers) == layers
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------- a TIES merge by slices


TIES_SLICES = [
    {
        "sources": [
            {"model": "base", "layer_range": [0, 2]},
            {"model": "model_a", "layer_range": [0, 2], "parameters": {"weight": 0.7, "density": 0.5}},
            {"model": "model_b", "layer_range": [2, 4], "parameters": {"weight": 0.5, "density": 0.6}},
        ]
    },
    {
        "sources": [
            {"model": "base", "layer_range": [1, 4]},
            {"model": "model_a", "layer_range": [1, 4], "parameters": {"weight": 1.0, "density": [0.3, 0.9]}},
            {"model": "model_c", "layer_range": [0, 3], "parameters": {"weight": 0.4}},
        ],
        "parameters": {"normalize": False, "density": 0.5},
    },
]


def _with_paths(slices: list[dict], paths: dict[str, Path]) -> list[dict]:
    return [{**s, "sources": [{**src, "model": str(paths[src["model"]])} for src in s["sources"]]} for s in slices]


def test_ties_slices_equal_a_reference_tensor_by_tensor_and_load(tmp_path, llamas):
    recipe = {"merge_method": "ties", "base_model": str(llamas["base"]), "slices": _with_paths(TIES_SLICES, llamas)}
    out = _merge(tmp_path, {**recipe, "dtype": "float32"})
    got = _weights(out)
    inputs = {name: _weights(path) for name, path in llamas.items()}

    # output layer -> (slice, k of n, {model: its source layer}), written out by hand from TIES_SLICES
    layer_map = [
        (0, 0, 2, {"base": 0, "model_a": 0, "model_b": 2}),
        (0, 1, 2, {"base": 1, "model_a": 1, "model_b": 3}),
        (1, 0, 3, {"base": 1, "model_a": 1, "model_c": 0}),
        (1, 1, 3, {"base": 2, "model_a": 2, "model_c": 1}),
        (1, 2, 3, {"base": 3, "model_a": 3, "model_c": 2}),
    ]
    params = {
        0: ({"model_a": (0.7, lambda t: 0.5), "model_b": (0.5, lambda t: 0.6)}, True),
        1: ({"model_a": (1.0, lambda t: 0.3 + 0.6 * t), "model_c": (0.4, lambda t: 0.5)}, False),
    }
    expected: dict[str, np.ndarray] = {}
    for out_layer, (s, k, n, sources) in enumerate(layer_map):
        t = k / (n - 1)
        models, normalize = params[s]
        for name in (n for n in inputs["base"] if n.startswith("model.layers.0.")):
            base = inputs["base"][_layer_name(name, sources["base"])]
            tvs = [
                TV(inputs[m][_layer_name(name, sources[m])] - base, weight=w, density=density(t))
                for m, (w, density) in models.items()
            ]
            expected[_layer_name(name, out_layer)] = generalized_task_arithmetic(
                base, tvs, "magnitude", True, normalize, 1.0, False
            )
    # embeddings from the first slice's sources (base, model_a, model_b); final norm and lm_head from the last's
    first, _ = params[0]
    last, _ = params[1]
    for name, models, normalize in [
        ("model.embed_tokens.weight", first, True),
        ("model.norm.weight", last, False),
        ("lm_head.weight", last, False),
    ]:
        base = inputs["base"][name]
        tvs = [TV(inputs[m][name] - base, weight=w, density=density(0.0)) for m, (w, density) in models.items()]
        expected[name] = generalized_task_arithmetic(base, tvs, "magnitude", True, normalize, 1.0, False)

    assert set(got) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=0, atol=2e-6, err_msg=name)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 5
    _loads_with_layers(out, 5)


def test_models_form_unchanged_by_slices_machinery(tmp_path, llamas):
    """A slices recipe of one slice covering every layer equals the models: recipe, bit for bit (DARE's
    random stream too: it is seeded by model and output tensor name)."""
    models = [{"model": str(llamas[m]), "parameters": {"weight": 0.6, "density": 0.5}} for m in MODELS]
    common = {"merge_method": "dare_ties", "base_model": str(llamas["base"]), "seed": 3}
    whole = _merge(tmp_path, {**common, "models": models}, "whole")
    sliced = _merge(
        tmp_path,
        {
            **common,
            "slices": [
                {
                    "sources": [
                        {"model": str(llamas["base"]), "layer_range": [0, LAYERS]},
                        *({**m, "layer_range": [0, LAYERS]} for m in models),
                    ]
                }
            ],
        },
        "sliced",
    )
    got, expected = load_file(str(sliced / "model.safetensors")), load_file(str(whole / "model.safetensors"))
    assert list(got) == list(expected)  # the same order in the file, too
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


# ---------------------------------------------------------------- passthrough


def test_passthrough_stack_copies_layers_and_loads(tmp_path, llamas):
    """A frankenmerge with overlapping ranges (orcamini-platy-44layer.yml's shape): layers copied as stored."""
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(llamas["model_a"]), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(llamas["model_b"]), "layer_range": [1, 4]}]},
            {
                "sources": [
                    {
                        "model": str(llamas["model_a"]),
                        "layer_range": [2, 4],
                        "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]},
                    }
                ]
            },
        ],
        "dtype": "bfloat16",
    }
    out = _merge(tmp_path, recipe)
    got = load_file(str(out / "model.safetensors"))
    a = load_file(str(llamas["model_a"] / "model.safetensors"))
    b = load_file(str(llamas["model_b"] / "model.safetensors"))
    sources = [(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3), (a, 2), (a, 3)]
    assert len([n for n in got if n.endswith("input_layernorm.weight")]) == 8
    for name, tensor in got.items():
        assert tensor.dtype == torch.bfloat16
        if not name.startswith("model.layers."):
            # embeddings from the first slice, final norm and lm_head from the last: both model_a here
            assert torch.equal(tensor, a[name].to(torch.bfloat16)), name
            continue
        layer = int(name.split(".")[2])
        model, source_layer = sources[layer]
        expected = model[_layer_name(name, source_layer)].to(torch.bfloat16)
        if layer >= 6 and "o_proj" in name:
            expected = torch.zeros_like(expected)
        assert torch.equal(tensor, expected), name
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 8
    _loads_with_layers(out, 8)


def test_passthrough_takes_the_last_slices_final_norm(tmp_path, llamas):
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(llamas["model_a"]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(llamas["model_b"]), "layer_range": [2, 4]}]},
        ],
    }
    got = load_file(str(_merge(tmp_path, recipe) / "model.safetensors"))
    a = load_file(str(llamas["model_a"] / "model.safetensors"))
    b = load_file(str(llamas["model_b"] / "model.safetensors"))
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], b["model.norm.weight"])
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"])


# ---------------------------------------------------------------- TADrop


def _materialize(folder: Path, source: Path, layer_map: list[int]) -> Path:
    """A model whose layer k is `source`'s layer layer_map[k] (other tensors as they are): what a slices
    recipe reads, written out, so that a models: recipe on it is the independent reference."""
    state = load_file(str(source / "model.safetensors"))
    out = {}
    for name, tensor in state.items():
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            if layer == 0:
                for k, src in enumerate(layer_map):
                    out[_layer_name(name, k)] = state[_layer_name(name, src)].clone()
        else:
            out[name] = tensor.clone()
    folder.mkdir(parents=True)
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text((source / "config.json").read_text())
    return folder


@pytest.mark.parametrize("method", ["ties", "dare_linear"])
def test_tadrop_in_slices_sees_the_sliced_task_vectors(tmp_path, llamas, method):
    """TADrop's pass 1 on a slices recipe scores the sliced task vectors: its merge (and its plan) equal a
    models: merge of the same layers written out as models of their own."""
    maps = {"base": [0, 1, 1, 2, 3], "model_a": [1, 2, 0, 1, 2], "model_b": [2, 3, 1, 2, 3]}
    tadrop = {"min_numel": 256, "strength": -0.3}
    slices = [
        {
            "sources": [
                {"model": str(llamas["base"]), "layer_range": [0, 2]},
                {"model": str(llamas["model_a"]), "layer_range": [1, 3], "parameters": {"density": 0.4}},
                {"model": str(llamas["model_b"]), "layer_range": [2, 4], "parameters": {"density": 0.6}},
            ]
        },
        {
            "sources": [
                {"model": str(llamas["base"]), "layer_range": [1, 4]},
                {"model": str(llamas["model_a"]), "layer_range": [0, 3], "parameters": {"density": 0.4}},
                {"model": str(llamas["model_b"]), "layer_range": [1, 4], "parameters": {"density": 0.6}},
            ]
        },
    ]
    common = {"merge_method": method, "tadrop": tadrop, "seed": 7, "dtype": "float32"}
    sliced = _merge(tmp_path, {**common, "base_model": str(llamas["base"]), "slices": slices}, "sliced")
    flat = {m: _materialize(tmp_path / "flat" / m, llamas[m], maps[m]) for m in maps}
    reference = {
        **common,
        "base_model": str(flat["base"]),
        "models": [
            {"model": str(flat["model_a"]), "parameters": {"density": 0.4}},
            {"model": str(flat["model_b"]), "parameters": {"density": 0.6}},
        ],
    }
    whole = _merge(tmp_path, reference, "whole")
    got, expected = _weights(sliced), _weights(whole)
    assert set(got) == set(expected)
    if method == "ties":  # a magnitude trim; DARE's random stream is seeded by the model's path, which differs
        for name in expected:
            assert np.array_equal(got[name], expected[name]), name
    # the plans agree: every tensor's ratio (pass 1 saw the same task vectors under the same names)
    plans = []
    for recipe in ({**common, "base_model": str(llamas["base"]), "slices": slices}, reference):
        result = run_cli("plan", str(_recipe(tmp_path, recipe)), "--json")
        assert result.returncode == 0, result.stderr
        rows = json.loads(result.stdout)["tensors"]
        plans.append(sorted((Path(r["model"]).name, r["tensor"], r["ratio"]) for r in rows))
    assert plans[0] == plans[1] and any(r[2] != plans[0][0][2] for r in plans[0])


# ---------------------------------------------------------------- bad slices: one line naming the key, exit 2


def _slice(model: str, start: int, stop: int, **extra) -> dict:
    return {"model": model, "layer_range": [start, stop], **extra}


BAD_SLICES = {
    "lengths differ": (
        "ties",
        [{"sources": [_slice("base", 0, 2), _slice("model_a", 0, 3)]}],
        ["slices[0].sources[1].layer_range", "[0, 3]", "3 layer"],
    ),
    "past the last layer": (
        "ties",
        [{"sources": [_slice("base", 2, 5), _slice("model_a", 1, 4)]}],
        ["slices[0].sources[0].layer_range", "[2, 5]", "4 layers"],
    ),
    "unknown model": (
        "ties",
        [{"sources": [_slice("base", 0, 2)]}, {"sources": [_slice("base", 0, 2), _slice("no_such_model", 0, 2)]}],
        ["slices[1].sources[1].model", "no_such_model"],
    ),
    "base not among the sources": (
        "ties",
        [{"sources": [_slice("model_a", 0, 2), _slice("model_b", 0, 2)]}],
        ["slices[0].sources", "base model", "not among"],
    ),
    "a model twice in a slice": (
        "ties",
        [{"sources": [_slice("base", 0, 2), _slice("model_a", 0, 2), _slice("model_a", 2, 4)]}],
        ["slices[0].sources[2].model", "twice"],
    ),
    "passthrough of two sources": (
        "passthrough",
        [{"sources": [_slice("model_a", 0, 2), _slice("model_b", 0, 2)]}],
        ["slices[0].sources", "passthrough", "one source"],
    ),
    "empty range": (
        "ties",
        [{"sources": [_slice("base", 2, 2)]}],
        ["slices[0].sources[0].layer_range", "start < stop"],
    ),
    "unknown key in a source": (
        "ties",
        [{"sources": [_slice("base", 0, 2, weight=1.0)]}],
        ["slices[0].sources[0].weight", "unknown key", "parameters"],
    ),
    "a parameter the method lacks": (
        "ties",
        [{"sources": [_slice("base", 0, 2), _slice("model_a", 0, 2, parameters={"scale": 2.0})]}],
        ["slices[0].sources[1].parameters.scale", "not a parameter of ties"],
    ),
    "no slices": ("ties", [], ["slices", "at least 1"]),
}


@pytest.mark.parametrize("case", list(BAD_SLICES), ids=list(BAD_SLICES))
def test_bad_slices_refused_in_one_line_naming_the_key(tmp_path, llamas, case):
    method, slices, expected = BAD_SLICES[case]
    paths = {**{k: str(v) for k, v in llamas.items()}, "no_such_model": str(tmp_path / "no_such_model")}
    for s in slices:
        for source in s["sources"]:
            source["model"] = paths[source["model"]]
    recipe = {"merge_method": method, "base_model": paths["base"], "slices": slices}
    result = run_cli("merge", str(_recipe(tmp_path, recipe)), str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for part in expected:
        assert part in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_models_and_slices_together_refused(tmp_path, llamas):
    recipe = {
        "merge_method": "ties",
        "base_model": str(llamas["base"]),
        "models": [{"model": str(llamas["model_a"])}],
        "slices": [{"sources": [_slice(str(llamas["base"]), 0, 2)]}],
    }
    result = run_cli("merge", str(_recipe(tmp_path, recipe)), str(tmp_path / "out"))
    assert result.returncode == 2 and "slices: give either models" in result.stderr, result.stderr


def test_dry_run_of_a_slices_recipe(tmp_path, llamas):
    recipe = {"merge_method": "ties", "base_model": str(llamas["base"]), "slices": _with_paths(TIES_SLICES, llamas)}
    result = run_cli("merge", str(_recipe(tmp_path, recipe)), str(tmp_path / "out"), "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tensors"] == 3 + 5 * 9 and not (tmp_path / "out").exists()


def test_layer_range_in_a_models_entry_points_to_slices(tmp_path, llamas):
    recipe = {
        "merge_method": "ties",
        "base_model": str(llamas["base"]),
        "models": [{"model": str(llamas["model_a"]), "layer_range": [0, 2]}],
    }
    result = run_cli("merge", str(_recipe(tmp_path, recipe)), str(tmp_path / "out"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "models[0].layer_range" in result.stderr and "slices" in result.stderr


def test_passthrough_of_whole_models(tmp_path, llamas):
    """passthrough in the models: form: one model, copied (scaled where asked); a base_model is ignored, as in
    mergekit; two models are refused; TADrop, which needs a sparsifying host, is refused."""
    one = {
        "merge_method": "passthrough",
        "base_model": str(llamas["base"]),
        "models": [{"model": str(llamas["model_c"]), "parameters": {"scale": [{"filter": "mlp", "value": -2.0}]}}],
    }
    got = load_file(str(_merge(tmp_path, one) / "model.safetensors"))
    c = load_file(str(llamas["model_c"] / "model.safetensors"))
    assert set(got) == set(c)
    for name, tensor in c.items():
        expected = (tensor.double() * -2.0).float() if ".mlp." in name else tensor
        assert torch.equal(got[name], expected), name
    two = {**one, "models": [{"model": str(llamas["model_a"])}, {"model": str(llamas["model_b"])}]}
    result = run_cli("merge", str(_recipe(tmp_path, two)), str(tmp_path / "out2"))
    assert result.returncode == 2 and "passthrough takes one model" in result.stderr, result.stderr
    result = run_cli("merge", str(_recipe(tmp_path, {**one, "tadrop": {}})), str(tmp_path / "out3"))
    assert result.returncode == 2 and "does not sparsify" in result.stderr, result.stderr


def test_layer_types_follow_the_layers(tmp_path):
    """A config with a per-layer list (layer_types: Qwen, Gemma) gets each output layer's source entry, so that
    transformers, which checks its length against num_hidden_layers, loads the result."""
    root = tmp_path / "m"
    _llama(root, None, 0)
    config = json.loads((root / "config.json").read_text())
    config["layer_types"] = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    (root / "config.json").write_text(json.dumps(config))
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(root), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(root), "layer_range": [1, 4]}]},
        ],
    }
    out = json.loads((_merge(tmp_path, recipe) / "config.json").read_text())
    assert out["num_hidden_layers"] == 5
    assert out["layer_types"] == [
        "full_attention",
        "sliding_attention",
        "sliding_attention",
        "full_attention",
        "sliding_attention",
    ]


def test_output_inside_a_model_that_is_only_a_slices_base_is_refused(tmp_path, llamas):
    """Every model a slices recipe opens is protected, also one that is only a slice's base (not the config's
    donor, not a contributor): an output inside it would be published into an input."""
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(llamas["base"]),
        "slices": [
            {"sources": [_slice(str(llamas["base"]), 0, 2), _slice(str(llamas["model_a"]), 0, 2)]},
            {
                "base_model": str(llamas["model_c"]),
                "sources": [_slice(str(llamas["model_c"]), 2, 4), _slice(str(llamas["model_a"]), 2, 4)],
            },
        ],
    }
    result = run_cli("merge", str(_recipe(tmp_path, recipe)), str(llamas["model_c"] / "merged"))
    assert result.returncode == 2 and "output inside the input" in result.stderr, result.stderr
    assert not (llamas["model_c"] / "merged").exists()


def test_tensors_after_the_layers_merge_every_source_of_the_last_slice(tmp_path, llamas):
    """The final norm and lm_head merge all of the last slice's sources, also where it has more sources than
    the first slice (mergekit 0.1.5 truncates them to the first slice's count: a documented difference)."""
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(llamas["base"]),
        "slices": [
            {"sources": [_slice(str(llamas["base"]), 0, 2), _slice(str(llamas["model_a"]), 0, 2)]},
            {
                "sources": [
                    _slice(str(llamas["base"]), 2, 4),
                    _slice(str(llamas["model_a"]), 2, 4, parameters={"weight": 0.5}),
                    _slice(str(llamas["model_c"]), 2, 4, parameters={"weight": 0.25}),
                ]
            },
        ],
        "dtype": "float32",
    }
    got = _weights(_merge(tmp_path, recipe))
    inputs = {name: _weights(path) for name, path in llamas.items()}
    for name in ("lm_head.weight", "model.norm.weight"):
        base = inputs["base"][name]
        expected = base + 0.5 * (inputs["model_a"][name] - base) + 0.25 * (inputs["model_c"][name] - base)
        np.testing.assert_allclose(got[name], expected, rtol=0, atol=2e-6, err_msg=name)
    # the embeddings are the first slice's: base + 1.0 * (model_a - base)
    np.testing.assert_allclose(
        got["model.embed_tokens.weight"], inputs["model_a"]["model.embed_tokens.weight"], atol=2e-6
    )
