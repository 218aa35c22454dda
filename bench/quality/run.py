#!/usr/bin/env python
"""TADrop quality benchmark: one command for everything.

    python bench/quality/run.py            # full: image benchmark, then text benchmark (~1 h CPU)
    python bench/quality/run.py --quick    # smoke-sized text benchmark (< 5 min)
    python bench/quality/run.py --bench images
    python bench/quality/run.py --bench vit   # the ViT benchmark in the paper's regime (bench_vit.py)

Data, fine-tuned checkpoints, merges and per-item results are cached under
bench/.cache/quality/ (git-ignored); a re-run only redoes what is missing. The full run writes
docs/quality_results.md and docs/quality_{text,images}.png; --quick writes its report into the
cache folder. Merges are made by `tadrop merge` (subprocess), never in-process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, DOCS, Log, set_threads  # noqa: E402

# "task arithmetic with a drop" is magnitude_prune (see recipes.py); plain task arithmetic is a
# reference row (it has no drop ratio, so TADrop cannot enter it).
ALL_METHODS = [
    "magnitude_prune",
    "ties",
    "dare",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "consensus_ta",
    "consensus_ties",
    "tsv_m",
    "iso_cts",
]
QUICK_METHODS = ["magnitude_prune", "ties", "dare", "della", "consensus_ties", "tsv_m"]

# TADrop settings used when no ablation is run (quick mode, --no-ablation); set from the full
# run's validation ablation (docs/quality.md explains the choice).
DEFAULT_TADROP = {"statistic": "hoyer", "normalize": "rank", "strength": 0.2, "preserve_budget": True}

SWEEPS = {
    ("text", False): dict(
        methods=ALL_METHODS, densities=[0.1, 0.3], seeds=3, ablation_hosts=[["ties", 0.1], ["dare", 0.1]]
    ),
    # quick (CI smoke test, < 5 min): three classic hosts and three of the stronger ones
    ("text", True): dict(methods=QUICK_METHODS, densities=[0.2], seeds=1, ablation_hosts=None),
    ("images", False): dict(
        methods=ALL_METHODS,
        densities=[0.05, 0.1, 0.2, 0.4],
        seeds=3,
        ablation_hosts=[["ties", 0.1], ["dare", 0.1], ["magnitude_prune", 0.1]],
    ),
    ("images", True): dict(methods=QUICK_METHODS, densities=[0.1], seeds=1, ablation_hosts=None),
}
ABLATION = dict(
    stats=["kurtosis", "hoyer", "cv", "gini", "topmass"], norms=["rank", "minmax"], strengths=[0.1, 0.2, 0.35, 0.5]
)


def _cpu_seconds():
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def check_summary(s: dict, tolerance: float = 0.03) -> list[str]:
    """Loose assertions for the CI smoke run; each could fail on a broken merge.

    - every merge (each method and arm) beats the base on average test accuracy;
    - TIES is not below dense task arithmetic by more than `tolerance`;
    - every cell's test score comes from a real `tadrop merge` (the CLI's summary was read).
    """
    problems = []
    base = s["refs"]["base"]["avg"]
    ta = s["refs"]["ta_dense"]["avg"]
    if not s["cells"]:
        problems.append("no merge cells were scored")
    for c in s["cells"]:
        label = f"{c['method']} d={c['density']} {c['arm']}"
        if not c["avg"] > base:
            problems.append(f"{label}: average test accuracy {c['avg']:.4f} is not above the base's {base:.4f}")
        if c["method"] == "ties" and c["avg"] < ta - tolerance:
            problems.append(f"{label}: {c['avg']:.4f} is more than {tolerance} below task arithmetic's {ta:.4f}")
    if s["refs"]["average"]["avg"] <= base:
        problems.append("plain averaging does not beat the base: the fine-tunes learned nothing")
    return problems


def make_bench(kind, quick, log):
    if kind == "text":
        from bench_text import TextBench

        return TextBench(quick=quick, log=log)
    from bench_images import ImageBench

    return ImageBench(quick=quick, log=log)


def run_one(kind, args, log):
    import report
    from mergers import make_merger
    from sweep import Sweep

    cfg = dict(SWEEPS[(kind, args.quick)])
    if args.seeds:
        cfg["seeds"] = args.seeds
    t0 = time.time()
    c0 = _cpu_seconds()
    bench = make_bench(kind, args.quick, log)
    merger = make_merger(args.merger, log)
    sw = Sweep(bench, merger, log=log, remerge=not args.quick, max_evals=3 if args.quick else 8)
    log(f"[{kind}] data + heads + fine-tunes ready after {time.time() - t0:.0f}s")
    sw.references()
    ablation = None
    td = dict(DEFAULT_TADROP)
    if cfg["ablation_hosts"] and not args.no_ablation:
        chosen, rows = sw.ablate([tuple(h) for h in cfg["ablation_hosts"]], DEFAULT_TADROP, **ABLATION)
        ablation = {"hosts": cfg["ablation_hosts"], "rows": rows, "chosen": chosen}
        if kind == "text" and not args.keep_default:
            td = dict(chosen)  # the text ablation picks the settings for both benchmarks
    if args.tadrop_json:
        import json

        td = json.loads(args.tadrop_json)
    # the rank hosts run at their own default budget: each task keeps 1/T of the rank
    from recipes import RANK_HOSTS

    by_method = {m: [round(1 / len(bench.tasks), 6)] for m in RANK_HOSTS}
    sw.main(cfg["methods"], cfg["densities"], {"uniform": None, "tadrop": td}, cfg["seeds"], by_method)
    extra = {"wall_s": time.time() - t0, "cpu_s": _cpu_seconds() - c0}
    s = report.summarize(sw, cfg, ablation=ablation, tadrop_cfg=td, extra=extra)
    spath = bench.root / f"summary_{merger.name}.json"
    report.save_summary(s, spath)
    log(
        f"[{kind}] done in {time.time() - t0:.0f}s wall, {_cpu_seconds() - c0:.0f}s CPU "
        f"(this process + tadrop subprocesses); summary {spath}"
    )
    return s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 text tasks, few steps, 1 budget, 1 seed")
    ap.add_argument(
        "--bench",
        choices=["text", "images", "all", "zeroshot", "vit"],
        default=None,
        help="default: all (full) / text (quick); zeroshot = zero-shot heads (zeroshot.py); "
        "vit = a small ViT under its frozen head (bench_vit.py)",
    )
    ap.add_argument(
        "--merger",
        choices=["tadrop", "reference"],
        default="tadrop",
        help="'reference' = in-process stand-in, only to test this pipeline",
    )
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument(
        "--keep-default", action="store_true", help="use DEFAULT_TADROP even when the ablation prefers other settings"
    )
    ap.add_argument("--tadrop-json", default=None, help="override the TADrop block (JSON)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", default=None, help="markdown path (default: docs/ or cache)")
    ap.add_argument(
        "--check", action="store_true", help="exit 1 unless the loose sanity checks hold (the CI smoke test)"
    )
    args, rest = ap.parse_known_args(argv)
    if args.bench == "zeroshot":  # its own options: python bench/quality/zeroshot.py --help
        import zeroshot

        return zeroshot.main(
            rest
            + (["--quick"] if args.quick else [])
            + ["--threads", str(args.threads)]
            + (["--seeds", str(args.seeds)] if args.seeds else [])
            + (["--report", args.report] if args.report else [])
        )
    if args.bench == "vit":  # its own options: python bench/quality/bench_vit.py --help
        import bench_vit

        return bench_vit.main(
            rest
            + (["--quick"] if args.quick else [])
            + ["--threads", str(args.threads)]
            + (["--seeds", str(args.seeds)] if args.seeds else [])
            + (["--report", args.report] if args.report else [])
        )
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    set_threads(args.threads)
    try:
        os.nice(0)
    except OSError:
        pass
    kinds = {"text": ["text"], "images": ["images"], "all": ["images", "text"]}[
        args.bench or ("text" if args.quick else "all")
    ]
    log = Log(CACHE / "logs" / f"run{'_quick' if args.quick else ''}.log")
    import report

    summaries = {}
    for kind in kinds:
        summaries[kind] = run_one(kind, args, log)
    # the full report shows every benchmark whose summary exists (a run of one keeps the other)
    if not args.quick:
        for kind in ("text", "images"):
            if kind not in summaries:
                p = CACHE / kind / f"summary_{'tadrop-cli' if args.merger == 'tadrop' else 'reference-standin'}.json"
                got = report.load_summaries({kind: p})
                summaries.update(got)
    if args.report:
        md = Path(args.report)
    elif args.quick or args.merger != "tadrop":
        md = CACHE / "report" / ("quality_quick.md" if args.quick else "quality_results.md")
    else:
        md = DOCS / "quality_results.md"
    header = (
        "# TADrop quality benchmark — generated results\n\nGenerated by "
        f"`python bench/quality/run.py{' --quick' if args.quick else ''}`; the reading and "
        "the choice of defaults are in [quality.md](quality.md).\n"
    )
    if args.merger != "tadrop":
        header += "\n**PIPELINE TEST ONLY: merges by the in-process reference stand-in, not tadrop.**\n"
    report.write_report(summaries, md, md.with_name("quality"), header=header)
    log(f"report: {md}")
    if args.check:
        problems = [f"{kind}: {p}" for kind, s in summaries.items() if kind in kinds for p in check_summary(s)]
        for p in problems:
            log("CHECK FAILED", p)
        if problems:
            raise SystemExit(1)
        log(
            f"checks passed: {sum(len(s['cells']) for k, s in summaries.items() if k in kinds)} merges all beat "
            "the base; TIES within 3 points of task arithmetic"
        )
    return summaries


if __name__ == "__main__":
    main()
