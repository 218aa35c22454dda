#!/usr/bin/env python3
"""The dense linear algebra under the SVD hosts, PyTorch (MKL on x86 CPU wheels) against numpy/scipy
(OpenBLAS): the table in docs/speed.md ("The SVD hosts") that explains tadrop_cli/dense_linalg.py
and the floor of the fast route.

    python bench/speed/linalg_primitives.py --n 2048 --threads 1 --top 512

Each row: the median of --repeats wall-clock runs of one operation on an n x n Gaussian matrix
(or its Gram matrix), with torch's and OpenBLAS's threads both set to --threads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits


def median_seconds(operation, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        operation()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--top", type=int, default=512, help="k for the top-k eigensolver rows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, k = args.n, args.top
    a32 = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
    a64 = a32.double()
    g64 = a64.T @ a64
    g32 = g64.float()
    na32, na64, ng32, ng64 = a32.numpy(), a64.numpy(), g32.numpy(), g64.numpy()
    subset = [n - k, n - 1]
    rows = [
        ("float32 SVD, all", lambda: torch.linalg.svd(a32, full_matrices=False), lambda: np.linalg.svd(na32, False)),
        ("float64 product", lambda: a64.T @ a64, lambda: na64.T @ na64),
        ("float32 product", lambda: a32.T @ a32, lambda: na32.T @ na32),
        ("float64 eigh, all", lambda: torch.linalg.eigh(g64), lambda: scipy.linalg.eigh(ng64, driver="evd")),
        ("float32 eigh, all", lambda: torch.linalg.eigh(g32), lambda: scipy.linalg.eigh(ng32, driver="evd")),
        (f"float32 eigh, top {k}", None, lambda: scipy.linalg.eigh(ng32, driver="evr", subset_by_index=subset)),
        (f"float64 eigh, top {k}", None, lambda: scipy.linalg.eigh(ng64, driver="evr", subset_by_index=subset)),
    ]
    print(f"| operation ({n} x {n}, {args.threads} thread(s)) | PyTorch {torch.__version__} | numpy/scipy (OpenBLAS) |")
    print("|---|---|---|")
    with threadpool_limits(args.threads):
        for name, with_torch, with_numpy in rows:
            left = f"{median_seconds(with_torch, args.repeats):.2f} s" if with_torch else "-"
            print(f"| {name} | {left} | {median_seconds(with_numpy, args.repeats):.2f} s |", flush=True)


if __name__ == "__main__":
    main()
