#!/usr/bin/env python3
"""A merge on a busy machine: tadrop's default threads against OMP_NUM_THREADS=1, under load.

Users merge next to training jobs and on shared CI runners. This starts --load N busy
processes (each a CPU-bound loop pinned to one core, cores taken in turn), then runs the same
`tadrop merge` alternately with the default thread count and with OMP_NUM_THREADS=1, and
reports medians and their ratio; then the same with no load of its own. The target
(docs/speed.md): under load the default takes at most 1.5x the one-thread time, and on a
quiet machine it keeps its speed.

    python bench/speed/busy.py --load 2 --size 168m --method ties --repeats 5
    python bench/speed/busy.py --load 2 --compare-pythonpath /path/to/older/checkout   # an older tadrop beside it

Each merge is a whole process (`python -m tadrop_cli merge ... --quiet`), timed by wall clock.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = REPO / "bench" / ".cache"
BUSY_LOOP = "while True:\n    pass\n"


@contextmanager
def busy_processes(count: int) -> Iterator[list[subprocess.Popen]]:
    """`count` CPU-bound processes, the i-th pinned to the i-th allowed core (round robin)."""
    cores = sorted(os.sched_getaffinity(0))
    processes = []
    try:
        for i in range(count):
            core = cores[i % len(cores)]
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-c", BUSY_LOOP], preexec_fn=lambda core=core: os.sched_setaffinity(0, {core})
                )
            )
        time.sleep(0.5 if count else 0)
        yield processes
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.wait()


def recipe(path: Path, method: str, checkpoints: Path, models: int, tadrop: bool, output: Path) -> Path:
    lines = [f"merge_method: {method}", f"base_model: {checkpoints / 'base'}", "models:"]
    lines += [f"  - model: {checkpoints / f'ft{i + 1}'}" for i in range(models)]
    lines += ["parameters: {density: 0.5, weight: 1.0}", "seed: 0", f"output: {{path: {output}}}"]
    if tadrop:
        lines.append("tadrop: {enabled: true}")
    path.write_text("\n".join(lines) + "\n")
    return path


def timed_merge(recipe_path: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    # cwd: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH, so run from
    # the repository root it would import that checkout's tadrop_cli for every variant
    subprocess.run(
        [sys.executable, "-m", "tadrop_cli", "merge", str(recipe_path), "--overwrite", "--quiet"],
        env=env,
        check=True,
        cwd=recipe_path.parent,
    )
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--load", type=int, default=len(os.sched_getaffinity(0)), help="busy processes (default: one per core)"
    )
    parser.add_argument("--size", default="168m", help="make_checkpoints.py preset")
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--method", default="ties")
    parser.add_argument("--no-tadrop", dest="tadrop", action="store_false")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compare-pythonpath", default=None, help="also time the tadrop found on this PYTHONPATH")
    parser.add_argument(
        "--quiet-too", action=argparse.BooleanOptionalAction, default=True, help="also measure with no load"
    )
    args = parser.parse_args(argv)

    subprocess.run(
        [sys.executable, str(HERE / "make_checkpoints.py"), "--preset", args.size, "--n-models", str(args.models)],
        check=True,
    )
    work = CACHE / "busy"
    work.mkdir(parents=True, exist_ok=True)
    recipe_path = recipe(
        work / "recipe.yaml", args.method, CACHE / "ckpt" / f"{args.size}-s0", args.models, args.tadrop, work / "out"
    )

    base_env = {
        k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    }
    base_env["PYTHONPATH"] = str(REPO)
    variants = {"default threads": dict(base_env), "OMP_NUM_THREADS=1": dict(base_env, OMP_NUM_THREADS="1")}
    if args.compare_pythonpath:
        variants["compared, default threads"] = dict(base_env, PYTHONPATH=args.compare_pythonpath)
        variants["compared, OMP_NUM_THREADS=1"] = dict(
            base_env, PYTHONPATH=args.compare_pythonpath, OMP_NUM_THREADS="1"
        )

    loads = [args.load] + ([0] if args.quiet_too and args.load else [])
    results: dict[str, dict[str, list[float]]] = {}
    for load in loads:
        times: dict[str, list[float]] = {name: [] for name in variants}
        with busy_processes(load):
            timed_merge(recipe_path, variants["default threads"])  # warm the page cache
            for repeat in range(args.repeats):
                for name, env in variants.items():
                    times[name].append(timed_merge(recipe_path, env))
                    print(
                        f"[busy] load {load} repeat {repeat + 1}: {name} {times[name][-1]:.2f} s "
                        f"(loadavg {open('/proc/loadavg').read().split()[0]})",
                        file=sys.stderr,
                        flush=True,
                    )
        results[f"load {load}"] = times

    print(
        f"\n{args.method}{' + TADrop' if args.tadrop else ''}, {args.size}, {args.models} models, "
        f"{len(os.sched_getaffinity(0))} cores, medians of {args.repeats} "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n"
    )
    print("| load | " + " | ".join(variants) + " | default / one thread |")
    print("|---|" + "---|" * (len(variants) + 1))
    for load, times in results.items():
        medians = {name: statistics.median(t) for name, t in times.items()}
        ratio = medians["default threads"] / medians["OMP_NUM_THREADS=1"]
        print(f"| {load} | " + " | ".join(f"{m:.2f} s" for m in medians.values()) + f" | {ratio:.2f} |")
    out = CACHE / "results" / f"busy-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"\nraw: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
