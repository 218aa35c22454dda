"""The dry run's time estimate (estimate.py): rates per path, and a dry run that tells the paths apart."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import basic_recipe, fine_tune, run_cli, write_checkpoint, write_recipe

from tadrop_cli import estimate


def test_tensor_seconds_by_path_hand_computed():
    gb = 10**9
    assert estimate.tensor_seconds("kernels", 5 * gb, (10,), 4) == pytest.approx(2.0)  # 2.5 GB/s
    assert estimate.tensor_seconds("torch", 5 * gb, (10,), 4) == pytest.approx(10.0)  # 0.5 GB/s
    assert estimate.tensor_seconds("ranked_rows", 12 * 10**7, (10,), 4) == pytest.approx(1.0)  # 0.12 GB/s
    # the docs' exact-route figure: 4096 x 4096, 4 models, 143 s on one core; two cores 1.6x, fast route 1.5x
    exact = estimate.tensor_seconds("svd", 0, (4096, 4096), 4, exact_svd=True)
    assert exact == pytest.approx(5.2e-10 * 4 * 4096**3 / 1.6)
    assert estimate.tensor_seconds("svd", 0, (4096, 4096), 4) == pytest.approx(exact / 1.5)
    assert estimate.tensor_seconds("svd", 0, (1024, 4096), 4) == pytest.approx(exact / 16 / 1.5)  # m n^2, m >= n
    assert estimate.tensor_seconds("svd", 5 * gb, (4096,), 4) == pytest.approx(10.0)  # 1-D: the mean, element-wise
    with pytest.raises(ValueError):
        estimate.tensor_seconds("quantum", 1, (1,), 1)


@pytest.mark.parametrize("seconds, shown", [(0.01, 0.1), (0.123, 0.12), (2.84, 2.8), (31.7, 32.0), (143.6, 140.0)])
def test_estimates_are_rounded_to_two_figures(seconds, shown):
    assert estimate.rounded(seconds) == shown


def test_a_dry_run_estimates_the_svd_hosts_by_their_cubic_cost(tmp_path):
    """The old estimate counted bytes alone: TSV-M and task arithmetic on the same inputs came out the same."""
    g = torch.Generator().manual_seed(3)
    base = {f"layers.{i}.weight": torch.randn(512, 512, generator=g) for i in range(2)}
    models = {"base": write_checkpoint(tmp_path / "base", base)}
    for i in range(4):
        models[f"ft{i}"] = write_checkpoint(tmp_path / f"ft{i}", fine_tune(base, i))
    estimates = {}
    for method in ("task_arithmetic", "tsv_m"):
        recipe = basic_recipe(models, tmp_path / f"out-{method}", method=method)
        for entry in recipe["models"]:
            entry["parameters"] = {"weight": 0.5}
        path = write_recipe(tmp_path, recipe, name=f"{method}.yaml")
        result = run_cli("merge", str(path), "--dry-run", "--json")
        assert result.returncode == 0, result.stderr
        estimates[method] = json.loads(result.stdout)["estimated_seconds"]
    svd = sum(estimate.tensor_seconds("svd", 0, (512, 512), 4) for _ in range(2))
    assert estimates["tsv_m"] >= svd + estimate.START_SECONDS + estimate.TORCH_IMPORT_SECONDS - 0.05
    assert estimates["task_arithmetic"] < estimate.START_SECONDS + 0.1 + estimate.TORCH_IMPORT_SECONDS


def test_the_reported_peak_is_the_merges_own_not_its_parents(tmp_path):
    """A merge started by a process holding much memory (this one: torch and ~256 MB more) reports its
    own peak: getrusage's maxrss keeps, after the exec, the peak of the vfork'd parent it replaced."""
    held = bytearray(256 * 2**20)
    held[::4096] = b"\x01" * len(held[::4096])  # resident, not just reserved
    g = torch.Generator().manual_seed(4)
    base = {"layers.0.weight": torch.randn(64, 64, generator=g)}
    models = {
        "base": write_checkpoint(tmp_path / "base", base),
        "ft": write_checkpoint(tmp_path / "ft", fine_tune(base, 1)),
    }
    path = write_recipe(tmp_path, basic_recipe(models, tmp_path / "out", method="task_arithmetic"))
    result = run_cli("merge", str(path), "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["peak_rss_bytes"] < 200 * 2**20  # a kernels merge of 2 tiny models: ~100 MB
    del held


@pytest.mark.parametrize("method", ["karcher", "multislerp", "nuslerp"])
def test_a_dry_run_counts_a_baseless_interpolations_models_once(tiny_models, tmp_path, method):
    """Without base_model the first model stands in as the layout's reference, but the merge reads each
    model once (tensor_merge.merge_inputs): the dry run counted the first model twice, as a base and a model."""
    from safetensors import safe_open

    models = [tiny_models["ft0"], tiny_models["ft1"]]
    recipe = {
        "merge_method": method,
        "models": [{"model": str(m)} for m in models],
        "output": {"path": str(tmp_path / "o")},
    }
    result = run_cli("merge", str(write_recipe(tmp_path, recipe)), "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    sizes = []
    for folder in models:
        with safe_open(str(folder / "model.safetensors"), "np") as handle:
            sizes.extend(handle.get_tensor(name).nbytes for name in handle.keys())
    assert summary["bytes_to_read"] == sum(sizes)  # each tensor of each model, once
    largest = max(sizes) // 4  # float32 entries of the largest tensor
    assert summary["estimated_peak_memory_bytes"] == 4 * (2 + 4) * largest + 300 * 2**20  # 2 models read, torch
