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
import reference as ref
import torch
from conftest import basic_recipe, run_cli, tiny_state, write_checkpoint, write_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from tadrop_cli import plan as plan_module
from tadrop_cli import tadrop
from tadrop_cli.errors import BadInput
from tadrop_cli.plan import _settings_for, scope_group
from tadrop_cli.recipe import TadropSettings, parse_recipe
from tadrop_cli.run import MergeOptions, plan_only, run_merge
from tadrop_cli.tadrop import adaptive_ratios

# ---------------------------------------------------------------- 1. signed strength


@pytest.mark.parametrize("strength", [-1.0, -0.2, 0.0, 0.2, 1.0])
def test_signed_strength_is_accepted_everywhere(strength):
    recipe = parse_recipe(
        {
            "merge_method": "ties",
            "base_model": "b",
            "models": [{"model": "a", "tadrop": {"strength": strength}}],
            "tadrop": {"strength": strength, "overrides": [{"filter": "*mlp*", "strength": strength}]},
        }
    )
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


def test_the_default_strength_is_zero_the_uniform_ratio():
    """No strength beat the uniform ratio on the quality benchmarks (the sign that helps changes with
    the benchmark and the pretrained base: docs/tadrop.md), so the default is 0."""
    recipe = parse_recipe({"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}], "tadrop": {}})
    assert recipe.tadrop.strength == 0.0


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


# ---------------------------------------------------------------- 3, 4. allocations with no strength knob


def numpy_profile(tau: np.ndarray, q: int = 1, points: int = tadrop.PROFILE_POINTS) -> tadrop.MagnitudeProfile:
    """A tensor's profile from a histogram counted here with numpy (pass 1 counts with torch or the kernels)."""
    tau = np.ascontiguousarray(tau, dtype=np.float32).ravel()
    buckets = (tau.view(np.int32) & 0x7FFFFFFF) >> 16
    counts = np.bincount(buckets, minlength=1 << 15)
    masses = np.bincount(buckets, weights=np.abs(tau.astype(np.float64)) ** q, minlength=1 << 15)
    return tadrop.magnitude_profile(counts, masses, points)


def integer_taus(seed: int, sizes=(300, 500, 200, 800)) -> list[np.ndarray]:
    """Task vectors of whole numbers below 256: each histogram bucket holds one value, so the
    histogram allocations must equal the sorting references exactly. Some concentrated (a few
    large entries among ones), some spread."""
    rng = np.random.default_rng(seed)
    taus = []
    for t, n in enumerate(sizes):
        if t % 2:
            tau = rng.integers(1, 4, size=n).astype(np.float32)
            tau[rng.choice(n, size=n // 20, replace=False)] = rng.integers(100, 256, size=n // 20)
        else:
            tau = rng.integers(1, 256, size=n).astype(np.float32)
        taus.append(tau * rng.choice([-1, 1], size=n))
    return taus


@pytest.mark.parametrize("q", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mass_allocation_matches_the_sorting_reference(q, seed):
    taus = integer_taus(seed)
    profiles = [numpy_profile(tau, q) for tau in taus]
    sizes = [tau.size for tau in taus]
    checked = 0
    for target in range(1, sum(sizes), 37):
        if ref.mass_boundary_is_tied(taus, target, q):
            continue
        result = tadrop.mass_allocation(profiles, target, [0] * len(sizes), sizes)
        assert result.budget_met and sum(result.kept) == target
        assert result.kept == ref.mass_allocation_counts(taus, target, q), target
        checked += 1
    assert checked > 30


def test_mass_allocation_hand_computed():
    # a: 8 + 1 + 1 (L1 10), b: 5 5 5 5 (L1 20). Budget 4: f = 0.5 needs a's 8 (1 entry) and
    # b's two 5s (2 entries): 3; the 4th entry goes at the next share: a's 9/10 or b's 15/20.
    # b needs its third at f > 10/20, a its second at f > 8/10 = 0.8, b's third first
    a, b = np.array([8, 1, 1], np.float32), np.array([5, 5, 5, 5], np.float32)
    result = tadrop.mass_allocation([numpy_profile(a), numpy_profile(b)], 4, [0, 0], [3, 4])
    assert result.kept == [1, 3]
    assert 0.5 < result.parameter <= 0.75 + 1e-12
    result = tadrop.mass_allocation([numpy_profile(a), numpy_profile(b)], 5, [0, 0], [3, 4])
    assert result.kept == [1, 4]  # b's 4th is needed at f > .75, a's 2nd only above .8


def test_mass_allocation_respects_bounds_and_reports_an_unreachable_budget():
    taus = integer_taus(5)
    profiles = [numpy_profile(tau) for tau in taus]
    sizes = [tau.size for tau in taus]
    lows = [n // 10 for n in sizes]
    highs = [n // 2 for n in sizes]
    result = tadrop.mass_allocation(profiles, sum(sizes) // 3, lows, highs)
    assert result.budget_met and sum(result.kept) == sum(sizes) // 3
    assert all(lo <= k <= hi for k, lo, hi in zip(result.kept, lows, highs, strict=True))
    too_many = tadrop.mass_allocation(profiles, sum(highs) + 1, lows, highs)
    assert not too_many.budget_met and too_many.kept == highs


@pytest.mark.parametrize("seed", [0, 3])
def test_global_allocation_matches_one_threshold_over_the_model(seed):
    taus = integer_taus(seed)
    profiles = [numpy_profile(tau) for tau in taus]
    sizes = [tau.size for tau in taus]
    everything = np.sort(np.abs(np.concatenate(taus)))[::-1]
    checked = 0
    for target in np.flatnonzero(everything[:-1] != everything[1:]) + 1:  # splits that are no tie-break
        target = int(target)
        result = tadrop.global_allocation(profiles, target, [0] * len(sizes), sizes)
        assert result.budget_met and result.kept == ref.global_trim_counts(taus, target), target
        assert everything[target] <= tadrop.threshold_value(result.parameter) <= everything[target - 1]
        checked += 1
    assert checked > 100


def test_allocations_on_float_deltas_stay_within_a_bucket_of_the_reference():
    rng = np.random.default_rng(11)
    taus = [rng.normal(size=4000) * 1e-3, rng.laplace(size=6000) * 1e-3, rng.standard_t(2, size=3000) * 1e-3]
    taus = [t.astype(np.float32) for t in taus]
    sizes = [t.size for t in taus]
    target = sum(sizes) * 3 // 10
    for q in (1, 2):
        got = tadrop.mass_allocation([numpy_profile(t, q) for t in taus], target, [0] * 3, sizes)
        assert sum(got.kept) == target
        np.testing.assert_allclose(got.kept, ref.mass_allocation_counts(taus, target, q), atol=0.01 * max(sizes))
    got = tadrop.global_allocation([numpy_profile(t) for t in taus], target, [0] * 3, sizes)
    assert sum(got.kept) == target
    np.testing.assert_allclose(got.kept, ref.global_trim_counts(taus, target), atol=0.01 * max(sizes))


def test_a_compressed_profile_keeps_the_budget_exact_and_the_allocation_close():
    rng = np.random.default_rng(4)
    taus = [(rng.lognormal(size=20000, sigma=3) * 1e-4).astype(np.float32) for _ in range(3)]
    sizes = [t.size for t in taus]
    full = [numpy_profile(t, points=1 << 15) for t in taus]
    small = [numpy_profile(t, points=64) for t in taus]
    assert all(p.lows.size <= 64 and p.width > 1 for p in small) and all(p.width == 1 for p in full)
    target = sum(sizes) // 5
    exact = ref.mass_allocation_counts(taus, target)
    for profiles, tolerance in ((full, 0.01), (small, 0.05)):
        got = tadrop.mass_allocation(profiles, target, [0] * 3, sizes)
        assert sum(got.kept) == target
        np.testing.assert_allclose(got.kept, exact, atol=tolerance * max(sizes))


def test_mass_reverse_mirrors_the_mass_allocation_about_uniform():
    taus = integer_taus(7)
    profiles = [numpy_profile(tau) for tau in taus]
    sizes = [tau.size for tau in taus]
    uniform = [int(0.4 * n) for n in sizes]
    if ref.mass_boundary_is_tied(taus, sum(uniform)):
        pytest.skip("tied boundary")
    result = tadrop.mass_reverse_allocation(profiles, uniform, [0] * 4, sizes)
    assert result.budget_met and sum(result.kept) == sum(uniform)
    assert result.kept == ref.mass_reverse_counts(taus, uniform)
    mass = ref.mass_allocation_counts(taus, sum(uniform))
    for k, m, u in zip(
        result.kept, mass, uniform, strict=True
    ):  # fewer than uniform under mass <=> more under its reverse
        assert (k - u) == -(m - u)


def test_mass_reverse_restores_the_budget_when_bounds_clip():
    taus = integer_taus(8)
    profiles = [numpy_profile(tau) for tau in taus]
    sizes = [tau.size for tau in taus]
    uniform = [int(0.3 * n) for n in sizes]
    highs = [int(0.35 * n) for n in sizes]
    result = tadrop.mass_reverse_allocation(profiles, uniform, [0] * 4, highs)
    assert result.budget_met and sum(result.kept) == sum(uniform)
    assert all(0 <= k <= h for k, h in zip(result.kept, highs, strict=True))


# ---------------------------------------------------------------- plans: helpers


def integer_models(tmp_path, count: int = 2, seed: int = 0) -> dict:
    """A base and fine-tunes whose task vectors are whole numbers below 256 (exact in float32, one
    histogram bucket per value): the plan's kept counts must equal the sorting references."""
    rng = np.random.default_rng(seed)
    base = {
        name: torch.from_numpy(np.round(rng.normal(size=t.shape) * 8).astype(np.float32))
        for name, t in tiny_state().items()
    }
    paths = {"base": write_checkpoint(tmp_path / "base", base)}
    for i in range(count):
        tuned = {}
        for k, (name, tensor) in enumerate(sorted(base.items())):
            n = tensor.numel()
            delta = rng.integers(1, 4, size=n).astype(np.float32)
            if (k + i) % 2:
                delta[rng.choice(n, size=max(1, n // 30), replace=False)] = rng.integers(100, 256, size=max(1, n // 30))
            else:
                delta = rng.integers(0, 256, size=n).astype(np.float32)
            tuned[name] = tensor + torch.from_numpy(
                (delta * rng.choice([-1, 1], size=n)).reshape(tensor.shape).astype(np.float32)
            )
        paths[f"ft{i}"] = write_checkpoint(tmp_path / f"ft{i}", tuned)
    return paths


def plan_of(models, tmp_path, method="ties", **tadrop_settings):
    recipe = parse_recipe(basic_recipe(models, tmp_path / "out", method=method, tadrop=tadrop_settings))
    return plan_only(recipe)[1]


def task_vectors(models, label_key: str, names) -> list[np.ndarray]:
    base = load_file(str(models["base"] / "model.safetensors"))
    tuned = load_file(str(models[label_key] / "model.safetensors"))
    return [(tuned[n] - base[n]).numpy().ravel() for n in names]


def adaptive_rows(plan, model: str):
    return [r for r in plan.rows if r.model == model and r.reason.startswith("adaptive")]


# ---------------------------------------------------------------- 2. scope


NAMES = [
    "bert.encoder.layer.0.attention.self.query.weight",
    "bert.encoder.layer.11.attention.self.query.weight",
    "bert.encoder.layer.3.output.LayerNorm.weight",
    "bert.embeddings.word_embeddings.weight",
    "transformer.h.0.attn.c_attn.weight",
    "transformer.h.10.mlp.c_fc.weight",
    "transformer.ln_f.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.31.mlp.down_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
    "vision_model.encoder.layers.7.self_attn.k_proj.weight",
    "blocks.2.attn.qkv.weight",
    # two stacks numbered from 0 each: T5, BART/Whisper, CLIP
    "encoder.block.3.layer.0.SelfAttention.q.weight",
    "decoder.block.3.layer.1.EncDecAttention.q.weight",
    "model.encoder.layers.2.self_attn.q_proj.weight",
    "model.decoder.layers.2.self_attn.q_proj.weight",
    "text_model.encoder.layers.7.self_attn.k_proj.weight",
]


@pytest.mark.parametrize("name", NAMES)
def test_scope_groups_match_the_reference(name):
    assert scope_group(name, "model") is None
    assert scope_group(name, "kind") == ref.tensor_kind(name)
    assert scope_group(name, "layer") == ref.layer_group(name)


@pytest.mark.parametrize(
    "first, second",
    [
        ("encoder.block.3.layer.0.SelfAttention.q.weight", "decoder.block.3.layer.0.SelfAttention.q.weight"),
        ("model.encoder.layers.2.fc1.weight", "model.decoder.layers.2.fc1.weight"),  # BART, Whisper
        ("vision_model.encoder.layers.7.mlp.fc1.weight", "text_model.encoder.layers.7.mlp.fc1.weight"),  # CLIP
    ],
)
def test_two_stacks_layer_n_are_two_groups(first, second):
    """An encoder's block 3 and a decoder's block 3 are different layers: `scope: layer` normalises each
    stack's layer apart (it put both in "layer 3"); `scope: kind` keeps each stack's kind apart too."""
    assert scope_group(first, "layer") != scope_group(second, "layer")
    assert scope_group(first, "kind") != scope_group(second, "kind")
    assert scope_group(first, "layer") == scope_group(first.replace("weight", "bias"), "layer")  # one layer, one group


def test_kind_groups_every_layers_query_matrices_together():
    assert (
        scope_group("bert.encoder.layer.11.attention.self.query.weight", "kind")
        == "bert.encoder.layer.{}.attention.self.query.weight"
    )
    assert scope_group("transformer.h.10.mlp.c_fc.weight", "kind") == "transformer.h.{}.mlp.c_fc.weight"


@pytest.mark.parametrize("scope", ["kind", "layer"])
def test_scope_normalises_within_groups_and_keeps_the_budget_model_wide(tiny_models, tmp_path, scope):
    plan = plan_of(tiny_models, tmp_path, statistic="kurtosis", strength=0.3, scope=scope)
    label = str(tiny_models["ft0"])
    rows = adaptive_rows(plan, label)
    assert len(rows) == 5
    groups: dict = {}
    for row in rows:
        expected_group = ref.tensor_kind(row.tensor) if scope == "kind" else ref.layer_group(row.tensor)
        assert row.group == expected_group
        assert expected_group in row.reason
        groups.setdefault(row.group, []).append(row)
    for members in groups.values():
        assert [r.normalized for r in members] == pytest.approx(ref.normalize_rank([r.score for r in members]))
    weighted = sum(r.numel * r.ratio for r in rows) / sum(r.numel for r in rows)
    assert weighted == pytest.approx(0.6, abs=1e-6)
    summary = next(m for m in plan.models if m.model == label)
    assert summary.scope == scope and summary.allocation == "strength" and summary.budget_met


def test_scope_model_is_the_default_and_reads_as_before(tiny_models, tmp_path):
    plan = plan_of(tiny_models, tmp_path, statistic="kurtosis")
    rows = adaptive_rows(plan, str(tiny_models["ft0"]))
    assert all(r.reason == "adaptive" and r.group is None for r in rows)
    assert [r.normalized for r in rows] == pytest.approx(ref.normalize_rank([r.score for r in rows]))
    assert all("group" not in r and "kept" not in r for r in plan.to_json()["tensors"])


# ---------------------------------------------------------------- 3, 4. allocations in the plan and the merge


@pytest.mark.parametrize("allocation,norm", [("mass", "l1"), ("mass", "l2"), ("global", "l1"), ("mass_reverse", "l1")])
def test_count_allocations_in_the_plan_match_the_references(tmp_path, allocation, norm):
    models = integer_models(tmp_path)
    plan = plan_of(models, tmp_path, allocation=allocation, mass_norm=norm, max_ratio=1.0)
    for key in ("ft0", "ft1"):
        rows = adaptive_rows(plan, str(models[key]))
        assert len(rows) == 5
        taus = task_vectors(models, key, [r.tensor for r in rows])
        uniform = [int(0.4 * r.numel) for r in rows]
        q = 1 if norm == "l1" else 2
        if allocation == "mass":
            if ref.mass_boundary_is_tied(taus, sum(uniform), q):
                continue
            expected = ref.mass_allocation_counts(taus, sum(uniform), q)
        elif allocation == "mass_reverse":
            expected = ref.mass_reverse_counts(taus, uniform, q)
            if ref.mass_boundary_is_tied(taus, sum(uniform), q) or any(
                k < 0 or k > r.numel for k, r in zip(expected, rows, strict=True)
            ):
                continue
        else:  # whole numbers tie at the threshold: which tied entries are kept is a tie-break
            threshold = np.sort(np.abs(np.concatenate(taus)))[::-1][sum(uniform) - 1]
            for row, tau in zip(rows, taus, strict=True):
                assert int((np.abs(tau) > threshold).sum()) <= row.kept <= int((np.abs(tau) >= threshold).sum())
            expected = [r.kept for r in rows]
        assert [r.kept for r in rows] == expected
        assert sum(r.kept for r in rows) == sum(uniform)  # the same entries as the uniform trim
        assert all(r.ratio == pytest.approx(1 - r.kept / r.numel) for r in rows)
        summary = next(m for m in plan.models if m.model == str(models[key]))
        assert summary.allocation == allocation and summary.budget_met
        if allocation == "global":
            assert summary.threshold > 0 and f"{summary.threshold:.6g}" in rows[0].reason
        else:
            assert 0 < summary.mass_fraction < 1 and f"f={summary.mass_fraction:.6g}" in rows[0].reason


@pytest.mark.parametrize("allocation", ["mass", "global"])
def test_the_merge_keeps_exactly_the_planned_counts(tmp_path, allocation):
    models = integer_models(tmp_path, count=1, seed=3)
    recipe = basic_recipe(models, tmp_path / "out", method="magnitude_prune", tadrop={"allocation": allocation})
    recipe["models"][0]["parameters"] = {"weight": 1.0, "density": 0.3}
    recipe = parse_recipe(recipe)
    plan = plan_only(recipe)[1]
    run_merge(recipe, MergeOptions())
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    base = load_file(str(models["base"] / "model.safetensors"))
    rows = adaptive_rows(plan, str(models["ft0"]))
    assert len(rows) == 5 and len({r.kept for r in rows}) > 1
    for row in rows:
        assert int((out[row.tensor] != base[row.tensor]).sum()) == row.kept, row.tensor


def test_allocations_per_model(tmp_path):
    models = integer_models(tmp_path)
    recipe = basic_recipe(models, tmp_path / "out", tadrop={"allocation": "mass"})
    recipe["models"][1]["tadrop"] = {"allocation": "strength", "scope": "layer"}
    plan = plan_only(parse_recipe(recipe))[1]
    first, second = (next(m for m in plan.models if m.model == str(models[k])) for k in ("ft0", "ft1"))
    assert first.allocation == "mass" and first.mass_fraction is not None and first.statistic is None
    assert second.allocation == "strength" and second.scope == "layer" and second.statistic == "hoyer"


def test_a_scope_with_a_count_allocation_is_refused():
    with pytest.raises(BadInput, match="scope"):
        parse_recipe(
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": [{"model": "a"}],
                "tadrop": {"allocation": "mass", "scope": "kind"},
            }
        )


def test_count_allocations_are_refused_for_rank_hosts(tiny_models, tmp_path):
    recipe = basic_recipe(tiny_models, tmp_path / "out", method="tsv_m", tadrop={"allocation": "global"})
    for entry in recipe["models"]:
        entry["parameters"] = {"weight": 0.6}
    result = run_cli("plan", str(write_recipe(tmp_path, recipe)))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "allocation" in result.stderr and "tsv_m" in result.stderr and "Traceback" not in result.stderr


def test_the_plan_command_shows_the_allocation(tmp_path):
    models = integer_models(tmp_path, count=1)
    recipe = basic_recipe(models, tmp_path / "out", tadrop={"allocation": "global"})
    result = run_cli("plan", str(write_recipe(tmp_path, recipe)), "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["models"][0]["allocation"] == "global" and plan["models"][0]["threshold"] > 0
    assert all(
        r["kept"] >= 0 and "model-wide threshold" in r["reason"]
        for r in plan["tensors"]
        if r["reason"].startswith("adaptive")
    )


# ---------------------------------------------------------------- 5. random hosts: the rescale cap


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della"])
def test_random_hosts_cap_the_drop_ratio_at_max_rescale(tiny_models, tmp_path, method):
    plan = plan_of(tiny_models, tmp_path, method=method, statistic="kurtosis", strength=1.0)
    for label in (str(tiny_models[k]) for k in ("ft0", "ft1", "ft2")):
        rows = adaptive_rows(plan, label)
        assert max(r.ratio for r in rows) == pytest.approx(0.9)  # uncapped, strength 1 reaches 0.99
        assert all(r.ratio <= 0.9 + 1e-12 for r in rows)
        assert any("max_rescale 10" in r.reason for r in rows)
        assert sum(r.numel * r.ratio for r in rows) / sum(r.numel for r in rows) == pytest.approx(0.6, abs=1e-6)
    free = plan_of(tiny_models, tmp_path, method=method, statistic="kurtosis", strength=1.0, max_rescale=100)
    assert max(r.ratio for r in free.rows) > 0.95


def test_magnitude_hosts_are_not_capped(tiny_models, tmp_path):
    plan = plan_of(tiny_models, tmp_path, method="ties", statistic="kurtosis", strength=1.0)
    assert max(r.ratio for r in plan.rows) > 0.95
    assert not any("max_rescale" in r.reason for r in plan.rows)


def test_the_cap_never_goes_below_the_hosts_own_ratio(tiny_models, tmp_path):
    recipe = basic_recipe(tiny_models, tmp_path / "out", method="dare_ties", tadrop={"strength": 0.5})
    for entry in recipe["models"]:
        entry["parameters"]["density"] = 0.05  # the user's own rescale is 20
    plan = plan_only(parse_recipe(recipe))[1]
    rows = [r for r in plan.rows if r.reason.startswith("adaptive")]
    assert rows and all(r.ratio == pytest.approx(0.95) for r in rows)
    assert all(m.budget_met for m in plan.models)


def test_the_cap_bounds_count_allocations_too(tmp_path):
    models = integer_models(tmp_path)
    recipe = basic_recipe(models, tmp_path / "out", method="dare_linear", tadrop={"allocation": "mass"})
    for entry in recipe["models"]:
        entry["parameters"]["density"] = 0.2
    plan = plan_only(parse_recipe(recipe))[1]
    for key in ("ft0", "ft1"):
        rows = adaptive_rows(plan, str(models[key]))
        assert all(r.ratio <= 0.9 + 1e-12 for r in rows)
        assert sum(r.kept for r in rows) == sum(int(0.2 * r.numel) for r in rows)
    assert any("held at max_ratio 0.9 (max_rescale)" in r.reason for r in plan.rows)


def test_the_rescale_the_merge_applies_stays_within_the_cap(tmp_path, tiny_models):
    """DARE's survivors are rescaled by 1 / density: at most max_rescale."""
    recipe = basic_recipe(
        tiny_models, tmp_path / "out", method="dare_linear", tadrop={"statistic": "kurtosis", "strength": 1.0}
    )
    recipe["models"] = recipe["models"][:1]
    recipe["models"][0]["parameters"] = {"weight": 1.0, "density": 0.4}
    recipe = parse_recipe(recipe)
    run_merge(recipe, MergeOptions())
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    base = load_file(str(tiny_models["base"] / "model.safetensors"))
    tuned = load_file(str(tiny_models["ft0"] / "model.safetensors"))
    for name in base:
        delta, merged = (tuned[name] - base[name]).double(), (out[name] - base[name]).double()
        kept = (merged != 0) & (delta.abs() > 1e-3)
        if bool(kept.any()):
            assert float((merged[kept] / delta[kept]).max()) <= 10.0 * (1 + 1e-3), name


# ---------------------------------------------------------------- 6. exclude globs, case-insensitive

EXCLUDED = [
    "bert.encoder.layer.3.output.LayerNorm.weight",
    "bert.embeddings.LayerNorm.bias",
    "transformer.h.0.ln_1.weight",
    "transformer.h.11.ln_2.weight",
    "transformer.ln_f.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.5.post_attention_layernorm.weight",
    "model.norm.weight",
    "ln_f.weight",
    "encoder.layer.0.attention.output.dense.bias",
]
ADAPTED = [
    "bert.encoder.layer.0.attention.self.query.weight",
    "transformer.h.0.attn.c_attn.weight",
    "transformer.h.0.mlp.c_fc.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "lm_head.weight",
    "kiln_proj.weight",
]


@pytest.mark.parametrize("name", EXCLUDED + ADAPTED)
def test_default_exclude_matches_norms_and_biases_of_bert_gpt2_and_llama(name):
    settings = TadropSettings()
    result = _settings_for(settings, name, 1 << 20)
    assert result.reason == ("excluded" if name in EXCLUDED else "adaptive")


def test_user_globs_match_case_insensitively():
    settings = TadropSettings(exclude=["*LAYERNORM*"], overrides=[{"filter": "*Q_Proj*", "strength": -0.4}])
    assert _settings_for(settings, "bert.embeddings.LayerNorm.weight", 1 << 20).reason == "excluded"
    assert _settings_for(settings, "model.layers.0.input_layernorm.weight", 1 << 20).reason == "excluded"
    assert _settings_for(settings, "model.layers.0.self_attn.q_proj.weight", 1 << 20).strength == -0.4


# ---------------------------------------------------------------- 7. statistics near float32's range


def strict_json(text: str) -> dict:
    def refuse(constant):
        raise AssertionError(f"{constant} in the plan JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("scale", [1e30, 1e36])
@pytest.mark.parametrize("statistic", ["hoyer", "kurtosis", "cv", "gini", "topmass"])
def test_huge_task_vectors_give_finite_scores_equal_to_the_reference(tmp_path, scale, statistic):
    zeros = {name: torch.zeros_like(t) for name, t in tiny_state().items()}
    g = torch.Generator().manual_seed(5)
    tuned = {name: (torch.randn(t.shape, generator=g) ** 3 * scale).clamp(-3e38, 3e38) for name, t in zeros.items()}
    models = {"base": write_checkpoint(tmp_path / "base", zeros), "ft0": write_checkpoint(tmp_path / "ft0", tuned)}
    recipe = basic_recipe(models, tmp_path / "out", tadrop={"statistic": statistic})
    result = run_cli("plan", str(write_recipe(tmp_path, recipe)), "--json")
    assert result.returncode == 0, result.stderr
    plan = strict_json(result.stdout)
    rows = [r for r in plan["tensors"] if r["reason"] == "adaptive"]
    assert len(rows) == 5
    for row in rows:
        expected = ref.score(tuned[row["tensor"]].double().numpy(), statistic)
        assert row["score"] == pytest.approx(expected, rel=1e-4, abs=1e-5), row["tensor"]


@pytest.mark.parametrize("allocation,norm", [("mass", "l1"), ("mass", "l2"), ("global", "l1")])
def test_huge_task_vectors_in_the_count_allocations(tmp_path, allocation, norm):
    zeros = {name: torch.zeros_like(t) for name, t in tiny_state().items()}
    g = torch.Generator().manual_seed(6)
    tuned = {name: (torch.randn(t.shape, generator=g) ** 3 * 1e36).clamp(-3e38, 3e38) for name, t in zeros.items()}
    models = {"base": write_checkpoint(tmp_path / "base", zeros), "ft0": write_checkpoint(tmp_path / "ft0", tuned)}
    recipe = basic_recipe(models, tmp_path / "out", tadrop={"allocation": allocation, "mass_norm": norm})
    result = run_cli("plan", str(write_recipe(tmp_path, recipe)), "--json")
    assert result.returncode == 0, result.stderr
    plan = strict_json(result.stdout)
    rows = [r for r in plan["tensors"] if r["reason"].startswith("adaptive")]
    assert sum(r["kept"] for r in rows) == sum(int(0.4 * r["numel"]) for r in rows)


def test_a_task_vector_that_overflows_float32_is_named(tmp_path):
    base = {name: torch.full_like(t, -3e38) for name, t in tiny_state().items()}
    tuned = {name: torch.full_like(t, 3e38) for name, t in base.items()}
    models = {"base": write_checkpoint(tmp_path / "base", base), "ft0": write_checkpoint(tmp_path / "ft0", tuned)}
    for tadrop_settings in ({}, {"allocation": "global"}, {"allocation": "mass"}):
        recipe = basic_recipe(models, tmp_path / "out", tadrop=tadrop_settings)
        result = run_cli("plan", str(write_recipe(tmp_path, recipe)), "--json")
        assert result.returncode == 2, (tadrop_settings, result.stdout, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert "model.embed.weight" in result.stderr or "model.layers" in result.stderr


@pytest.mark.parametrize(
    "recipe_level,model_level,culprit",
    [
        ({"allocation": "mass"}, {"scope": "kind"}, "scope"),
        ({"max_ratio": 0.5}, {"min_ratio": 0.9}, "min_ratio"),
    ],
)
def test_per_model_settings_that_contradict_the_recipes_are_one_line_errors(
    tiny_models, tmp_path, recipe_level, model_level, culprit
):
    recipe = basic_recipe(tiny_models, tmp_path / "out", tadrop=recipe_level)
    recipe["models"][1]["tadrop"] = model_level
    path = write_recipe(tmp_path, recipe)
    for command in (("plan", str(path)), ("merge", str(path), "--dry-run")):
        result = run_cli(*command)
        assert result.returncode == 2, (command, result.stderr)
        line = result.stderr.strip()
        assert len(line.splitlines()) == 1 and "internal error" not in line and "Traceback" not in line
        assert culprit in line and str(tiny_models["ft1"]) in line and "tadrop" in line
        assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- pass 1 reads in slices, with or without the kernels


@pytest.mark.parametrize("allocation", ["mass", "global"])
def test_profiles_counted_in_slices_equal_whole_tensors(tmp_path, monkeypatch, allocation):
    models = integer_models(tmp_path)
    whole = plan_of(models, tmp_path, allocation=allocation)
    monkeypatch.setattr(plan_module, "SCORE_SLICE_ELEMENTS", 1000)  # 4096-8192 entries: 5-9 slices, the last partial
    sliced = plan_of(models, tmp_path, allocation=allocation)
    assert [r.kept for r in sliced.rows] == [r.kept for r in whole.rows]
    assert any(r.kept is not None for r in sliced.rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_kernels_count_the_same_profiles_as_pytorch(tmp_path, dtype):
    base = tiny_state()
    tuned = {
        name: t + torch.randn(t.shape, generator=torch.Generator().manual_seed(i)) ** 3 * 1e-2
        for i, (name, t) in enumerate(base.items())
    }
    models = {
        "base": write_checkpoint(tmp_path / "base", base, dtype=dtype),
        "ft0": write_checkpoint(tmp_path / "ft0", tuned, dtype=dtype),
    }
    path = write_recipe(tmp_path, basic_recipe(models, tmp_path / "out", tadrop={"allocation": "global"}))
    with_kernels = strict_json(run_cli("plan", str(path), "--json").stdout)
    without = strict_json(run_cli("plan", str(path), "--json", env={"TADROP_KERNELS": "torch"}).stdout)
    assert with_kernels == without
    assert len({r["kept"] for r in with_kernels["tensors"] if "kept" in r}) == 5


def test_strength_zero_the_default_keeps_the_uniform_ratios_and_says_so(tiny_models, tmp_path):
    """`tadrop:` with its defaults merges with the host's uniform ratio (bytes equal to no tadrop
    block), scores still shown in the plan, and one note says why and how to adapt."""
    from conftest import basic_recipe, run_cli, write_recipe

    adaptive = basic_recipe(tiny_models, tmp_path / "tadrop", tadrop={"min_numel": 0})
    uniform = basic_recipe(tiny_models, tmp_path / "uniform")
    result = run_cli("merge", str(write_recipe(tmp_path, adaptive)), "--json")
    assert result.returncode == 0, result.stderr
    (tmp_path / "u").mkdir()
    assert run_cli("merge", str(write_recipe(tmp_path / "u", uniform)), "--quiet").returncode == 0
    notes = [n for n in json.loads(result.stdout)["notes"] if n.startswith("tadrop:")]
    assert notes == [
        "tadrop: strength 0 (the default) for every model: every ratio stays the host's uniform ratio, as no "
        "strength beat it on the quality benchmarks (docs/tadrop.md); set tadrop.strength (-1..1) to adapt"
    ]
    from safetensors.torch import load_file

    merged, expected = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("tadrop", "uniform"))
    assert set(merged) == set(expected) and all(torch.equal(merged[k], expected[k]) for k in merged)
    plan = json.loads(run_cli("plan", str(write_recipe(tmp_path, adaptive)), "--json").stdout)
    adapted = [r for r in plan["tensors"] if r["reason"] == "adaptive"]
    assert adapted and all(r["ratio"] == r["base_ratio"] and r["score"] is not None for r in adapted)


@pytest.mark.parametrize("density,pinned", [(0.1, True), (0.4, False)])
def test_a_random_host_whose_ratios_cannot_move_says_so(tiny_models, tmp_path, density, pinned):
    """DARE at density 0.1 with max_rescale 10: the drop ratio's cap, 1 - 1/10, is the uniform ratio,
    so with the budget kept no ratio can move; the merge says so instead of silently doing uniform."""
    from conftest import basic_recipe, run_cli, write_recipe

    settings = {"min_numel": 0, "strength": -0.2}
    recipe = basic_recipe(tiny_models, tmp_path / "out", method="dare_linear", tadrop=settings)
    for entry in recipe["models"]:
        entry["parameters"]["density"] = density
    result = run_cli("merge", str(write_recipe(tmp_path, recipe)), "--json")
    assert result.returncode == 0, result.stderr
    notes = [n for n in json.loads(result.stdout)["notes"] if "every ratio stays uniform" in n]
    assert bool(notes) == pinned, notes
    if pinned:
        assert len(notes) == 3 and all("max_rescale 10" in n for n in notes)
