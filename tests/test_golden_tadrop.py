"""Golden tests: TADrop scores, normalisation and adaptive ratios against float64 numpy references.

- kurtosis m4/m2^2 - 3 (population central moments); hoyer (sqrt(n) - L1/L2)/(sqrt(n)-1);
  cv std(|tau|)/mean(|tau|); gini sum (2i-n-1) a_(i) / (n sum a); topmass share of L1
  in the largest ceil(f*n) entries (>= 1). All-zero tensor: no score. Constant: -2 / 0 / 0 / 0.
- rank: average percentile rank / (m-1) (m == 1: 0.5); minmax (all equal: 0.5).
- ratios: clip(p_t0 + g(1 - 2 s_t) + shift, lo, hi) with the shift solving the element
  budget exactly (reference: piecewise-linear solve over sorted breakpoints).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tadrop_cli import tadrop
from tadrop_cli.tadrop import STATISTICS, adaptive_ratios, normalize_scores, tensor_score

FUNCTIONS = {
    "kurtosis": tadrop.excess_kurtosis,
    "hoyer": tadrop.hoyer,
    "cv": tadrop.coefficient_of_variation,
    "gini": tadrop.gini,
    "topmass": tadrop.top_mass,
}


def sample_tensors():
    rng = np.random.default_rng(2024)
    concentrated = rng.normal(size=(32, 48)) * 1e-3
    idx = rng.choice(concentrated.size, size=15, replace=False)
    concentrated.reshape(-1)[idx] = rng.normal(size=15) * 2
    single = np.zeros((10, 10))
    single[3, 7] = -0.25
    return {
        "gaussian": rng.normal(size=(16, 24)) * 0.02,
        "laplace": rng.laplace(size=(20, 30)) * 0.01,
        "offset_uniform": rng.uniform(0.2, 1.0, size=(12, 12)),
        "student_t3": rng.standard_t(3, size=(40, 25)) * 0.01,
        "concentrated": concentrated,
        "single_nonzero": single,
        "mixed_zero": np.where(rng.uniform(size=(9, 11)) < 0.5, 0.0, rng.normal(size=(9, 11))),
        "vector": rng.normal(size=(257,)),
        "three_d": rng.normal(size=(4, 5, 6)) ** 3,
        "two_entries": np.array([0.5, -2.0]),
    }


TENSORS = {k: v.astype(np.float32) for k, v in sample_tensors().items()}


def test_every_statistic_has_a_reference():
    assert set(STATISTICS) <= set(ref.STATISTICS)


@pytest.mark.parametrize("tensor", sorted(TENSORS))
@pytest.mark.parametrize("statistic", STATISTICS)
def test_statistic_matches_reference(statistic, tensor):
    tau = TENSORS[tensor]
    expected = ref.score(tau, statistic)
    got = tensor_score(torch.from_numpy(tau), statistic)
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert FUNCTIONS[statistic](torch.from_numpy(tau)) == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("fraction", [1e-3, 0.01, 0.05, 0.3, 1.0])
def test_topmass_fraction(fraction):
    for name, tau in TENSORS.items():
        got = tensor_score(torch.from_numpy(tau), "topmass", fraction)
        assert got == pytest.approx(ref.topmass(tau, fraction), rel=1e-5, abs=1e-6), name


def test_statistics_hand_computed():
    x = torch.tensor([1.0, 0.0, 0.0, 0.0])
    # mean .25; centred .75, -.25 x3; m2 = (.5625 + 3 * .0625)/4 = .1875; m4 = (.31640625 + 3*.00390625)/4 = .08203125
    assert tadrop.excess_kurtosis(x) == pytest.approx(0.08203125 / 0.1875**2 - 3)
    assert tadrop.hoyer(x) == pytest.approx(1.0)  # (2 - 1) / (2 - 1)
    assert tadrop.coefficient_of_variation(x) == pytest.approx(math.sqrt(3))  # std sqrt(3)/4, mean 1/4
    assert tadrop.gini(x) == pytest.approx(0.75)  # (2*4 - 5) * 1 / (4 * 1)
    assert tadrop.top_mass(x, 0.25) == pytest.approx(1.0)
    y = torch.tensor([1.0, -2.0, 3.0, -4.0])
    # |y| sorted 1 2 3 4; gini = (-3*1 - 1*2 + 1*3 + 3*4) / (4*10) = 10/40
    assert tadrop.gini(y) == pytest.approx(0.25)
    assert tadrop.top_mass(y, 0.5) == pytest.approx(0.7)  # (4 + 3) / 10
    assert tadrop.top_mass(y, 0.01) == pytest.approx(0.4)  # ceil(.04) = 1 entry


@pytest.mark.parametrize("statistic", STATISTICS)
def test_zero_tensor_has_no_score(statistic):
    assert tensor_score(torch.zeros(7, 5), statistic) is None
    assert ref.score(np.zeros((7, 5)), statistic) is None


@pytest.mark.parametrize(
    "values",
    [[0.3] * 50, [0.3, -0.3] * 25, [-1e-3] * 1000, [2.5], [1e-5] * 4096, [-1e-6] * 1000, [2e-5, -2e-5] * 500],
    ids=["const", "plusminus", "small_neg", "single", "const_1e-5_x4096", "const_-1e-6_x1000", "plusminus_2e-5"],
)
def test_constant_magnitude_scores(values):
    tau = torch.tensor(values, dtype=torch.float32)
    expected = {"kurtosis": -2.0, "hoyer": 0.0, "cv": 0.0, "gini": 0.0}
    for statistic, value in expected.items():
        assert tensor_score(tau, statistic) == pytest.approx(value, abs=1e-5), statistic
        if len(set(values)) == 1 or statistic != "kurtosis":
            assert ref.score(np.array(values), statistic) == pytest.approx(value, abs=1e-9)
    # +-c (two values) is not constant for kurtosis, but its excess kurtosis is also -2
    assert ref.excess_kurtosis(np.array(values)) == pytest.approx(-2.0, abs=1e-9)


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 1e3])
def test_statistics_are_scale_invariant(scale):
    rng = np.random.default_rng(9)
    base = (rng.standard_t(3, size=(48, 40))).astype(np.float32)
    for statistic in STATISTICS:
        expected = ref.score(base, statistic)
        got = tensor_score(torch.from_numpy(base) * scale, statistic)
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-6), statistic


@pytest.fixture(scope="module")
def large_tensor():
    """4M entries (a 2048 x 2048 projection): float32 accumulation must stay accurate."""
    rng = np.random.default_rng(5)
    return (rng.standard_t(4, size=(2048, 2048)) * 1e-3).astype(np.float32)


@pytest.mark.parametrize("statistic", STATISTICS)
def test_statistics_precision_on_a_large_tensor(statistic, large_tensor):
    got = tensor_score(torch.from_numpy(large_tensor), statistic)
    assert got == pytest.approx(ref.score(large_tensor, statistic), rel=1e-5)


# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    "scores",
    [
        [3.0, 1.0, 2.0],
        [5.0, 5.0, 1.0, 7.0, 5.0],
        [0.1, -4.0, 2.5, 2.5, 9.0, -4.0, 0.0],
        [1.0, 1.0, 1.0],
        [42.0],
        [1e-9, 2e-9],
    ],
)
@pytest.mark.parametrize("method", ["rank", "minmax"])
def test_normalize_matches_reference(method, scores):
    expected = ref.normalize_rank(scores) if method == "rank" else ref.normalize_minmax(scores)
    assert normalize_scores(scores, method) == pytest.approx(expected, abs=1e-12)


def test_normalize_hand_computed():
    assert normalize_scores([5.0, 5.0, 1.0, 7.0, 5.0], "rank") == pytest.approx([0.5, 0.5, 0.0, 1.0, 0.5])
    assert normalize_scores([2.0, 4.0, 10.0], "minmax") == pytest.approx([0.0, 0.25, 1.0])
    assert normalize_scores([3.0], "rank") == [0.5]
    assert normalize_scores([3.0, 3.0], "minmax") == [0.5, 0.5]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-5, 5).map(float) | st.floats(-1e6, 1e6), min_size=1, max_size=30))
def test_normalize_property(scores):
    for method, reference in (("rank", ref.normalize_rank), ("minmax", ref.normalize_minmax)):
        got = normalize_scores(scores, method)
        assert got == pytest.approx(reference(scores), abs=1e-9)
        assert all(0.0 <= s <= 1.0 for s in got)
        # order preserving
        for i in range(len(scores)):
            for j in range(len(scores)):
                if scores[i] < scores[j]:
                    assert got[i] <= got[j]


# ---------------------------------------------------------------- adaptive ratios


def assert_ratios_match(result, expected: ref.Ratios, sizes, base_ratios):
    assert len(result.ratios) == len(expected.ratios)
    np.testing.assert_allclose(result.ratios, expected.ratios, atol=1e-6, rtol=0)
    assert result.budget_met == expected.reachable
    if expected.reachable:
        n = np.asarray(sizes, float)
        assert float(np.dot(n, result.ratios)) / n.sum() == pytest.approx(
            float(np.dot(n, base_ratios)) / n.sum(), abs=1e-6
        )


GOLDEN_RATIO_CASES = {
    "simple": dict(normalized=[0.0, 0.5, 1.0], base_ratios=[0.5] * 3, sizes=[100, 100, 100], strength=0.2),
    "uneven_sizes": dict(
        normalized=[0.0, 0.25, 0.75, 1.0], base_ratios=[0.6] * 4, sizes=[4096, 100, 20000, 777], strength=0.3
    ),
    "clipped_top": dict(
        normalized=[0.0, 0.1, 0.9, 1.0], base_ratios=[0.9] * 4, sizes=[5000, 3000, 100, 2000], strength=0.5
    ),
    "clipped_both": dict(
        normalized=[0.0, 0.2, 0.4, 0.6, 1.0],
        base_ratios=[0.5] * 5,
        sizes=[10, 2000, 30, 4000, 500],
        strength=0.9,
        min_ratio=0.1,
        max_ratio=0.8,
    ),
    "per_tensor_everything": dict(
        normalized=[0.1, 0.9, 0.5, 0.3],
        base_ratios=[0.7, 0.2, 0.5, 0.9],
        sizes=[100, 4000, 50, 3000],
        strength=[0.2, 0.6, 0.0, 0.3],
        min_ratio=[0.0, 0.1, 0.2, 0.3],
        max_ratio=[0.99, 0.5, 0.9, 0.95],
    ),
    "unreachable_high": dict(
        normalized=[0.0, 1.0], base_ratios=[0.95, 0.95], sizes=[10, 10], strength=0.2, max_ratio=0.9
    ),
    "unreachable_low": dict(
        normalized=[0.0, 1.0], base_ratios=[0.05, 0.05], sizes=[10, 10], strength=0.2, min_ratio=0.1
    ),
    "zero_base": dict(normalized=[0.0, 0.3, 1.0], base_ratios=[0.0] * 3, sizes=[5, 6, 7], strength=0.4),
    "single": dict(normalized=[0.5], base_ratios=[0.3], sizes=[4096], strength=0.2),
    "no_budget": dict(
        normalized=[0.0, 0.4, 1.0], base_ratios=[0.9] * 3, sizes=[1, 2, 3], strength=0.3, preserve_budget=False
    ),
    "no_budget_clipped": dict(
        normalized=[0.0, 0.5, 1.0],
        base_ratios=[0.1] * 3,
        sizes=[1, 2, 3],
        strength=0.3,
        min_ratio=0.05,
        max_ratio=0.3,
        preserve_budget=False,
    ),
}


@pytest.mark.parametrize("case", sorted(GOLDEN_RATIO_CASES))
def test_adaptive_ratios_match_reference(case):
    kwargs = GOLDEN_RATIO_CASES[case]
    result = adaptive_ratios(**kwargs)
    expected = ref.adaptive_ratios(**kwargs)
    assert_ratios_match(
        result,
        expected,
        kwargs["sizes"],
        kwargs["base_ratios"] if kwargs.get("preserve_budget", True) else result.ratios,
    )


def test_adaptive_ratios_hand_computed():
    # raw = .5 + .2 * (1, 0, -1) = .7 .5 .3; equal sizes: the budget already holds, shift 0
    result = adaptive_ratios([0.0, 0.5, 1.0], [0.5] * 3, [10, 10, 10], 0.2)
    assert result.ratios == pytest.approx([0.7, 0.5, 0.3], abs=1e-9)
    assert result.shift == pytest.approx(0.0, abs=1e-9) and result.budget_met
    # raw = .9 + .5 * (1, -1) = 1.4, .4 -> .99 clip; sizes 1, 1: .99 + (.4 + x) = 1.8 -> x = .41
    result = adaptive_ratios([0.0, 1.0], [0.9, 0.9], [1, 1], 0.5)
    assert result.ratios == pytest.approx([0.99, 0.81], abs=1e-9)
    assert result.budget_met
    # without the budget: plain clip
    result = adaptive_ratios([0.0, 1.0], [0.9, 0.9], [1, 1], 0.5, preserve_budget=False)
    assert result.ratios == pytest.approx([0.99, 0.4], abs=1e-12) and result.shift == 0.0


def _ratio_inputs(draw, count, same_base: bool):
    normalized = draw(st.lists(st.floats(0, 1), min_size=count, max_size=count))
    if same_base:
        base = [draw(st.floats(0, 1))] * count
    else:
        base = draw(st.lists(st.floats(0, 1), min_size=count, max_size=count))
    sizes = draw(st.lists(st.integers(1, 100_000), min_size=count, max_size=count))
    strength = draw(st.floats(0, 1))
    low = draw(st.floats(0, 1))
    high = draw(st.floats(0, 1))
    low, high = min(low, high), max(low, high)
    return normalized, base, sizes, strength, low, high


@st.composite
def ratio_inputs(draw, same_base=False):
    count = draw(st.integers(1, 12))
    return _ratio_inputs(draw, count, same_base)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ratio_inputs())
def test_adaptive_ratios_property_budget_bounds_reference(inputs):
    normalized, base, sizes, strength, low, high = inputs
    result = adaptive_ratios(normalized, base, sizes, strength, low, high)
    n = np.asarray(sizes, float)
    ratios = np.asarray(result.ratios)
    assert np.all(ratios >= low - 1e-12) and np.all(ratios <= high + 1e-12)
    target = float(np.dot(n, base)) / n.sum()
    reachable = low - 1e-9 <= target <= high + 1e-9
    if low + 1e-9 < target < high - 1e-9:
        assert result.budget_met
    if result.budget_met or reachable:
        assert float(np.dot(n, ratios)) / n.sum() == pytest.approx(target, abs=1e-3)
    if not (low - 1e-6 <= target <= high + 1e-6):
        assert not result.budget_met
    expected = ref.adaptive_ratios(normalized, base, sizes, strength, low, high)
    if abs(target - low) > 1e-9 and abs(target - high) > 1e-9:  # away from the degenerate edge
        np.testing.assert_allclose(ratios, expected.ratios, atol=1e-6, rtol=0)
        assert result.budget_met == expected.reachable


@st.composite
def per_tensor_ratio_inputs(draw):
    count = draw(st.integers(1, 10))
    normalized = draw(st.lists(st.floats(0, 1), min_size=count, max_size=count))
    base = draw(st.lists(st.floats(0, 1), min_size=count, max_size=count))
    sizes = draw(st.lists(st.integers(1, 100_000), min_size=count, max_size=count))
    strength = draw(st.lists(st.floats(0, 1), min_size=count, max_size=count))
    bounds = [sorted(draw(st.tuples(st.floats(0, 1), st.floats(0, 1)))) for _ in range(count)]
    return normalized, base, sizes, strength, [b[0] for b in bounds], [b[1] for b in bounds]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(per_tensor_ratio_inputs())
def test_adaptive_ratios_property_per_tensor_settings(inputs):
    normalized, base, sizes, strength, lows, highs = inputs
    result = adaptive_ratios(normalized, base, sizes, strength, lows, highs)
    ratios, n = np.asarray(result.ratios), np.asarray(sizes, float)
    assert np.all(ratios >= np.asarray(lows) - 1e-12) and np.all(ratios <= np.asarray(highs) + 1e-12)
    target, floor, ceiling = (float(np.dot(n, v)) / n.sum() for v in (base, lows, highs))
    if floor + 1e-9 < target < ceiling - 1e-9:
        assert result.budget_met
        assert float(np.dot(n, ratios)) / n.sum() == pytest.approx(target, abs=1e-6)
        np.testing.assert_allclose(
            ratios, ref.adaptive_ratios(normalized, base, sizes, strength, lows, highs).ratios, atol=1e-6, rtol=0
        )
    if target < floor - 1e-6 or target > ceiling + 1e-6:
        assert not result.budget_met
        np.testing.assert_allclose(ratios, lows if target < floor else highs, atol=1e-12)


@settings(max_examples=150, deadline=None)
@given(ratio_inputs(same_base=True), st.booleans())
def test_adaptive_ratios_property_monotone(inputs, preserve_budget):
    normalized, base, sizes, strength, low, high = inputs
    ratios = adaptive_ratios(normalized, base, sizes, strength, low, high, preserve_budget).ratios
    for i in range(len(ratios)):
        for j in range(len(ratios)):
            if normalized[i] > normalized[j]:
                assert ratios[i] <= ratios[j] + 1e-12


# ---------------------------------------------------------------- end to end (function level)


def _concentrated(rng, shape):
    tau = rng.normal(size=shape) * 1e-4
    flat = tau.reshape(-1)
    idx = rng.choice(flat.size, size=max(1, flat.size // 100), replace=False)
    flat[idx] = rng.normal(size=idx.size) * 0.5 + np.sign(rng.normal(size=idx.size)) * 0.5
    return tau.astype(np.float32)


def _spread(rng, shape):
    return (rng.normal(size=shape) * 0.01).astype(np.float32)


@pytest.mark.parametrize("statistic", STATISTICS)
def test_concentrated_tensor_scores_higher_and_gets_lower_drop(statistic):
    rng = np.random.default_rng(77)
    shapes = [(64, 64), (96, 64), (64, 128), (128, 64)]
    tensors = [_spread(rng, shapes[0]), _spread(rng, shapes[1]), _concentrated(rng, shapes[2]), _spread(rng, shapes[3])]
    scores = [tensor_score(torch.from_numpy(t), statistic) for t in tensors]
    expected = [ref.score(t, statistic) for t in tensors]
    assert scores == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert all(scores[2] > s for k, s in enumerate(scores) if k != 2)
    sizes = [t.size for t in tensors]
    for method in ("rank", "minmax"):
        normalized = normalize_scores(scores, method)
        result = adaptive_ratios(normalized, [0.7] * 4, sizes, strength=0.2)
        assert result.budget_met
        assert all(result.ratios[2] < r for k, r in enumerate(result.ratios) if k != 2)
        assert result.ratios[2] < 0.7
        assert float(np.dot(sizes, result.ratios)) / sum(sizes) == pytest.approx(0.7, abs=1e-6)
        np.testing.assert_allclose(
            result.ratios, ref.adaptive_ratios(normalized, [0.7] * 4, sizes, 0.2).ratios, atol=1e-6
        )


def _adaptive_ratios_in_python(normalized, base_ratios, sizes, strength, min_ratio, max_ratio):
    """adaptive_ratios' bisection as it was written before numpy took its sums (one Python loop
    over the tensors per step): the numpy version must give its very bits."""
    count = len(normalized)
    raw = [p + strength * (1.0 - 2.0 * s) for p, s in zip(base_ratios, normalized, strict=True)]

    def ratios_for(shift):
        return [min(max_ratio, max(min_ratio, r + shift)) for r in raw]

    total = float(sum(sizes))
    target = sum(n * p for n, p in zip(sizes, base_ratios, strict=True)) / total

    def mean_drop(shift):
        return sum(n * r for n, r in zip(sizes, ratios_for(shift), strict=True)) / total

    low, high = -(2.0 + abs(strength)), 2.0 + abs(strength)
    if mean_drop(low) > target or mean_drop(high) < target:
        shift = low if mean_drop(low) > target else high
        return ratios_for(shift), shift, False
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if mean_drop(middle) < target else (low, middle)
    shift = (low + high) / 2
    assert count == len(raw)
    return ratios_for(shift), shift, abs(mean_drop(shift) - target) < 1e-6


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ratio_inputs(), st.floats(-1, 1))
def test_adaptive_ratios_give_the_bits_of_the_python_bisection(inputs, strength):
    normalized, base, sizes, _, low, high = inputs
    result = adaptive_ratios(normalized, base, sizes, strength, low, high)
    ratios, shift, met = _adaptive_ratios_in_python(normalized, base, sizes, strength, low, high)
    assert (result.ratios, result.shift, result.budget_met) == (ratios, shift, met)
    assert [math.copysign(1, r) for r in result.ratios] == [math.copysign(1, r) for r in ratios]


def test_adaptive_ratios_of_many_tensors_give_the_bits_of_the_python_bisection():
    rng = np.random.default_rng(4)
    normalized, sizes = rng.random(3000).tolist(), rng.integers(1, 10**7, 3000).tolist()
    result = adaptive_ratios(normalized, [0.7] * 3000, sizes, -0.2, 0.0, 0.99)
    ratios, shift, met = _adaptive_ratios_in_python(normalized, [0.7] * 3000, sizes, -0.2, 0.0, 0.99)
    assert (result.ratios, result.shift, result.budget_met) == (ratios, shift, met) and met


def test_the_excludes_matched_at_once_match_as_each_glob_does():
    """plan._any_glob (all of a model's exclude globs in one pattern) matches a name exactly where
    one of the globs does, case-insensitively, newlines and brackets included."""
    from tadrop_cli.plan import _any_glob, glob_matches

    patterns = ("*norm*", "*.bias", "*.ln_*", "ln_*", "A[bc]?d", "[!x]*z")
    names = ["model.norm.weight", "x.bias", "h.ln_1.weight", "ln_f.weight", "model.layers.0.mlp.up_proj.weight"]
    names += ["Abxd", "yz", "xz", "LayerNorm", "a.BIAS", "bias\nx", "ln_\n", "x.bias.y", ""]
    for name in names:
        assert bool(_any_glob(patterns).match(name.lower())) == any(glob_matches(name, p) for p in patterns), name
    assert not _any_glob(()).match("anything")
