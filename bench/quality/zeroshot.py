#!/usr/bin/env python
"""The zero-shot-head text benchmark (bench_zeroshot.py) and TADrop's direction question.

    python bench/quality/run.py --bench zeroshot            # everything below, then the report
    python bench/quality/zeroshot.py --hosts ties --tag a   # one share of the cells (run two at once)
    python bench/quality/zeroshot.py --report-only          # tables from every cached share
    python bench/quality/zeroshot.py --finetune noun_def pos_def   # only these fine-tunes (share them)
    python bench/quality/zeroshot.py --ft-steps 150 ...     # another fine-tuning length (own cache)

Steps: the regime references (base + zero-shot heads, each fine-tune, task arithmetic with a tuned
lambda), then per host x kept fraction the arms uniform, strength +0.2 and (where the installed
tadrop accepts it) strength -0.2, each with lambda hill-climbed on validation by the same
procedure (sweep.Sweep.tune), then merged by `tadrop merge` at that lambda and scored on test;
random hosts on every seed. Differences are paired on the same test items (common.paired_bootstrap).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, Log, acc_se, paired_bootstrap, read_json, set_threads, write_json  # noqa: E402

TD_BASE = {"statistic": "hoyer", "normalize": "rank", "preserve_budget": True}
HOSTS = ["ties", "magnitude_prune"]
DENSITIES = [0.1, 0.2, 0.3]
STRENGTHS = {"plus0.2": 0.2, "minus0.2": -0.2}
STATISTICS = ("kurtosis", "cv", "gini", "topmass")  # besides hoyer, the default
RANDOM_SEEDS = 3


def arm_settings(strength: float) -> dict:
    return dict(TD_BASE, strength=strength)


def tadrop_accepts(settings: dict) -> bool:
    """Whether the tadrop that the merges run (TADROP_CMD or the installed one) validates `settings`."""
    from mergers import _env, _tadrop_exe

    exe = _tadrop_exe()
    # the frozen copy is `env PYTHONPATH=... python -m tadrop_cli`: ask its python
    if exe[-2:] == ["-m", "tadrop_cli"]:
        py = exe[:-2]
    else:
        py = [sys.executable]
    code = "import json, sys; from tadrop_cli.recipe import TadropSettings; TadropSettings(**json.loads(sys.argv[1]))"
    p = subprocess.run(py + ["-c", code, json.dumps(settings)], capture_output=True, env=_env(), timeout=120)
    return p.returncode == 0


# ---------------------------------------------------------------- references


def regime_references(sw, log) -> dict:
    """Base + heads, each fine-tune on its own task, and dense task arithmetic (tuned lambda)."""
    from recipes import make_recipe

    b = sw.b
    out = sw.records.setdefault("refs", {})
    sw.evaluate(["base"], "val", lambda: b.base_state)
    sw.evaluate(["base"], "test", lambda: b.base_state)
    out["base"] = {"test_key": ["base"]}
    for t in b.tasks:
        st = lambda t=t: b.load_state(sw.ft[t])  # noqa: E731
        sw.evaluate(["ft", t], "val", st, tasks=[t])
        sw.evaluate(["ft", t], "test", st, tasks=[t])
    if "ta_dense" not in out:
        fn = lambda lam: make_recipe("task_arithmetic", b.base_dir, sw.models, density=None, lam=lam)  # noqa: E731
        lam, vals, lazy1 = sw.tune(fn, 0.5)
        _, _, _, key = sw.test_at(fn, lam, None, lazy1)
        lazy1.drop()
        out["ta_dense"] = {"lam": lam, "val_grid": vals, "val": dict(vals)[lam], "test_key": key}
    sw.save()
    log(f"references ready: TA dense lambda {out['ta_dense']['lam']}")
    return out


# ---------------------------------------------------------------- cells


def run_direction(sw, hosts, densities, arms: dict, seeds: int, log, start: float | None = None) -> None:
    """Every arm of every host x budget, the same lambda start for all (None: the host's own)."""
    from recipes import is_random

    for method in hosts:
        for d in densities:
            for arm, td in arms.items():
                sw.run_cell(method, d, arm, td, list(range(seeds)) if is_random(method) else [0], start=start)


# ---------------------------------------------------------------- the wider family (validation)


def family_grid() -> dict:
    """Candidate TADrop settings (TADROP.md 2b): direction x scope for the strength allocation, the
    knob-free mass allocations, and the model-wide trim. Names as tadrop's TadropSettings has them."""
    grid = {"global": dict(TD_BASE, allocation="global")}
    for alloc in ("mass", "mass_reverse"):
        grid[f"{alloc}/l1"] = dict(TD_BASE, allocation=alloc, mass_norm="l1")
    for scope in ("model", "kind", "layer"):
        for name, g in STRENGTHS.items():
            # scope model is the default: the same recipe as the direction arm, so its merges are reused
            extra = {} if scope == "model" else {"allocation": "strength", "scope": scope}
            grid[f"strength/{scope}/{name}"] = dict(TD_BASE, strength=g, **extra)
    for alloc in ("mass", "mass_reverse"):
        grid[f"{alloc}/l2"] = dict(TD_BASE, allocation=alloc, mass_norm="l2")
    grid.update(wide_grid())
    return grid


def wide_grid() -> dict:
    """The rest of the strength allocation's axes at model scope (issue 17, part 2): the other
    statistics (normalize rank) and min-max normalisation (statistic hoyer), each at strength
    -0.2 and +0.2; hoyer with rank is family_grid's strength/model. The -0.2 arms first, the
    shipped direction, so that a search cut short leaves them."""
    grid = {}
    for name, g in sorted(STRENGTHS.items(), key=lambda kv: kv[1]):
        for stat in STATISTICS:
            grid[f"stat/{stat}/{name}"] = dict(TD_BASE, statistic=stat, strength=g)
        grid[f"norm/minmax/{name}"] = dict(TD_BASE, normalize="minmax", strength=g)
    return grid


def run_family_search(sw, hosts_budgets, grid: dict, log) -> dict:
    """Validation only. Every arm, uniform included, gets the same 3-point lambda neighbourhood
    (factor sqrt 2) around uniform's hill-climbed lambda; an arm's score is its best of the three."""
    from sweep import k_of, lam_of

    fam = sw.records.setdefault("family", {})
    ks = {hb: k_of(sw.run_cell(*hb, "uniform", None, [0])["lam"]) for hb in hosts_budgets}
    # arms outside, host-budgets inside: a run cut short leaves whole arms
    for name, td in [("uniform", None)] + list(grid.items()):
        for method, d in hosts_budgets:
            k = ks[(method, d)]
            key = f"{method}|{d}|{name}"
            if key in fam:
                continue
            fn = sw.recipe_fn(method, d, td)
            lam, vals, lazy = sw.tune(fn, lam_of(k), ks=(k - 1, k, k + 1))
            lazy.drop()
            fam[key] = {
                "method": method,
                "density": d,
                "arm": name,
                "tadrop": td,
                "lam": lam,
                "val_grid": vals,
                "val": max(v for _, v in vals),
            }
            sw.save()
            log(f"family {key}: val {fam[key]['val']:.4f} at lambda {lam}")
    return fam


def family_choice(fam: dict) -> tuple[str | None, dict]:
    """The arm with the highest mean validation gain over uniform across the host-budgets."""
    gains = {}
    for c in fam.values():
        if c["arm"] == "uniform":
            continue
        u = fam.get(f"{c['method']}|{c['density']}|uniform")
        if u is not None:
            gains.setdefault(c["arm"], []).append(c["val"] - u["val"])
    mean = {a: float(np.mean(g)) for a, g in gains.items()}
    return (max(mean, key=mean.get) if mean else None), mean


def family_table(fam: dict) -> str:
    if not fam:
        return "(not run)\n"
    hb = sorted({(c["method"], c["density"]) for c in fam.values()})
    arms = sorted({c["arm"] for c in fam.values()}, key=lambda a: (a != "uniform", a))
    _, mean = family_choice(fam)
    out = (
        "| arm | "
        + " | ".join(f"{m} {d}" for m, d in hb)
        + " | mean gain over uniform (points) |\n|---|"
        + "---|" * (len(hb) + 1)
        + "\n"
    )
    for a in arms:
        cells = []
        for m, d in hb:
            c = fam.get(f"{m}|{d}|{a}")
            cells.append(f"{_pct(c['val'])} (λ {c['lam']:g})" if c else "")
        g = f"{100 * mean[a]:+.2f}" if a in mean else ""
        out += f"| {a} | " + " | ".join(cells) + f" | {g} |\n"
    return out


# ---------------------------------------------------------------- report


def load_records(root: Path) -> dict:
    """All shares' records merged (each share writes records_zeroshot_<tag>.json)."""
    merged = {"refs": {}, "cells": {}}
    for p in sorted(glob.glob(str(root / "records_zeroshot*.json"))):
        r = read_json(p, {})
        merged["refs"].update(r.get("refs", {}))
        merged["cells"].update(r.get("cells", {}))
        merged.setdefault("family", {}).update(r.get("family", {}))
    return merged


def _pct(x):
    return f"{100 * x:.1f}"


def regime_table(sw, recs) -> tuple[str, dict]:
    tasks = sw.b.tasks
    rows = {
        "base + zero-shot heads": sw.test_result(recs["refs"]["base"]["test_key"]),
        "each task's fine-tune": {t: sw.ft_test(t) for t in tasks},
    }
    ta = recs["refs"].get("ta_dense")
    if ta:
        rows[f"task arithmetic (λ={ta['lam']:g})"] = sw.test_result(ta["test_key"])
    for c in sorted(recs["cells"].values(), key=lambda c: (c["method"], c["density"])):
        if c["arm"] == "uniform" and c["method"] in ("ties", "magnitude_prune") and c["density"] == 0.2:
            name = {"ties": "TIES", "magnitude_prune": "magnitude prune"}[c["method"]]
            rows[f"{name}, kept 0.2, uniform (λ={c['lam']:g})"] = sw.test_result(c["seeds"]["0"]["test_key"])
    head = "| | " + " | ".join(tasks) + " | mean | ±se |\n|---|" + "---|" * (len(tasks) + 2) + "\n"
    body = ""
    means = {}
    for name, res in rows.items():
        means[name] = float(np.mean([res[t].mean() for t in tasks]))
        body += (
            f"| {name} | "
            + " | ".join(_pct(res[t].mean()) for t in tasks)
            + f" | **{_pct(means[name])}** | {100 * acc_se([res[t] for t in tasks]):.1f} |\n"
        )
    return head + body, means


def search_table(recs) -> str:
    """Validation: each cell's lambda grid and its best value, beside uniform's."""
    cells = recs["cells"].values()
    uni = {(c["method"], c["density"]): c["val"] for c in cells if c["arm"] == "uniform"}
    out = (
        "| host | kept | arm | λ grid tried (validation mean accuracy, %) | chosen λ | val | val − uniform |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    for c in sorted(cells, key=lambda c: (c["method"], c["density"], c["arm"] != "uniform", c["arm"])):
        grid = ", ".join(f"{lam:g}: {_pct(v)}" for lam, v in c["val_grid"])
        u = uni.get((c["method"], c["density"]))
        diff = f"{100 * (c['val'] - u):+.2f}" if u is not None and c["arm"] != "uniform" else ""
        out += f"| {c['method']} | {c['density']} | {c['arm']} | {grid} | {c['lam']:g} | {_pct(c['val'])} | {diff} |\n"
    return out


def test_table(sw, recs) -> tuple[str, list]:
    tasks = sw.b.tasks
    cells = list(recs["cells"].values())
    uni = {(c["method"], c["density"]): c for c in cells if c["arm"] == "uniform"}
    rows = []
    out = (
        "| host | kept | arm | seeds | uniform test | arm test | arm − uniform [95% paired CI] | per seed |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    for c in sorted(cells, key=lambda c: (c["method"], c["density"], c["arm"])):
        u = uni.get((c["method"], c["density"]))
        if c["arm"] == "uniform" or u is None:
            continue
        seeds = sorted(set(c["seeds"]) & set(u["seeds"]), key=int)
        pairs = [(sw.test_result(u["seeds"][s]["test_key"]), sw.test_result(c["seeds"][s]["test_key"])) for s in seeds]
        bs = paired_bootstrap(pairs, tasks)
        ut = np.mean([u["seeds"][s]["test"] for s in seeds])
        at = np.mean([c["seeds"][s]["test"] for s in seeds])
        rows.append(
            dict(
                method=c["method"],
                density=c["density"],
                arm=c["arm"],
                seeds=len(seeds),
                uniform=float(ut),
                arm_test=float(at),
                **bs,
            )
        )
        per_seed = ", ".join(f"{100 * x:+.2f}" for x in bs["per_seed"]) if len(seeds) > 1 else ""
        out += (
            f"| {c['method']} | {c['density']} | {c['arm']} | {len(seeds)} | {_pct(ut)} | {_pct(at)} | "
            f"**{100 * bs['diff']:+.2f}** [{100 * bs['lo']:+.2f}, {100 * bs['hi']:+.2f}] | {per_seed} |\n"
        )
    return out, rows


def direction_table(sw, recs, a="plus0.2", b="minus0.2") -> str:
    """The two directions against each other, paired on the same test items and seeds."""
    by = {(c["method"], c["density"], c["arm"]): c for c in recs["cells"].values()}
    out = (
        f"\n### {b} against {a} on test (points)\n\n| host | kept | seeds | {b} − {a} [95% paired CI] |\n"
        "|---|---|---|---|\n"
    )
    for (m, d, arm), ca in sorted(by.items()):
        cb = by.get((m, d, b))
        if arm != a or cb is None:
            continue
        seeds = sorted(set(ca["seeds"]) & set(cb["seeds"]), key=int)
        pairs = [
            (sw.test_result(ca["seeds"][s]["test_key"]), sw.test_result(cb["seeds"][s]["test_key"])) for s in seeds
        ]
        bs = paired_bootstrap(pairs, sw.b.tasks)
        interval = f"[{100 * bs['lo']:+.2f}, {100 * bs['hi']:+.2f}]"
        out += f"| {m} | {d} | {len(seeds)} | **{100 * bs['diff']:+.2f}** {interval} |\n"
    return out


def per_task_table(tasks, rows) -> str:
    """Arm − uniform on test, per task (points), from the paired comparisons."""
    out = (
        "\n### Per task: arm − uniform on test (points)\n\n| host | kept | arm | "
        + " | ".join(tasks)
        + " |\n|---|---|---|"
        + "---|" * len(tasks)
        + "\n"
    )
    for r in rows:
        out += (
            f"| {r['method']} | {r['density']} | {r['arm']} | "
            + " | ".join(f"{100 * r['per_task'][t]:+.1f}" for t in tasks)
            + " |\n"
        )
    return out


def write_report(sw, path: Path, log) -> dict:
    recs = load_records(sw.root)
    regime, means = regime_table(sw, recs)
    test_md, rows = test_table(sw, recs)
    md = (
        "# Zero-shot-head text benchmark — generated tables\n\n"
        "Generated by `python bench/quality/zeroshot.py --report-only` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f" ({sw.m.version()}, commit {os.environ.get('TADROP_COMMIT', 'working tree')})."
        "\n\n## Regime (test, accuracy %)\n\n"
        + regime
        + "\n## Validation search (λ tuned per arm)\n\n"
        + search_table(recs)
        + "\n## Validation search over the wider family (3-point λ neighbourhood of uniform's)\n\n"
        + family_table(recs.get("family", {}))
        + "\n## Test: each arm against uniform at the same kept fraction (points)\n\n"
        + test_md
    )
    md += direction_table(sw, recs)
    md += per_task_table(sw.b.tasks, rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(md)
    write_json(path.with_suffix(".json"), {"means": means, "test": rows, "cells": recs["cells"], "refs": recs["refs"]})
    log(f"report: {path}")
    return {"means": means, "test": rows}


# ---------------------------------------------------------------- main


def make_sweep(quick, tag, log, max_evals=8, ft_steps=None):
    from bench_zeroshot import ZeroShotBench
    from mergers import make_merger
    from sweep import Sweep

    bench = ZeroShotBench(quick=quick, log=log, ft_steps=ft_steps)
    return Sweep(bench, make_merger("tadrop", log), log=log, tag=f"zeroshot_{tag}", remerge=True, max_evals=max_evals)


def finetune_only(quick, tasks, log, ft_steps=None) -> None:
    """Fine-tune `tasks` (those not cached yet) and nothing else: two processes given disjoint tasks
    share the fine-tuning. Start the second once the first has written base/ and heads."""
    from bench_zeroshot import ZeroShotBench

    bench = ZeroShotBench(quick=quick, log=log, ft_steps=ft_steps)
    unknown = sorted(set(tasks) - set(bench.tasks))
    if unknown:
        raise SystemExit(f"--finetune: not tasks of this benchmark: {unknown}")
    for t in tasks:
        if not (bench.ft_dir(t) / "model.safetensors").exists():
            bench.finetune(t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 tasks, short fine-tunes, TIES at kept 0.2 only")
    ap.add_argument(
        "--ft-steps",
        type=int,
        default=None,
        help="fine-tuning steps per task (default: bench_zeroshot's, 400 full / 60 quick); each "
        "step count has its own cache folder (bench_zeroshot.bench_root)",
    )
    ap.add_argument(
        "--finetune",
        nargs="+",
        default=None,
        metavar="TASK",
        help="only fine-tune these tasks, then exit (run two at once with disjoint tasks)",
    )
    ap.add_argument("--hosts", nargs="*", default=None)
    ap.add_argument("--densities", nargs="*", type=float, default=None)
    ap.add_argument("--seeds", type=int, default=RANDOM_SEEDS, help="seeds of the random hosts")
    ap.add_argument("--arms", nargs="*", default=None, help="among uniform, plus0.2, minus0.2")
    ap.add_argument("--tag", default="main", help="records file of this share (run shares in parallel)")
    ap.add_argument("--no-refs", action="store_true")
    ap.add_argument(
        "--family",
        action="store_true",
        help="validation search over family_grid() on --hosts x --densities (default ties, "
        "magnitude_prune x 0.1, 0.2) instead of the direction cells",
    )
    ap.add_argument("--family-arms", nargs="*", default=None, help="a subset of family_grid()'s names")
    ap.add_argument("--wide", action="store_true", help="with --family: only wide_grid()'s arms (statistics, minmax)")
    ap.add_argument(
        "--test-arm", default=None, help="a family_grid() name: test it against uniform on --hosts x --densities"
    )
    ap.add_argument(
        "--lam-start",
        type=float,
        default=None,
        help="where every arm's lambda hill climb starts (a point of the 2^(k/2) grid; default: the "
        "host's scale_start); the climb still extends until the best point is interior",
    )
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared 2-core machine, 2 threads ran 3-5x slower)",
    )
    ap.add_argument("--report", default=None)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    steps = f"_steps{args.ft_steps}" if args.ft_steps is not None else ""
    log = Log(CACHE / "logs" / f"zeroshot_{args.tag}{'_quick' if args.quick else ''}{steps}.log")
    if args.finetune:
        return finetune_only(args.quick, args.finetune, log, args.ft_steps)
    sw = make_sweep(args.quick, args.tag, log, ft_steps=args.ft_steps)
    report_path = Path(args.report) if args.report else sw.b.root / "report" / "zeroshot.md"
    if not args.report_only:
        if not args.no_refs:
            regime_references(sw, log)
        if args.family:
            grid = {
                k: v
                for k, v in family_grid().items()
                if (not args.family_arms or k in args.family_arms)
                and (not args.wide or k in wide_grid())
                and tadrop_accepts(v)
            }
            log(f"family grid: {sorted(grid)}")
            hb = [(h, d) for h in (args.hosts or HOSTS) for d in (args.densities or [0.1, 0.2])]
            run_family_search(sw, hb, grid, log)
            return write_report(sw, report_path, log)
        if args.test_arm:
            td = family_grid()[args.test_arm]
            run_direction(
                sw,
                args.hosts or HOSTS,
                args.densities or DENSITIES,
                {"uniform": None, args.test_arm: td},
                args.seeds,
                log,
                start=args.lam_start,
            )
            return write_report(sw, report_path, log)
        arms = {"uniform": None}
        for name, g in STRENGTHS.items():
            if tadrop_accepts(arm_settings(g)):
                arms[name] = arm_settings(g)
            else:
                log(f"arm {name}: this tadrop refuses strength {g}; skipped")
        if args.arms:
            arms = {k: v for k, v in arms.items() if k in args.arms}
        hosts = args.hosts or (["ties"] if args.quick else HOSTS)
        densities = args.densities or ([0.2] if args.quick else DENSITIES)
        run_direction(sw, hosts, densities, arms, args.seeds, log, start=args.lam_start)
    return write_report(sw, report_path, log)


if __name__ == "__main__":
    main()
