"""dense_linalg: the SVD hosts' products and eigendecompositions, by numpy/scipy on the CPU and by
PyTorch elsewhere, against numpy float64 references and against each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

from tadrop_cli import dense_linalg


@pytest.fixture(autouse=True)
def by_openblas(monkeypatch):
    """The numpy/scipy route (what a one-core merge takes), whatever this machine's thread count."""
    monkeypatch.setattr(dense_linalg, "torch_thread_limit", lambda: 1)


def symmetric(n: int, seed: int, dtype=np.float64) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(n + 7, n))
    return (a.T @ a).astype(dtype)


def sin_largest_angle(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b @ (b.T @ a), 2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("top", [None, 90, 30, 1, 0])  # all; above n/3 (all, then cut); the MRRR subset; edges
def test_eigh_descending_gives_the_largest_eigenpairs_in_order(dtype, top):
    n = 90
    g = symmetric(n, 1, dtype)
    values, vectors = dense_linalg.eigh_descending(torch.from_numpy(g), top=top)
    k = n if top is None else top
    assert values.shape == (k,) and vectors.shape == (n, k)
    assert values.dtype == vectors.dtype == torch.from_numpy(g).dtype
    assert vectors.is_contiguous()
    expected_values, expected_vectors = np.linalg.eigh(g.astype(np.float64))
    expected_values, expected_vectors = expected_values[::-1][:k], expected_vectors[:, ::-1][:, :k]
    tolerance = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(
        values.double().numpy(), expected_values, rtol=tolerance, atol=tolerance * expected_values.max(initial=0)
    )
    if k:
        assert np.all(np.diff(values.numpy()) <= 0)
        # the leading eigenvalues here are well apart: each vector is the reference's up to sign
        lead = min(k, 5)
        dots = np.abs(np.sum(vectors.double().numpy()[:, :lead] * expected_vectors[:, :lead], axis=0))
        np.testing.assert_allclose(dots, 1, atol=10 * tolerance)
        np.testing.assert_allclose(
            vectors.double().numpy().T @ vectors.double().numpy(), np.eye(k), atol=10 * tolerance
        )


def test_the_subset_solver_is_used_for_a_small_share_and_agrees_with_all(monkeypatch):
    import scipy.linalg

    drivers = []
    real = scipy.linalg.eigh

    def spy(*args, **kwargs):
        drivers.append(kwargs.get("driver"))
        return real(*args, **kwargs)

    monkeypatch.setattr(scipy.linalg, "eigh", spy)
    g = torch.from_numpy(symmetric(120, 2))
    some = dense_linalg.eigh_descending(g, top=40)
    every = dense_linalg.eigh_descending(g, top=41)
    assert drivers == ["evr", "evd"]
    np.testing.assert_allclose(some[0].numpy(), every[0][:40].numpy(), rtol=1e-12)
    assert sin_largest_angle(some[1].numpy(), every[1][:, :40].numpy()) < 1e-10


@pytest.mark.parametrize("transposed", [False, True])
def test_gram64_is_the_float64_gram_block_by_block(transposed, monkeypatch):
    monkeypatch.setattr(dense_linalg, "ROWS_PER_BLOCK", 16)  # 70 rows: 5 blocks, the last one short
    a = np.random.default_rng(3).normal(size=(30, 70) if transposed else (70, 30)).astype(np.float32)
    matrix = torch.from_numpy(a).T if transposed else torch.from_numpy(a)
    exact = matrix.double().numpy().T @ matrix.double().numpy()
    gram = dense_linalg.gram64(matrix)
    assert gram.dtype == torch.float64
    np.testing.assert_allclose(gram.numpy(), exact, rtol=1e-13, atol=1e-12)


def test_times64_is_a_float64_product_returned_in_the_dtype_asked(monkeypatch):
    monkeypatch.setattr(dense_linalg, "ROWS_PER_BLOCK", 16)
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(50, 20)).astype(np.float32), rng.normal(size=(20, 7))
    exact = a.astype(np.float64) @ b
    single = dense_linalg.times64(torch.from_numpy(a), torch.from_numpy(b))
    double = dense_linalg.times64(torch.from_numpy(a), torch.from_numpy(b), torch.float64)
    assert single.dtype == torch.float32 and double.dtype == torch.float64
    np.testing.assert_allclose(double.numpy(), exact, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(single.numpy(), exact.astype(np.float32))  # rounded once, at the end


def test_matmul_of_views_in_their_dtype():
    rng = np.random.default_rng(5)
    a, b = torch.from_numpy(rng.normal(size=(9, 6)).astype(np.float32)), torch.from_numpy(rng.normal(size=(9, 4)))
    got = dense_linalg.matmul(a.T, b.float())
    assert got.dtype == torch.float32 and got.shape == (6, 4)
    np.testing.assert_allclose(got.numpy(), a.double().numpy().T @ b.numpy(), rtol=1e-5, atol=1e-5)


def test_the_torch_route_agrees_with_the_openblas_route(monkeypatch):
    """The PyTorch branch (what several threads and a GPU take), on the CPU, against numpy/scipy's."""
    rng = np.random.default_rng(6)
    a = torch.from_numpy(rng.normal(size=(40, 25)).astype(np.float32))
    g = torch.from_numpy(symmetric(25, 7))
    openblas = (dense_linalg.gram64(a), dense_linalg.times64(a, g), dense_linalg.eigh_descending(g, top=5))
    monkeypatch.setattr(dense_linalg, "torch_thread_limit", lambda: 2)
    import scipy.linalg

    monkeypatch.setattr(scipy.linalg, "eigh", None)  # not called on this route
    other = (dense_linalg.gram64(a), dense_linalg.times64(a, g), dense_linalg.eigh_descending(g, top=5))
    np.testing.assert_allclose(other[0].numpy(), openblas[0].numpy(), rtol=1e-13)
    np.testing.assert_allclose(other[1].numpy(), openblas[1].numpy(), rtol=1e-6)
    np.testing.assert_allclose(other[2][0].numpy(), openblas[2][0].numpy(), rtol=1e-12)
    assert sin_largest_angle(other[2][1].numpy(), openblas[2][1].numpy()) < 1e-10


def test_the_route_follows_the_thread_limit_the_process_started_with(monkeypatch):
    from tadrop_cli import cpu_share

    cpu_share.torch_thread_limit.cache_clear()
    monkeypatch.undo()  # the real torch_thread_limit
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cpu_share.torch_thread_limit() == 1 and dense_linalg._by_openblas(torch.zeros(1))
        torch.set_num_threads(2)  # later changes (cpu_share fitting the idle cores) do not switch routes
        assert cpu_share.torch_thread_limit() == 1 and dense_linalg._by_openblas(torch.zeros(1))
        cpu_share.torch_thread_limit.cache_clear()
        assert cpu_share.torch_thread_limit() == 2 and not dense_linalg._by_openblas(torch.zeros(1))
    finally:
        torch.set_num_threads(threads)
        cpu_share.torch_thread_limit.cache_clear()


def test_openblas_runs_on_one_thread_during_a_call_and_is_restored_after():
    dense_linalg.eigh_descending(torch.eye(3))  # loads scipy's OpenBLAS
    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    assert blas, "numpy's or scipy's OpenBLAS should be loaded"
    before = {i["filepath"]: i["num_threads"] for i in blas}
    with dense_linalg._one_openblas_thread():
        inside = {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
    assert set(inside.values()) == {1}
    after = {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
    assert after == before
