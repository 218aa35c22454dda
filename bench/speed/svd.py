#!/usr/bin/env python3
"""The SVD hosts' per-matrix cost: the exact route (full float32 SVDs, `exact_svd: true`) against
the fast route (the default), side by side in one process, alternating, medians of --repeats.

For each shape and host: the median seconds of each route, their ratio, and the fast route's
relative Frobenius error against the exact one (and, with --reference, of both routes against
the float64 numpy reference of tests/reference.py). Task matrices: --spectrum gauss (flat: the
hardest case for a top-k cut, as the synthetic checkpoints of make_checkpoints.py), power
(sigma_i ~ (1 + i)^-0.5 with random singular vectors: a decaying spectrum like a fine-tune's).

Then a projection of a whole model's time from the per-shape medians: every 2-D tensor of a
Llama-shaped model (make_checkpoints.tensor_shapes) priced at its shape's median.

    python bench/speed/svd.py --shapes 2048x2048,5632x2048 --methods tsv_m,iso_cts --repeats 3
    python bench/speed/svd.py --shapes 256x192 --reference   # quick check of the errors
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench" / "speed"))

from tadrop_cli import subspace  # noqa: E402

MERGES = {"tsv_m": subspace.tsv_merge, "iso_c": subspace.iso_c_merge, "iso_cts": subspace.iso_cts_merge}


def task_matrices(shape: tuple[int, int], count: int, spectrum: str, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    m, n = shape
    if spectrum == "gauss":
        return [torch.randn(m, n, generator=generator) * 0.01 for _ in range(count)]
    r = min(m, n)
    out = []
    for _ in range(count):
        u = torch.linalg.qr(torch.randn(m, r, generator=generator)).Q
        v = torch.linalg.qr(torch.randn(n, r, generator=generator)).Q
        out.append(((u * (0.01 * (1 + torch.arange(r)) ** -0.5)) @ v.T).contiguous())
    return out


def merge(method: str, deltas, exact: bool) -> torch.Tensor:
    arguments = () if method == "iso_c" else ([1 / len(deltas)] * len(deltas),)
    return MERGES[method](deltas, *arguments, exact_svd=exact, seeds=list(range(len(deltas))))


def timed(method: str, deltas, exact: bool) -> tuple[float, torch.Tensor]:
    _wait(deltas[0].device)
    start = time.perf_counter()
    out = merge(method, deltas, exact)
    _wait(out.device)  # a GPU's work is queued: wait for it before stopping the clock
    return time.perf_counter() - start, out


def _wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def relative(a: torch.Tensor, b) -> float:
    b = torch.as_tensor(b, dtype=torch.float64).cpu()
    return float(torch.linalg.matrix_norm(a.double().cpu() - b) / torch.linalg.matrix_norm(b))


def reference_merge(method: str, deltas):
    import reference as ref

    numpy_deltas = [d.double().cpu().numpy() for d in deltas]
    if method == "iso_c":
        return ref.iso_c_matrix(numpy_deltas)
    densities = [1 / len(deltas)] * len(deltas)
    return (ref.tsv_m_matrix if method == "tsv_m" else ref.iso_cts_matrix)(numpy_deltas, densities)


def projection(medians: dict, hidden: int, intermediate: int, layers: int, kv: int) -> dict:
    """Seconds for every 2-D matrix of `layers` decoder layers (embeddings left out: see the report)."""
    per_layer = [
        (hidden, hidden),
        (kv, hidden),
        (kv, hidden),
        (hidden, hidden),
        (intermediate, hidden),
        (intermediate, hidden),
        (hidden, intermediate),
    ]
    result = {}
    for key, by_shape in medians.items():
        total = 0.0
        for m, n in per_layer:
            name = f"{m}x{n}" if f"{m}x{n}" in by_shape else f"{n}x{m}"
            if name not in by_shape:
                return {}
            total += by_shape[name]
        result[key] = total * layers
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="2048x2048,5632x2048,256x2048")
    parser.add_argument("--methods", default="tsv_m,iso_cts")
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spectrum", default="gauss", choices=["gauss", "power"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: one core, as docs/speed.md)")
    parser.add_argument("--reference", action="store_true", help="also the float64 numpy reference's error (slow)")
    parser.add_argument("--project", default="", help="hidden,intermediate,layers,kv_width: project a model's time")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the task matrices made on the CPU, then moved)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, medians = [], {}
    for shape_text in args.shapes.split(","):
        shape = tuple(int(x) for x in shape_text.split("x"))
        deltas = [d.to(args.device) for d in task_matrices(shape, args.models, args.spectrum, seed=sum(shape))]
        for method in args.methods.split(","):
            times = {True: [], False: []}
            outputs = {}
            for repeat in range(args.repeats):
                for exact in (True, False) if repeat % 2 == 0 else (False, True):  # alternate who goes first
                    seconds, outputs[exact] = timed(method, deltas, exact)
                    times[exact].append(seconds)
            row = {
                "shape": shape_text,
                "method": method,
                "models": args.models,
                "spectrum": args.spectrum,
                "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(args.device),
                "exact_s": statistics.median(times[True]),
                "fast_s": statistics.median(times[False]),
                "exact_runs": [round(t, 3) for t in times[True]],
                "fast_runs": [round(t, 3) for t in times[False]],
                "fast_vs_exact": relative(outputs[False], outputs[True]),
            }
            row["speedup"] = row["exact_s"] / row["fast_s"]
            if args.reference:
                truth = reference_merge(method, deltas)
                row["exact_vs_float64"] = relative(outputs[True], truth)
                row["fast_vs_float64"] = relative(outputs[False], truth)
            rows.append(row)
            for route in ("exact", "fast"):
                medians.setdefault(f"{method} {route}", {})[shape_text] = row[f"{route}_s"]
            print(json.dumps({k: (round(v, 8) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    if args.project:
        hidden, intermediate, layers, kv = (int(x) for x in args.project.split(","))
        for key, seconds in projection(medians, hidden, intermediate, layers, kv).items():
            print(
                f"projection ({layers} layers of hidden {hidden}, intermediate {intermediate}, "
                f"{args.models} models) {key}: "
                f"{seconds:.0f} s = {seconds / 3600:.2f} h",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
