"""The widened TADrop family (issue 17, part 2): signed strength, scope of normalisation,
mass-fraction and model-wide allocations, the DARE rescale cap, case-insensitive exclude,
statistics near float32's range, and what `tadrop plan` says about each tensor.

Each allocation is checked against an independent reference in reference.py that works
another way (sorting every entry, where tadrop uses per-tensor histograms and bisection).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference as ref
from conftest import basic_recipe, run_cli, tiny_state, write_checkpoint, write_recipe
from tadrop_cli.errors import BadInput
from tadrop_cli.recipe import parse_recipe
from tadrop_cli.tadrop import adaptive_ratios

# ---------------------------------------------------------------- 1. signed strength


@pytest.mark.parametrize("strength", [-1.0, -0.2, 0.0, 0.2, 1.0])
def test_signed_strength_is_accepted_everywhere(strength):
    recipe = parse_recipe({
        "merge_method": "ties", "base_model": "b",
        "models": [{"model": "a", "tadrop": {"strength": strength}}],
        "tadrop": {"strength": strength, "overrides": [{"filter": "*mlp*", "strength": strength}]},
    })
    assert recipe.tadrop.strength == strength
    assert recipe.tadrop.overrides[0].strength == strength
    assert recipe.models[0].tadrop.strength == strength


@pytest.mark.parametrize("where", ["tadrop", "model", "override"])
@pytest.mark.parametrize("strength", [-1.01, 1.01])
def test_strength_outside_minus_one_one_is_refused(where, strength):
    recipe = {"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}], "tadrop": {}}
    if where == "tadrop":
        recipe["tadrop"]["strength"] = strength
    elif where == "model":
        recipe["models"][0]["tadrop"] = {"strength": strength}
    else:
        recipe["tadrop"]["overrides"] = [{"filter": "*", "strength": strength}]
    with pytest.raises(BadInput, match="strength"):
        parse_recipe(recipe)


def test_the_default_strength_stays_plus_point_two():
    recipe = parse_recipe({"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}], "tadrop": {}})
    assert recipe.tadrop.strength == 0.2


def test_negative_strength_reverses_the_direction_hand_computed():
    # raw = .5 - .2 * (1, 0, -1) = .3 .5 .7: the most concentrated tensor (s = 1) is pruned most
    result = adaptive_ratios([0.0, 0.5, 1.0], [0.5] * 3, [10, 10, 10], -0.2)
    assert result.ratios == pytest.approx([0.3, 0.5, 0.7], abs=1e-9)
    assert result.budget_met and result.shift == pytest.approx(0.0, abs=1e-9)


@st.composite
def signed_ratio_inputs(draw):
    count = draw(st.integers(1, 10))
    normalized = draw(st.lists(st.floats(0, 1), min_size=count, max_size=count))
    base = [draw(st.floats(0, 1))] * count
    sizes = draw(st.lists(st.integers(1, 100_000), min_size=count, max_size=count))
    strength = draw(st.lists(st.floats(-1, 1), min_size=count, max_size=count))
    low, high = sorted(draw(st.tuples(st.floats(0, 1), st.floats(0, 1))))
    return normalized, base, sizes, strength, low, high


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(signed_ratio_inputs())
def test_signed_strength_matches_reference_and_keeps_the_budget(inputs):
    normalized, base, sizes, strength, low, high = inputs
    result = adaptive_ratios(normalized, base, sizes, strength, low, high)
    n = np.asarray(sizes, float)
    target = float(np.dot(n, base)) / n.sum()
    if low + 1e-9 < target < high - 1e-9:
        assert result.budget_met
        assert float(np.dot(n, result.ratios)) / n.sum() == pytest.approx(target, abs=1e-6)
        expected = ref.adaptive_ratios(normalized, base, sizes, strength, low, high)
        np.testing.assert_allclose(result.ratios, expected.ratios, atol=1e-6, rtol=0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=2, max_size=8), st.floats(-1, -0.01), st.floats(0, 1))
def test_negative_strength_is_monotone_the_other_way(normalized, strength, p):
    ratios = adaptive_ratios(normalized, [p] * len(normalized), [100] * len(normalized), strength, 0.0, 0.99).ratios
    for i in range(len(ratios)):
        for j in range(len(ratios)):
            if normalized[i] > normalized[j]:
                assert ratios[i] >= ratios[j] - 1e-12


def _plan(tmp_path, models, name="recipe.yaml", **recipe_extra) -> dict:
    recipe = basic_recipe(models, tmp_path / "out", **recipe_extra)
    result = run_cli("plan", str(write_recipe(tmp_path, recipe, name)), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_negative_strength_prunes_concentrated_tensors_more_in_the_plan(tiny_models, tmp_path):
    ft0 = str(tiny_models["ft0"])
    for strength in (0.3, -0.3):
        plan = _plan(tmp_path, tiny_models, f"s{strength}.yaml", tadrop={"statistic": "kurtosis", "strength": strength})
        adaptive = [r for r in plan["tensors"] if r["model"] == ft0 and r["reason"] == "adaptive"]
        weighted = sum(r["numel"] * r["ratio"] for r in adaptive) / sum(r["numel"] for r in adaptive)
        assert weighted == pytest.approx(0.6, abs=1e-3)  # the budget holds either way
        sparse_like = [r["ratio"] for r in adaptive if r["score"] > 10]
        dense_like = [r["ratio"] for r in adaptive if r["score"] < 1]
        assert sparse_like and dense_like
        if strength > 0:
            assert max(sparse_like) < min(dense_like)
        else:
            assert min(sparse_like) > max(dense_like)
