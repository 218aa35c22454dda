"""Issue 13 (stock): the magnitude trim's kept count, model_stock, sce, arcee_fusion, and the
recipe's suggestions for unknown methods and keys."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch
from conftest import write_checkpoint
from safetensors.torch import load_file

from tadrop_cli import kernels, sparsify
from tadrop_cli.recipe import parse_recipe
from tadrop_cli.run import MergeOptions, run_merge

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
