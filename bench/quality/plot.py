#!/usr/bin/env python
"""Arm − uniform with its 95% interval, per host × kept fraction, one panel per arm.

    python bench/quality/plot.py --bench vit                       # docs/img/quality_vit.png
    python bench/quality/plot.py --bench zeroshot                  # docs/img/quality_zeroshot.png
    python bench/quality/plot.py --bench vit_replication           # over the sets of fine-tunes
    python bench/quality/plot.py --json a.json --out b.png --title "..."

Input: a report JSON whose "test" rows have method, density, arm, diff, lo, hi (fractions, as
zeroshot.test_table and replication.replication_rows write them; a row's "against", when
present, names its reference arm, else uniform). Needs matplotlib (the bench's extra:
`pip install -e .[bench]`), never tadrop itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, DOCS, read_json  # noqa: E402

HOST_LABELS = {
    "ties": "TIES",
    "magnitude_prune": "magnitude prune",
    "dare": "DARE",
    "dare_ties": "DARE-TIES",
    "della": "DELLA",
    "breadcrumbs": "breadcrumbs",
    "consensus_ties": "Consensus TIES",
    "consensus_ta": "Consensus TA",
    "tsv_m": "TSV-M",
    "iso_cts": "Iso-CTS",
}
DEFAULT_JSON = {
    "vit": CACHE / "vit" / "report" / "vit.json",
    "zeroshot": CACHE / "zeroshot" / "steps400" / "report" / "zeroshot.json",  # bench_zeroshot.bench_root
    "vit_replication": CACHE / "vit" / "report" / "vit_replication.json",
}
TITLES = {
    "vit": "images: small ViT, 8 Fashion-MNIST domains, frozen head",
    "zeroshot": "text: MiniLM, 8 tasks, zero-shot heads",
    "vit_replication": "images: small ViT, mean over 3 sets of fine-tunes (interval: sets × test items bootstrap)",
}


def panels(rows: list[dict]) -> dict:
    """comparison label -> [(x label, diff, lo, hi)] in points; x = host × kept, hosts in row order."""
    out = {}
    for r in rows:
        against = r.get("against", "uniform")
        label = f"{r['arm']} − {against}"
        host = HOST_LABELS.get(r["method"], r["method"])
        kept = r["density"] if isinstance(r["density"], str) else f"{r['density']:g}"
        out.setdefault(label, []).append((f"{host} {kept}", 100 * r["diff"], 100 * r["lo"], 100 * r["hi"]))
    return out


def draw(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pan = panels(rows)
    if not pan:
        raise SystemExit("no arm − uniform rows in this report: nothing to draw")
    n = len(pan)
    cols = 2 if n == 4 else min(n, 3)  # 4 panels as 2 x 2
    nrows = (n + cols - 1) // cols
    width = max(len(v) for v in pan.values())
    size = (max(7.5, min(4.5 * cols, 0.45 * width * cols + 1.5)), 1.0 + 3.0 * nrows)
    fig, axes = plt.subplots(nrows, cols, figsize=size, squeeze=False, sharey=True)
    for ax, (label, pts) in zip(axes.flat, pan.items(), strict=False):
        xs = range(len(pts))
        ys = [p[1] for p in pts]
        err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
        colors = ["#2b8a3e" if p[2] > 0 else "#c92a2a" if p[3] < 0 else "#495057" for p in pts]
        for x, y, lo, hi, c in zip(xs, ys, err[0], err[1], colors, strict=True):
            ax.errorbar([x], [y], yerr=[[lo], [hi]], fmt="o", ms=4, capsize=2, color=c, lw=1)
        ax.axhline(0, color="black", lw=0.7)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([p[0] for p in pts], rotation=60, ha="right", fontsize=7)
        ax.set_title(label, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", lw=0.3, alpha=0.5)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy, points", fontsize=8)
    fig.suptitle(f"{title}\narm − reference on test, 95% interval (green / red: above / below 0)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", choices=sorted(DEFAULT_JSON), default="vit")
    ap.add_argument("--json", default=None, help="report JSON (default: the bench's report in the cache)")
    ap.add_argument("--out", default=None, help="PNG path (default: docs/img/quality_<bench>.png)")
    ap.add_argument("--title", default=None)
    ap.add_argument("--arms", nargs="*", default=None, help="only these arms (panels)")
    args = ap.parse_args(argv)
    src = Path(args.json) if args.json else DEFAULT_JSON[args.bench]
    rep = read_json(src)
    if rep is None:
        raise SystemExit(f"{src}: no such report JSON (run the benchmark's report first)")
    rows = [r for r in rep.get("test", []) if not args.arms or r["arm"] in args.arms]
    out = Path(args.out) if args.out else DOCS / "img" / f"quality_{args.bench}.png"
    draw(rows, out, args.title or TITLES[args.bench])
    print(f"{out} ({out.stat().st_size // 1024} KB)")
    return out


if __name__ == "__main__":
    main()
