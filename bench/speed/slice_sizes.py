#!/usr/bin/env python3
"""The merge's own time (in one process, after a warm-up) against the slice size, on a device.

Whole-process timings (run.py) include starting Python and importing torch, which on the lent
GPU machines takes ~5 s and hides the engine's work; this times `run_merge` alone, with the
engine's slice size for the device set to each value asked for, median of --repeats.

    python bench/speed/slice_sizes.py --device cuda --preset 168m --chunks 20,24,26
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import make_checkpoints  # noqa: E402
import run as runner  # noqa: E402  (recipe_text)

from tadrop_cli import tensor_merge  # noqa: E402
from tadrop_cli.recipe import load_recipe  # noqa: E402
from tadrop_cli.run import MergeOptions, reuse_freed_memory, run_merge  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="168m")
    ap.add_argument("--n-models", type=int, default=4)
    ap.add_argument("--methods", default="task_arithmetic,ties,dare_ties")
    ap.add_argument("--chunks", default="20,24,26", help="log2 of the slice sizes to try")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tadrop", action="store_true", help="TADrop on (trimming methods)")
    ap.add_argument("--json", type=Path, default=None, help="write the timings here too")
    args = ap.parse_args()

    reuse_freed_memory()
    base, fts = make_checkpoints.ensure(
        args.preset, args.n_models, 0, make_checkpoints.DEFAULT_CACHE, 250, log=lambda m: print(m, file=sys.stderr)
    )
    attribute = "CHUNK_ELEMENTS" if args.device == "cpu" else "GPU_CHUNK_ELEMENTS"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            tadrop = "on" if args.tadrop and method not in runner.NO_TADROP else None
            path = Path(tmp) / f"{method}.yaml"
            path.write_text(runner.recipe_text(method, base, fts, dtype="bfloat16", seed=0, tadrop=tadrop))
            recipe = load_recipe(path)
            for log2 in map(int, args.chunks.split(",")):
                setattr(tensor_merge, attribute, 1 << log2)
                times, summary = [], {}
                for _ in range(args.repeats + 1):  # the first is a warm-up
                    started = time.perf_counter()
                    summary = run_merge(
                        recipe, MergeOptions(output=Path(tmp) / "out", overwrite=True, device=args.device)
                    )
                    times.append(time.perf_counter() - started)
                row = {
                    "method": method,
                    "tadrop": bool(tadrop),
                    "slice": f"2^{log2}",
                    "median_s": round(statistics.median(times[1:]), 3),
                    "runs_s": [round(t, 3) for t in times[1:]],
                    "peak_gpu_mb": round(summary.get("peak_gpu_bytes", 0) / 2**20),
                    "peak_rss_mb": round(summary["peak_rss_bytes"] / 2**20),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
