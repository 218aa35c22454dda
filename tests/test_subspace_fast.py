"""The SVD hosts' fast route (the default) against the exact route (exact_svd: true, full float32
SVDs) and against the float64 numpy reference of tests/reference.py.

Tolerances, stated: on every matrix here the fast route's merged tensor is within 1e-5 (relative
Frobenius) of the float64 reference and within 1e-4 of the exact float32 route; the exact route
itself is ~1e-5 from float64 (float32 SVD rounding), the fast one ~1e-7 (float64 Gram matrices).
A kept subspace's largest principal angle to float64's is below 1e-5 (sin).
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import reference as ref
import torch
from conftest import basic_recipe, run_cli, tiny_state, write_checkpoint, write_recipe

from tadrop_cli import dense_linalg, subspace
from tadrop_cli import methods as methods_module
from tadrop_cli.methods import METHODS, TaskVector

FAST_VS_FLOAT64 = 1e-5
FAST_VS_EXACT = 1e-4


def spectral(rng, shape, sigma) -> np.ndarray:
    """A matrix with singular values `sigma` (padded with zeros) and random singular vectors."""
    m, n = shape
    r = min(m, n)
    u, _ = np.linalg.qr(rng.normal(size=(m, r)))
    v, _ = np.linalg.qr(rng.normal(size=(n, r)))
    s = np.zeros(r)
    s[: len(sigma)] = sigma[:r]
    return (u * s) @ v.T


def relative(got, expected) -> float:
    got, expected = (np.asarray(x, dtype=np.float64) for x in (got, expected))
    scale = np.linalg.norm(expected)
    if scale == 0:  # nothing kept: zero exactly
        return float(np.abs(got).max())
    return float(np.linalg.norm(got - expected) / scale)


def sin_largest_angle(a: np.ndarray, b: np.ndarray) -> float:
    """sin of the largest principal angle between the column spaces of a and b (orthonormal columns)."""
    return float(np.linalg.norm(a - b @ (b.T @ a), 2))


def tasks_for(case: str, rng) -> list[np.ndarray]:
    shape = {"tall": (60, 36), "wide": (36, 60), "square": (48, 48), "tiny": (3, 5), "row": (1, 12)}.get(case, (50, 40))
    r = min(shape)
    if case == "rank_deficient":  # LoRA-like rank-3 tasks, k_t = 10 asks for more than there is
        return [spectral(rng, shape, rng.uniform(0.5, 2, 3)) for _ in range(4)]
    if case == "near_degenerate":  # clusters of equal singular values inside the kept set, a clear gap at every cut
        sigma = np.repeat([4.0, 2.0, 1.0, 0.5, 0.25], [4, 6, 10, 20, r])[:r]
        return [spectral(rng, shape, sigma * (1 + 1e-9 * rng.normal(size=r))) for _ in range(4)]
    if case == "gauss":  # flat spectrum: neighbours at the cut ~1% apart
        return [rng.normal(size=shape) * rng.uniform(0.05, 0.5) for _ in range(4)]
    return [spectral(rng, shape, rng.uniform(0.05, 0.5) * 3 * 0.8 ** np.arange(r)) for _ in range(4)]


CASES = ["tall", "wide", "square", "tiny", "row", "rank_deficient", "near_degenerate", "gauss"]


def merged(method: str, tasks, exact: bool, densities=None, seeds=(11, 12, 13, 14)) -> torch.Tensor:
    deltas = [torch.from_numpy(t.astype(np.float32)) for t in tasks]
    densities = densities or [1 / len(tasks)] * len(tasks)
    merge = {"tsv_m": subspace.tsv_merge, "iso_c": subspace.iso_c_merge, "iso_cts": subspace.iso_cts_merge}[method]
    arguments = () if method == "iso_c" else (densities,)
    return merge(deltas, *arguments, exact_svd=exact, seeds=list(seeds)[: len(tasks)])


def reference_of(method: str, tasks, densities=None) -> np.ndarray:
    tasks32 = [t.astype(np.float32).astype(np.float64) for t in tasks]  # what both routes see
    densities = densities or [1 / len(tasks)] * len(tasks)
    if method == "iso_c":
        return ref.iso_c_matrix(tasks32)
    return (ref.tsv_m_matrix if method == "tsv_m" else ref.iso_cts_matrix)(tasks32, densities)


@pytest.fixture(params=["openblas", "torch"])
def linalg(request, monkeypatch):
    """Both routes of dense_linalg: numpy/scipy (one-core merges) and PyTorch (several threads, GPUs)."""
    monkeypatch.setattr(dense_linalg, "torch_thread_limit", lambda: 1 if request.param == "openblas" else 2)
    return request.param


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_fast_route_matches_float64_and_the_exact_route(method, case, linalg):
    rng = np.random.default_rng(zlib.crc32(f"{method} {case}".encode()))
    tasks = tasks_for(case, rng)
    expected = reference_of(method, tasks)
    fast = merged(method, tasks, exact=False)
    assert fast.dtype == torch.float32 and fast.shape == tasks[0].shape
    assert relative(fast, expected) < FAST_VS_FLOAT64
    assert relative(fast, merged(method, tasks, exact=True)) < FAST_VS_EXACT


def test_rank_deficient_sum_keeps_no_arbitrary_direction():
    """Iso-C of a rank-4 sum: the fast route's flat spectrum lives in the sum's span, as the exact route's."""
    rng = np.random.default_rng(3)
    tasks = [spectral(rng, (30, 20), [1.0, 0.5]) for _ in range(2)]
    fast = merged("iso_c", tasks, exact=False).numpy().astype(np.float64)
    assert np.linalg.matrix_rank(fast, tol=1e-5) == 4
    np.testing.assert_allclose(fast, reference_of("iso_c", tasks), atol=1e-6)


def randomized_calls(monkeypatch) -> list:
    """Records whether each call of the randomized route converged (True) or gave up (False)."""
    calls, original = [], subspace._top_randomized

    def spy(*args, **kwargs):
        found = original(*args, **kwargs)
        calls.append(found is not None)
        return found

    monkeypatch.setattr(subspace, "_top_randomized", spy)
    return calls


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_randomized_route_gives_the_exact_top_subspace(shape, monkeypatch):
    """A spectrum that falls off after the cut (a fine-tune's, or a LoRA's): the randomized route
    converges, and its kept subspaces are float64's to sin(angle) < 1e-5."""
    calls = randomized_calls(monkeypatch)
    rng = np.random.default_rng(5)
    sigma = np.concatenate([np.linspace(3, 1, 12), 0.05 * 0.9 ** np.arange(200)])
    matrix = spectral(rng, shape, sigma).astype(np.float32)
    tensor = torch.from_numpy(matrix)
    u, s, vh = subspace.top_fast(tensor, 12, subspace.null_tolerance(tensor), seed=7)
    assert calls == [True]
    tu, ts, tvh = ref.top_triplets(matrix.astype(np.float64), 12)
    assert sin_largest_angle(u.double().numpy(), tu) < 1e-5
    assert sin_largest_angle(vh.T.double().numpy(), tvh.T) < 1e-5
    np.testing.assert_allclose(s.numpy(), ts, rtol=1e-6)
    # orthonormal factors
    np.testing.assert_allclose(u.T.double().numpy() @ u.double().numpy(), np.eye(12), atol=1e-6)


def test_randomized_route_gives_up_on_a_flat_spectrum(monkeypatch):
    """Gaussian: neighbours at the cut are too close for the iteration; the exact Gram route answers."""
    calls = randomized_calls(monkeypatch)
    matrix = torch.from_numpy(np.random.default_rng(9).normal(size=(200, 160)).astype(np.float32))
    u, s, vh = subspace.top_fast(matrix, 10, subspace.null_tolerance(matrix), seed=1)
    assert calls == [False]
    tu, ts, _ = ref.top_triplets(matrix.double().numpy(), 10)
    # the Gram route's float32 eigensolver (sigma_10 > sigma_1 / 4): within 2x a float32 SVD's error
    single = torch.linalg.svd(matrix, full_matrices=False)[0][:, :10].double().numpy()
    assert sin_largest_angle(u.double().numpy(), tu) < 2 * max(sin_largest_angle(single, tu), 1e-6)


def test_iso_cts_task_directions_take_the_randomized_route(monkeypatch):
    """Iso-CTS's task-specific parts are small (k_t = 5 of 200 here) with a gap after them: the
    randomized route converges, and the merge matches float64. (No common space here: with
    one, the sum's common directions absorb these tasks' strong ones, and what is left is a
    flat tail where the route gives up, as test_randomized_route_gives_up_on_a_flat_spectrum.)"""
    calls = randomized_calls(monkeypatch)
    rng = np.random.default_rng(13)
    sigma = np.concatenate([np.linspace(3, 1, 5), 0.02 * 0.9 ** np.arange(200)])
    tasks = [spectral(rng, (240, 200), sigma) for _ in range(4)]
    densities = [0.025] * 4  # common_space_fraction 0: a budget of 200, k_t = 5
    deltas = [torch.from_numpy(t.astype(np.float32)) for t in tasks]
    fast = subspace.iso_cts_merge(deltas, densities, 0.0, exact_svd=False, seeds=[1, 2, 3, 4])
    assert len(calls) == 4 and all(calls)
    tasks32 = [t.astype(np.float32).astype(np.float64) for t in tasks]
    assert relative(fast, ref.iso_cts_matrix(tasks32, densities, 0.0)) < FAST_VS_FLOAT64


def test_fast_route_is_seeded_and_independent_of_task_order(monkeypatch):
    calls = randomized_calls(monkeypatch)
    rng = np.random.default_rng(17)
    sigma = np.concatenate([np.linspace(3, 1, 4), 0.02 * 0.9 ** np.arange(100)])
    tasks = [spectral(rng, (120, 100), sigma) for _ in range(3)]
    densities = [0.04, 0.05, 0.03]
    first = merged("tsv_m", tasks, exact=False, densities=densities, seeds=(1, 2, 3))
    assert calls and all(calls)
    again = merged("tsv_m", tasks, exact=False, densities=densities, seeds=(1, 2, 3))
    assert torch.equal(first, again)  # same seeds: the same bits
    order = [2, 0, 1]
    shuffled = merged(
        "tsv_m",
        [tasks[i] for i in order],
        exact=False,
        densities=[densities[i] for i in order],
        seeds=[(1, 2, 3)[i] for i in order],
    )
    torch.testing.assert_close(shuffled, first, atol=1e-6, rtol=0)


def through_registry(method: str, tasks, exact: bool) -> torch.Tensor:
    """The method as the engine calls it (base 0, lambda 1); the default route unless exact."""
    tvs = [TaskVector(torch.from_numpy(t.astype(np.float32)), density=1 / len(tasks)) for t in tasks]
    params = {"lambda": 1.0, **({"exact_svd": True} if exact else {})}
    return METHODS[method].merge(torch.zeros(tasks[0].shape), tvs, **params)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_huge_task_vectors_merge_as_scaled_ones(method, exact):
    """Entries ~1e36 (finite in float32, but their norm and Gram overflow): scaled by a power of two
    before the decompositions and back after, the merge is 2^100 times the merge of the task
    vectors divided by 2^100. Before, TSV-M and Iso-CTS returned zeros (an infinite null
    tolerance kept no direction) and Iso-C NaN."""
    rng = np.random.default_rng(19)
    tasks = [rng.normal(size=(40, 30)) for _ in range(3)]
    small = through_registry(method, tasks, exact)
    huge = through_registry(method, [t * 2.0**120 for t in tasks], exact)
    assert bool(torch.isfinite(huge).all())
    torch.testing.assert_close(huge / 2.0**120, small, atol=1e-6, rtol=1e-5)
    assert float(small.abs().max()) > 0.1


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_non_finite_task_vectors_give_nan_not_a_quiet_result(method, bad):
    """A task vector with Inf or NaN (a fine-tune minus base that overflowed float32) has no SVD:
    the merge is NaN, which the engine refuses naming the tensor (exit 2), instead of a
    LAPACK failure (internal error) or, as before, zeros: the base published as the merge."""
    tasks = [np.random.default_rng(23).normal(size=(20, 16)) for _ in range(2)]
    tasks[1][3, 4] = bad
    for exact in (False, True):
        assert bool(torch.isnan(through_registry(method, tasks, exact)).all())


@pytest.mark.parametrize("method", ["tsv_m", "iso_cts"])
def test_overflowing_fine_tune_is_exit_2_naming_the_tensor(method, tmp_path):
    """A fine-tune whose difference from the base overflows float32 (3e38 - (-3e38) = Inf)."""
    base = tiny_state()
    name = "model.layers.0.attn.weight"
    base[name][0, 0] = -3e38
    paths = {"base": write_checkpoint(tmp_path / "base", base)}
    for i in range(2):
        tuned = {k: v.clone() + 0.01 * (i + 1) for k, v in base.items()}
        tuned[name][0, 0] = 3e38
        paths[f"ft{i}"] = write_checkpoint(tmp_path / f"ft{i}", tuned)
    recipe = basic_recipe(paths, tmp_path / "out", method=method)
    for entry in recipe["models"]:
        entry["parameters"] = {"weight": 1.0}
    result = run_cli("merge", str(write_recipe(tmp_path, recipe)), "--quiet")
    assert result.returncode == 2, result.stderr
    assert name in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_exact_svd_is_a_recipe_parameter_that_selects_the_float32_svds(method, monkeypatch, tmp_path):
    spec = METHODS[method].param("exact_svd")
    assert spec is not None and spec.kind == "bool" and spec.default is False and not spec.per_model
    used = []
    original = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: used.append(1) or original(*a, **k))
    rng = np.random.default_rng(29)

    def tvs():
        return [
            TaskVector(torch.from_numpy(rng.normal(size=(12, 10)).astype(np.float32)), density=0.5) for _ in range(2)
        ]

    METHODS[method].merge(torch.zeros(12, 10), tvs(), **{"lambda": 1.0, "exact_svd": False})
    assert used  # below methods.FAST_SVD_MIN_SIDE the full SVDs serve (faster there, and closer to float64)
    used.clear()
    monkeypatch.setattr(methods_module, "FAST_SVD_MIN_SIDE", 10)
    METHODS[method].merge(torch.zeros(12, 10), tvs(), **{"lambda": 1.0, "exact_svd": False})
    assert used == []  # the fast route takes no SVD at all
    METHODS[method].merge(torch.zeros(12, 10), tvs(), **{"lambda": 1.0, "exact_svd": True})
    assert used


@pytest.mark.parametrize("m,c,e", [(50, 30, 8), (60, 40, 20), (30, 4, 10), (30, 0, 5), (30, 10, 0)])
def test_polar_extended_is_the_polar_factor(m, c, e):
    """Iso-CTS's left Procrustes factor by a low-rank update of an orthonormal basis, against the SVD's."""
    rng = np.random.default_rng(m + c + e)
    basis = torch.from_numpy(np.linalg.qr(rng.normal(size=(m, c)))[0].astype(np.float32)) if c else torch.zeros(m, 0)
    extra = torch.from_numpy((rng.normal(size=(m, e)) * 0.3).astype(np.float32))
    full = torch.cat([basis, extra], dim=1)
    expected = ref.polar(full.double().numpy())
    np.testing.assert_allclose(subspace.polar_extended(basis, extra).double().numpy(), expected, atol=2e-6)
    np.testing.assert_allclose(subspace.polar(full).double().numpy(), expected, atol=2e-6)


def test_polar_keeps_small_real_singular_values():
    """A square matrix with singular values down to 1e-5 (a square concatenation of task bases has
    such): they are real, not rounding (that is ~eps * (sqrt(m) + sqrt(n)) ~ 3e-6 here), so
    the polar factor keeps them, as the exact route does. Dropping them (numpy's rank rule,
    eps * max(m, n) ~ 1.4e-5) moved a 1024 x 1024 TSV-M merge by 3%."""
    rng = np.random.default_rng(31)
    u, _ = np.linalg.qr(rng.normal(size=(120, 120)))
    v, _ = np.linalg.qr(rng.normal(size=(120, 120)))
    matrix = ((u * np.logspace(0, -5, 120)) @ v.T).astype(np.float32)
    got = subspace.polar(torch.from_numpy(matrix)).double().numpy()
    np.testing.assert_allclose(got, ref.polar(matrix.astype(np.float64)), atol=1e-5)


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_exact_route_survives_a_float32_svd_that_fails_to_converge(method, monkeypatch):
    """LAPACK's float32 SVD can fail to converge on an ill-conditioned matrix (seen once on a
    512 x 512 Iso-CTS merge): the exact route then takes that SVD in float64 instead of ending
    the merge, and its result still matches the float64 reference."""
    real_svd = torch.linalg.svd
    failures = []

    def svd_that_fails_in_float32(matrix, *args, **kwargs):
        if matrix.dtype == torch.float32:
            failures.append(tuple(matrix.shape))
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (simulated)")
        return real_svd(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", svd_that_fails_in_float32)
    tasks = tasks_for("square", np.random.default_rng(7))
    got = merged(method, tasks, exact=True)
    assert failures, "the exact route took no float32 SVD: the test checks nothing"
    assert got.dtype == torch.float32
    assert relative(got, reference_of(method, tasks)) < FAST_VS_FLOAT64


def test_polar_keeps_a_tiny_singular_value_of_a_square_concatenation():
    """A concatenation of task bases (entries ~1/sqrt(m), sigma_1 ~2) with one real singular value
    at 2e-6 sigma_1, well apart from the others. Its direction is resolved (M's float32 rounding
    is ~eps * (sqrt(m) + sqrt(n)) * rms entry ~ 2e-7), so the polar factor keeps it, as the exact
    route and the papers' code do. A rounding level scaled by sigma_1 instead (~8e-6 here) left
    it out, and moved a real TSV-M merge (all-MiniLM-L6-v2, 4 fine-tunes, layer 2's value
    matrix) by 5.6% from float64 while the exact route was within 1e-5."""
    rng = np.random.default_rng(5)
    m = 256
    u, _ = np.linalg.qr(rng.normal(size=(m, m)))
    v, _ = np.linalg.qr(rng.normal(size=(m, m)))
    sigma = np.concatenate([[2.0], rng.uniform(0.2, 1.5, m - 2), [4e-6]])
    matrix = ((u * sigma) @ v.T).astype(np.float32)
    got = subspace.polar(torch.from_numpy(matrix)).double().numpy()
    np.testing.assert_allclose(got, ref.polar(matrix.astype(np.float64)), atol=1e-5)
    # Iso-CTS's left factor by the low-rank update: task directions orthogonal to the common basis,
    # two of them nearly parallel (the tiny singular value sits in the task block)
    c, e = 200, 40
    basis = u[:, :c]
    extra = u[:, c:] @ (
        (np.linalg.qr(rng.normal(size=(m - c, e)))[0] * np.r_[rng.uniform(0.5, 1.5, e - 1), 4e-6])
        @ np.linalg.qr(rng.normal(size=(e, e)))[0]
    )
    full = np.concatenate([basis, extra], axis=1).astype(np.float32)
    assert np.linalg.svd(full.astype(np.float64), compute_uv=False)[-1] < 1e-5
    got = subspace.polar_extended(torch.from_numpy(full[:, :c]), torch.from_numpy(full[:, c:])).double().numpy()
    np.testing.assert_allclose(got, ref.polar(full.astype(np.float64)), atol=1e-5)


@pytest.mark.parametrize("exact", [False, True])
def test_tsv_m_of_a_model_with_itself_is_its_truncation(exact):
    """The same task vector twice (a recipe that lists one model twice): the concatenated bases
    repeat exactly, so half of their Gram's directions are null. The fast route leaves them out
    (a partial isometry) and gives back the task's top r/2 directions: A [I I] / sqrt 2 is the
    polar factor of [A A], and A [I I] diag(s, s) [I I]^T B^T / 2 = A diag(s) B^T."""
    rng = np.random.default_rng(8)
    task = spectral(rng, (40, 32), 0.9 ** np.arange(32))
    expected = ref.top_triplets(task.astype(np.float32).astype(np.float64), 16)
    truncated = (expected[0] * expected[1]) @ expected[2]
    got = merged("tsv_m", [task, task], exact=exact, densities=[0.5, 0.5], seeds=(3, 3))
    assert torch.isfinite(got).all()
    if not exact:  # the float32 SVD of a rank-deficient concatenation picks arbitrary null directions
        assert relative(got, truncated) < FAST_VS_FLOAT64


def _eigh_dtypes(monkeypatch) -> list:
    dtypes = []
    real = subspace.eigh_descending

    def spy(symmetric, top=None):
        dtypes.append(symmetric.dtype)
        return real(symmetric, top)

    monkeypatch.setattr(subspace, "eigh_descending", spy)
    return dtypes


@pytest.mark.parametrize("spectrum", ["decaying", "flat"])
def test_the_float32_try_is_skipped_only_where_it_cannot_pass(spectrum, monkeypatch, linalg):
    """A fine-tune-like decaying spectrum (sigma_k < sigma_1 / 4 at the cut): the float32 try is
    skipped, and the result is the same bits as with the try; a flat one still gets the try."""
    rng = np.random.default_rng(23)
    if spectrum == "decaying":
        matrix = spectral(rng, (300, 200), 1 / (1 + np.arange(200))).astype(np.float32)
    else:
        matrix = rng.normal(size=(300, 200)).astype(np.float32)
    tensor = torch.from_numpy(matrix)
    tolerance = subspace.null_tolerance(tensor)
    dtypes = _eigh_dtypes(monkeypatch)
    got = subspace._top_gram(tensor, 50, tolerance)
    if spectrum == "decaying":
        assert dtypes == [torch.float64]
    else:
        assert dtypes == [torch.float32]
    monkeypatch.setattr(subspace, "_spread_can_pass", lambda gram, k: True)
    tried = subspace._top_gram(tensor, 50, tolerance)
    for a, b in zip(got, tried, strict=True):
        assert torch.equal(a, b)


def test_spread_can_pass_is_false_only_where_sigma_k_is_below_a_quarter_of_sigma_1():
    """The bound is certain: a False never stands where the float32 try would have passed."""
    rng = np.random.default_rng(29)
    falses = 0
    for trial in range(40):
        decay = rng.uniform(0, 1.5)
        sigma = (1 + np.arange(80)) ** -decay * rng.uniform(0.5, 2)
        matrix = spectral(rng, (120, 80), sigma)
        gram = torch.from_numpy(matrix.T @ matrix)
        k = int(rng.integers(1, 80))
        if not subspace._spread_can_pass(gram, k):
            falses += 1
            assert sigma[k - 1] < subspace._SINGLE_SPREAD * sigma[0], (trial, decay, k)
    assert falses >= 10  # the check does skip on decaying spectra
