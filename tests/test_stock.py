"""Issue 13 (stock): the magnitude trim's kept count, model_stock, sce, arcee_fusion, and the
recipe's suggestions for unknown methods and keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import reference as ref
import torch
import yaml
from conftest import (
    REPO,
    basic_recipe,
    fine_tune,
    run_cli,
    tiny_llama_config,
    tiny_state,
    write_checkpoint,
    write_recipe,
)
from safetensors.torch import load_file

from tadrop_cli import kernels, sparsify, statistic_merges
from tadrop_cli.errors import BadInput
from tadrop_cli.methods import METHODS, TaskVector
from tadrop_cli.recipe import Recipe, parse_recipe
from tadrop_cli.recipe_errors import MERGEKIT_NOT_YET
from tadrop_cli.run import MergeOptions, plan_only, run_merge

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="the C kernels were not built")


# ---------------------------------------------------------------- the magnitude trim's kept count


@pytest.mark.parametrize(
    ("n", "density", "kept"),
    [(2, 0.4, 1), (2, 0.5, 1), (3, 0.2, 1), (10, 0.05, 1), (10, 0.25, 2), (1000, 0.0004, 1), (2, 0.0, 0), (0, 0.5, 0)],
)
def test_a_magnitude_trim_keeps_at_least_one_entry_at_a_positive_density(n, density, kept):
    """mergekit 0.1.5 keeps max(1, int(density * n)) entries for density > 0 (sparsify.magnitude)."""
    assert sparsify.kept_count(n, density) == kept == ref.kept_count(n, density)
    if n:
        delta = torch.tensor(np.linspace(-1.0, 0.9, n), dtype=torch.float32)
        assert int(sparsify.magnitude(delta, density).count_nonzero()) == kept


def _float32_state(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in state.items()}


def _two_entry_bias_merge(tmp_path, method: str, density: float, kernels_on: bool, monkeypatch) -> dict:
    """A TIES-family recipe over a model with a 2-entry bias and a 5 x 3 weight; the merged tensors."""
    rng = np.random.default_rng(5)
    base = {"bias": rng.normal(size=2), "w": rng.normal(size=(5, 3))}
    deltas = [
        {"bias": np.array([0.3, -0.1]), "w": rng.normal(size=(5, 3)) * 0.1},
        {"bias": np.array([-0.05, 0.2]), "w": rng.normal(size=(5, 3)) * 0.1},
    ]
    write_checkpoint(tmp_path / "base", _float32_state(base))
    models = []
    for i, d in enumerate(deltas):
        write_checkpoint(tmp_path / f"ft{i}", _float32_state({k: base[k] + d[k] for k in d}))
        models.append({"model": str(tmp_path / f"ft{i}"), "parameters": {"weight": [1.0, 0.5][i], "density": density}})
    out = tmp_path / ("out-kernels" if kernels_on else "out-torch")
    recipe = {"merge_method": method, "base_model": str(tmp_path / "base"), "models": models}
    with monkeypatch.context() as patch:
        if not kernels_on:
            patch.setattr(kernels, "_library", lambda: None)
        run_merge(parse_recipe(recipe), MergeOptions(output=out, device="cpu"))
    got = load_file(str(out / "model.safetensors"))
    base32 = {k: v.astype(np.float32) for k, v in base.items()}
    tuned = [_float32_state({k: base[k] + d[k] for k in d}) for d in deltas]
    seen = [{k: (t[k].numpy() - base32[k]).astype(np.float64) for k in t} for t in tuned]
    return got, base32, seen


@pytest.mark.parametrize("kernels_on", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("method", ["ties", "magnitude_prune"])
def test_a_two_entry_bias_at_density_0_4_keeps_its_largest_entry(tmp_path, monkeypatch, method, kernels_on):
    if kernels_on and not kernels.available():
        pytest.skip("the C kernels were not built")
    got, base, seen = _two_entry_bias_merge(tmp_path, method, 0.4, kernels_on, monkeypatch)
    for name in ("bias", "w"):
        refs = [ref.TV(s[name], w, 0.4) for s, w in zip(seen, [1.0, 0.5], strict=True)]
        expected = ref.REFERENCES[method](base[name].astype(np.float64), refs)
        np.testing.assert_allclose(got[name].numpy().astype(np.float64), expected, atol=1e-6, rtol=1e-6)
    # by hand: model 0 keeps +0.3 (entry 0), model 1 keeps +0.2 * 0.5 (entry 1): both entries move
    moved = got["bias"].numpy() - base["bias"]
    if method == "magnitude_prune":
        np.testing.assert_allclose(moved, [0.3, 0.1], atol=1e-6)
    else:  # TIES: disjoint mean, each entry's one agreeing model divides by its own weight
        np.testing.assert_allclose(moved, [0.3, 0.2], atol=1e-6)


@needs_kernels
def test_kernels_and_pytorch_trim_tiny_tensors_to_the_same_bits(tmp_path, monkeypatch):
    with_kernels, _, _ = _two_entry_bias_merge(tmp_path, "ties", 0.3, True, monkeypatch)
    without, _, _ = _two_entry_bias_merge(tmp_path, "ties", 0.3, False, monkeypatch)
    for name in with_kernels:
        assert torch.equal(with_kernels[name].view(torch.int32), without[name].view(torch.int32)), name


# ---------------------------------------------------------------- model_stock, sce, arcee_fusion: the maths


def _correlated(seed: int, count: int, shape, scale: float = 0.1):
    """A float32 base and `count` task vectors sharing a common direction (cosines around 0.5)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape).astype(np.float32)
    shared = rng.normal(size=shape)
    deltas = [((shared + rng.normal(size=shape) * (1 + i / 2)) * scale).astype(np.float32) for i in range(count)]
    return base, deltas


def _merge(name: str, base: np.ndarray, deltas, densities=None, **params) -> np.ndarray:
    densities = densities or [1.0] * len(deltas)
    tvs = [TaskVector(torch.from_numpy(d.copy()), density=p) for d, p in zip(deltas, densities, strict=True)]
    defaults = {p.name: p.default for p in METHODS[name].params if not p.per_model}
    return METHODS[name].merge(torch.from_numpy(base.copy()), tvs, **{**defaults, **params}).numpy()


def _refs(deltas, densities=None):
    densities = densities or [1.0] * len(deltas)
    return [ref.TV(d.astype(np.float64), 1.0, p) for d, p in zip(deltas, densities, strict=True)]


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(24, 40), (40,), (3, 4, 10)])
@pytest.mark.parametrize("count", [2, 3, 5])
def test_model_stock_matches_the_float64_reference(count, shape, filter_wise):
    base, deltas = _correlated(count * 100 + len(shape), count, shape)
    got = _merge("model_stock", base, deltas, filter_wise=filter_wise)
    expected = ref.model_stock(base, _refs(deltas), filter_wise)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-6)
    mean = np.mean(deltas, axis=0)
    assert 0.05 < np.abs(expected - base).max() < np.abs(mean).max()  # moved towards the average, not all the way


def test_model_stock_by_hand():
    """tau_1 = (1, 0), tau_2 = (1, 1): cos = 1/sqrt(2), t = 2 cos / (1 + cos) = 0.5858; w0 + t (1, 0.5)."""
    got = _merge("model_stock", np.zeros(2, np.float32), [np.array([1, 0], np.float32), np.array([1, 1], np.float32)])
    t = 2 * (1 / np.sqrt(2)) / (1 + 1 / np.sqrt(2))
    np.testing.assert_allclose(got, [t, t / 2], rtol=1e-6)


def test_model_stock_keeps_the_base_where_the_ratio_is_singular_or_a_task_vector_is_zero():
    base = np.array([0.5, -1.0, 2.0], np.float32)
    tau = np.array([0.1, 0.2, -0.3], np.float32)
    np.testing.assert_array_equal(_merge("model_stock", base, [tau, -tau]), base)  # cos = -1: 1 + cos = 0
    np.testing.assert_array_equal(_merge("model_stock", base, [tau, np.zeros(3, np.float32)]), base)  # cos = 0
    np.testing.assert_array_equal(_merge("model_stock", base, [tau]), base)  # one model: no angle


def test_model_stock_takes_the_exact_cosine_of_small_task_vectors():
    """mergekit floors |tau_i| |tau_j| at 1e-6; for a 64-entry bias moved by ~1e-4 per entry that
    shrinks the cosine from 1 to about 0.06. The paper's cosine is exact: identical task vectors
    give t = 1, the fine-tuned tensor."""
    base = np.zeros(64, np.float32)
    tau = np.full(64, 1e-4, np.float32)
    np.testing.assert_allclose(_merge("model_stock", base, [tau, tau.copy()]), tau, rtol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("fraction", [1.0, 0.6, 0.1, 0.0])
@pytest.mark.parametrize("shape", [(24, 40), (40,)])
def test_sce_matches_the_float64_reference(shape, fraction, normalize):
    base, deltas = _correlated(int(fraction * 10) + len(shape), 3, shape)
    got = _merge("sce", base, deltas, [fraction] * 3, normalize=normalize)
    expected = ref.sce(base, _refs(deltas, [fraction] * 3), normalize)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-6)
    assert fraction == 0 or np.abs(expected - base).max() > 0.05


def test_sce_by_hand():
    """tau_1 = (3, -1, 2, 0), tau_2 = (1, 1, -2, 0): eta = (14, 6) / 20. Signs of the sum (4, 0, 0, 0):
    +, +, +, + (>= 0 counts as +). Entry 0: both kept, (0.7*3 + 0.3*1) / 1 = 2.4; entry 1: model 2
    only, 1; entry 2: model 1 only, 2; entry 3: nothing (zeros are erased), 0."""
    taus = [np.array([3, -1, 2, 0], np.float32), np.array([1, 1, -2, 0], np.float32)]
    np.testing.assert_allclose(_merge("sce", np.zeros(4, np.float32), taus), [2.4, 1, 2, 0], rtol=1e-6)
    unnormalized = _merge("sce", np.zeros(4, np.float32), taus, normalize=False)
    np.testing.assert_allclose(unnormalized, [2.4, 0.3, 1.4, 0], rtol=1e-6)


def test_sce_selects_by_variance_across_models():
    """Variances (1, 0, 0.0025, 4): 3 non-zero, and select_topk 0.67 keeps int(3 * 0.67) = 2 of them,
    entries 3 and 0, where the models differ most."""
    taus = [np.array([1, 0.5, 0.5, -2], np.float32), np.array([-1, 0.5, 0.4, 2], np.float32)]
    got = _merge("sce", np.zeros(4, np.float32), taus, [0.67, 0.67], normalize=False)
    eta = np.array([5, 5]) / 10  # sums of squares of the selected entries: 1 + 4 each
    # sum of the selected entries is (0, 0): sign + wins; entry 0 keeps model 1, entry 3 keeps model 2
    np.testing.assert_allclose(got, [eta[0] * 1, 0, 0, eta[1] * 2], rtol=1e-6)


def test_sce_coefficients_of_small_task_vectors_follow_the_paper():
    """mergekit falls back to equal coefficients when the summed mean squares are below 1e-6 (task
    vectors of RMS ~1e-4 here); the paper's ratio of sums of squares holds at any scale."""
    small = [torch.full((100,), 1e-4), torch.full((100,), 3e-4)]
    np.testing.assert_allclose(statistic_merges.sce_coefficients(small), [0.1, 0.9], rtol=1e-6)
    assert statistic_merges.sce_coefficients([torch.zeros(3), torch.zeros(3)]) == [0.5, 0.5]


@pytest.mark.parametrize("shape", [(24, 40), (300,), (6, 5, 8)])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_arcee_fusion_matches_the_float64_reference(shape, seed):
    base, (delta,) = _correlated(seed, 1, shape, scale=0.3)
    got = _merge("arcee_fusion", base, [delta])
    expected = ref.arcee_fusion(base, _refs([delta])[0])
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-6)
    kept = int(np.count_nonzero(expected - base))
    assert 0 < kept < delta.size // 2  # an outlier cut: some entries, far from all


def test_arcee_fusion_quartiles_by_hand():
    """Importances 0..9 (n = 10): q1 = sorted[2] = 2, median = sorted[4] = 4, q3 = sorted[6] = 6; the
    threshold is 4 + 1.5 * 4 = 10."""
    assert float(statistic_merges.quartile_threshold(torch.arange(10, dtype=torch.float32))) == 10.0


# ---------------------------------------------------------------- end to end, in mergekit's recipe form


RECIPES = REPO / "tests" / "data" / "mergekit_recipes"
PLACEHOLDERS = ("base", "model_a", "model_b", "model_c")


@pytest.fixture(scope="module")
def llama_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base and three fine-tunes sharing a common direction, saved by transformers."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("llama")
    config = tiny_llama_config()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder / "base", safe_serialization=True)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(7)
    shared = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in base.items()}
    for i, name in enumerate(PLACEHOLDERS[1:]):
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(base[k] + shared[k] + torch.randn(p.shape, generator=g) * 0.02 * (1 + i))
        model.save_pretrained(folder / name, safe_serialization=True)
    return {name: folder / name for name in PLACEHOLDERS}


def _recipe_for(file: str, models: dict[str, Path], output: Path) -> dict:
    """A stored mergekit recipe with its placeholder model names replaced by the tiny models' folders."""
    recipe = yaml.safe_load((RECIPES / file).read_text())
    recipe["base_model"] = str(models[recipe["base_model"]])
    for entry in recipe["models"]:
        entry["model"] = str(models[entry["model"]])
    recipe["output"] = {"path": str(output)}
    return recipe


def _state(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file as load_numpy

    return {k: v.astype(np.float32) for k, v in load_numpy(str(folder / "model.safetensors")).items()}


def _expected(file: str, models: dict[str, Path], name: str, base: np.ndarray) -> np.ndarray:
    recipe = yaml.safe_load((RECIPES / file).read_text())
    tuned = [_state(models[e["model"]])[name] for e in recipe["models"] if e["model"] != "base"]
    refs = [
        ref.TV((t - base).astype(np.float64), 1.0, recipe.get("parameters", {}).get("select_topk", 1.0)) for t in tuned
    ]
    method, params = recipe["merge_method"], recipe.get("parameters", {})
    if method == "model_stock":
        return ref.model_stock(base, refs, params.get("filter_wise", False))
    if method == "sce":
        return ref.sce(base, refs)
    return ref.arcee_fusion(base, refs[0])


@pytest.mark.parametrize(
    "file",
    [
        "stock-model_stock.yaml",
        "stock-model_stock-filter_wise.yaml",
        "stock-sce.yaml",
        "stock-sce-all.yaml",
        "stock-arcee_fusion.yaml",
    ],
)
def test_a_mergekit_recipe_merges_to_the_reference_and_loads_in_transformers(tmp_path, llama_models, file):
    transformers = pytest.importorskip("transformers")
    recipe = _recipe_for(file, llama_models, tmp_path / "merged")
    result = run_cli("merge", str(write_recipe(tmp_path, recipe)), "--quiet")
    assert result.returncode == 0, result.stderr
    merged, base = _state(tmp_path / "merged"), _state(llama_models["base"])
    assert set(merged) == set(base)
    for name, tensor in merged.items():
        expected = _expected(file, llama_models, name, base[name])
        if file == "stock-arcee_fusion.yaml":  # float32 importances (as mergekit) may fall either side of a near-tie
            importance, threshold = ref.arcee_fusion_scores(
                base[name], _state(llama_models["model_a"])[name] - base[name]
            )
            near = np.abs(importance - threshold) <= 1e-3 * threshold  # float32 KL: ~1e-4 relative error
            expected = np.where(near, tensor, expected)
        np.testing.assert_allclose(tensor, expected, atol=2e-6, rtol=1e-6, err_msg=name)
    assert max(np.abs(merged[k] - base[k]).max() for k in merged) > 0.05  # the merge moved the model
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 96) and torch.isfinite(logits).all()


def test_the_trim_count_recipe_keeps_one_entry_of_each_norm(tmp_path, llama_models):
    """stock-ties-trim_count.yaml: density 0.01 on 32-entry norms keeps max(1, int(0.32)) = 1 entry per model."""
    run_merge(parse_recipe(_recipe_for("stock-ties-trim_count.yaml", llama_models, tmp_path / "out")), MergeOptions())
    merged, base = _state(tmp_path / "out"), _state(llama_models["base"])
    name = "model.norm.weight"
    tuned = [_state(llama_models[m])[name] for m in ("model_a", "model_b")]
    refs = [ref.TV((t - base[name]).astype(np.float64), w, 0.01) for t, w in zip(tuned, [0.7, 0.5], strict=True)]
    np.testing.assert_allclose(merged[name], ref.REFERENCES["ties"](base[name], refs), atol=1e-6)
    assert 1 <= np.count_nonzero(merged[name] != base[name]) <= 2


# ---------------------------------------------------------------- recipes: model counts, parameters, TADrop


def _recipe(method: str, models: int = 2, base_listed: bool = False, **extra) -> dict:
    entries = [{"model": "base"}] if base_listed else []
    entries += [{"model": f"model_{c}"} for c in "abc"[:models]]
    return {"merge_method": method, "base_model": "base", "models": entries, **extra}


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (
            _recipe("arcee_fusion", 2),
            "recipe: models: arcee_fusion merges exactly 1 model besides the base (got 2)",
        ),
        (
            _recipe("model_stock", 1, base_listed=True),
            "recipe: models: model_stock merges at least 2 models besides the base (got 1)",
        ),
        (
            _recipe("model_stock", 2, tadrop={"enabled": True}),
            "recipe: tadrop: model_stock drops no entries (it interpolates between the base and the models' "
            "average), so TADrop has nothing to adapt",
        ),
        (
            _recipe("arcee_fusion", 1, tadrop={}),
            "recipe: tadrop: arcee_fusion keeps the entries above its own importance threshold (median + 1.5 "
            "IQR): it has no kept fraction for TADrop to set, so TADrop has nothing to adapt",
        ),
        (
            {
                **_recipe("model_stock", 2),
                "models": [{"model": "model_a", "parameters": {"weight": 0.5}}, {"model": "b"}],
            },
            "recipe: models[0].parameters.weight: not a parameter of model_stock; model_stock takes none per model",
        ),
        (
            _recipe("sce", 2, parameters={"select_topk": 1.5}),
            "recipe: parameters.select_topk: must be between 0.0 and 1.0 (got 1.5)",
        ),
    ],
)
def test_recipes_the_new_methods_refuse(recipe, message):
    with pytest.raises(BadInput) as error:
        parse_recipe(recipe)
    assert str(error.value) == message


def test_a_base_listed_under_models_is_not_counted():
    assert parse_recipe(_recipe("arcee_fusion", 1, base_listed=True)).merge_method == "arcee_fusion"
    assert parse_recipe(_recipe("model_stock", 2, base_listed=True)).merge_method == "model_stock"


def _sce_models(tmp_path) -> dict[str, Path]:
    base = tiny_state()
    models = {"base": write_checkpoint(tmp_path / "base", base)}
    models.update({f"ft{i}": write_checkpoint(tmp_path / f"ft{i}", fine_tune(base, i)) for i in range(3)})
    return models


def test_tadrop_sets_sces_select_fraction_per_tensor(tmp_path):
    """With TADrop, each (model, tensor) gets its own fraction around select_topk; the tensor's one
    mask keeps the mean of its models' fractions (the reference with those densities)."""
    models = _sce_models(tmp_path)
    raw = basic_recipe(models, tmp_path / "out", method="sce", parameters={"select_topk": 0.4})
    for entry in raw["models"]:
        entry.pop("parameters")
    raw["tadrop"] = {"enabled": True, "min_numel": 1000, "strength": 0.3}
    recipe = parse_recipe(raw)
    plan = plan_only(recipe)[1]
    run_merge(recipe, MergeOptions())
    adapted = [row for row in plan.rows if row.reason.startswith("adaptive")]
    assert adapted and len({round(row.ratio, 6) for row in adapted}) > 3  # adapted, not uniform
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    base = load_file(str(models["base"] / "model.safetensors"))
    name = adapted[0].tensor
    refs = []
    for key in ("ft0", "ft1", "ft2"):
        tuned = load_file(str(models[key] / "model.safetensors"))[name]
        density = plan.density(str(models[key]), name, 0.4)
        refs.append(ref.TV((tuned - base[name]).numpy().astype(np.float64), 1.0, density))
    assert len({tv.density for tv in refs}) == 3
    expected = ref.sce(base[name].numpy(), refs)
    np.testing.assert_allclose(merged[name].numpy(), expected, atol=1e-6, rtol=1e-6)


def test_tadrop_count_allocations_are_refused_for_sce(tmp_path):
    models = _sce_models(tmp_path)
    raw = basic_recipe(models, tmp_path / "out", method="sce")
    for entry in raw["models"]:
        entry.pop("parameters")
    raw["tadrop"] = {"allocation": "mass"}
    with pytest.raises(BadInput) as error:
        run_merge(parse_recipe(raw), MergeOptions())
    assert str(error.value).startswith(
        "tadrop.allocation: mass sets kept entries, but sce keeps one selection for all models "
        "(the entries of largest variance across them) ("
    )


# ---------------------------------------------------------------- suggestions for unknown methods and keys


VALID = ", ".join(METHODS)
KEYS = ", ".join(Recipe.model_fields)


def _refusal(data: dict) -> str:
    with pytest.raises(BadInput) as error:
        parse_recipe(data)
    return str(error.value)


@pytest.mark.parametrize(
    ("method", "message"),
    [
        (
            "ram",
            f"recipe: merge_method: 'ram' is mergekit's Reinforced Agent Merging; tadrop does not support it yet; "
            f"valid: {VALID}",
        ),
        ("dare-ties", f"recipe: merge_method: unknown method 'dare-ties'; did you mean 'dare_ties'? valid: {VALID}"),
        ("TIES", f"recipe: merge_method: unknown method 'TIES'; did you mean 'ties'? valid: {VALID}"),
        (
            "modelstock",
            f"recipe: merge_method: unknown method 'modelstock'; did you mean 'model_stock'? valid: {VALID}",
        ),
        ("arcee", f"recipe: merge_method: unknown method 'arcee'; valid: {VALID}"),  # was "dare_linear"
        ("iso", f"recipe: merge_method: unknown method 'iso'; valid: {VALID}"),
        ("magnitude", f"recipe: merge_method: unknown method 'magnitude'; valid: {VALID}"),
    ],
)
def test_an_unknown_method_is_named_and_only_a_close_name_suggested(method, message):
    assert _refusal(_recipe(method)) == message


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            "modules",
            "recipe: modules: 'modules' is mergekit's per-module recipe form (a recipe per module of a "
            "multi-module model); tadrop does not support it yet",
        ),
        ("slice", f"recipe: slice: unknown key; did you mean 'slices'? allowed keys: {KEYS}"),  # was 'policies'
        ("policie", f"recipe: policie: unknown key; did you mean 'policies'? allowed keys: {KEYS}"),
        ("Seed", f"recipe: Seed: unknown key; did you mean 'seed'? allowed keys: {KEYS}"),
    ],
)
def test_an_unknown_key_is_named_and_only_a_close_name_suggested(key, message):
    assert _refusal({**_recipe("ties"), key: {}}) == message


def test_an_unknown_parameter_gets_a_suggestion_one_swap_away():
    data = _recipe("ties")
    data["models"][0]["parameters"] = {"weigth": 0.5}
    assert _refusal(data) == (
        "recipe: models[0].parameters.weigth: not a parameter of ties; did you mean 'weight'? allowed: weight, density"
    )


@pytest.mark.parametrize("name", sorted(MERGEKIT_NOT_YET))
def test_every_mergekit_feature_not_yet_read_is_named_as_such(name):
    kind, what = MERGEKIT_NOT_YET[name]
    assert name not in METHODS and name not in Recipe.model_fields  # a feature that landed must leave the table
    data = _recipe(name) if kind == "merge_method" else {**_recipe("ties"), name: {}}
    where = "merge_method" if kind == "merge_method" else name
    assert _refusal(data).startswith(f"recipe: {where}: '{name}' is {what}; tadrop does not support it yet")
