"""Dense products and symmetric eigendecompositions for the SVD hosts' fast route (tensors in, tensors out).

Where tadrop computes on one CPU core (PyTorch's thread limit is 1: OMP_NUM_THREADS=1, a
one-core machine or affinity mask) these run in numpy and scipy (OpenBLAS and its LAPACK), not
in PyTorch, for two measured reasons (docs/speed.md, "The SVD hosts"):
- PyTorch's CPU wheels use MKL, whose matrix products ran at about half OpenBLAS's speed on
  this project's AMD EPYC machines (2048 x 2048, one core: float64 0.41 s against 0.22 s,
  float32 0.19 s against 0.11 s);
- the fast route needs only the top k eigenpairs of a task's Gram matrix, and LAPACK's MRRR
  eigensolver (scipy's driver "evr") finds just those, which torch.linalg.eigh cannot be asked
  for (k = r/4 of 2048: 0.57 s against 0.97 s for all of them, float32).
With several threads, PyTorch: OpenBLAS's worker threads and PyTorch's OpenMP threads, called in
turn, spin for the same cores (a 40m TSV-M merge took 50 s with both on 2 threads, against 16 s
with PyTorch alone). The choice follows the thread limit the process started with, not the
count cpu_share.py fits to the idle cores tensor by tensor, so that a tensor's result does not
depend on how busy the machine was. On a GPU, PyTorch.

Every function returns new tensors on the input's device; the inputs are not modified.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache

from .cpu_share import torch_thread_limit
from .lazy import torch

ROWS_PER_BLOCK = 4096  # rows turned into float64 at a time: a tall matrix is never copied whole
_SUBSET_SHARE = 1 / 3  # eigh(top=k): the MRRR solver for k up to this share of n (beyond, no faster than all)


@lru_cache(maxsize=1)
def _blas_threads():
    """threadpoolctl's controller of the BLAS libraries loaded (numpy's and scipy's OpenBLAS)."""
    import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS, so that the controller finds it)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextmanager
def _one_openblas_thread():
    """OpenBLAS on one thread (its default is every core) for the length of a call."""
    with _blas_threads().limit(limits=1, user_api="blas"):
        yield


def _by_openblas(*tensors) -> bool:
    """Whether numpy/scipy compute this: on the CPU, where the process computes on one core."""
    return all(t.device.type == "cpu" for t in tensors) and torch_thread_limit() == 1


def _numpy(tensor, dtype=None):
    """A numpy view of a CPU tensor (a copy only where `dtype` differs)."""
    array = tensor.detach().numpy()
    return array if dtype is None else array.astype(dtype, copy=False)


def matmul(left, right):
    """left @ right, in their (common) dtype."""
    if not _by_openblas(left, right):
        return left @ right
    with _one_openblas_thread():
        return torch.from_numpy(_numpy(left) @ _numpy(right))


def gram64(matrix):
    """M^T M in float64, formed a block of ROWS_PER_BLOCK rows at a time (float64 sums: the Gram of
    float32 entries is exact to float64 rounding, whatever its condition number)."""
    if not _by_openblas(matrix):
        gram = torch.zeros(matrix.shape[1], matrix.shape[1], dtype=torch.float64, device=matrix.device)
        for start in range(0, matrix.shape[0], ROWS_PER_BLOCK):
            block = matrix[start : start + ROWS_PER_BLOCK].double()
            gram.addmm_(block.T, block)
        return gram
    import numpy as np

    array = _numpy(matrix)
    with _one_openblas_thread():
        gram = np.zeros((array.shape[1], array.shape[1]), dtype=np.float64)
        for start in range(0, array.shape[0], ROWS_PER_BLOCK):
            block = array[start : start + ROWS_PER_BLOCK].astype(np.float64)
            gram += block.T @ block
    return torch.from_numpy(gram)


def times64(matrix, right, dtype=None):
    """matrix @ right in float64 (`right` float64), returned in `dtype` (float32 by default), a block
    of ROWS_PER_BLOCK rows at a time. (The default is looked up here, not in the signature: that
    would import torch.)"""
    dtype = torch.float32 if dtype is None else dtype
    out = torch.empty(matrix.shape[0], right.shape[1], dtype=dtype, device=matrix.device)
    if not _by_openblas(matrix, right):
        for start in range(0, matrix.shape[0], ROWS_PER_BLOCK):
            out[start : start + ROWS_PER_BLOCK] = matrix[start : start + ROWS_PER_BLOCK].double() @ right
        return out
    import numpy as np

    array, right_array, out_array = _numpy(matrix), _numpy(right, np.float64), out.numpy()
    with _one_openblas_thread():
        for start in range(0, array.shape[0], ROWS_PER_BLOCK):
            block = array[start : start + ROWS_PER_BLOCK].astype(np.float64)
            out_array[start : start + ROWS_PER_BLOCK] = block @ right_array
    return out


def eigh_descending(symmetric, top: int | None = None):
    """(eigenvalues, eigenvectors) of a symmetric matrix, largest first, in its dtype: all n of
    them, or only the `top` largest (then by LAPACK's MRRR solver where top <= n/3, by OpenBLAS).
    Reads the lower triangle."""
    n = symmetric.shape[0]
    top = n if top is None else max(0, min(n, top))
    if not _by_openblas(symmetric):
        values, vectors = torch.linalg.eigh(symmetric)
        return values.flip(0)[:top], vectors.flip(1)[:, :top]
    if top == 0:
        return symmetric.new_zeros(0), symmetric.new_zeros(n, 0)
    import scipy.linalg

    with _one_openblas_thread():
        if top <= _SUBSET_SHARE * n:
            values, vectors = scipy.linalg.eigh(
                _numpy(symmetric), driver="evr", subset_by_index=[n - top, n - 1], check_finite=False
            )
        else:
            values, vectors = scipy.linalg.eigh(_numpy(symmetric), driver="evd", check_finite=False)
            values, vectors = values[n - top :], vectors[:, n - top :]
    values, vectors = values[::-1].copy(), vectors[:, ::-1].copy()  # C order: torch refuses negative strides
    return torch.from_numpy(values), torch.from_numpy(vectors)
