"""Arm − uniform across several sets of fine-tunes (fine-tuning runs), on the same test items.

One set = the 8 tasks fine-tuned once (bench_vit.py --ft-seed N); every set is merged and scored
by the same cells (zeroshot.run_direction: λ hill-climbed on validation per arm, merged at that λ
by `tadrop merge`, scored on test). Per cell and set, d_s = mean over tasks of the per-item
difference arm − uniform. Across the n sets:

- mean and sd of d_s, and a t-interval mean ± t(0.975, n−1) · sd / √n (sets as the only noise);
- a two-way bootstrap: each replicate draws n sets with replacement AND the test items of every
  task with replacement (the same item indices for every set and both arms: the test items are
  the same in every set), and takes the mean over the drawn sets of the paired difference. It
  carries both the fine-tuning runs' spread and the test items'; with n = 3 its set part can
  only take 10 distinct multisets, so the t-interval is the stricter one to read.

Rows also pool the three budgets of a host ("mean" row): the mean over budgets of the same
quantities, under the same replicates.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from common import write_json
from scipy import stats

COMPARISONS = [
    ("uniform", "strength/model/plus0.2"),
    ("uniform", "strength/model/minus0.2"),
    ("strength/model/plus0.2", "strength/model/minus0.2"),
    # the wider search's validation winner (bench_vit.wider_grid), tested after that search
    ("uniform", "gini/model/plus0.2"),
    # the validation winner over both benchmarks (docs/tadrop.md), the default since 2026-12-02 13:30 UTC
    ("uniform", "minmax/model/minus0.2"),
]


def per_item_diffs(sw, cells: dict, a: str, b: str, method: str, density: float) -> dict | None:
    """task -> per-item (b − a) on test for one set (seed 0 of the host), or None if a cell is missing."""
    ca, cb = cells.get((method, density, a)), cells.get((method, density, b))
    if ca is None or cb is None or "0" not in ca["seeds"] or "0" not in cb["seeds"]:
        return None
    ra, rb = sw.test_result(ca["seeds"]["0"]["test_key"]), sw.test_result(cb["seeds"]["0"]["test_key"])
    return {t: rb[t].astype(np.float64) - ra[t].astype(np.float64) for t in sw.b.tasks}


def set_diff(d: dict) -> float:
    """d_s = mean over tasks of the mean per-item difference."""
    return float(np.mean([v.mean() for v in d.values()]))


def t_interval(x: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """mean ± t(level, n−1) · sd / √n over independent repeats; (nan, nan) below 2 repeats."""
    n = len(x)
    if n < 2:
        return float("nan"), float("nan")
    h = stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / np.sqrt(n)
    return float(x.mean() - h), float(x.mean() + h)


def draws(n_sets: int, n_items: dict, n_boot: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """The replicates shared by every cell: set indices [B, n_sets], item indices per task [B, N_t]."""
    rng = np.random.default_rng(seed)
    sets = rng.integers(0, n_sets, size=(n_boot, n_sets))
    items = {t: rng.integers(0, n, size=(n_boot, n)) for t, n in n_items.items()}
    return sets, items


def two_way_boot(diffs: list[dict], sets: np.ndarray, items: dict) -> np.ndarray:
    """[B] replicates of mean over drawn sets of (mean over tasks of the mean over drawn items)."""
    n_boot = len(sets)
    per_set = np.zeros((len(diffs), n_boot))  # [n_sets, B]: each set's difference on each item draw
    for t, idx in items.items():
        for s, d in enumerate(diffs):
            per_set[s] += d[t][idx].mean(axis=1)
    per_set /= len(items)
    return per_set[sets, np.arange(n_boot)[:, None]].mean(axis=1)


def summarise(per_set: list[float], boot: np.ndarray) -> dict:
    x = np.asarray(per_set)
    t_lo, t_hi = t_interval(x)
    return {
        "per_set": [float(v) for v in x],
        "diff": float(x.mean()),
        "sd": float(x.std(ddof=1)) if len(x) > 1 else float("nan"),
        "t_lo": t_lo,
        "t_hi": t_hi,
        "lo": float(np.percentile(boot, 2.5)),
        "hi": float(np.percentile(boot, 97.5)),
    }


def replication_rows(sweeps: dict, recs: dict, hosts, densities, n_boot: int = 2000) -> list[dict]:
    """One row per (host, budget or 'mean', comparison) over the sets that have every needed cell."""
    seeds = list(sweeps)
    first = sweeps[seeds[0]]
    cells = {s: {(c["method"], c["density"], c["arm"]): c for c in recs[s]["cells"].values()} for s in seeds}
    tasks = list(first.b.tasks)
    sets, items = draws(len(seeds), {t: first.b.n_items(t, "test") for t in tasks}, n_boot)
    rows = []
    for a, b in COMPARISONS:
        for m in hosts:
            pooled_sets, pooled_boot = [], []
            for d in densities:
                diffs = [per_item_diffs(sweeps[s], cells[s], a, b, m, d) for s in seeds]
                if any(x is None for x in diffs):
                    continue
                per_set = [set_diff(x) for x in diffs]
                boot = two_way_boot(diffs, sets, items)
                rows.append(dict(method=m, density=d, arm=b, against=a, sets=seeds, **summarise(per_set, boot)))
                pooled_sets.append(per_set)
                pooled_boot.append(boot)
            if len(pooled_sets) == len(densities) > 1:
                per_set = list(np.mean(pooled_sets, axis=0))
                boot = np.mean(pooled_boot, axis=0)
                rows.append(dict(method=m, density="mean", arm=b, against=a, sets=seeds, **summarise(per_set, boot)))
    return rows


def _p(x: float) -> str:
    return f"{100 * x:+.2f}"


def table(rows: list[dict], seeds: list) -> str:
    head = (
        "| host | kept | comparison | "
        + " | ".join(f"set {s}" for s in seeds)
        + " | mean ± sd | 95% t-interval (sets) | 95% two-way bootstrap (sets × items) |\n|---|---|---|"
        + "---|" * (len(seeds) + 3)
        + "\n"
    )
    body = ""
    for r in rows:
        body += (
            f"| {r['method']} | {r['density']} | {r['arm']} − {r['against']} | "
            + " | ".join(_p(v) for v in r["per_set"])
            + f" | **{_p(r['diff'])}** ± {100 * r['sd']:.2f} | [{_p(r['t_lo'])}, {_p(r['t_hi'])}]"
            + f" | [{_p(r['lo'])}, {_p(r['hi'])}] |\n"
        )
    return head + body


def regime_rows(sweeps: dict, recs: dict) -> str:
    """Per set: the mean of the fine-tunes, dense task arithmetic (λ tuned) and uniform TIES /
    magnitude prune at 0.2 (test, %; the base + head is the same in every set)."""
    out = (
        "| set | fine-tunes | task arithmetic (λ) | uniform TIES 0.2 | uniform magnitude prune 0.2 |\n"
        "|---|---|---|---|---|\n"
    )
    for s, sw in sweeps.items():
        tasks = sw.b.tasks
        try:
            ft_s = f"{100 * np.mean([sw.ft_test(t).mean() for t in tasks]):.1f}"
        except FileNotFoundError:
            ft_s = "(not scored)"
        ta = recs[s]["refs"].get("ta_dense")
        ta_s = f"{100 * sw.avg(sw.test_result(ta['test_key'])):.1f} ({ta['lam']:g})" if ta else "(not run)"
        u = {
            c["method"]: 100 * c["seeds"]["0"]["test"]
            for c in recs[s]["cells"].values()
            if c["arm"] == "uniform" and c["density"] == 0.2 and "0" in c["seeds"]
        }
        cols = [f"{u[m]:.1f}" if m in u else "" for m in ("ties", "magnitude_prune")]
        out += f"| {s} | {ft_s} | {ta_s} | " + " | ".join(cols) + " |\n"
    return out


def write_report(
    sweeps: dict, load_records, path: Path, log, hosts=("ties", "magnitude_prune"), densities=None, base: str = ""
):
    """`base`: the options naming the pretrained base in the printed command ("" for base 0)."""
    densities = densities or [0.1, 0.2, 0.3]
    recs = {s: load_records(sw.root) for s, sw in sweeps.items()}
    rows = replication_rows(sweeps, recs, list(hosts), densities)
    seeds = list(sweeps)
    md = (
        "# ViT benchmark: arm − uniform over sets of fine-tunes — generated tables\n\n"
        f"Generated by `python bench/quality/bench_vit.py{base} --replication-report {' '.join(map(str, seeds))}"
        + (f" --hosts {' '.join(hosts)}" if tuple(hosts) != ("ties", "magnitude_prune") else "")
        + (f" --densities {' '.join(map(str, densities))}" if densities != [0.1, 0.2, 0.3] else "")
        + "` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Points of mean test accuracy over the 8 tasks; "
        "λ tuned on validation per arm and set.\n\n## Per set (test, %)\n\n"
        + regime_rows(sweeps, recs)
        + "\n## Arm − uniform per set, and over the sets (points)\n\n"
        + table(rows, seeds)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(md)
    # 'test' rows in the shape of zeroshot.test_table's (method, density, arm, diff, lo, hi): plot.py draws them
    write_json(path.with_suffix(".json"), {"test": rows, "sets": seeds, "interval": "two-way bootstrap"})
    log(f"replication report: {path}")
    return rows
