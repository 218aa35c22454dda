"""Golden tests: sparsifiers and merge methods against independent float64 numpy references.

The references (tests/reference.py) re-derive mergekit's semantics:
- magnitude: keep max(1, int(density*n)) largest |delta| at density > 0 (ties: lowest flat index first);
- breadcrumbs: sort |delta| ascending, keep ranks [n_bottom, n - n_top);
- DARE: keep where the (seed) SplitMix64 word XOR 2^31 < round(density * 2^32),
  survivors / density when rescale is True/"paper";
- rescale l1/l2/linf: kept * norm(orig)/norm(kept) (skipped when a norm < 1e-7);
- generalized task arithmetic: sparsify * weight, optional TIES sign election
  (sum), normalise by (agreeing) weights, * lambda, + base;
- linear: sum w_i (base + delta_i), / sum w_i when normalize.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import reference as ref
import torch

from tadrop_cli import sparsify
from tadrop_cli.methods import METHODS, TaskVector

ATOL = 1e-5
RTOL = 1e-5
SHAPE = (16, 24)
DENSITIES = [0.1, 0.5, 0.9, 1.0]
WEIGHTS = [1.0, 0.6, -0.4, 0.8]  # one negative; no subset sums to zero
GAMMAS = [0.01, 0.05, 0.15, 0.0]  # 0.15 at density 0.9 exercises n_bottom < 0; 0.0 gives n_top == 0
SEEDS = [11, 12345, 2**40 + 7, 3]


def make_inputs(seed: int, densities, weights=WEIGHTS, shape=SHAPE):
    """Random float32 base and task vectors (distinct magnitudes: ties have measure zero)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape).astype(np.float32)
    deltas = [(rng.normal(size=shape) * rng.uniform(0.05, 0.5)).astype(np.float32) for _ in weights]
    seeds, gammas = SEEDS[: len(weights)], GAMMAS[: len(weights)]
    tvs = [
        TaskVector(torch.from_numpy(d.copy()), weight=w, density=dens, seed=s, gamma=g)
        for d, w, dens, s, g in zip(deltas, weights, densities, seeds, gammas, strict=True)
    ]
    refs = [
        ref.TV(d.astype(np.float64), w, dens, s, g)
        for d, w, dens, s, g in zip(deltas, weights, densities, seeds, gammas, strict=True)
    ]
    return torch.from_numpy(base.copy()), tvs, base.astype(np.float64), refs


def inputs_for(name: str, seed: int, densities):
    """make_inputs with as many models as the method merges (ref.MODEL_COUNT; else four)."""
    count = ref.MODEL_COUNT.get(name, len(WEIGHTS))
    return make_inputs(seed, densities[:count], WEIGHTS[:count])


def global_params(name: str, **overrides):
    """As the engine does: every non-per-model parameter the method declares, default unless overridden."""
    method = METHODS[name]
    params = {p.name: p.default for p in method.params if not p.per_model}
    for key, value in overrides.items():
        if method.param(key) is not None:
            params[key] = value
    return params


def assert_close(got: torch.Tensor, expected: np.ndarray):
    assert got.dtype == torch.float32
    assert tuple(got.shape) == expected.shape
    np.testing.assert_allclose(got.numpy().astype(np.float64), expected, atol=ATOL, rtol=RTOL)


def reference_for(name):
    if name not in ref.REFERENCES:
        pytest.fail(f"method {name!r} has no independent reference in tests/reference.py: write one")
    return ref.REFERENCES[name]


# ---------------------------------------------------------------- the registry


# passthrough takes one model (tested below); the interpolating methods have test_interpolation.py
MANY_MODELS = sorted(n for n, m in METHODS.items() if m.model_count[1] is None and not m.interpolates)


@pytest.mark.parametrize("scale", [1.0, 0.0, -0.75, 3.0])
def test_passthrough_matches_reference(scale):
    """passthrough: the one model's tensor (base + tau), times its scale; the base is left alone."""
    base, tvs, base_np, refs = make_inputs(11, [1.0] * len(WEIGHTS))
    tvs, refs = [tvs[0]], [refs[0]]
    tvs[0].weight, refs[0].weight = scale, scale
    saved = base.clone()
    got = METHODS["passthrough"].merge(base, tvs, **global_params("passthrough"))
    assert torch.equal(base, saved) and got.data_ptr() != base.data_ptr()
    assert_close(got, reference_for("passthrough")(base_np, refs))


def test_every_method_has_a_reference():
    missing = set(METHODS) - set(ref.REFERENCES) - set(ref.INTERPOLATION_REFERENCES)  # (test_interpolation.py)
    assert not missing, f"methods without a golden reference: {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_registry_defaults_match_mergekit(name):
    method = METHODS[name]
    normalize = method.param("normalize")  # the SVD-based methods have none (reference: None)
    assert (None if normalize is None else normalize.default) is ref.DEFAULT_NORMALIZE[name]
    assert method.sparsifier == ref.SPARSIFIER[name]
    if name in ref.DEFAULT_RESCALE and method.param("rescale") is not None:
        assert method.param("rescale").default is ref.DEFAULT_RESCALE[name]
    if method.param("lambda") is not None:
        assert method.param("lambda").default == 1.0


# ---------------------------------------------------------------- golden merges

# the methods that merge task vectors (the interpolating ones take the models' own tensors: test_interpolation.py)
TASK_VECTOR_METHODS = sorted(name for name, method in METHODS.items() if not method.interpolates)


@pytest.mark.parametrize("normalize", [True, False, None], ids=["norm", "nonorm", "default"])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("name", MANY_MODELS)
def test_method_matches_reference(name, density, normalize):
    reference = reference_for(name)
    seed = zlib.crc32(repr((name, density, normalize)).encode())
    base, tvs, base_np, refs = inputs_for(name, seed, [density] * len(WEIGHTS))
    lam = 0.7
    overrides = {"lambda": lam, "int8_mask": True}
    if normalize is not None:
        overrides["normalize"] = normalize
    params = global_params(name, **overrides)
    got = METHODS[name].merge(base, tvs, **params)
    expected = reference(base_np, refs, normalize=normalize, lam=lam)
    assert_close(got, expected)
    # the test can fail: unless nothing is dropped and linear == mean, the merge moved the base
    assert not np.allclose(expected, base_np, atol=1e-3)


@pytest.mark.parametrize("name", MANY_MODELS)
def test_method_mixed_per_model_densities_and_lambda(name):
    """TADrop gives every (model, tensor) its own density: each model sparsified at its own."""
    reference = reference_for(name)
    for lam in (1.0, -1.3, 2.5):
        base, tvs, base_np, refs = inputs_for(name, 7, [0.1, 0.5, 0.9, 1.0])  # fresh: deltas may be used as scratch
        params = global_params(name, **{"lambda": lam})
        got = METHODS[name].merge(base, tvs, **params)
        assert_close(got, reference(base_np, refs, normalize=None, lam=lam))


@pytest.mark.parametrize("how", [False, True, "paper", "l1", "l2", "linf", "none"])
@pytest.mark.parametrize("name", sorted(n for n in METHODS if METHODS[n].sparsifier is not None))
def test_method_rescale_options(name, how):
    reference = reference_for(name)
    for normalize in (True, False):
        base, tvs, base_np, refs = inputs_for(name, 101, [0.3, 0.6, 0.45, 0.8])
        params = global_params(name, rescale=how, normalize=normalize, **{"lambda": 0.9})
        got = METHODS[name].merge(base, tvs, **params)
        assert_close(got, reference(base_np, refs, normalize=normalize, lam=0.9, how=how))


@pytest.mark.parametrize("name", MANY_MODELS)
def test_merge_leaves_the_base_alone_and_returns_a_new_tensor(name):
    """The base tensor is shared by every model: a merge must not write into it.
    (The task vectors' deltas may be used as scratch space, see methods.generalized_task_arithmetic.)"""
    base, tvs, base_np, refs = inputs_for(name, 5, [0.5, 1.0, 0.3, 0.9])
    saved = base.clone()
    got = METHODS[name].merge(base, tvs, **global_params(name, **{"lambda": 0.5}))
    assert torch.equal(base, saved)
    assert got.data_ptr() != base.data_ptr()
    assert_close(got, reference_for(name)(base_np, refs, lam=0.5))


def test_ties_hand_computed():
    """A 1-D TIES example worked by hand (density 1, weights 1, 1, -1)."""
    base = torch.zeros(4)
    deltas = [
        torch.tensor([1.0, -2.0, 0.0, 3.0]),
        torch.tensor([2.0, 1.0, 0.0, -1.0]),
        torch.tensor([1.0, 1.0, 0.5, 1.0]),
    ]

    def tvs():  # fresh each call: the deltas may be used as scratch space
        return [TaskVector(d.clone(), weight=w) for d, w in zip(deltas, [1.0, 1.0, -1.0], strict=True)]

    # weighted: [1,-2,0,3], [2,1,0,-1], [-1,-1,-0.5,-1]; sums: [2,-2,-0.5,1] -> signs [+,-,-,+]
    # entry 0: agree models 0,1 -> (1+2)/(1+1) = 1.5
    # entry 1: agree models 0,2 -> (-2-1)/(1-1 = 0 -> 1) = -3
    # entry 2: agree model 2 -> -0.5/-1 = 0.5
    # entry 3: agree model 0 -> 3/1 = 3
    got = METHODS["ties"].merge(base, tvs(), **global_params("ties", **{"lambda": 2.0}))
    assert got.tolist() == [3.0, -6.0, 1.0, 6.0]
    got = METHODS["ties"].merge(base, tvs(), **global_params("ties", normalize=False))
    assert got.tolist() == [3.0, -3.0, -0.5, 3.0]


# ---------------------------------------------------------------- sparsifiers


@pytest.mark.parametrize("density", [0.0, 0.05, 0.1, 0.37, 0.5, 0.9, 0.999, 1.0, 1.5])
def test_magnitude_matches_reference(density):
    rng = np.random.default_rng(int(density * 1000))
    d = rng.normal(size=SHAPE).astype(np.float32)
    got = sparsify.magnitude(torch.from_numpy(d), density)
    expected = ref.magnitude(d, density)
    assert_close(got, expected)
    assert int((got != 0).sum()) == (d.size if density >= 1 else int(density * d.size))


def test_magnitude_tie_rule_lowest_index_first():
    d = torch.tensor([3.0, -1.0, 2.0, -3.0, 1.0, 2.0, -2.0, 0.0])
    # |d| = 3 1 2 3 1 2 2 0; keep 4: both 3s (0, 3), then the 2s at the lowest indices (2, 5)
    got = sparsify.magnitude(d, 0.5)
    assert got.tolist() == [3.0, 0.0, 2.0, -3.0, 0.0, 2.0, 0.0, 0.0]
    np.testing.assert_array_equal(got.numpy(), ref.magnitude(d.numpy(), 0.5))
    # a 2-D integer tensor with many ties, checked at every k
    rng = np.random.default_rng(3)
    m = rng.integers(-3, 4, size=(6, 7)).astype(np.float32)
    for k in range(m.size + 1):
        got_mask = sparsify.top_k_mask(torch.from_numpy(np.abs(m)), k).numpy()
        np.testing.assert_array_equal(got_mask, ref.topk_keep_mask(np.abs(m), k))
        assert got_mask.sum() == k


LARGE = (600, 500)  # 300k entries: above the size where top_k_mask brackets the threshold with a sample


@pytest.fixture(scope="module")
def large_delta():
    return np.random.default_rng(59).standard_t(3, size=LARGE).astype(np.float32)


@pytest.mark.parametrize("density", [1e-5, 0.001, 0.1, 0.5, 0.9, 0.9999])
def test_magnitude_large_tensor_matches_reference(density, large_delta):
    got = sparsify.magnitude(torch.from_numpy(large_delta.copy()), density)
    expected = ref.magnitude(large_delta, density)
    np.testing.assert_array_equal(got.numpy() != 0, expected != 0)
    assert_close(got, expected)


def test_top_k_mask_large_tensor_with_massive_ties():
    rng = np.random.default_rng(61)
    scores = np.abs(rng.integers(-6, 7, size=LARGE)).astype(np.float32)  # 7 distinct values
    scores[17, 3] = 100.0  # a lone maximum
    n = scores.size
    for k in (1, 2, 777, n // 13, n // 2, n - 12345, n - 1):
        got = sparsify.top_k_mask(torch.from_numpy(scores), k).numpy()
        assert got.sum() == k
        np.testing.assert_array_equal(got, ref.topk_keep_mask(scores, k))


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.9, 0.97, 1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.01, 0.05, 0.2])
def test_breadcrumbs_matches_reference(density, gamma):
    rng = np.random.default_rng(17)
    d = rng.normal(size=SHAPE).astype(np.float32)
    got = sparsify.breadcrumbs(torch.from_numpy(d), density, gamma)
    assert_close(got, ref.breadcrumbs(d, density, gamma))
    if density < 1:
        assert int((got != 0).sum()) == int(density * d.size)


def test_breadcrumbs_without_outliers_keeps_the_largest_not_nothing():
    """n_top == 0: mergekit's slice [n_bot:-0] is empty (drops everything); the sensible result,
    tadrop's, keeps ranks [n_bottom, n): the int(density*n) largest entries."""
    rng = np.random.default_rng(23)
    d = rng.normal(size=SHAPE).astype(np.float32)
    for gamma in (0.0, 0.001):  # int(0.001 * 384) == 0
        got = sparsify.breadcrumbs(torch.from_numpy(d), 0.5, gamma)
        assert int((got != 0).sum()) == 192
        np.testing.assert_array_equal(got.numpy(), ref.magnitude(d, 0.5).astype(np.float32))


def test_breadcrumbs_hand_computed():
    d = torch.tensor([0.1, -5.0, 0.3, 0.2, -0.4, 0.6, 0.5, -0.7, 0.8, 0.9])
    # n=10, density .5 -> keep 5, gamma .1 -> top 1 (|-5|), bottom 4 (.1 .2 .3 .4): keep .5 .6 .7 .8 .9
    got = sparsify.breadcrumbs(d, 0.5, 0.1)
    assert got.tolist() == pytest.approx([0, 0, 0, 0, 0, 0.6, 0.5, -0.7, 0.8, 0.9])
    # density .95 -> keep 9, top 1, bottom 0: everything but the outlier
    got = sparsify.breadcrumbs(d, 0.95, 0.1)
    assert got.tolist() == pytest.approx([0.1, 0, 0.3, 0.2, -0.4, 0.6, 0.5, -0.7, 0.8, 0.9])
    # density .95, gamma .3 -> n_top 3, n_bottom -2 -> n_top 1, n_bottom 0
    assert sparsify.breadcrumbs(d, 0.95, 0.3).tolist() == got.tolist()


@pytest.mark.parametrize("how", [False, True, "paper", "l1", "l2", "linf", "none"])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_random_matches_reference(density, how):
    rng = np.random.default_rng(31)
    d = rng.normal(size=SHAPE).astype(np.float32)
    for seed in (0, 1, 987654321):
        got = sparsify.random(torch.from_numpy(d), density, seed, how)
        assert_close(got, ref.random_drop(d, density, seed, how))


@pytest.mark.parametrize("how", ["l1", "l2", "linf"])
def test_norm_rescale_hand_computed(how):
    d = torch.tensor([3.0, -4.0, 1.0, 0.0])
    got = sparsify.magnitude(d, 0.5, how)  # keeps 3, -4
    factor = {"l1": 8 / 7, "l2": (26**0.5) / 5, "linf": 1.0}[how]
    assert got.tolist() == pytest.approx([3 * factor, -4 * factor, 0, 0])
    # a norm below 1e-7: no rescale
    tiny = torch.tensor([1e-9, -2e-9, 5e-10, 0.0])
    np.testing.assert_array_equal(
        sparsify.magnitude(tiny, 0.5, how).numpy(), np.array([1e-9, -2e-9, 0, 0], dtype=np.float32)
    )


def test_paper_rescale_hand_computed():
    d = torch.tensor([3.0, -4.0, 1.0, 0.5])
    assert sparsify.magnitude(d, 0.5, True).tolist() == [6.0, -8.0, 0.0, 0.0]
    assert sparsify.magnitude(d, 0.5, "paper").tolist() == [6.0, -8.0, 0.0, 0.0]


def test_random_statistics():
    # kept fraction over a large tensor
    big = torch.ones(200, 200)
    for density in (0.1, 0.3, 0.75):
        kept = float((sparsify.random(big, density, seed=42, rescale=False) != 0).float().mean())
        assert abs(kept - density) < 5 * (density * (1 - density) / big.numel()) ** 0.5
    # unbiased with rescale: E[result] = delta over many seeds
    rng = np.random.default_rng(0)
    d = torch.from_numpy(rng.normal(size=(8, 8)).astype(np.float32))
    density, runs = 0.4, 2000
    total = torch.zeros_like(d, dtype=torch.float64)
    for seed in range(runs):
        total += sparsify.random(d, density, seed, True).double()
    mean = total / runs
    sd = d.abs().double() * ((1 - density) / density / runs) ** 0.5
    assert bool(((mean - d.double()).abs() <= 5 * sd + 1e-9).all())
    # same seed -> identical; different seed -> different
    a = sparsify.random(d, 0.5, 7, True)
    assert torch.equal(a, sparsify.random(d, 0.5, 7, True))
    assert not torch.equal(a, sparsify.random(d, 0.5, 8, True))
    # (torch's CPU mt19937 uses only the low 32 bits of a seed, so seeds must differ there)
    assert not torch.equal(a, sparsify.random(d, 0.5, 2**33 + 8, True))
    masks = {tuple((sparsify.random(d, 0.5, s, False) != 0).reshape(-1).tolist()) for s in range(20)}
    assert len(masks) == 20


def test_sign_consensus_sum_and_count():
    a, b, c = (
        torch.tensor([1.0, -3.0, 0.0, 2.0]),
        torch.tensor([1.0, 1.0, 0.0, -1.0]),
        torch.tensor([-5.0, 1.0, 0.0, -1.0]),
    )
    # sums: -3, -1, 0, 0 -> -1, -1, +1, +1; counts: 1, 1, 0, -1 -> +1, +1, +1, -1
    assert sparsify.sign_consensus([a, b, c], "sum").tolist() == [-1.0, -1.0, 1.0, 1.0]
    assert sparsify.sign_consensus([a, b, c], "count").tolist() == [1.0, 1.0, 1.0, -1.0]


def test_kept_count_is_mergekit_floor():
    for n in (1, 7, 384, 4096):
        for density in (0.0, 0.1, 0.33, 0.5, 0.9, 0.999, 1.0, 2.0):
            assert sparsify.kept_count(n, density) == ref.kept_count(n, density)


# ---------------------------------------------------------------- through the engine (TADrop off)


@pytest.mark.parametrize("density", [0.1, 0.2, 0.4])
@pytest.mark.parametrize("name", ["magnitude_prune", "ties"])
def test_engine_uniform_density_matches_mergekit_count(tmp_path, name, density):
    """Without TADrop, a recipe's density must give mergekit's mask: max(1, int(density * n)) entries.

    A 40 x 25 tensor (n = 1000) makes density * n an exact integer, so any round trip
    through the drop ratio (1 - (1 - density)) that loses an ulp shows as one entry fewer.
    """
    from conftest import write_checkpoint
    from safetensors.torch import load_file

    from tadrop_cli.recipe import parse_recipe
    from tadrop_cli.run import MergeOptions, run_merge

    rng = np.random.default_rng(41)
    base = rng.normal(size=(40, 25)).astype(np.float32)
    deltas = [(rng.normal(size=(40, 25)) * 0.1).astype(np.float32) for _ in range(2)]
    write_checkpoint(tmp_path / "base", {"w": torch.from_numpy(base)})
    models = []
    for i, (d, w) in enumerate(zip(deltas, [0.7, 0.5], strict=True)):
        write_checkpoint(tmp_path / f"ft{i}", {"w": torch.from_numpy(base + d)})
        models.append({"model": str(tmp_path / f"ft{i}"), "parameters": {"weight": w, "density": density}})
    recipe = {
        "merge_method": name,
        "base_model": str(tmp_path / "base"),
        "models": models,
        "output": {"path": str(tmp_path / "out")},
    }
    run_merge(parse_recipe(recipe), MergeOptions())
    got = load_file(str(tmp_path / "out" / "model.safetensors"))["w"]
    # the deltas the engine sees are (base + d) - base in float32
    seen = [((base + d) - base).astype(np.float64) for d in deltas]
    refs = [ref.TV(s, w, density) for s, w in zip(seen, [0.7, 0.5], strict=True)]
    expected = ref.REFERENCES[name](base.astype(np.float64), refs)
    assert_close(got, expected)


@pytest.mark.parametrize("how", [False, True, "l1", "l2", "linf"])
@pytest.mark.parametrize("which", ["magnitude", "random", "breadcrumbs"])
def test_sparsifiers_in_place_variant_matches_reference(which, how):
    """Where a sparsifier offers `in_place` (overwrite the delta to save a buffer), both ways agree
    with the reference."""
    import inspect

    function = getattr(sparsify, which)
    d = np.random.default_rng(73).normal(size=SHAPE).astype(np.float32)
    extra = {"magnitude": (), "random": (4242,), "breadcrumbs": (0.03,)}[which]
    reference = {"magnitude": ref.magnitude, "random": ref.random_drop, "breadcrumbs": ref.breadcrumbs}[which]
    expected = reference(d, 0.35, *extra, how)
    variants = [False, True] if "in_place" in inspect.signature(function).parameters else [None]
    for in_place in variants:
        kwargs = {} if in_place is None else {"in_place": in_place}
        tensor = torch.from_numpy(d.copy())
        assert_close(function(tensor, 0.35, *extra, how, **kwargs), expected)
        if in_place is False:
            np.testing.assert_array_equal(tensor.numpy(), d)  # not in place: the input is untouched
