"""Merging large tensors in slices: the exact top-k cut, the counter-based random stream and
Hoyer scores summed over slices give what the whole-tensor computations give, and the engine
writes the same bytes either way."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import basic_recipe, fine_tune, tiny_state, write_checkpoint
from reference import dare_keep, splitmix64_words
from test_selection import CASES

from tadrop_cli import sparsify
from tadrop_cli.methods import METHODS
from tadrop_cli.recipe import parse_recipe
from tadrop_cli.run import MergeOptions, run_merge
from tadrop_cli.tadrop import HoyerSums, hoyer

# ---------------------------------------------------------------- the top-k cut over slices


def _masks_from_cut(values: torch.Tensor, k: int, slice_size: int) -> torch.Tensor:
    parts = list(values.split(slice_size))
    cut = sparsify.top_k_cut(parts, k)
    if cut is None:
        return torch.ones(values.numel(), dtype=torch.bool)
    starts = np.cumsum([0] + [p.numel() for p in parts])
    masks = [sparsify.cut_mask(p, cut, int(s)) for p, s in zip(parts, starts[:-1], strict=True)]
    assert all(m.dtype == torch.float32 and bool(((m == 0) | (m == 1)).all()) for m in masks)  # 1.0 kept, 0.0 dropped
    return torch.cat(masks).bool()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.3, 0.5, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("slice_size", [1000, 65536, 77777])
def test_cut_over_slices_keeps_exactly_what_a_full_sort_keeps(name, fraction, slice_size):
    values = CASES[name]
    k = int(fraction * values.numel())
    mask = _masks_from_cut(values, k, slice_size)
    # reference: a stable sort on (-|value|, position) keeps the lowest positions among ties
    order = np.lexsort((np.arange(values.numel()), -np.abs(values.numpy().astype(np.float64))))
    expected = np.zeros(values.numel(), dtype=bool)
    expected[order[:k]] = True
    assert int(mask.sum()) == k
    assert np.array_equal(mask.numpy(), expected)


def test_cut_splits_ties_inside_the_right_slice():
    # 10 slices of 100 entries, all tied at 1.0 except a few larger ones: keep 250 entries
    values = torch.ones(1000)
    values[[5, 450, 999]] = 2.0
    cut = sparsify.top_k_cut(list(values.split(100)), 250)
    # 3 larger entries, so 247 ties are kept: 99 in slice 0, 100 in slice 1, the first 48 of slice 2
    assert cut.threshold == 1.0 and cut.tie_start == 200 and cut.tie_quota == 48
    mask = _masks_from_cut(values, 250, 100)
    assert bool(mask[[5, 450, 999]].all()) and int(mask.sum()) == 250
    kept_ties = torch.nonzero(mask & (values == 1.0)).reshape(-1)
    assert kept_ties.tolist() == [i for i in range(1000) if values[i] == 1.0][:247]


# ---------------------------------------------------------------- the random stream


def test_the_stream_is_splitmix64():
    # the first output of SplitMix64 seeded with 0 (the published reference value)
    words = sparsify.random_words(0, 0, 2).numpy().view(np.uint32)
    assert (int(words[1]) << 32) | int(words[0]) == 0xE220A8397B1DCDAF
    for seed in (0, 7, 2**63 + 5, -1):
        assert np.array_equal(
            sparsify.random_words(seed, 0, 3001).numpy().view(np.uint32), splitmix64_words(seed, 3001)
        )


@pytest.mark.parametrize("start,stop", [(0, 1), (1, 2), (1, 1), (3, 1_048_583), (999_999, 1_100_000)])
def test_any_slice_of_the_stream_is_the_same_slice_of_the_whole(start, stop):
    whole = splitmix64_words(123, stop)
    assert np.array_equal(sparsify.random_words(123, start, stop).numpy().view(np.uint32), whole[start:stop])


def test_keep_mask_matches_the_reference_and_its_probability():
    mask = sparsify.random_keep_mask(200_000, 0.3, 42)
    assert np.array_equal(mask.numpy(), dare_keep((200_000,), 0.3, 42))
    assert abs(float(mask.float().mean()) - 0.3) < 0.005  # 4.9 standard deviations
    assert np.array_equal(
        sparsify.random_keep_mask(1000, 0.3, 42, offset=5000).numpy(), dare_keep((6000,), 0.3, 42)[5000:]
    )
    assert not bool(sparsify.random_keep_mask(1000, 0.0, 1).any()) and bool(
        sparsify.random_keep_mask(1000, 1.0, 1).all()
    )


def test_streams_of_different_seeds_are_unrelated():
    a, b = (sparsify.random_keep_mask(100_000, 0.5, seed).float() for seed in (1, 2))
    assert abs(float((a * b).mean()) - 0.25) < 0.006


# ---------------------------------------------------------------- scores over slices


@pytest.mark.parametrize(
    "values",
    [
        torch.randn(3_000_001),
        torch.distributions.StudentT(1.5).sample((2_000_000,)) * 1e-12,
        torch.zeros(5000).index_fill_(0, torch.tensor([3, 4000]), 1e-30),
    ],
)
def test_hoyer_summed_over_slices_equals_hoyer_of_the_whole(values):
    sums = HoyerSums()
    for part in values.split(1 << 20):
        sums.add(part)
    assert sums.score() == pytest.approx(hoyer(values), rel=1e-6)


def test_hoyer_sums_of_zeros_is_none():
    sums = HoyerSums()
    sums.add(torch.zeros(10))
    assert sums.score() is None


# ---------------------------------------------------------------- the engine


SLICED_METHODS = [
    "ties",
    "magnitude_prune",
    "dare_ties",
    "dare_linear",
    "consensus_ta",
    "consensus_ties",
    "della",
    "della_linear",
]


def test_the_trimming_hosts_are_the_ones_sliced():
    assert {name for name, m in METHODS.items() if m.sliced_trims} == set(SLICED_METHODS)
    assert METHODS["ties"].sliceable({"rescale": False}) and not METHODS["ties"].sliceable({"rescale": "l1"})
    assert METHODS["della"].whole_rows and not METHODS["della"].sliceable({"rescale": "l2"})
    assert not METHODS["breadcrumbs"].sliceable({}) and not METHODS["tsv_m"].sliceable({})


@pytest.mark.parametrize("method", SLICED_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tadrop", [False, True])
def test_trimming_hosts_merge_in_slices_exactly_as_whole(tmp_path, monkeypatch, method, dtype, tadrop):
    """The same bytes whether a tensor is merged whole or in slices (a last one shorter), for
    float32 task vectors and for bf16 ones (many tied values at the trim threshold)."""
    from tadrop_cli import tensor_merge

    base = tiny_state()
    models = {"base": write_checkpoint(tmp_path / "base", base, dtype=dtype)}
    models.update({f"ft{i}": write_checkpoint(tmp_path / f"ft{i}", fine_tune(base, i), dtype=dtype) for i in range(3)})
    extra = {"tadrop": {"enabled": True, "min_numel": 1000}} if tadrop else {}
    recipe = parse_recipe(basic_recipe(models, tmp_path / "whole", method=method, seed=3, **extra))
    whole = run_merge(recipe, MergeOptions())
    monkeypatch.setattr(
        tensor_merge, "CHUNK_ELEMENTS", 1000
    )  # 96 x 64 = 6144 entries: 7 slices, the last of 144 (DELLA: 15 rows of 64)
    sliced = run_merge(recipe, MergeOptions(output=tmp_path / "sliced"))
    assert whole["ratios"] == sliced["ratios"]
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == (
        tmp_path / "sliced" / "model.safetensors"
    ).read_bytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", SLICED_METHODS)
@pytest.mark.parametrize("pinned_reads", [1 << 24, 100])
def test_trimming_hosts_on_cuda_match_the_cpu(tmp_path, monkeypatch, method, pinned_reads):
    """The same keep decisions on a GPU (the cut and the random stream are exact integer work),
    merging in slices on both, with reads crossing from page-locked memory or (100: all but the
    smallest) from ordinary memory; only the float arithmetic may round differently."""
    from safetensors.torch import load_file

    from tadrop_cli import checkpoint, tensor_merge

    monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(tensor_merge, "GPU_CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(checkpoint, "PINNED_READ_ELEMENTS", pinned_reads)

    base = tiny_state()
    models = {"base": write_checkpoint(tmp_path / "base", base)}
    models.update({f"ft{i}": write_checkpoint(tmp_path / f"ft{i}", fine_tune(base, i)) for i in range(3)})
    recipe = parse_recipe(
        basic_recipe(models, tmp_path / "cpu", method=method, seed=3, tadrop={"enabled": True, "min_numel": 1000})
    )
    run_merge(recipe, MergeOptions(device="cpu"))
    run_merge(recipe, MergeOptions(output=tmp_path / "cuda", device="cuda"))
    on_cpu, on_gpu = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("cpu", "cuda"))
    for name, expected in on_cpu.items():
        torch.testing.assert_close(on_gpu[name], expected, rtol=1e-6, atol=1e-6)


def test_first_non_finite_names_the_first_bad_tensor_and_forgives_overflowing_sums():
    """One check for many tensors (one wait on a GPU): the first with NaN/Inf, and none for
    finite tensors whose float32 sum overflows."""
    from tadrop_cli.checkpoint import first_non_finite

    clean, huge = torch.ones(10), torch.full((4,), 3e38)  # huge sums to inf, every entry finite
    with_nan, with_inf = torch.ones(10), torch.ones(10, dtype=torch.bfloat16)
    with_nan[3], with_inf[9] = math.nan, -math.inf
    assert first_non_finite([clean, huge, clean.bfloat16()]) is None
    assert first_non_finite([clean, huge, with_inf, with_nan]) == 2
    assert first_non_finite([with_nan, with_inf]) == 0
    assert first_non_finite([]) is None
