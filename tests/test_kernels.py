"""The compiled CPU kernels (tadrop_cli/_kernels.c) give exactly the bits of the PyTorch code
they stand in for: the top-k cut's histograms, where a slice's kept ties end, and the merge of a
slice for every generalized-task-arithmetic host; and the engine writes the same bytes with
them as without them."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from conftest import basic_recipe, fine_tune, tiny_state, write_checkpoint

from tadrop_cli import kernels, methods, run, sparsify, tensor_merge
from tadrop_cli.dtypes import Stored
from tadrop_cli.errors import BadInput
from tadrop_cli.recipe import parse_recipe
from tadrop_cli.run import MergeOptions, run_merge
from tadrop_cli.tadrop import HoyerSums

needs_kernels = pytest.mark.skipif(
    not kernels.available(), reason="the C kernels were not built (no C compiler at install)"
)
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
KERNEL_METHODS = ["task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties"]


def test_ci_builds_the_kernels():
    """CI sets TADROP_REQUIRE_KERNELS=1, so that these tests cannot all skip there unnoticed."""
    if os.environ.get("TADROP_REQUIRE_KERNELS") != "1":
        pytest.skip("TADROP_REQUIRE_KERNELS is not set")
    assert kernels.available()


def test_the_kernel_hosts_are_the_generalized_task_arithmetic_ones():
    assert {
        n for n, m in methods.METHODS.items() if m.gta is not None and m.gta.sparsifier in (None, "magnitude", "random")
    } == set(KERNEL_METHODS)


def _pair(dtype: torch.dtype, n: int, seed: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A base and a fine-tune of n entries, stored in dtype: dense small changes, changes on a
    few entries (most task-vector entries exactly 0), or few distinct changes (many ties)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    if kind == "dense":
        tuned = base + 0.01 * torch.randn(n, generator=g)
    elif kind == "sparse":
        tuned = base.clone()
        picked = torch.randperm(n, generator=g)[: n // 50]
        tuned[picked] += torch.randn(picked.numel(), generator=g)
    else:  # ties: changes of a few sizes only
        tuned = base + torch.randint(-3, 4, (n,), generator=g).float() * 0.125
    base[:3] = torch.tensor([0.0, -0.0, 1e-40])  # zeros of both signs and a subnormal
    return base.to(dtype), tuned.to(dtype)


def _delta(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    return tuned.float() - base.float()


def _stored(tensor: torch.Tensor) -> Stored:
    """A tensor's entries as the kernels take them (as a file stores them)."""
    return Stored.from_torch(tensor)


# ---------------------------------------------------------------- the cut's pieces


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["dense", "sparse", "ties"])
def test_histograms_equal_pytorchs(dtype, kind):
    base, tuned = _pair(dtype, 100_003, 1, kind)
    delta = _delta(base, tuned)
    counts = kernels.magnitude_histogram(_stored(base), _stored(tuned))
    assert np.array_equal(counts, sparsify.magnitude_histogram(delta).numpy())
    assert int(counts.sum()) == delta.numel() and not kernels.has_non_finite(counts)
    for k in (1, 777, 50_000, 100_002):  # the boundary buckets of several cuts
        bucket, _ = sparsify.boundary_bucket(counts, k)
        assert np.array_equal(
            kernels.bucket_histogram(_stored(base), _stored(tuned), bucket),
            sparsify.bucket_histogram(delta, bucket).numpy(),
        )


@needs_kernels
def test_a_magnitude_histogram_counts_nan_and_inf():
    base, tuned = _pair(torch.bfloat16, 1000, 2, "dense")
    assert not kernels.has_non_finite(kernels.magnitude_histogram(_stored(base), _stored(tuned)))
    for bad in (math.nan, math.inf, -math.inf):
        spoiled = tuned.clone()
        spoiled[500] = bad
        assert kernels.has_non_finite(kernels.magnitude_histogram(_stored(base), _stored(spoiled)))


@needs_kernels
@pytest.mark.parametrize("slice_size", [1000, 4096, 100_000])
def test_ties_kept_before_agrees_with_cut_mask(slice_size):
    """The kernels keep a tie where its slice position is below ties_kept_before; sparsify.cut_mask
    decides the same ties, whichever slice holds the last kept one."""
    base, tuned = _pair(torch.bfloat16, 20_000, 3, "ties")
    delta = _delta(base, tuned)
    for k in (1, 5000, 9999, 15_000):
        parts = list(delta.split(slice_size))
        cut = sparsify.top_k_cut(parts, k)
        for s, part in enumerate(parts):
            offset = s * slice_size
            before = kernels.ties_kept_before(
                cut,
                offset,
                _stored(base[offset : offset + part.numel()]),
                _stored(tuned[offset : offset + part.numel()]),
            )
            tied = (part.abs() == cut.threshold).nonzero().reshape(-1)
            kept = sparsify.cut_mask(part.clone(), cut, offset)[tied] == 1
            assert torch.equal(kept, tied < before)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["dense", "sparse", "ties"])
def test_magnitude_keys_are_the_bits_of_abs_delta(dtype, kind):
    """numpy's keys of a small tensor are the bit patterns of |tuned.float() - base.float()|, signed
    zeros and subnormals included, as the histograms count them."""
    base, tuned = _pair(dtype, 5000, 4, kind)
    keys = kernels.magnitude_keys(_stored(base), _stored(tuned))
    expected = (_delta(base, tuned).view(torch.int32) & 0x7FFFFFFF).numpy().view(np.uint32)
    assert keys.dtype == np.uint32 and np.array_equal(keys, expected)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["dense", "sparse", "ties"])
@pytest.mark.parametrize("n", [3, 4, 97, 5000])
def test_the_cut_by_selection_is_the_cut_by_histograms(dtype, kind, n):
    """A small tensor's cut found by one selection (cut_of_keys) is the two-sweep histogram cut,
    ties and their quota included, and keeps exactly what a full sort keeps."""
    base, tuned = _pair(dtype, n, 5, kind)
    delta = _delta(base, tuned)
    keys = kernels.magnitude_keys(_stored(base), _stored(tuned))
    magnitudes = np.abs(delta.numpy().astype(np.float64))
    for k in sorted({1, n // 3, n // 2, n - 1} - {0}):
        cut = sparsify.cut_of_keys(keys, k)
        assert cut == sparsify.top_k_cut([delta], k)
        kept = sparsify.cut_mask(delta.clone(), cut).numpy() == 1
        order = np.lexsort((np.arange(n), -magnitudes))  # ties: lowest positions first
        assert np.array_equal(np.flatnonzero(kept), np.sort(order[:k]))


# ---------------------------------------------------------------- TADrop's Hoyer sums


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e-30, 1e-41, 1e30])
def test_hoyer_sums_equal_float64_sums(dtype, scale):
    """Within 1e-13 of exact sums (math.fsum), from subnormal deltas (squares that would underflow
    in float32) to huge ones; a slice of several blocks, the last one short. Float64 accuracy is
    what makes plans independent of the device: PyTorch's sums (tadrop.HoyerSums) agree to it."""
    if dtype == torch.float16 and scale > 1:
        pytest.skip("beyond float16's range")
    g = torch.Generator().manual_seed(6)
    base = (torch.randn(100_003, generator=g) * scale).to(dtype)
    with torch.random.fork_rng():  # StudentT draws from the global generator: seeded, so that every run sees the same
        torch.manual_seed(6)
        heavy_tailed = torch.distributions.StudentT(2.0).sample((100_003,)).clamp(-1e4, 1e4)  # (a draw can be inf)
    tuned = (base.float() + heavy_tailed * scale).to(dtype)
    delta = _delta(base, tuned).double()
    [(l1, l2_squared)], non_finite = kernels.hoyer_sums(_stored(base), [_stored(tuned)])
    assert not non_finite
    entries = delta.numpy().tolist()
    expected_l1, expected_l2 = math.fsum(map(abs, entries)), math.fsum(x * x for x in entries)
    if expected_l1 == 0:  # the dtype cannot hold deltas this small: all zero
        assert l1 == 0 and l2_squared == 0
        return
    assert l1 == pytest.approx(expected_l1, rel=1e-13) and l2_squared == pytest.approx(expected_l2, rel=1e-13)
    with_torch = HoyerSums()
    with_torch.add(delta.float())
    assert with_torch.l1 == pytest.approx(expected_l1, rel=1e-13)
    assert with_torch.l2_squared == pytest.approx(expected_l2, rel=1e-13)


@needs_kernels
def test_hoyer_sums_flag_nan_and_inf_and_scores_match_pytorch():
    from tadrop_cli.tadrop import HoyerSums

    base, tuned = _pair(torch.bfloat16, 300_000, 7, "sparse")
    with_kernels, with_torch = HoyerSums(), HoyerSums()
    for part in range(0, 300_000, 65_536):
        b, t = base[part : part + 65_536], tuned[part : part + 65_536]
        [(l1, l2_squared)], _ = kernels.hoyer_sums(_stored(b), [_stored(t)])
        with_kernels.add_sums(b.numel(), l1, l2_squared)
        with_torch.add(_delta(b, t))
    assert with_kernels.score() == pytest.approx(with_torch.score(), rel=1e-14)
    spoiled = tuned.clone()
    spoiled[123] = math.inf
    assert kernels.hoyer_sums(_stored(base), [_stored(tuned), _stored(spoiled)])[1]
    assert not kernels.hoyer_sums(_stored(base), [_stored(tuned), _stored(tuned)])[1]


@needs_kernels
def test_hoyer_sums_of_several_models_are_each_models_own():
    """Summed together (the base read once), each model's sums are the bits it gets alone."""
    base, first = _pair(torch.float16, 70_001, 15, "dense")
    tuned = [first, _pair(torch.float16, 70_001, 16, "sparse")[1], _pair(torch.float16, 70_001, 17, "ties")[1]]
    together, _ = kernels.hoyer_sums(_stored(base), [_stored(t) for t in tuned])
    assert together == [kernels.hoyer_sums(_stored(base), [_stored(t)])[0][0] for t in tuned]
    assert len(set(together)) == 3


@needs_kernels
def test_hoyer_sums_of_a_batch_are_each_tensors_own():
    """Many tensors in one call: each tensor's sums are the bits it gets alone, and a NaN flags
    its own tensor only."""
    pairs = [
        _pair(torch.bfloat16, n, 20 + n % 7, kind)
        for n, kind in [(3, "dense"), (4, "sparse"), (4097, "ties"), (65_536, "dense")]
    ]
    tuned = [[t, _pair(torch.bfloat16, b.numel(), 30 + i, "sparse")[1]] for i, (b, t) in enumerate(pairs)]
    tuned[2][1] = tuned[2][1].clone()
    tuned[2][1][7] = math.nan
    sums, non_finite = kernels.hoyer_sums_batch(
        "BF16",
        [b.data_ptr() for b, _ in pairs],
        [[t.data_ptr() for t in models] for models in tuned],
        [b.numel() for b, _ in pairs],
    )
    assert non_finite.tolist() == [False, False, True, False]
    for i, (base, _) in enumerate(pairs):
        alone, _ = kernels.hoyer_sums(_stored(base), [_stored(t) for t in tuned[i]])
        if i != 2:
            assert [tuple(pair) for pair in sums[i].tolist()] == alone


def _many_small(seed: int, count: int = 300) -> dict[str, torch.Tensor]:
    """An MoE-like model of many small tensors (1 to 6,000 entries)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 6000, (count,), generator=g).tolist()
    return {
        f"model.layers.{i // 8}.mlp.experts.{i % 8}.w.weight": torch.randn(n, generator=g) for i, n in enumerate(sizes)
    }


@needs_kernels
@pytest.mark.parametrize("normalize", ["rank", "minmax"])
def test_plans_of_many_small_tensors_scored_in_batches_equal_one_at_a_time(tmp_path, monkeypatch, normalize):
    from tadrop_cli import plan as plan_module
    from tadrop_cli.layout import build_layout

    base = _many_small(0)
    models = {"base": write_checkpoint(tmp_path / "base", base, dtype=torch.bfloat16)}
    for i in range(3):
        tuned = {
            name: t + 0.01 * torch.randn(t.shape, generator=torch.Generator().manual_seed(i * 1000 + k)) ** 3
            for k, (name, t) in enumerate(base.items())
        }
        models[f"ft{i}"] = write_checkpoint(tmp_path / f"ft{i}", tuned, dtype=torch.bfloat16)
    settings = {"enabled": True, "min_numel": 1, "normalize": normalize}
    recipe = parse_recipe(basic_recipe(models, tmp_path / "out", tadrop=settings))
    layout = build_layout(recipe)
    calls = []
    monkeypatch.setattr(plan_module, "SCORE_BATCH_TENSORS", 128)  # several batches
    monkeypatch.setattr(
        kernels,
        "hoyer_sums_batch",
        lambda *a, original=kernels.hoyer_sums_batch: calls.append(len(a[1])) or original(*a),
    )
    try:
        batched = plan_module.build_plan(layout, "cpu")
        assert calls == [128, 128, 44]
        monkeypatch.setattr(plan_module, "SMALL_SCORE_ELEMENTS", 0)
        one_at_a_time = plan_module.build_plan(layout, "cpu")
    finally:
        layout.close()
    assert len(calls) == 3
    assert [(r.model, r.tensor, r.reason, r.score, r.ratio) for r in batched.rows] == [
        (r.model, r.tensor, r.reason, r.score, r.ratio) for r in one_at_a_time.rows
    ]
    assert sum(r.reason == "adaptive" for r in batched.rows) == 900


@needs_kernels
def test_a_nan_in_a_small_tensor_scored_in_a_batch_is_named(tmp_path):
    base = _many_small(1, count=20)
    tuned = {name: t + 0.01 for name, t in base.items()}
    name = "model.layers.1.mlp.experts.3.w.weight"
    tuned[name] = tuned[name].clone()
    tuned[name][0] = math.nan
    models = {"base": write_checkpoint(tmp_path / "base", base), "ft0": write_checkpoint(tmp_path / "ft0", tuned)}
    recipe = parse_recipe(basic_recipe(models, tmp_path / "out", tadrop={"enabled": True, "min_numel": 1}))
    with pytest.raises(BadInput) as error:
        run_merge(recipe, MergeOptions(device="cpu"))
    assert name in str(error.value) and "ft0" in str(error.value)


# ---------------------------------------------------------------- the merge of a slice


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """float32 entries as their bit patterns: equal bits, zeros' signs and NaN payloads included."""
    return tensor.contiguous().view(torch.int32)


def _kernel_merge(base, tuned, steps, weights, densities, seeds, cuts, offset, normalize, lambda_, rescale):
    models = []
    for t, w, d, seed, cut in zip(tuned, weights, densities, seeds, cuts, strict=True):
        model = kernels.ModelSlice(_stored(t), w)
        if steps.sparsifier == "magnitude" and d < 1:
            model.drop, model.threshold, model.ties_before = (
                kernels.DROP_BY_MAGNITUDE,
                cut.threshold,
                kernels.ties_kept_before(cut, offset, _stored(base), _stored(t)),
            )
        elif steps.sparsifier == "random" and d < 1:
            model.drop, model.seed, model.limit = kernels.DROP_AT_RANDOM, seed, kernels.random_keep_limit(d)
        if model.drop != kernels.DROP_NOTHING and rescale and d > 0:
            model.rescale_by = d
        models.append(model)
    total = sum(weights)
    merged, non_finite = kernels.merge_slice(
        _stored(base),
        models,
        offset,
        steps.consensus is not None,
        normalize,
        total if abs(total) >= 1e-8 else 1.0,
        lambda_,
    )
    assert not non_finite and merged.dtype == "F32"
    return merged.to_torch()


MERGE_CASES = {
    "plain": dict(weights=[0.6, 0.6, 0.6], densities=[0.4, 0.4, 0.4], normalize=True, lambda_=1.0, rescale=False),
    "mixed weights": dict(
        weights=[1.0, -0.3, 2.5], densities=[0.1, 0.5, 0.9], normalize=True, lambda_=0.7, rescale=True
    ),
    "weights summing to 0": dict(weights=[0.5, -0.5], densities=[0.3, 0.6], normalize=True, lambda_=1.0, rescale=False),
    "keep all, keep none": dict(
        weights=[1.0, 1.0, 0.2], densities=[1.0, 0.0, 0.5], normalize=False, lambda_=1.3, rescale=True
    ),
    "one model": dict(weights=[0.8], densities=[0.25], normalize=False, lambda_=2.0, rescale=True),
}


@needs_kernels
@pytest.mark.parametrize("method", KERNEL_METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_slice_gives_the_bits_of_generalized_task_arithmetic(method, dtype, case):
    """Merged in slices of a 50_000-entry tensor (the last one shorter), with each model's cut
    or random stream of the whole tensor, the kernel's float32 slices are exactly PyTorch's."""
    steps, setting = methods.METHODS[method].gta, MERGE_CASES[case]
    n, size = 50_000, 16_384
    base, first = _pair(dtype, n, 10, "dense")
    tuned = [first] + [_pair(dtype, n, 11 + i, kind)[1] for i, kind in enumerate(["sparse", "ties", "dense"])]
    tuned = tuned[: len(setting["weights"])]
    seeds = [2**63 - 1 - i for i in range(len(tuned))]
    whole_deltas = [_delta(base, t) for t in tuned]
    cuts = [
        sparsify.top_k_cut(list(d.split(size)), sparsify.kept_count(n, density)) if density < 1 else None
        for d, density in zip(whole_deltas, setting["densities"], strict=True)
    ]
    for offset in range(0, n, size):
        part = slice(offset, offset + size)
        task_vectors = [
            methods.TaskVector(delta=d[part].clone(), weight=w, density=density, seed=seed, offset=offset, cut=cut)
            for d, w, density, seed, cut in zip(
                whole_deltas, setting["weights"], setting["densities"], seeds, cuts, strict=True
            )
        ]
        expected = methods.generalized_task_arithmetic(
            base[part].float(),
            task_vectors,
            sparsifier=steps.sparsifier,
            consensus=steps.consensus,
            normalize=setting["normalize"],
            lambda_=setting["lambda_"],
            rescale=setting["rescale"],
        )
        merged = _kernel_merge(
            base[part],
            [t[part] for t in tuned],
            steps,
            setting["weights"],
            setting["densities"],
            seeds,
            cuts,
            offset,
            setting["normalize"],
            setting["lambda_"],
            setting["rescale"],
        )
        assert torch.equal(_bits(merged), _bits(expected)), f"slice at {offset}"


@needs_kernels
@pytest.mark.parametrize("name, out_dtype", [("BF16", torch.bfloat16), ("F16", torch.float16)])
def test_merge_slice_rounds_to_the_output_dtype_as_torch_does(name, out_dtype):
    """The merged entries stored as bf16/fp16 are float32's .to(out_dtype), halfway cases
    (ties to even) and subnormals included; entries too large for the output are flagged."""
    g = torch.Generator().manual_seed(8)
    base = torch.randn(70_000, generator=g) * 0.5
    base[:4] = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, 1e-40, -3e-6])  # bf16 halfway cases, tiny values
    tuned = base + torch.randn(70_000, generator=g) * 0.01
    tuned[:4] = base[:4]
    models = [kernels.ModelSlice(_stored(tuned), 0.7)]
    as_float, _ = kernels.merge_slice(_stored(base), models, 0, False, False, 0.7, 1.0)
    stored, flagged = kernels.merge_slice(_stored(base), models, 0, False, False, 0.7, 1.0, name)
    assert stored.dtype == name and stored.to_torch().dtype == out_dtype and not flagged
    assert torch.equal(stored.to_torch().view(torch.int16), as_float.to_torch().to(out_dtype).view(torch.int16))
    huge = torch.full((10,), 3.4e38 if out_dtype == torch.bfloat16 else 7e4)
    assert kernels.merge_slice(
        _stored(huge), [kernels.ModelSlice(_stored(huge * 0.999), 1.0)], 0, False, False, 1.0, 1.0, name
    )[1]


@needs_kernels
def test_merge_slice_flags_non_finite_task_vectors():
    base, tuned = _pair(torch.float32, 5000, 4, "dense")
    clean, flagged = kernels.merge_slice(_stored(base), [kernels.ModelSlice(_stored(tuned))], 0, True, True, 1.0, 1.0)
    assert not flagged and bool(torch.isfinite(clean.to_torch()).all())
    for a, b in ((math.nan, 0.0), (math.inf, 0.0), (3e38, -3e38)):  # the last: finite inputs whose difference overflows
        spoiled_base, spoiled = base.clone(), tuned.clone()
        spoiled[7], spoiled_base[7] = a, b
        model = kernels.ModelSlice(
            _stored(spoiled), drop=kernels.DROP_BY_MAGNITUDE, threshold=1e30
        )  # the bad entry is dropped, and still flagged
        assert kernels.merge_slice(_stored(spoiled_base), [model], 0, False, False, 1.0, 1.0)[1]


@needs_kernels
def test_the_baseline_build_gives_the_same_bits(tmp_path, monkeypatch):
    """The kernels as built for CPUs without AVX2 (the SSE2 baseline; this machine runs the AVX2
    clone) give the same histograms and merges. Needs a C compiler, as the install did."""
    import shutil
    import subprocess
    import sysconfig

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    source = os.path.join(os.path.dirname(kernels.__file__), "_kernels.c")
    library = tmp_path / "baseline.so"
    subprocess.run(
        [
            compiler,
            "-O3",
            "-std=gnu11",
            "-fopenmp",
            "-ffp-contract=off",
            "-fno-math-errno",
            "-fno-trapping-math",
            "-DTADROP_BASELINE_ONLY",
            "-shared",
            "-fPIC",
            f"-I{sysconfig.get_paths()['include']}",
            source,
            "-o",
            str(library),
        ],
        check=True,
        capture_output=True,
    )
    base, tuned = _pair(torch.bfloat16, 50_000, 12, "ties")
    _, other = _pair(torch.bfloat16, 50_000, 13, "dense")
    deltas = [_delta(base, t) for t in (tuned, other)]
    cuts = [sparsify.top_k_cut([d], sparsify.kept_count(50_000, 0.3)) for d in deltas]

    def results():
        counts = kernels.magnitude_histogram(_stored(base), _stored(tuned))
        merged = [
            _kernel_merge(
                base,
                [tuned, other],
                methods.METHODS[m].gta,
                [0.7, 1.3],
                [0.3, 0.3],
                [5, 6],
                cuts,
                0,
                True,
                0.9,
                m == "dare_ties",
            )
            for m in ("ties", "dare_ties", "task_arithmetic")
        ]
        return (
            counts,
            kernels.bucket_histogram(_stored(base), _stored(tuned), 0x3E00),
            kernels.hoyer_sums(_stored(base), [_stored(tuned), _stored(other)]),
            merged,
        )

    with_clones = results()
    monkeypatch.setattr(kernels, "_library", lambda: kernels.load_library(str(library)))
    baseline = results()
    assert (
        np.array_equal(baseline[0], with_clones[0])
        and np.array_equal(baseline[1], with_clones[1])
        and baseline[2] == with_clones[2]
    )
    for a, b in zip(baseline[3], with_clones[3], strict=True):
        assert torch.equal(_bits(a), _bits(b))


# ---------------------------------------------------------------- the engine


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_mapped_views_hold_what_read_returns(tmp_path, fmt):
    """Checkpoint.mapped (the kernels' zero-copy reads) gives read()'s entries, also after
    unmap() let go of the pages, and for a PyTorch file (read, not mapped)."""
    from tadrop_cli.checkpoint import open_checkpoint

    state = tiny_state()
    checkpoint = open_checkpoint(str(write_checkpoint(tmp_path / "m", state, fmt=fmt, dtype=torch.bfloat16, shards=1)))
    try:
        for name, tensor in state.items():
            flat = tensor.to(torch.bfloat16).reshape(-1)
            for start, stop in ((0, flat.numel()), (1, flat.numel() - 1), (17, 18)):
                view = checkpoint.mapped(name, start, stop)
                assert view.dtype == "BF16" and torch.equal(view.to_torch(), flat[start:stop])
                checkpoint.unmap(name, start, stop)
                assert torch.equal(view.to_torch(), flat[start:stop])
    finally:
        checkpoint.close()


def test_unmap_lets_go_of_every_page_in_runs(tmp_path, monkeypatch):
    """Unmapping many small tensors in file order lets go of every page they lay on, in a few
    madvise runs (one per RELEASE_BYTES, the rest at close) rather than one per tensor; a range
    of RELEASE_BYTES or more goes at once."""
    import mmap

    from tadrop_cli import checkpoint as checkpoint_module

    state = {f"t{i:04d}": torch.full((300,), float(i)) for i in range(3000)}  # 600 bytes each in bf16
    state["big"] = torch.zeros(1 << 20)
    folder = write_checkpoint(tmp_path / "m", state, dtype=torch.bfloat16, shards=1)
    released = []
    monkeypatch.setattr(checkpoint_module, "_release", lambda mapping, first, end: released.append((first, end)))
    opened = checkpoint_module.open_checkpoint(str(folder))
    try:
        small = sorted((name for name in state if name != "big"), key=lambda name: opened.tensors[name].offset)
        for name in small:
            view = opened.mapped(name, 0, 300)
            assert torch.equal(view.to_torch(), state[name].to(torch.bfloat16))
            opened.unmap(name, 0, 300)
        runs = len(released)
        opened.mapped("big", 0, 1 << 20)
        opened.unmap("big", 0, 1 << 20)
        assert len(released) == runs + 2  # the small tensors' last run, then the big one's at once
        infos = [opened.tensors[name] for name in small]
    finally:
        opened.close()
    page = mmap.PAGESIZE
    first_page = min(i.offset for i in infos) // page * page
    end = max(i.offset + i.nbytes for i in infos)
    covered = set()
    for start, stop in released:
        assert start % page == 0 and stop > start
        covered.update(range(start // page, -(-stop // page)))
    assert covered >= set(range(first_page // page, -(-end // page)))  # every page the small tensors lay on
    assert runs <= -(-(end - first_page) // checkpoint_module.RELEASE_BYTES) + 1  # 1.8 MB: 2 runs, not 3000


@pytest.fixture
def count_kernel_merges(monkeypatch):
    """How many slices the kernels merged (so that a test knows they ran): alone, or as tensors of a batch."""
    calls = []
    original, original_batch = kernels.merge_slice, kernels.BatchMerge.run

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    def counting_batch(self):
        calls.extend([1] * len(self))
        return original_batch(self)

    monkeypatch.setattr(kernels, "merge_slice", counting)
    monkeypatch.setattr(kernels.BatchMerge, "run", counting_batch)
    return calls


def _models(tmp_path, dtype, base_dtype=None):
    base = tiny_state()
    paths = {"base": write_checkpoint(tmp_path / "base", base, dtype=base_dtype or dtype)}
    paths.update({f"ft{i}": write_checkpoint(tmp_path / f"ft{i}", fine_tune(base, i), dtype=dtype) for i in range(3)})
    return paths


def _merge_without_kernels(monkeypatch, recipe, output):
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "_library", lambda: None)
        assert not kernels.available()
        return run_merge(recipe, MergeOptions(output=output, device="cpu"))


@needs_kernels
@pytest.mark.parametrize("method", KERNEL_METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk", [1000, 1 << 20])
def test_the_engine_writes_the_same_bytes_with_and_without_kernels(
    tmp_path, monkeypatch, count_kernel_merges, method, dtype, chunk
):
    monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", chunk)  # 1000: every weight in several slices, the last shorter
    models = _models(tmp_path, dtype)
    extra = {"tadrop": {"enabled": True, "min_numel": 1000}} if method != "task_arithmetic" else {}
    recipe = parse_recipe(
        basic_recipe(models, tmp_path / "kernels", method=method, seed=5, parameters={"lambda": 0.9}, **extra)
    )
    with_kernels = run_merge(
        recipe, MergeOptions(device="cpu")
    )  # the kernels run on the CPU, even where there is a GPU
    assert len(count_kernel_merges) >= len(tiny_state())  # every tensor went through the kernels
    without = _merge_without_kernels(monkeypatch, recipe, tmp_path / "torch")
    assert with_kernels["ratios"] == without["ratios"]
    assert (tmp_path / "kernels" / "model.safetensors").read_bytes() == (
        tmp_path / "torch" / "model.safetensors"
    ).read_bytes()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("normalize", ["rank", "minmax"])
def test_tadrop_plans_from_the_kernels_equal_pytorchs(tmp_path, monkeypatch, dtype, normalize):
    """The scoring pass's float64 sums differ from PyTorch's (other slices, another order) in the
    last digits of a double only: the same ratios, even where min-max normalisation carries the
    scores' digits into them."""
    from tadrop_cli.layout import build_layout
    from tadrop_cli.plan import build_plan

    monkeypatch.setattr("tadrop_cli.plan.SCORE_SLICE_ELEMENTS", 1000)
    settings = {"enabled": True, "min_numel": 1000, "normalize": normalize}
    recipe = parse_recipe(basic_recipe(_models(tmp_path, dtype), tmp_path / "out", tadrop=settings))
    layout = build_layout(recipe)
    try:
        calls = []
        monkeypatch.setattr(
            kernels, "hoyer_sums", lambda *a, original=kernels.hoyer_sums: calls.append(1) or original(*a)
        )
        plan = build_plan(layout, "cpu")
        assert calls
        with monkeypatch.context() as patch:
            patch.setattr(kernels, "_library", lambda: None)
            reference = build_plan(layout, "cpu")
    finally:
        layout.close()
    assert any(row.reason == "adaptive" for row in plan.rows)
    for row, expected in zip(plan.rows, reference.rows, strict=True):
        assert (row.model, row.tensor, row.reason, row.ratio) == (
            expected.model,
            expected.tensor,
            expected.reason,
            expected.ratio,
        )
        assert (
            row.score == expected.score
            if expected.score is None
            else row.score == pytest.approx(expected.score, rel=1e-13)
        )


@needs_kernels
@pytest.mark.parametrize("method", ["ties", "dare_linear"])
def test_min_max_plans_write_the_same_bytes_with_kernels_and_with_gpu_sized_pytorch_slices(
    tmp_path, monkeypatch, method
):
    """`normalize: minmax` carries the scores' digits into the ratios, and a random host's mask
    compares every draw with its tensor's ratio: the kernels' sums (blocks of 4,096 entries) and
    PyTorch's sums over a GPU's slices (here one slice a tensor) must give the same bytes."""
    models = _models(tmp_path, torch.bfloat16)
    settings = {"enabled": True, "min_numel": 1000, "normalize": "minmax", "strength": 0.3}
    recipe = parse_recipe(basic_recipe(models, tmp_path / "kernels", method=method, seed=3, tadrop=settings))
    with_kernels = run_merge(recipe, MergeOptions(device="cpu"))
    monkeypatch.setattr("tadrop_cli.plan.SCORE_SLICE_ELEMENTS", 1 << 24)
    without = _merge_without_kernels(monkeypatch, recipe, tmp_path / "torch")
    assert with_kernels["ratios"] == without["ratios"]
    assert (tmp_path / "kernels" / "model.safetensors").read_bytes() == (
        tmp_path / "torch" / "model.safetensors"
    ).read_bytes()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_small_tensors_cut_by_selection_write_the_bytes_of_the_histogram_sweeps(tmp_path, monkeypatch, dtype):
    """A TIES merge whose tensors are small enough for the cut by selection writes the bytes that
    the two histogram sweeps give (SMALL_CUT = 0 sends every tensor through them)."""
    models = _models(tmp_path, dtype)
    recipe = parse_recipe(
        basic_recipe(models, tmp_path / "selection", method="ties", seed=5, tadrop={"enabled": True, "min_numel": 1})
    )
    by_selection = run_merge(recipe, MergeOptions(device="cpu"))
    monkeypatch.setattr(tensor_merge, "SMALL_CUT", 0)
    by_histograms = run_merge(recipe, MergeOptions(output=tmp_path / "histograms", device="cpu"))
    assert by_selection["ratios"] == by_histograms["ratios"]
    assert (tmp_path / "selection" / "model.safetensors").read_bytes() == (
        tmp_path / "histograms" / "model.safetensors"
    ).read_bytes()


@needs_kernels
def test_inputs_of_different_dtypes_merge_without_the_kernels(tmp_path, monkeypatch, count_kernel_merges):
    models = _models(tmp_path, torch.bfloat16, base_dtype=torch.float32)
    recipe = parse_recipe(basic_recipe(models, tmp_path / "mixed", method="ties"))
    run_merge(recipe, MergeOptions(device="cpu"))
    assert count_kernel_merges == []
    _merge_without_kernels(monkeypatch, recipe, tmp_path / "torch")
    assert (tmp_path / "mixed" / "model.safetensors").read_bytes() == (
        tmp_path / "torch" / "model.safetensors"
    ).read_bytes()


@needs_kernels
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_nan_in_an_input_is_named_on_the_kernel_path(tmp_path, monkeypatch, method):
    monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", 1000)
    base = tiny_state()
    spoiled = fine_tune(base, 1)
    spoiled["model.layers.1.mlp.weight"][50, 3] = math.nan  # in the 5th slice of that tensor
    models = {
        "base": write_checkpoint(tmp_path / "base", base, dtype=torch.bfloat16),
        "ft0": write_checkpoint(tmp_path / "ft0", fine_tune(base, 0), dtype=torch.bfloat16),
        "ft1": write_checkpoint(tmp_path / "ft1", spoiled, dtype=torch.bfloat16),
    }
    recipe = parse_recipe(basic_recipe(models, tmp_path / "out", method=method))
    with pytest.raises(BadInput, match=r"ft1: tensor model\.layers\.1\.mlp\.weight contains NaN or Inf"):
        run_merge(recipe, MergeOptions(device="cpu"))
    assert not (tmp_path / "out").exists()


@needs_kernels
def test_an_overflowing_difference_fails_as_without_kernels(tmp_path, monkeypatch):
    """Finite inputs whose task vector overflows float32: the same error either way."""
    base = tiny_state()
    tuned = fine_tune(base, 0)
    base["model.embed.weight"][0, 0], tuned["model.embed.weight"][0, 0] = -3e38, 3e38
    models = {"base": write_checkpoint(tmp_path / "base", base), "ft0": write_checkpoint(tmp_path / "ft0", tuned)}
    recipe = parse_recipe(basic_recipe(models, tmp_path / "out", method="task_arithmetic"))
    messages = []
    for use_kernels in (True, False):
        with monkeypatch.context() as patch:
            if not use_kernels:
                patch.setattr(kernels, "_library", lambda: None)
            with pytest.raises(BadInput) as error:
                run_merge(recipe, MergeOptions(device="cpu"))
            messages.append(str(error.value))
    assert messages[0] == messages[1] and "model.embed.weight: the merge produced NaN or Inf" in messages[0]


# ---------------------------------------------------------------- checking written entries


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_finds_what_isfinite_finds(dtype):
    """The read-back check of written shards: NaN, Inf and -Inf anywhere in the slice, and
    nothing in finite entries however large or small."""
    info = torch.finfo(dtype)
    entries = torch.randn(10_001, generator=torch.Generator().manual_seed(14)).to(dtype)
    entries[:4] = torch.tensor([info.max, -info.max, info.tiny / 4, -0.0]).to(dtype)  # largest, subnormal, signed zero
    assert not kernels.non_finite(_stored(entries))
    for position in (0, 4999, 10_000):
        for bad in (math.nan, math.inf, -math.inf):
            spoiled = entries.clone()
            spoiled[position] = bad
            assert kernels.non_finite(_stored(spoiled)) == (not bool(torch.isfinite(spoiled).all()))


# ---------------------------------------------------------------- never importing torch

_MERGE_WITHOUT_TORCH = """
import json, sys
from pathlib import Path
from tadrop_cli.run import MergeOptions, run_merge
from tadrop_cli.recipe import load_recipe
summary = run_merge(load_recipe(Path(sys.argv[1])), MergeOptions(device="cpu"))
print(json.dumps({"torch_imported": "torch" in sys.modules, "cpu_kernels": summary["cpu_kernels"]}))
"""


@needs_kernels
@pytest.mark.parametrize(
    "method, tadrop", [("task_arithmetic", False), ("ties", True), ("dare_ties", True), ("magnitude_prune", False)]
)
def test_a_merge_by_the_kernels_never_imports_torch(tmp_path, monkeypatch, method, tadrop):
    """Importing torch takes 1-2 s, longer than such a merge of a small model: a CPU merge that
    the kernels do whole (the plan's scores, the cuts, the merge, the read-back check) runs
    without it, in a fresh process, and writes the bytes that the PyTorch code writes."""
    import json
    import subprocess
    import sys

    import yaml

    models = _models(tmp_path, torch.bfloat16)
    extra = {"tadrop": {"enabled": True, "min_numel": 1000}} if tadrop else {}
    recipe = basic_recipe(models, tmp_path / "lean", method=method, seed=3, dtype="bfloat16", **extra)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    done = subprocess.run(
        [sys.executable, "-c", _MERGE_WITHOUT_TORCH, str(tmp_path / "recipe.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"torch_imported": False, "cpu_kernels": True}
    _merge_without_kernels(monkeypatch, parse_recipe(recipe), tmp_path / "torch")
    assert (tmp_path / "lean" / "model.safetensors").read_bytes() == (
        tmp_path / "torch" / "model.safetensors"
    ).read_bytes()


@needs_kernels
def test_the_command_line_merges_without_importing_torch(tmp_path):
    """The same through `tadrop merge` itself (its imports logged by python -X importtime)."""
    import subprocess
    import sys

    import yaml

    recipe = basic_recipe(_models(tmp_path, torch.bfloat16), tmp_path / "out", method="ties", device="cpu")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tadrop_cli", "merge", str(tmp_path / "recipe.yaml"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert "tadrop_cli.kernels" in imported and "torch" not in imported
    assert (tmp_path / "out" / "model.safetensors").is_file()


@needs_kernels
def test_a_dry_run_counts_the_runtime_that_will_run(tmp_path, monkeypatch):
    """~100 MB for the process where the kernels merge every tensor (no torch), ~300 MB with torch."""
    recipe = parse_recipe(
        basic_recipe(_models(tmp_path, torch.bfloat16), tmp_path / "out", method="ties", device="cpu")
    )
    lean = run.dry_run(recipe, MergeOptions())["estimated_peak_memory_bytes"]
    monkeypatch.setattr(kernels, "_library", lambda: None)
    assert run.dry_run(recipe, MergeOptions())["estimated_peak_memory_bytes"] - lean == 200 * 2**20
