"""The interpolation methods (slerp, nuslerp, multislerp, karcher, nearswap): golden tests against the
float64 numpy references in reference.py (mergekit 0.1.5's definitions), their edge cases, how the
engine runs them (the models' own tensors, slices for nearswap, bases optional), their one-line
errors, and an end-to-end slerp of a tiny Llama with per-filter t gradients that transformers loads.
Checked by hand against mergekit 0.1.5 in float32: the recipes in data/mergekit_recipes/slerp-*.yaml.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference
import torch
from conftest import run_cli, tiny_llama_config, tiny_state, write_checkpoint, write_recipe
from safetensors.torch import load_file

from tadrop_cli import tensor_merge
from tadrop_cli.errors import BadInput
from tadrop_cli.interpolation import AntipodalMean
from tadrop_cli.interpolation import multislerp as multislerp_maths
from tadrop_cli.methods import METHODS, ModelTensor
from tadrop_cli.recipe import parse_recipe
from tadrop_cli.run import MergeOptions, run_merge

INTERPOLATING = ["slerp", "nuslerp", "multislerp", "karcher", "nearswap"]


def tensors(count: int, shape=(48, 40), seed: int = 0, spread: float = 0.7) -> list[torch.Tensor]:
    """A base-like tensor and `count - 1` others at a real angle from it."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(shape, generator=g)
    return [first] + [first + spread * torch.randn(shape, generator=g) for _ in range(count - 1)]


def models(xs: list[torch.Tensor], weights: list[float] | None = None) -> list[ModelTensor]:
    return [ModelTensor(x.clone(), w) for x, w in zip(xs, weights or [1.0] * len(xs), strict=True)]


def close(got: torch.Tensor, expected: np.ndarray, rtol: float = 2e-5) -> None:
    """float32 against float64: within a few float32 roundings of the tensor's scale."""
    scale = max(float(np.abs(expected).max()), 1e-30)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=0, atol=rtol * scale)


def f64(x: torch.Tensor) -> np.ndarray:
    return x.double().numpy()


# ---------------------------------------------------------------- golden: slerp


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0, 1.3])
def test_slerp_matches_the_reference(t):
    base, other = tensors(2)
    got = METHODS["slerp"].merge(base.clone(), models([other]), t=t)
    close(got, reference.slerp(t, f64(base), f64(other)))


def test_slerp_takes_the_spherical_path_not_the_chord():
    """At t = 0.5 between two orthogonal unit-norm tensors, slerp has norm 1 (lerp: 1/sqrt 2)."""
    a = torch.zeros(64)
    b = torch.zeros(64)
    a[0], b[1] = 1.0, 1.0
    got = METHODS["slerp"].merge(a, models([b]), t=0.5)
    assert float(got.norm()) == pytest.approx(1.0, abs=1e-6)
    assert got[0] == pytest.approx(math.sqrt(0.5)) and got[1] == pytest.approx(math.sqrt(0.5))


@pytest.mark.parametrize("factor", [2.0, -3.0, 1.0])
def test_slerp_of_colinear_or_antipodal_tensors_is_linear(factor):
    """|cos theta| > 0.9995 (mergekit's DOT_THRESHOLD): (1 - t) v0 + t v1, no division by sin ~ 0."""
    (base,) = tensors(1)
    other = base * factor
    got = METHODS["slerp"].merge(base.clone(), models([other]), t=0.3)
    close(got, 0.7 * f64(base) + 0.3 * f64(other))


def test_slerp_just_inside_the_threshold_is_spherical_and_just_outside_linear():
    """A pair at cos theta = 0.9994 is slerped; at 0.9996 lerped (the threshold is 0.9995)."""
    e0, e1 = torch.zeros(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    e0[0], e1[1] = 1.0, 1.0
    for cos, spherical in [(0.9994, True), (0.9996, False)]:
        other = (cos * e0 + math.sqrt(1 - cos * cos) * e1).float()
        got = METHODS["slerp"].merge(e0.float(), models([other * 3]), t=0.5)
        lerp = 0.5 * f64(e0.float()) + 0.5 * f64(other * 3)
        assert (np.abs(f64(got) - lerp).max() > 1e-4) == spherical
        close(got, reference.slerp(0.5, f64(e0.float()), f64(other * 3)))


def test_slerp_of_a_zero_tensor_is_finite():
    """A norm at or below 1e-8 counts as 1 (mergekit's eps): a zero base is at a right angle to
    anything (cos theta = 0), so the result is sin(t pi / 2) * other, not NaN."""
    other = tensors(1)[0]
    got = METHODS["slerp"].merge(torch.zeros_like(other), models([other]), t=0.4)
    close(got, math.sin(0.4 * math.pi / 2) * f64(other))
    close(got, reference.slerp(0.4, np.zeros(other.shape), f64(other)))


def test_slerp_of_large_tensors_reduces_in_slices_like_mergekit():
    """Over 2^20 entries the norms are norms of slice norms and the dot a sum of slice dots."""
    base, other = tensors(2, shape=(1 << 20) + 4099, seed=3)
    got = METHODS["slerp"].merge(base.clone(), models([other]), t=0.35)
    close(got, reference.slerp(0.35, f64(base), f64(other)))


# ---------------------------------------------------------------- golden: nuslerp


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("weights", [(1.0, 2.0), (0.5, 0.5), (1.0, -1.0)])
def test_nuslerp_matches_the_reference(with_base, flatten, row_wise, weights):
    base, x0, x1 = tensors(3, seed=1)
    got = METHODS["nuslerp"].merge(
        base.clone() if with_base else None,
        models([x0, x1], list(weights)),
        nuslerp_flatten=flatten,
        nuslerp_row_wise=row_wise,
    )
    expected = reference.nuslerp(f64(base) if with_base else None, [f64(x0), f64(x1)], weights, flatten, row_wise)
    close(got, expected)


def test_nuslerp_row_wise_interpolates_the_columns_as_mergekit_does():
    """nuslerp_row_wise: true makes vectors along dim 0: a column's result depends on that column alone."""
    _, x0, x1 = tensors(3, seed=2)
    x1_changed = x1.clone()
    x1_changed[:, 5] *= 2
    kwargs = dict(nuslerp_flatten=False, nuslerp_row_wise=True)
    a = METHODS["nuslerp"].merge(None, models([x0, x1]), **kwargs)
    b = METHODS["nuslerp"].merge(None, models([x0, x1_changed]), **kwargs)
    changed = (a != b).any(dim=0)
    assert changed[5] and int(changed.sum()) == 1


def test_nuslerp_of_a_1d_tensor_vector_by_vector_is_the_whole_vector():
    base, x0, x1 = tensors(3, shape=(96,), seed=4)
    for row_wise in (False, True):
        got = METHODS["nuslerp"].merge(base.clone(), models([x0, x1]), nuslerp_flatten=False, nuslerp_row_wise=row_wise)
        close(got, reference.nuslerp(f64(base), [f64(x0), f64(x1)], (1.0, 1.0), True))


# ---------------------------------------------------------------- golden: multislerp


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("count", [2, 3, 5])
def test_multislerp_matches_the_reference(with_base, normalize, count):
    base, *xs = tensors(count + 1, seed=5)
    weights = [1.0, 0.5, 0.25, 2.0, 0.7][:count]
    if not normalize:
        weights = [w / sum(weights) for w in weights]
    got = METHODS["multislerp"].merge(
        base.clone() if with_base else None, models(xs, weights), normalize_weights=normalize, eps=1e-8
    )
    expected = reference.multislerp(f64(base) if with_base else None, [f64(x) for x in xs], weights, normalize)
    close(got, expected)


def test_multislerp_of_one_model_is_that_model():
    base, x = tensors(2)
    got = METHODS["multislerp"].merge(base, models([x], [0.3]), normalize_weights=True, eps=1e-8)
    assert torch.equal(got, x)


def test_multislerp_of_two_balanced_antipodes_is_linear_and_of_three_is_refused():
    (x,) = tensors(1)
    got = multislerp_maths([x, -x], [1.0, 1.0], None, normalize_weights=True, eps=1e-8)
    close(got, reference.multislerp(None, [f64(x), -f64(x)], [1.0, 1.0]))
    with pytest.raises(AntipodalMean):
        multislerp_maths([x, -x, x, -x], [1.0, 1.0, 1.0, 1.0], None, normalize_weights=True, eps=1e-8)


# ---------------------------------------------------------------- golden: karcher


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("count", [2, 3, 4])
@pytest.mark.parametrize("max_iter,tol", [(10, 1e-5), (1, 1e-5), (50, 1e-7)])
def test_karcher_matches_the_reference(with_base, count, max_iter, tol):
    base, *xs = tensors(count + 1, seed=6, spread=1.5)
    got = METHODS["karcher"].merge(base.clone() if with_base else None, models(xs), max_iter=max_iter, tol=tol)
    inputs = ([f64(base)] if with_base else []) + [f64(x) for x in xs]
    close(got, reference.karcher(inputs, max_iter, tol), rtol=5e-5)


def test_karcher_leaves_zero_tensors_out_of_the_mean_but_not_out_of_the_norm():
    _, x0, x1 = tensors(3, seed=7)
    zero = torch.zeros_like(x0)
    got = METHODS["karcher"].merge(None, models([x0, zero, x1]), max_iter=10, tol=1e-5)
    close(got, reference.karcher([f64(x0), f64(zero), f64(x1)]), rtol=5e-5)
    all_zero = METHODS["karcher"].merge(None, models([zero, zero]), max_iter=10, tol=1e-5)
    assert torch.equal(all_zero, zero)


def test_karcher_of_two_tensors_is_their_midpoint_on_the_sphere():
    """Two unit tensors at angle theta: the Karcher mean is the slerp midpoint."""
    _, x0, x1 = tensors(3, seed=8)
    x0, x1 = x0 / x0.norm(), x1 / x1.norm()
    got = METHODS["karcher"].merge(None, models([x0, x1]), max_iter=50, tol=1e-7)
    close(got, reference.slerp(0.5, f64(x0), f64(x1)), rtol=1e-5)


# ---------------------------------------------------------------- golden: nearswap


@pytest.mark.parametrize("t", [0.0, 1e-4, 0.05, 0.5, 10.0])
def test_nearswap_matches_the_reference(t):
    base, other = tensors(2, spread=0.1)
    other[0, :5] = base[0, :5]  # equal entries: |diff| floored at 1e-6
    got = METHODS["nearswap"].merge(base.clone(), models([other]), t=t)
    close(got, reference.nearswap(t, f64(base), f64(other)))


# ---------------------------------------------------------------- the engine


def write_models(tmp_path, count: int = 3, spread: float = 1.0):
    base = tiny_state()
    paths = {"base": write_checkpoint(tmp_path / "base", base)}
    for i in range(count):
        g = torch.Generator().manual_seed(100 + i)
        tuned = {k: v + spread * v.std().clamp(min=0.1) * torch.randn(v.shape, generator=g) for k, v in base.items()}
        paths[f"m{i}"] = write_checkpoint(tmp_path / f"m{i}", tuned)
    return paths


def load(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def merge(recipe: dict) -> None:
    run_merge(parse_recipe(recipe), MergeOptions())


def test_slerp_merge_with_filtered_t_gradients(tmp_path):
    """Each tensor gets the t of its filter at its layer's position (layers 0 and 1: 0 and 1);
    the base listed among the models is the base, not a second model."""
    paths = write_models(tmp_path, 1)
    recipe = {
        "merge_method": "slerp",
        "base_model": str(paths["base"]),
        "models": [{"model": str(paths["base"])}, {"model": str(paths["m0"])}],
        "parameters": {
            "t": [{"filter": "attn", "value": [0.1, 0.9]}, {"filter": "mlp", "value": [0.8, 0.2]}, {"value": 0.5}]
        },
        "output": {"path": str(tmp_path / "out")},
    }
    merge(recipe)
    out, base, other = load(tmp_path / "out"), load(paths["base"]), load(paths["m0"])
    expected_t = {
        "model.layers.0.attn.weight": 0.1,
        "model.layers.1.attn.weight": 0.9,
        "model.layers.0.mlp.weight": 0.8,
        "model.layers.1.mlp.bias": 0.2,
        "model.layers.1.norm.weight": 0.5,
        "model.embed.weight": 0.5,
    }
    for name, t in expected_t.items():
        close(out[name], reference.slerp(t, f64(base[name]), f64(other[name])))


@pytest.mark.parametrize(
    "method,params,with_base",
    [
        ("nuslerp", {"nuslerp_flatten": False}, True),
        ("nuslerp", {}, False),
        ("multislerp", {}, True),
        ("multislerp", {"normalize_weights": False}, False),
        ("karcher", {"max_iter": 5}, False),
        ("karcher", {}, True),
        ("nearswap", {"t": 0.05}, True),
    ],
)
def test_interpolating_merges_match_the_references(tmp_path, method, params, with_base):
    paths = write_models(tmp_path, 2 if method in ("nuslerp",) else 1 if method == "nearswap" else 3)
    names = [k for k in paths if k != "base"]
    weights = [1.0, 2.0, 0.5][: len(names)]
    recipe = {
        "merge_method": method,
        "models": [{"model": str(paths[k]), "parameters": {"weight": w}} for k, w in zip(names, weights, strict=True)],
        "parameters": params,
        "output": {"path": str(tmp_path / "out")},
    }
    if method in ("karcher", "nearswap"):
        for entry in recipe["models"]:
            entry.pop("parameters")
    if with_base:
        recipe["base_model"] = str(paths["base"])
    merge(recipe)
    out, base = load(tmp_path / "out"), load(paths["base"])
    inputs = [load(paths[k]) for k in names]
    for name in out:
        b = f64(base[name]) if with_base else None
        xs = [f64(x[name]) for x in inputs]
        if method == "nuslerp":
            expected = reference.nuslerp(b, xs, weights, params.get("nuslerp_flatten", True))
        elif method == "multislerp":
            expected = reference.multislerp(b, xs, weights, params.get("normalize_weights", True))
        elif method == "karcher":
            expected = reference.karcher(([b] if with_base else []) + xs, params.get("max_iter", 10))
        else:
            expected = reference.nearswap(params["t"], b, xs[0])
        close(out[name], expected, rtol=5e-5)


def test_nearswap_merges_large_tensors_in_slices_with_the_same_result(tmp_path, monkeypatch):
    paths = write_models(tmp_path, 1, spread=0.01)
    recipe = {
        "merge_method": "nearswap",
        "base_model": str(paths["base"]),
        "models": [{"model": str(paths["m0"])}],
        "parameters": {"t": 0.003},
        "output": {"path": str(tmp_path / "whole")},
    }
    merge(recipe)
    monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", 1000)
    calls = []
    original = tensor_merge._interpolate_entries
    monkeypatch.setattr(tensor_merge, "_interpolate_entries", lambda *a: calls.append(a[3]) or original(*a))
    merge({**recipe, "output": {"path": str(tmp_path / "sliced")}})
    assert len([c for c in calls if c is not None]) > 10  # 96 x 64 entries in slices of 1000
    whole, sliced = load(tmp_path / "whole"), load(tmp_path / "sliced")
    assert all(torch.equal(whole[k], sliced[k]) for k in whole)


def test_slerp_copies_the_base_where_the_other_model_lacks_a_tensor(tmp_path):
    """policies.missing_tensor: skip_model leaves slerp no other model: the base is written (as
    mergekit's passthrough of a lone tensor)."""
    paths = write_models(tmp_path, 1)
    state = load(paths["m0"])
    del state["model.layers.1.mlp.bias"]
    write_checkpoint(paths["m0"], state)
    recipe = {
        "merge_method": "slerp",
        "base_model": str(paths["base"]),
        "models": [{"model": str(paths["m0"])}],
        "parameters": {"t": 0.5},
        "policies": {"missing_tensor": "skip_model"},
        "output": {"path": str(tmp_path / "out")},
    }
    merge(recipe)
    assert torch.equal(
        load(tmp_path / "out")["model.layers.1.mlp.bias"], load(paths["base"])["model.layers.1.mlp.bias"]
    )


# ---------------------------------------------------------------- one-line errors


def recipe_for(method: str, paths, count: int, **extra) -> dict:
    names = [k for k in paths if k != "base"][:count]
    recipe = {
        "merge_method": method,
        "base_model": str(paths["base"]),
        "models": [{"model": str(paths[k])} for k in names],
        "output": {"path": "unused"},
    }
    recipe.update(extra)
    return recipe


@pytest.mark.parametrize("method", INTERPOLATING)
def test_tadrop_is_refused_in_one_line(tmp_path, method):
    """None of these drops entries: a tadrop block is refused, never silently ignored."""
    paths = write_models(tmp_path, 2)
    params = {"t": 0.5} if method in ("slerp", "nearswap") else {}
    recipe = recipe_for(method, paths, 2 if method == "nuslerp" else 1, parameters=params, tadrop={})
    with pytest.raises(BadInput, match=f"tadrop: {method} does not sparsify"):
        parse_recipe(recipe)


@pytest.mark.parametrize(
    "method,count,params,words",
    [
        ("slerp", 2, {"t": 0.5}, ["models", "slerp", "exactly 1", "(got 2)"]),
        ("nearswap", 2, {"t": 0.5}, ["models", "nearswap", "exactly 1"]),
        ("nuslerp", 1, {}, ["models", "nuslerp", "exactly 2", "(got 1)"]),
        ("nuslerp", 3, {}, ["models", "nuslerp", "exactly 2", "(got 3)"]),
        ("slerp", 1, {}, ["parameters.t", "required by slerp"]),
        ("nearswap", 1, {}, ["parameters.t", "required by nearswap"]),
        ("karcher", 2, {"max_iter": 2.5}, ["parameters.max_iter", "whole number"]),
        ("nearswap", 1, {"t": -1}, ["parameters.t", "at least 0"]),
    ],
)
def test_bad_interpolation_recipes(tmp_path, method, count, params, words):
    paths = write_models(tmp_path, 3)
    with pytest.raises(BadInput) as error:
        parse_recipe(recipe_for(method, paths, count, parameters=params), "recipe.yaml")
    line = str(error.value)
    assert "\n" not in line and all(w in line for w in words), line


def test_slerp_needs_a_base(tmp_path):
    paths = write_models(tmp_path, 2)
    recipe = recipe_for("slerp", paths, 2, parameters={"t": 0.5})
    del recipe["base_model"]
    with pytest.raises(BadInput, match="base_model: required for slerp"):
        parse_recipe(recipe)


def test_a_filtered_t_with_no_value_for_some_tensor_is_refused_before_merging(tmp_path):
    paths = write_models(tmp_path, 1)
    recipe = recipe_for("slerp", paths, 1, parameters={"t": [{"filter": "mlp", "value": 0.3}]})
    recipe["output"] = {"path": str(tmp_path / "out")}
    result = run_cli("merge", str(write_recipe(tmp_path, recipe)))
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "parameters.t: no value for tensor" in line and "\n" not in line
    assert not (tmp_path / "out").exists()


def test_nuslerp_with_a_model_missing_a_tensor_names_it(tmp_path):
    paths = write_models(tmp_path, 2)
    state = load(paths["m1"])
    del state["model.layers.0.attn.weight"]
    write_checkpoint(paths["m1"], state)
    recipe = recipe_for("nuslerp", paths, 2, policies={"missing_tensor": "skip_model"})
    recipe["output"] = {"path": str(tmp_path / "out")}
    result = run_cli("merge", str(write_recipe(tmp_path, recipe)), "--dry-run")
    assert result.returncode == 2
    assert "tensor model.layers.0.attn.weight: nuslerp merges 2 model(s)" in result.stderr


def test_multislerp_of_balanced_antipodes_names_the_tensor(tmp_path):
    base = tiny_state()
    plus = {k: base[k] + 1.0 for k in base}
    minus = {k: base[k] - 1.0 for k in base}
    paths = {
        "base": write_checkpoint(tmp_path / "base", base),
        "p": write_checkpoint(tmp_path / "p", plus),
        "m": write_checkpoint(tmp_path / "m", minus),
        "p2": write_checkpoint(tmp_path / "p2", {k: base[k] + 2.0 for k in base}),
        "m2": write_checkpoint(tmp_path / "m2", {k: base[k] - 2.0 for k in base}),
    }
    recipe = recipe_for("multislerp", paths, 4)
    recipe["output"] = {"path": str(tmp_path / "out")}
    result = run_cli("merge", str(write_recipe(tmp_path, recipe)))
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "multislerp" in line and "tensor " in line and "weights" in line and "\n" not in line


# ---------------------------------------------------------------- end to end: a tiny Llama


def test_slerp_of_a_tiny_llama_with_filtered_gradients_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = tiny_llama_config(num_hidden_layers=5)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * p.std().clamp(min=0.05))
    model.save_pretrained(tmp_path / "other", safe_serialization=True)
    recipe = {
        "merge_method": "slerp",
        "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / "base")}, {"model": str(tmp_path / "other")}],
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ]
        },
        "output": {"path": str(tmp_path / "out")},
    }
    result = run_cli("merge", str(write_recipe(tmp_path, recipe)), "--quiet")
    assert result.returncode == 0, result.stderr
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    logits = merged(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
    base, other, out = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("base", "other", "out"))
    attn = [0, 0.5, 0.3, 0.7, 1]
    mlp = [1, 0.5, 0.7, 0.3, 0]
    for layer in range(5):  # five layers: positions 0, 1/4, ..., 1 hit the gradients' points
        for name, t in [
            (f"model.layers.{layer}.self_attn.q_proj.weight", attn[layer]),
            (f"model.layers.{layer}.mlp.down_proj.weight", mlp[layer]),
            (f"model.layers.{layer}.input_layernorm.weight", 0.5),
        ]:
            close(out[name], reference.slerp(t, f64(base[name]), f64(other[name])))
    close(out["lm_head.weight"], reference.slerp(0.5, f64(base["lm_head.weight"]), f64(other["lm_head.weight"])))
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in base.items()}


@pytest.mark.parametrize(
    "method,params,count",
    [
        ("slerp", {"t": 0.3}, 1),
        ("nuslerp", {"nuslerp_flatten": False}, 2),
        ("multislerp", {"normalize_weights": True, "eps": 1e-8}, 3),
        ("karcher", {"max_iter": 10, "tol": 1e-5}, 3),
        ("nearswap", {"t": 0.1}, 1),
    ],
)
def test_merges_leave_their_inputs_alone_and_return_a_new_tensor(method, params, count):
    """The base and the models' tensors are read-only to these methods (unlike task vectors, which are scratch)."""
    base, *xs = tensors(count + 1, seed=9)
    saved = [base.clone(), *(x.clone() for x in xs)]
    inputs = models(xs)
    got = METHODS[method].merge(base, inputs, **params)
    assert all(torch.equal(a, b) for a, b in zip([base, *(m.tensor for m in inputs)], saved, strict=True))
    assert got.data_ptr() not in {base.data_ptr(), *(m.tensor.data_ptr() for m in inputs)}
    assert got.dtype == torch.float32 and got.shape == base.shape
