#!/usr/bin/env python
"""TADrop in the paper's regime, with images: the small ViT of vit.py under its frozen head.

    python bench/quality/run.py --bench vit                  # every stage below, then the report
    python bench/quality/bench_vit.py --stage finetune --tasks rot90 invert   # a share of the fine-tunes
    python bench/quality/bench_vit.py --stage search --hosts ties --tag s1    # a share of the search
    python bench/quality/bench_vit.py --stage test --hosts dare --tag t1      # a share of the test
    python bench/quality/bench_vit.py --report-only
    python bench/quality/bench_vit.py --ft-seed 1 --stage test --hosts ties --arms strength/model/plus0.2
    python bench/quality/bench_vit.py --replication-report 0 1 2     # arm − uniform over sets of fine-tunes

Stages (each resumable: finished records and evaluations are cached under bench/.cache/quality/vit):
1. finetune: pretrain the base, fine-tune the 8 tasks under the frozen head.
2. refs: base + head, each fine-tune, dense task arithmetic (λ tuned on validation).
3. search (validation only): uniform vs strength {+0.2, -0.2, -0.4} x scope {model, kind, layer}
   with the default statistic, and the knob-free allocations mass, mass_reverse and global; then
   (wider_grid) the statistics kurtosis, cv, gini, topmass and minmax normalisation at strength
   +-0.2 and the L2 mass allocations; for TIES and magnitude prune at kept 0.1/0.2/0.3. Every arm,
   uniform included, gets the same λ grid (the 3-point neighbourhood of uniform's hill-climbed λ:
   zeroshot.run_family_search).
4. test: the validation winner (`--arm`, default: the search's winner) against uniform for every
   host and budget, λ hill-climbed on validation per arm, 3 seeds for the random hosts, paired
   bootstrap on test (zeroshot.run_direction, common.paired_bootstrap).
Every merge is made by `tadrop merge` in a subprocess (mergers.CliMerger).

Sets of fine-tunes: `--ft-seed N` (N > 0) fine-tunes the 8 tasks again from the same base with
another minibatch order (vit.finetune_seed) into vit/ft_seedN/, which holds that set's records and
evaluations; set 0 is the first run's. `--replication-report` compares arms over the sets
(replication.py: per set, mean ± sd, a t-interval and a sets × items bootstrap).

Pretrained bases: `--base-seed N` (N > 0) pretrains another base with the same recipe and
another init and minibatch order (vit.pretrain_seed) into vit/base_seedN/base/; that base's
sets of fine-tunes (`--ft-seed`), records and evaluations live under vit/base_seedN/ as base 0's
live under vit/. Base 0 is the first run's.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zeroshot  # noqa: E402
from common import CACHE, Log, read_json, set_threads, write_json  # noqa: E402

SEARCH_HOSTS = ["ties", "magnitude_prune"]
SEARCH_DENSITIES = [0.1, 0.2, 0.3]
STRENGTHS = {"plus0.2": 0.2, "minus0.2": -0.2, "minus0.4": -0.4}
# the hosts of the issue; Consensus is TALL-masked TIES here (consensus_ta ran too where time allowed)
TEST_HOSTS = ["ties", "magnitude_prune", "dare", "dare_ties", "della", "breadcrumbs", "consensus_ties"]
RANK_HOSTS = ["tsv_m", "iso_cts"]
RANK_SHARES = [0.125]  # each of the 8 tasks keeps 1/8 of the rank: the hosts' own default
RANDOM_SEEDS = 3
WIDER_STATISTICS = ["kurtosis", "cv", "gini", "topmass"]  # hoyer (the default) ran in the first search
# the replication over sets of fine-tunes (--ft-seed): the direction question on the search hosts
REPLICATION_ARMS = ["strength/model/plus0.2", "strength/model/minus0.2"]


def search_grid() -> dict:
    """Candidate TADrop settings (TADROP.md 2b), named as in zeroshot.family_grid."""
    td = zeroshot.TD_BASE
    grid = {}
    # in the order they run (a search cut short leaves the first): the direction question first
    for scope in ("model", "layer", "kind"):
        for name, g in STRENGTHS.items():
            extra = {} if scope == "model" else {"allocation": "strength", "scope": scope}
            grid[f"strength/{scope}/{name}"] = dict(td, strength=g, **extra)
    grid["global"] = dict(td, allocation="global")
    for alloc in ("mass_reverse", "mass"):
        grid[f"{alloc}/l1"] = dict(td, allocation=alloc, mass_norm="l1")
    grid.update(wider_grid())
    return grid


def wider_grid() -> dict:
    """The rest of the issue's family (part 2), after the first run's arms: the other statistics
    (TadropSettings.statistic) and min-max normalisation at strength +-0.2, model scope; the
    knob-free mass allocations on L2 mass. Arms in the order they run."""
    td = zeroshot.TD_BASE
    grid = {}
    for stat in WIDER_STATISTICS:
        for name in ("plus0.2", "minus0.2"):
            grid[f"{stat}/model/{name}"] = dict(td, statistic=stat, strength=STRENGTHS[name])
    for name in ("plus0.2", "minus0.2"):
        grid[f"minmax/model/{name}"] = dict(td, normalize="minmax", strength=STRENGTHS[name])
    for alloc in ("mass", "mass_reverse"):
        grid[f"{alloc}/l2"] = dict(td, allocation=alloc, mass_norm="l2")
    return grid


def make_sweep(quick, tag, log, ft_seed=0, base_seed=0):
    from mergers import make_merger
    from sweep import Sweep
    from vit import ViTBench

    bench = ViTBench(quick=quick, log=log, ft_seed=ft_seed, base_seed=base_seed)
    return Sweep(bench, make_merger("tadrop", log), log=log, tag=f"vit_{tag}", remerge=True, max_evals=8)


def set_complete(quick: bool, ft_seed: int, log, base_seed: int = 0) -> bool:
    """Whether every task of set `ft_seed` of base `base_seed` is fine-tuned (a report must not
    start fine-tuning)."""
    from vit import FULL, QUICK, set_root

    root = set_root(quick, ft_seed, base_seed)
    missing = [t for t in (QUICK if quick else FULL)["tasks"] if not (root / "ft" / t / "model.safetensors").exists()]
    if missing:
        log(f"set {ft_seed}: not fine-tuned yet ({', '.join(missing)}): left out")
    return not missing


def log_suffix(ft_seed: int, base_seed: int) -> str:
    """The log file's suffix: "" for base 0's set 0 (the first run's names), _bN for base N, _sM for set M."""
    return (f"_b{base_seed}" if base_seed else "") + (f"_s{ft_seed}" if ft_seed else "")


def load_records(root: Path) -> dict:
    """All shares' records merged (each share writes records_vit_<tag>.json)."""
    merged = {"refs": {}, "cells": {}, "family": {}}
    for p in sorted(glob.glob(str(root / "records_vit_*.json"))):
        r = read_json(p, {})
        for k in merged:
            merged[k].update(r.get(k, {}))
    return merged


def complete_family(fam: dict) -> dict:
    """The search records of the arms that ran on every host-budget uniform ran on (a search cut
    short must not compare an arm's mean gain over some budgets with another's over all)."""
    hb = {(c["method"], c["density"]) for c in fam.values() if c["arm"] == "uniform"}
    done = {}
    for c in fam.values():
        done.setdefault(c["arm"], set()).add((c["method"], c["density"]))
    return {k: c for k, c in fam.items() if done[c["arm"]] >= hb}


def winner(root: Path) -> str | None:
    name, _ = zeroshot.family_choice(complete_family(load_records(root)["family"]))
    return name


def family_gain_table(fam: dict, arms=None) -> str:
    """Validation gain over uniform (points) per host-budget and its mean, for `arms` in that order
    (default: every arm, as they ran)."""
    hb = sorted({(c["method"], c["density"]) for c in fam.values() if c["arm"] == "uniform"})
    present = [a for a in dict.fromkeys(c["arm"] for c in fam.values()) if a != "uniform"]
    names = [a for a in arms if a in present] if arms else present
    out = "| arm | " + " | ".join(f"{m} {d}" for m, d in hb) + " | mean |\n|---|" + "---|" * (len(hb) + 1) + "\n"
    for a in names:
        gains = [
            100 * (fam[f"{m}|{d}|{a}"]["val"] - fam[f"{m}|{d}|uniform"]["val"]) if f"{m}|{d}|{a}" in fam else None
            for m, d in hb
        ]
        done = [g for g in gains if g is not None]
        mean = f"**{sum(done) / len(done):+.2f}**" + ("" if len(done) == len(hb) else f" ({len(done)} of {len(hb)})")
        out += f"| {a} | " + " | ".join("" if g is None else f"{g:+.2f}" for g in gains) + f" | {mean} |\n"
    return out


def requirements_table(sw, means: dict) -> str:
    tasks = sw.b.tasks
    base = means["base + zero-shot heads"]
    ft = means["each task's fine-tune"]
    ta = [v for k, v in means.items() if k.startswith("task arithmetic")]
    ties = [v for k, v in means.items() if k.startswith("TIES")]
    n_test = min(sw.b.n_items(t, "test") for t in tasks)
    n_val = min(sw.b.n_items(t, "val") for t in tasks)
    rows = [
        ("8 tasks", f"{len(tasks)}"),
        ("fine-tunes ≥ 25 points above base + head", f"{100 * (ft - base):+.1f} ({100 * ft:.1f} vs {100 * base:.1f})"),
        (
            "task arithmetic ≥ 10 points below the fine-tunes",
            f"{100 * (ft - ta[0]):.1f} below ({100 * ta[0]:.1f})" if ta else "(not run)",
        ),
        ("≥ 1,000 test items per task", f"{n_test} per task (validation {n_val})"),
        ("TIES (kept 0.2, uniform) for reference", f"{100 * ties[0]:.1f}" if ties else "(not run)"),
    ]
    return "| requirement | here |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)


def write_report(sw, path: Path, log) -> dict:
    recs = load_records(sw.root)
    regime, means = zeroshot.regime_table(sw, recs)
    regime = regime.replace("base + zero-shot heads", "base + frozen head")  # the base's own classifier
    test_md, rows = zeroshot.test_table(sw, recs)
    pre = read_json(sw.b.base_dir / "finetune.json", {})
    md = (
        "# ViT benchmark in the paper's regime — generated tables\n\n"
        "Generated by `python bench/quality/bench_vit.py --report-only"
        + (f" --base-seed {sw.b.base_seed}" if sw.b.base_seed else "")
        + "` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} ({sw.m.version()}, commit "
        f"{os.environ.get('TADROP_COMMIT', 'working tree')}). Base: Fashion-MNIST test accuracy "
        f"{100 * pre.get('fashion_test_acc', float('nan')):.1f}% after {pre.get('pretrain_steps')} steps.\n\n"
        "## Regime (test, accuracy %)\n\n"
        + regime
        + "\n"
        + requirements_table(sw, means)
        + "\n## Validation search (same 3-point λ neighbourhood for every arm; validation accuracy %)\n\n"
        + zeroshot.family_table(recs["family"])
        + "\n### The same, as gains over uniform (validation, points)\n\n"
        + family_gain_table(recs["family"])
        + "\n## Test: each arm against uniform at the same kept fraction (points)\n\n"
        + test_md
    )
    md += zeroshot.direction_table(sw, recs, "strength/model/plus0.2", "strength/model/minus0.2")
    md += zeroshot.per_task_table(sw.b.tasks, rows)
    md += "\n## λ tuning of the test cells (validation)\n\n" + zeroshot.search_table(recs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(md)
    write_json(path.with_suffix(".json"), {"means": means, "test": rows, "cells": recs["cells"], "refs": recs["refs"]})
    log(f"report: {path}")
    return {"means": means, "test": rows}


def run_search(sw, hosts, densities, arms, log):
    grid = {k: v for k, v in search_grid().items() if not arms or k in arms}
    zeroshot.run_family_search(sw, [(h, d) for h in hosts for d in densities], grid, log)


def run_test(sw, hosts, densities, arm_names, seeds, log):
    grid = search_grid()
    arms = {"uniform": None, **{a: grid[a] for a in arm_names if a != "uniform"}}  # uniform first: always
    # budgets outside, hosts inside: a run cut short leaves every host at the first budgets
    sparse = [h for h in hosts if h not in RANK_HOSTS]
    for d in densities or SEARCH_DENSITIES:
        zeroshot.run_direction(sw, sparse, [d], arms, seeds, log)
        for h in [h for h in hosts if h in RANK_HOSTS]:
            zeroshot.run_direction(sw, [h], RANK_SHARES, arms, seeds, log)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["all", "finetune", "refs", "search", "test"], default="all")
    ap.add_argument("--quick", action="store_true", help="3 tasks, short training (pipeline check only)")
    ap.add_argument("--tasks", nargs="*", default=None, help="finetune stage: only these tasks")
    ap.add_argument("--hosts", nargs="*", default=None)
    ap.add_argument("--densities", nargs="*", type=float, default=None)
    ap.add_argument("--arms", nargs="*", default=None, help="search: a subset of search_grid(); test: the arms")
    ap.add_argument("--seeds", type=int, default=RANDOM_SEEDS)
    ap.add_argument("--tag", default="main", help="records file of this share (run shares in parallel)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    ap.add_argument("--report", default=None)
    ap.add_argument(
        "--ft-seed",
        type=int,
        default=0,
        help="which set of fine-tunes (0: the first run's; N > 0 in vit/ft_seedN/ with its own records)",
    )
    ap.add_argument(
        "--base-seed",
        type=int,
        default=0,
        help="which pretrained base (0: the first run's, in vit/; N > 0 pretrained with seed N in "
        "vit/base_seedN/, which holds its sets of fine-tunes, records and evaluations)",
    )
    ap.add_argument(
        "--replication-report",
        nargs="*",
        type=int,
        default=None,
        metavar="FT_SEED",
        help="only the replication tables over these sets of fine-tunes (default 0 1 2)",
    )
    args = ap.parse_args(argv)
    set_threads(args.threads)
    seed_tag = log_suffix(args.ft_seed, args.base_seed)
    log = Log(CACHE / "logs" / f"vit_{args.tag}{seed_tag}{'_quick' if args.quick else ''}.log")
    if args.replication_report is not None:
        import replication

        sets = [s for s in args.replication_report or [0, 1, 2] if set_complete(args.quick, s, log, args.base_seed)]
        if not sets:
            raise SystemExit("no complete set of fine-tunes: run --stage finetune --ft-seed N first")
        sweeps = {s: make_sweep(args.quick, "report", log, ft_seed=s, base_seed=args.base_seed) for s in sets}
        out = Path(args.report) if args.report else sweeps[sets[0]].b.root / "report" / "vit_replication.md"
        base = f" --base-seed {args.base_seed}" if args.base_seed else ""
        hosts = tuple(args.hosts or ("ties", "magnitude_prune"))
        return replication.write_report(sweeps, load_records, out, log, hosts, args.densities, base)
    if args.stage == "finetune":
        from vit import ViTBench

        b = ViTBench(quick=args.quick, log=log, ft_seed=args.ft_seed, base_seed=args.base_seed)
        for t in args.tasks or b.tasks:
            if not (b.ft_dir(t) / "model.safetensors").exists():
                b.finetune(t)
        return None
    sw = make_sweep(args.quick, args.tag, log, ft_seed=args.ft_seed, base_seed=args.base_seed)
    report_path = Path(args.report) if args.report else sw.b.root / "report" / "vit.md"
    if not args.report_only:
        if args.stage in ("all", "refs"):
            zeroshot.regime_references(sw, log)
        if args.stage in ("all", "search"):
            run_search(sw, args.hosts or SEARCH_HOSTS, args.densities or SEARCH_DENSITIES, args.arms, log)
        if args.stage in ("all", "test"):
            arms = args.arms or [winner(sw.root)]
            if arms == [None]:
                raise SystemExit("no search records: run --stage search first, or name --arms")
            log(f"test arms: {arms}")
            run_test(sw, args.hosts or TEST_HOSTS + RANK_HOSTS, args.densities, arms, args.seeds, log)
    return write_report(sw, report_path, log)


if __name__ == "__main__":
    main()
