#!/usr/bin/env python3
"""Per-tensor overhead: merges of checkpoints made of many tiny tensors (a large MoE model's shape).

Builds a base and --models fine-tunes of --tensors tensors of 4 bf16 entries each (names as in a
MoE model: `model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`), and the same with one
tensor, then times whole `tadrop merge` processes (wall and CPU time) for each method: the
many-tensor merge minus the one-tensor merge (interpreter start, imports, recipe, publish: the
fixed cost), divided by the number of tensors, is the per-tensor overhead. The data takes
microseconds, so this is all bookkeeping. Runs alternate methods and checkouts within a repeat;
medians of --repeats. With TADrop on, `min_numel: 1` has every tensor scored, as a real MoE
expert (millions of entries) would be.

    python bench/speed/many_tensors.py                                       # this checkout
    python bench/speed/many_tensors.py --compare /work/wt/house-before       # an older checkout beside it

Each checkout runs with PYTHONPATH set to it (its own compiled kernels). Checkpoints are cached
under bench/.cache/many/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = REPO / "bench" / ".cache" / "many"
METHODS = {  # name: (merge method, TADrop on)
    "task_arithmetic": ("task_arithmetic", False),
    "ties": ("ties", False),
    "ties + TADrop": ("ties", True),
}


def tensor_names(count: int) -> list[str]:
    """`count` MoE-style names: 4 layers' worth of experts at a time, three projections each."""
    names = []
    projections = ("gate_proj", "up_proj", "down_proj")
    for index in range(count):
        expert, projection = divmod(index, len(projections))
        layer, expert = divmod(expert, 128)
        names.append(f"model.layers.{layer}.mlp.experts.{expert}.{projections[projection]}.weight")
    return names


def make_models(folder: Path, tensors: int, models: int) -> Path:
    """A base and `models` fine-tunes of `tensors` tensors of shape (2, 2) in bf16, cached by a marker."""
    import torch  # only here: the timing loop stays light
    from safetensors.torch import save_file

    marker = folder / ".complete"
    want = json.dumps({"tensors": tensors, "models": models, "version": 1})
    if marker.is_file() and marker.read_text() == want:
        return folder
    names = tensor_names(tensors)
    generator = torch.Generator().manual_seed(0)
    base = {name: torch.randn(2, 2, generator=generator).to(torch.bfloat16) for name in names}
    for model in ["base"] + [f"ft{i}" for i in range(1, models + 1)]:
        state = (
            base
            if model == "base"
            else {n: (t + 0.01 * torch.randn(2, 2, generator=generator)).to(t.dtype) for n, t in base.items()}
        )
        (folder / model).mkdir(parents=True, exist_ok=True)
        save_file(state, str(folder / model / "model.safetensors"), metadata={"format": "pt"})
    marker.write_text(want)
    return folder


def write_recipe(path: Path, models: Path, count: int, method: str, tadrop: bool) -> Path:
    """A recipe in mergekit's `models:` form (JSON is YAML) for the base and ft1..ftN."""
    entries = [
        {"model": str(models / f"ft{i}"), "parameters": {"weight": 1.0 / count, "density": 0.5}}
        for i in range(1, count + 1)
    ]
    if method == "task_arithmetic":
        for entry in entries:
            del entry["parameters"]["density"]
    recipe = {
        "merge_method": method,
        "base_model": str(models / "base"),
        "models": entries,
        "dtype": "bfloat16",
        "seed": 0,
        "output": {"path": str(path.parent / "out")},
    }
    if tadrop:
        recipe["tadrop"] = {"enabled": True, "min_numel": 1}  # score every tensor, as a real MoE expert is
    path.write_text(json.dumps(recipe, indent=1))
    return path


def timed_merge(recipe: Path, checkout: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one whole `tadrop merge` process run from
    `checkout`. On a shared machine the CPU time is the steadier figure: the wall time also
    holds the waits for a core."""
    env = dict(os.environ, PYTHONPATH=str(checkout))
    shutil.rmtree(recipe.parent / "out", ignore_errors=True)  # a new output each time: no old one to check or remove
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "tadrop_cli", "merge", str(recipe), "--quiet"], env=env, cwd=checkout
    )
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"tadrop merge {recipe} failed (exit {child.returncode})")
    return wall, usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=20_000)
    parser.add_argument("--models", type=int, default=2, help="fine-tunes besides the base")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"any of {', '.join(METHODS)}")
    parser.add_argument("--compare", action="append", default=[], help="another checkout to time beside this one")
    args = parser.parse_args(argv)

    checkouts = {"this": REPO} | {Path(c).name: Path(c).resolve() for c in args.compare}
    methods = [m.strip() for m in args.methods.split(",")]
    sizes = {"many": args.tensors, "one": 1}
    folders = {k: make_models(CACHE / f"t{n}-m{args.models}", n, args.models) for k, n in sizes.items()}
    times: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for repeat in range(args.repeats):
        for method in methods:
            name, tadrop = METHODS[method]
            for checkout_name, checkout in checkouts.items():
                for size, folder in folders.items():
                    work = CACHE / "runs" / checkout_name / size / method.replace(" + ", "-")
                    work.mkdir(parents=True, exist_ok=True)
                    recipe = write_recipe(work / "recipe.yaml", folder, args.models, name, tadrop)
                    if repeat == 0 and size == "one":
                        timed_merge(recipe, checkout)  # warm the checkout's bytecode (the medians absorb a cold read)
                    wall, cpu = timed_merge(recipe, checkout)
                    times.setdefault((method, checkout_name, size), []).append((wall, cpu))
                    print(
                        f"[many] repeat {repeat + 1}: {method}, {checkout_name}, {size}: {wall:.2f} s wall, "
                        f"{cpu:.2f} s CPU (loadavg {_load()})",
                        file=sys.stderr,
                        flush=True,
                    )

    print(
        f"\n{args.tensors} tensors of 4 bf16 entries, base + {args.models} models, "
        f"{len(os.sched_getaffinity(0))} cores, medians of {args.repeats} "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, loadavg {_load()})\n"
    )
    print("| method | checkout | 1 tensor: wall / CPU | many: wall / CPU | per tensor: wall / CPU |")
    print("|---|---|---|---|---|")
    results = {}
    for method in methods:
        for checkout_name in checkouts:
            one = [statistics.median(x) for x in zip(*times[(method, checkout_name, "one")], strict=True)]
            many = [statistics.median(x) for x in zip(*times[(method, checkout_name, "many")], strict=True)]
            per = [(b - a) / (args.tensors - 1) * 1000 for a, b in zip(one, many, strict=True)]
            results[f"{method} / {checkout_name}"] = {"one_s": one, "many_s": many, "ms_per_tensor": per}
            print(
                f"| {method} | {checkout_name} | {one[0]:.2f} / {one[1]:.2f} s | {many[0]:.2f} / {many[1]:.2f} s "
                f"| {per[0]:.3f} / {per[1]:.3f} ms |"
            )
    out = REPO / "bench" / ".cache" / "results" / f"many-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"args": vars(args), "times": {" / ".join(k): v for k, v in times.items()}, "results": results}
    out.write_text(json.dumps(record, indent=2))
    print(f"\nraw: {out}", file=sys.stderr)
    return 0


def _load() -> str:
    with open("/proc/loadavg") as handle:
        return handle.read().split()[0]


if __name__ == "__main__":
    sys.exit(main())
