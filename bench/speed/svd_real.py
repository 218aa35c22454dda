#!/usr/bin/env python
"""The SVD hosts on real task vectors: the 8 all-MiniLM-L6-v2 fine-tunes of the text quality
benchmark (bench/quality/zeroshot.py; they must have been fine-tuned: its cache,
TADROP_QUALITY_CACHE or bench/.cache/quality, holds them).

    python bench/speed/svd_real.py            # spectra at the cut, timings, errors (docs/speed.md)

1. The spectrum at TSV-M's cut over all encoder matrices of the 8 fine-tunes: sigma_k / sigma_1,
   sigma_1.5k / sigma_k (the randomized route's rate with 50% oversampling), sigma_k+10 / sigma_k,
   medians (k = r/4 and r/8).
2. TSV-M and Iso-CTS of 4 fine-tunes (density 1/4) per encoder matrix, exact route against fast
   route: process time, one torch thread, medians of 3, summed over the matrices.
3. Each route's relative Frobenius error against the float64 reference of tests/reference.py.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import reference  # noqa: E402

from tadrop_cli import subspace  # noqa: E402

CACHE = Path(os.environ.get("TADROP_QUALITY_CACHE", REPO / "bench" / ".cache" / "quality")) / "zeroshot"
TASKS = ["noun_def", "verb_def", "pos_def", "verb_ex", "noun_lemma", "adj_kind", "fortune_topic", "fortune_lang"]
TIMED_TASKS = ["noun_def", "verb_def", "pos_def", "fortune_lang"]


def deltas_by_name() -> dict[str, list[torch.Tensor]]:
    base = load_file(str(CACHE / "base" / "model.safetensors"))
    tuned = {t: load_file(str(CACHE / "ft" / t / "model.safetensors")) for t in TASKS}
    return {
        name: [tuned[t][name].float() - tensor.float() for t in TASKS]
        for name, tensor in base.items()
        if tensor.ndim == 2 and name.startswith("encoder.layer.")
    }


def spectra(deltas: dict[str, list[torch.Tensor]]) -> None:
    for share in (4, 8):
        rows = []
        for tasks in deltas.values():
            for delta in tasks:
                s = torch.linalg.svdvals(delta.double())
                k = len(s) // share
                rows.append(
                    (s[k - 1] / s[0], s[min(len(s) - 1, k + k // 2)] / s[k - 1], s[min(len(s) - 1, k + 10)] / s[k - 1])
                )
        a = np.array(rows, dtype=float)
        print(
            f"k = r/{share}, {len(a)} matrices: sigma_k/sigma_1 {np.median(a[:, 0]):.3f}, "
            f"sigma_1.5k/sigma_k {np.median(a[:, 1]):.3f} [{a[:, 1].min():.3f}, {a[:, 1].max():.3f}], "
            f"sigma_k+10/sigma_k {np.median(a[:, 2]):.3f} (medians)"
        )


def routes(deltas: dict[str, list[torch.Tensor]]) -> None:
    torch.set_num_threads(1)
    picked = [TASKS.index(t) for t in TIMED_TASKS]
    merges = {
        "tsv_m": (subspace.tsv_merge, reference.tsv_m_matrix),
        "iso_cts": (subspace.iso_cts_merge, reference.iso_cts_matrix),
    }
    densities, seeds = [1 / len(picked)] * len(picked), list(range(1, len(picked) + 1))
    for method, (merge, expected_of) in merges.items():
        seconds = {True: 0.0, False: 0.0}
        worst = {True: 0.0, False: 0.0}
        for tasks in deltas.values():
            chosen = [tasks[i] for i in picked]
            expected = expected_of([d.double().numpy() for d in chosen], densities)
            for exact in (True, False):
                times = []
                for _ in range(3):
                    start = time.process_time()
                    merged = merge(chosen, densities, exact_svd=exact, seeds=seeds)
                    times.append(time.process_time() - start)
                seconds[exact] += statistics.median(times)
                error = np.linalg.norm(merged.double().numpy() - expected) / np.linalg.norm(expected)
                worst[exact] = max(worst[exact], float(error))
        print(
            f"{method}: exact {seconds[True]:.2f} s, fast {seconds[False]:.2f} s "
            f"({seconds[True] / seconds[False]:.2f}x); largest error against float64: "
            f"exact {worst[True]:.1e}, fast {worst[False]:.1e}"
        )


if __name__ == "__main__":
    found = deltas_by_name()
    spectra(found)
    routes(found)
