"""Small tensors merged in batches (tensor_merge.merge_tensors, kernels.BatchMerge): the same
bytes as each tensor merged alone, whatever the method, dtypes, densities, ties, batch bounds
and shards; a NaN in a batch named as alone; a resume in the middle of a batched shard."""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, basic_recipe, write_checkpoint

from tadrop_cli import kernels, sparsify, tensor_merge
from tadrop_cli.dtypes import Stored
from tadrop_cli.errors import BadInput
from tadrop_cli.recipe import parse_recipe
from tadrop_cli.run import MergeOptions, run_merge

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="the CPU kernels are not built here")

KERNEL_HOSTS = ["task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties"]
OTHER_HOSTS = ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear"]


def small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Many small tensors (1 to SMALL_CUT entries, 1-D and 2-D, in three float dtypes mixed along the
    order), a few larger ones between them (merged alone), and an integer buffer (copied)."""
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    state = {}
    for layer in range(3):
        for expert in range(8):
            shape = [(2, 2), (1,), (3,), (7, 5), (64,), (2, 3)][(layer + expert) % 6]
            dtype = dtypes[(layer * 8 + expert) % 3] if layer != 1 else torch.bfloat16
            state[f"model.layers.{layer}.mlp.experts.{expert}.w"] = torch.randn(shape, generator=g).to(dtype)
        state[f"model.layers.{layer}.mlp.gate.weight"] = torch.randn(128, 128, generator=g).to(torch.bfloat16)  # 16384
        state[f"model.layers.{layer}.mlp.big.weight"] = torch.randn(129, 128, generator=g).to(torch.bfloat16)  # 16512
        state[f"model.layers.{layer}.norm.weight"] = torch.ones(16, dtype=torch.bfloat16)
    state["model.position_ids"] = torch.arange(8)
    return state


def small_fine_tune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Dense small deltas, sparse large ones, and deltas of one magnitude (many ties at a cut)."""
    g = torch.Generator().manual_seed(100 + seed)
    out = {}
    for i, (name, tensor) in enumerate(sorted(base.items())):
        if not tensor.is_floating_point():
            out[name] = tensor.clone()
            continue
        kind = (i + seed) % 3
        if kind == 0:
            delta = torch.randn(tensor.shape, generator=g) * 0.05
        elif kind == 1:
            delta = torch.where(
                torch.rand(tensor.shape, generator=g) < 0.2, torch.randn(tensor.shape, generator=g), 0.0
            )
        else:  # +-0.25 everywhere: most |delta| tie
            delta = torch.where(torch.rand(tensor.shape, generator=g) < 0.5, 0.25, -0.25)
        out[name] = (tensor.float() + delta).to(tensor.dtype)
    return out


def write_models(folder: Path, state: dict[str, torch.Tensor] | None = None, count: int = 3) -> dict[str, Path]:
    state = state if state is not None else small_state()
    models = {"base": write_checkpoint(folder / "base", state)}
    for i in range(count):
        models[f"ft{i}"] = write_checkpoint(folder / f"ft{i}", small_fine_tune(state, i))
    return models


def recipe_for(models: dict[str, Path], output: Path, method: str, shard_size: str | None = None, **extra) -> dict:
    recipe = basic_recipe(models, output, method=method, seed=7, parameters={"lambda": 0.9}, **extra)
    if shard_size is not None:
        recipe["output"]["shard_size"] = shard_size
    densities = [0.4, 0.0, 1.0, 0.75]  # a trim, nothing kept, everything kept, another trim
    for entry, density in zip(recipe["models"], densities, strict=False):
        entry["parameters"]["density"] = density
    if method in ("dare_linear", "dare_ties"):
        recipe["parameters"]["rescale"] = True
    if method.startswith("della"):
        recipe["parameters"]["epsilon"] = 0.1
        for entry in recipe["models"]:
            entry["parameters"]["density"] = max(entry["parameters"]["density"], 0.3)
    return recipe


@pytest.fixture
def batch_sizes(monkeypatch):
    """The size of every kernel batch that ran (tensors)."""
    sizes = []
    original = kernels.BatchMerge.run

    def counting(self):
        sizes.append(len(self))
        return original(self)

    monkeypatch.setattr(kernels.BatchMerge, "run", counting)
    return sizes


def merged_bytes(recipe: dict, output: Path, monkeypatch, batched: bool) -> dict[str, bytes]:
    """Every file of the merge's output (path: bytes), merged with or without batches."""
    with monkeypatch.context() as patch:
        if not batched:
            patch.setattr(tensor_merge, "_batch_check", lambda layout, device: None)
        settings = {**recipe["output"], "path": str(output)}
        run_merge(parse_recipe({**recipe, "output": settings}), MergeOptions(device="cpu"))
    return {str(p.relative_to(output)): p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()}


CASES = [(method, {}) for method in KERNEL_HOSTS + OTHER_HOSTS] + [
    ("ties", {"tadrop": {"enabled": True, "min_numel": 1}}),
    ("ties", {"tadrop": {"enabled": True, "min_numel": 1, "allocation": "mass"}}),
    ("dare_ties", {"tadrop": {"enabled": True, "min_numel": 1}}),
    ("ties", {"dtype": "bfloat16"}),
    ("task_arithmetic", {"dtype": "float16"}),
    ("magnitude_prune", {"dtype": "float32", "shard_size": "1KB"}),
]


@needs_kernels
@pytest.mark.parametrize(("method", "extra"), CASES, ids=[f"{m}-{'-'.join(map(str, e)) or 'plain'}" for m, e in CASES])
def test_batched_merges_write_the_bytes_of_merges_one_tensor_at_a_time(
    tmp_path, monkeypatch, batch_sizes, method, extra
):
    models = write_models(tmp_path)
    recipe = recipe_for(models, tmp_path / "unused", method, **extra)
    alone = merged_bytes(recipe, tmp_path / "alone", monkeypatch, batched=False)
    assert batch_sizes == []
    batched = merged_bytes(recipe, tmp_path / "batched", monkeypatch, batched=True)
    if method in KERNEL_HOSTS:
        assert sum(batch_sizes) >= 24, batch_sizes  # the experts, norms and 128 x 128 gates went in batches
        assert max(batch_sizes) > 1
    else:
        assert batch_sizes == []  # not a kernel host: every tensor alone, as before
    assert batched.keys() == alone.keys()
    for name in alone:
        assert batched[name] == alone[name], name


@needs_kernels
@pytest.mark.parametrize(("tensors", "entries"), [(3, 100), (4096, 1)])
def test_batches_split_by_their_bounds_give_the_same_bytes(tmp_path, monkeypatch, batch_sizes, tensors, entries):
    """Batches of at most 3 tensors or 100 entries, or of 1 entry (every tensor larger than the
    bound: a batch of its own): other cuts of the same run, the same bytes."""
    models = write_models(tmp_path)
    recipe = recipe_for(models, tmp_path / "unused", "ties")
    whole = merged_bytes(recipe, tmp_path / "whole", monkeypatch, batched=True)
    monkeypatch.setattr(tensor_merge, "BATCH_TENSORS", tensors)
    monkeypatch.setattr(tensor_merge, "BATCH_ENTRIES", entries)
    batch_sizes.clear()
    split = merged_bytes(recipe, tmp_path / "split", monkeypatch, batched=True)
    assert split == whole
    assert len(batch_sizes) > 10 and max(batch_sizes) <= min(tensors, 3)


@needs_kernels
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_many_tensors_benchmark_checkpoints_merge_to_the_same_bytes(tmp_path, monkeypatch, batch_sizes, method):
    """The bench's MoE-shaped checkpoints (bench/speed/many_tensors.py), TADrop on for TIES."""
    sys.path.insert(0, str(REPO / "bench" / "speed"))
    try:
        import many_tensors
    finally:
        sys.path.remove(str(REPO / "bench" / "speed"))
    folder = many_tensors.make_models(tmp_path / "many", 500, 2)
    many_tensors.write_recipe(tmp_path / "recipe.json", folder, 2, method, method == "ties")
    recipe = __import__("json").loads((tmp_path / "recipe.json").read_text())
    alone = merged_bytes(recipe, tmp_path / "alone", monkeypatch, batched=False)
    batched = merged_bytes(recipe, tmp_path / "batched", monkeypatch, batched=True)
    assert sum(batch_sizes) == 500
    assert hashlib.sha256(batched["model.safetensors"]).digest() == hashlib.sha256(alone["model.safetensors"]).digest()


def _spoiled(tmp_path: Path, value: float) -> tuple[dict[str, Path], str]:
    state = small_state()
    tuned = small_fine_tune(state, 1)
    name = "model.layers.1.mlp.experts.3.w"  # bf16, in the middle of a run of small tensors
    tuned[name].view(-1)[1] = value
    models = {
        "base": write_checkpoint(tmp_path / "base", state),
        "ft0": write_checkpoint(tmp_path / "ft0", small_fine_tune(state, 0)),
        "ft1": write_checkpoint(tmp_path / "ft1", tuned),
    }
    return models, name


@needs_kernels
@pytest.mark.parametrize("method", KERNEL_HOSTS)
@pytest.mark.parametrize("batched", [True, False])
def test_nan_in_a_batched_tensor_is_named_as_alone(tmp_path, monkeypatch, batch_sizes, method, batched):
    models, name = _spoiled(tmp_path, math.nan)
    recipe = recipe_for(models, tmp_path / "out", method)
    if not batched:
        monkeypatch.setattr(tensor_merge, "_batch_check", lambda layout, device: None)
    with pytest.raises(BadInput) as error:
        run_merge(parse_recipe(recipe), MergeOptions(device="cpu"))
    assert str(error.value) == f"{models['ft1']}: tensor {name} contains NaN or Inf"
    assert bool(batch_sizes) == batched  # the batch ran, and the spoiled tensor was merged again alone
    assert not (tmp_path / "out").exists()


@needs_kernels
@pytest.mark.parametrize("batched", [True, False])
def test_a_batched_result_that_overflows_is_refused_naming_its_tensor(tmp_path, monkeypatch, batched):
    """Finite inputs, but a merged entry beyond float16's range (65504)."""
    models, name = _spoiled(tmp_path, 60000.0)
    recipe = recipe_for(models, tmp_path / "out", "task_arithmetic", dtype="float16")
    for entry in recipe["models"]:
        entry["parameters"]["weight"] = 3.0
    recipe["parameters"]["normalize"] = False
    if not batched:
        monkeypatch.setattr(tensor_merge, "_batch_check", lambda layout, device: None)
    with pytest.raises(
        BadInput, match=rf"^tensor {name.replace('.', '[.]')}: the merge produced NaN or Inf \(in F16\)"
    ):
        run_merge(parse_recipe(recipe), MergeOptions(device="cpu"))


@needs_kernels
@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_a_merge_interrupted_inside_a_batched_shard_resumes_to_the_same_bytes(tmp_path, monkeypatch, method):
    """Shards of ~1 KB (several batches' worth of small tensors each); the merge is stopped at the
    20th tensor written, inside a shard and a batch; the resumed merge's files are the
    uninterrupted merge's."""
    from tadrop_cli import shards

    models = write_models(tmp_path)
    recipe = recipe_for(models, tmp_path / "unused", method, shard_size="1KB")
    recipe["tadrop"] = {"enabled": True, "min_numel": 1}
    reference = merged_bytes(recipe, tmp_path / "reference", monkeypatch, batched=True)
    assert len([name for name in reference if name.endswith(".safetensors")]) > 3

    target = tmp_path / "out"
    parsed = parse_recipe({**recipe, "output": {"path": str(target), "shard_size": "1KB"}})
    written, original = [], shards.ShardWriter.write

    def stopping(self, name, tensor):
        written.append(name)
        if len(written) == 20:
            raise KeyboardInterrupt
        return original(self, name, tensor)

    with monkeypatch.context() as patch:
        patch.setattr(shards.ShardWriter, "write", stopping)
        with pytest.raises(KeyboardInterrupt) as stop:
            run_merge(parsed, MergeOptions(device="cpu"))
    assert stop.value.finished_shards  # some shards finished before the one cut in two
    assert not target.exists()
    summary = run_merge(parsed, MergeOptions(device="cpu", resume=True))
    assert 0 < summary["resumed_shards"] < summary["shards"]
    resumed = {str(p.relative_to(target)): p.read_bytes() for p in sorted(target.rglob("*")) if p.is_file()}
    assert resumed == reference


def test_address_reads_what_mapped_reads_and_unmap_whole_lets_go_of_every_page(tmp_path, monkeypatch):
    """Checkpoint.address points at the entries mapped() views; unmap_whole of many small tensors
    (in any order) lets go of every page they lay on, in a few runs, not one per tensor."""
    import ctypes
    import mmap

    from tadrop_cli import checkpoint as checkpoint_module

    state = {f"t{i:04d}": torch.full((300,), float(i)) for i in range(3000)}  # 600 bytes each in bf16
    folder = write_checkpoint(tmp_path / "m", state, dtype=torch.bfloat16)
    released = []
    monkeypatch.setattr(checkpoint_module, "_release", lambda mapping, first, end: released.append((first, end)))
    opened = checkpoint_module.open_checkpoint(str(folder))
    try:
        names = sorted(state, reverse=True)
        for name in names[:50]:
            address = opened.address(name)
            stored = np.ctypeslib.as_array(ctypes.cast(address, ctypes.POINTER(ctypes.c_uint16)), shape=(300,)).copy()
            assert np.array_equal(stored, opened.mapped(name, 0, 300).array)
        opened.unmap_whole(names)
        runs = len(released)
        infos = [opened.tensors[name] for name in names]
    finally:
        opened.close()
    page = mmap.PAGESIZE
    covered = set()
    for start, stop in released:
        covered.update(range(start // page, -(-stop // page)))
    first, end = min(i.offset for i in infos), max(i.offset + i.nbytes for i in infos)
    assert covered >= set(range(first // page, -(-end // page)))
    assert runs <= 3  # 1.8 MB in runs of 1 MB, the rest at close: not 3000


# ---------------------------------------------------------------- the kernel itself


def _stored(tensor: torch.Tensor) -> Stored:
    return Stored.from_torch(tensor)


def _alone(base: Stored, tuned: list[Stored], weights, densities, seeds, consensus, out_dtype):
    """A tensor's merge by merge_slice with its cuts by selection (sparsify.cut_of_keys): the
    per-tensor path of tensor_merge._merge_with_kernels."""
    models = []
    for entries, weight, density, seed in zip(tuned, weights, densities, seeds, strict=True):
        model = kernels.ModelSlice(entries, weight)
        if seed is None and density < 1:  # a magnitude trim
            k = sparsify.kept_count(base.numel, density)
            cut = sparsify.KEEP_NOTHING if k <= 0 else sparsify.cut_of_keys(kernels.magnitude_keys(base, entries), k)
            model.drop, model.threshold = kernels.DROP_BY_MAGNITUDE, cut.threshold
            model.ties_before = kernels.ties_kept_before(cut, 0, base, entries)
        elif seed is not None and density < 1:
            model.drop, model.seed, model.limit = kernels.DROP_AT_RANDOM, seed, kernels.random_keep_limit(density)
            model.rescale_by = density if density > 0 else None
        models.append(model)
    merged, flagged = kernels.merge_slice(base, models, 0, consensus, True, sum(weights), 0.8, out_dtype)
    return merged.array, flagged, [(m.threshold, m.ties_before) for m in models]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("random", [False, True])
def test_a_batch_gives_each_tensor_its_merge_alone(dtype, random):
    """Tensors of 1 to SMALL_CUT entries with many ties (deltas of few values), densities from 0
    to 1: each tensor's entries, flag and cuts are those of merge_slice with cut_of_keys."""
    g = torch.Generator().manual_seed(3)
    sizes = [1, 2, 3, 5, 16, 255, 256, 257, 1000, tensor_merge.SMALL_CUT]
    densities = [0.0, 0.1, 0.5, 0.99, 1.0]
    batch = kernels.BatchMerge(
        {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype], "BF16", 2, consensus=True
    )
    expected, keep = [], []
    for s, n in enumerate(sizes):
        base = torch.randn(n, generator=g).to(dtype)
        tuned = [(base.float() + torch.randint(-3, 4, (n,), generator=g) * 0.125).to(dtype) for _ in range(2)]
        stored = [_stored(base), *(_stored(t) for t in tuned)]
        keep.append(stored)
        model_densities = [densities[s % 5], densities[(s + 2) % 5]]
        seeds = [s * 10 + j if random else None for j in range(2)]
        expected.append(_alone(stored[0], stored[1:], [0.7, 0.4], model_densities, seeds, True, "BF16"))
        models = []
        for entries, weight, density, seed in zip(stored[1:], [0.7, 0.4], model_densities, seeds, strict=True):
            drop, limit, kept, rescale_by = kernels.DROP_NOTHING, 0, kernels.NO_CUT, None
            if density < 1 and seed is None:
                drop, kept = kernels.DROP_BY_MAGNITUDE, sparsify.kept_count(n, density)
            elif density < 1:
                drop, limit = kernels.DROP_AT_RANDOM, kernels.random_keep_limit(density)
                rescale_by = density if density > 0 else None
            models.append((entries.array.ctypes.data, weight, drop, seed or 0, limit, rescale_by, kept))
        batch.add(stored[0].array.ctypes.data, n, 1.1, 0.8, True, models)
    out, starts, flags, settings = batch.run()
    for s, (n, (entries, flagged, cuts)) in enumerate(zip(sizes, expected, strict=True)):
        assert flags[s] == flagged
        assert np.array_equal(out[starts[s] : starts[s] + n], entries), (s, n)
        if not random:
            found = [
                (float(settings[2 * s + j]["threshold"]), int(settings[2 * s + j]["ties_before"])) for j in range(2)
            ]
            for (threshold, ties_before), (want_threshold, want_ties) in zip(found, cuts, strict=True):
                if want_threshold != math.inf or threshold != math.inf:
                    assert (threshold, ties_before) == (want_threshold, want_ties), (s, n)


@needs_kernels
def test_a_batch_flags_only_the_tensor_with_nan_and_merges_the_others():
    batch = kernels.BatchMerge("F32", "F32", 1, consensus=False)
    arrays = []
    for spoil in (False, True, False):
        base = np.arange(4, dtype=np.float32)
        tuned = base + np.float32(0.5)
        if spoil:
            tuned[2] = np.nan
        arrays += [base, tuned]
        batch.add(
            base.ctypes.data, 4, 1.0, 1.0, False, [(tuned.ctypes.data, 1.0, kernels.DROP_BY_MAGNITUDE, 0, 0, None, 2)]
        )
    out, starts, flags, _ = batch.run()
    assert flags == [False, True, False]
    for start in (starts[0], starts[2]):
        assert out[start : start + 4].tolist() == [0.5, 1.5, 2.0, 3.0]  # every |delta| ties: the first two kept


def test_a_batch_refuses_a_tensor_larger_than_its_bound():
    if not kernels.available():
        pytest.skip("the CPU kernels are not built here")
    batch = kernels.BatchMerge("F32", "F32", 1, consensus=False)
    with pytest.raises(ValueError, match="at most"):
        batch.add(0, kernels.BATCH_SEGMENT_MAX + 1, 1.0, 1.0, False, [(0, 1.0, 0, 0, 0, None, kernels.NO_CUT)])


def test_a_merge_leaves_the_garbage_collector_as_it_found_it(tmp_path, monkeypatch):
    """The layout's headers are read with collection paused and the merge's bookkeeping is frozen
    (run.collection_paused, long_lived_objects_frozen): both undone at the end, also after a failure."""
    import gc

    models = write_models(tmp_path, count=2)
    recipe = recipe_for(models, tmp_path / "out", "ties")
    seen = []
    original = tensor_merge.merge_tensors

    def watching(*args):
        seen.append((gc.isenabled(), gc.get_freeze_count() > 0))
        return original(*args)

    monkeypatch.setattr("tadrop_cli.run.merge_tensors", watching)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    run_merge(parse_recipe(recipe), MergeOptions(device="cpu"))
    assert seen and all(enabled and frozen for enabled, frozen in seen)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    kept = [object()]  # a program's own frozen objects stay frozen
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        run_merge(parse_recipe(recipe), MergeOptions(device="cpu", overwrite=True))
        assert 0 < gc.get_freeze_count() <= frozen  # not unfrozen, nothing of the merge's added (some freed)
    finally:
        gc.unfreeze()
    del kept
    models, _ = _spoiled(tmp_path / "spoiled", math.nan)
    with pytest.raises(BadInput):
        run_merge(parse_recipe(recipe_for(models, tmp_path / "out2", "ties")), MergeOptions(device="cpu"))
    assert gc.isenabled() and gc.get_freeze_count() == 0
