"""Summaries (JSON) and the generated report (markdown tables + PNG plot)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from common import paired_bootstrap, read_json, write_json
from recipes import LABELS, is_random


def _mean_res(results):
    """Seed-mean per-item correctness: dict task -> float array."""
    return {t: np.mean([r[t].astype(np.float64) for r in results], axis=0) for t in results[0]}


def _item_se(res_mean, norm=None):
    tasks = list(res_mean)
    norm = norm or {t: 1.0 for t in tasks}
    var = sum(np.var(res_mean[t] / norm[t], ddof=1) / len(res_mean[t]) for t in tasks) / len(tasks) ** 2
    return float(math.sqrt(var))


def summarize(sw, sweep_cfg: dict, ablation=None, tadrop_cfg=None, extra=None) -> dict:
    b = sw.b
    tasks = list(b.tasks)
    refs = sw.records["refs"]
    ft = {t: float(sw.ft_test(t).mean()) for t in tasks}
    norm = ft

    def per_task(res):
        return {t: float(res[t].mean()) for t in tasks}

    def row(res_list):
        m = _mean_res(res_list)
        pt = {t: float(m[t].mean()) for t in tasks}
        return {
            "test": pt,
            "avg": float(np.mean(list(pt.values()))),
            "norm_avg": float(np.mean([pt[t] / norm[t] for t in tasks])),
            "se": _item_se(m),
            "se_norm": _item_se(m, norm),
            "avg_per_seed": [float(np.mean([r[t].mean() for t in tasks])) for r in res_list],
        }

    out = {
        "kind": b.kind,
        "quick": b.quick,
        "merger": sw.m.name,
        "merger_version": sw.m.version(),
        "tasks": tasks,
        "task_desc": {t: b.task_description(t) for t in tasks},
        "n": {t: {s: b.n_items(t, s) for s in ("train", "val", "test")} for t in tasks},
        "bench_cfg": b.cfg,
        "sweep_cfg": sweep_cfg,
        "tadrop_cfg": tadrop_cfg,
        "refs": {
            "finetuned": {"test": ft, "avg": float(np.mean(list(ft.values()))), "norm_avg": 1.0},
            "base": row([sw.test_result(refs["base"]["test_key"])]),
            "average": row([sw.test_result(refs["average"]["test_key"])]),
            "ta_dense": dict(row([sw.test_result(refs["ta_dense"]["test_key"])]), lam=refs["ta_dense"]["lam"]),
            **(
                {"iso_c": dict(row([sw.test_result(refs["iso_c"]["test_key"])]), lam=refs["iso_c"]["lam"])}
                if "iso_c" in refs
                else {}
            ),
        },
        "cells": [],
        "comparisons": [],
    }
    cells = sw.records.get("cells", {})
    want_td = tadrop_cfg
    for method in sweep_cfg["methods"]:
        for d in sorted({c["density"] for c in cells.values() if c["method"] == method}):
            pair = {}
            for arm in ("uniform", "tadrop"):
                cand = [
                    c
                    for c in cells.values()
                    if c["method"] == method
                    and c["density"] == d
                    and c["arm"] == arm
                    and (arm == "uniform" or c["tadrop"] == want_td)
                ]
                if not cand:
                    continue
                c = cand[0]
                seeds = sorted(c["seeds"], key=int)[: sweep_cfg["seeds"] if is_random(method) else 1]
                res = [sw.test_result(c["seeds"][s]["test_key"]) for s in seeds]
                r = row(res)
                r.update(
                    method=method,
                    density=d,
                    arm=arm,
                    lam=c["lam"],
                    val=c.get("val"),
                    val_grid=c["val_grid"],
                    seeds=len(seeds),
                    consistency_maxabs=c.get("consistency_maxabs"),
                )
                out["cells"].append(r)
                pair[arm] = res
            if len(pair) == 2:
                pairs = list(zip(pair["uniform"], pair["tadrop"], strict=True))
                a = paired_bootstrap(pairs, tasks)
                n_ = paired_bootstrap(pairs, tasks, norm=norm)
                out["comparisons"].append({"method": method, "density": d, "abs": a, "norm": n_})
    if ablation is not None:
        out["ablation"] = ablation
    out["timing"] = {
        "merge_s_mean": float(np.mean(sw.merge_seconds)) if sw.merge_seconds else None,
        "merges_this_run": len(sw.merge_seconds),
        "val_eval_s_mean": float(np.mean(sw.eval_seconds["val"])) if sw.eval_seconds["val"] else None,
        "test_eval_s_mean": float(np.mean(sw.eval_seconds["test"])) if sw.eval_seconds["test"] else None,
        "consistency_maxabs": max(sw.consistency) if sw.consistency else None,
    }
    if extra:
        out.update(extra)
    return out


# ---------------------------------------------------------------- markdown


def _f(x, nd=1):
    return "–" if x is None else f"{100 * x:.{nd}f}"


def _d(x, nd=2):
    return f"{100 * x:+.{nd}f}"


def markdown(s: dict) -> str:
    tasks = s["tasks"]
    L = []
    kind = "Text (all-MiniLM-L6-v2)" if s["kind"] == "text" else "Images (small CNN pretrained on Fashion-MNIST)"
    L.append(f"## {kind}{' — QUICK MODE' if s['quick'] else ''}\n")
    L.append(
        f"Merges by `{s['merger']}` ({s['merger_version']}). Accuracy in %, on the test split; "
        "*norm.* = accuracy divided by the task's own fine-tuned accuracy, averaged over tasks. "
        "λ chosen on the validation split.\n"
    )
    L.append("| task | classes / description | train / val / test |\n|---|---|---|")
    for t in tasks:
        n = s["n"][t]
        L.append(f"| {t} | {s['task_desc'][t]} | {n['train']} / {n['val']} / {n['test']} |")
    L.append("")
    # references
    r = s["refs"]
    L.append("### References (test accuracy per task)\n")
    L.append("| model | " + " | ".join(tasks) + " | avg | norm. |")
    L.append("|---|" + "---|" * (len(tasks) + 2))
    L.append(
        "| each task's own fine-tune | "
        + " | ".join(_f(r["finetuned"]["test"][t]) for t in tasks)
        + f" | {_f(r['finetuned']['avg'])} | 100.0 |"
    )
    for k, name in (
        ("base", "base + frozen heads"),
        ("average", "plain average of weights"),
        ("ta_dense", f"task arithmetic, no drop (λ={r['ta_dense']['lam']:g})"),
        ("iso_c", f"Iso-C, no budget (λ={r['iso_c']['lam']:g})" if "iso_c" in r else ""),
    ):
        if k not in r:
            continue
        x = r[k]
        L.append(
            f"| {name} | "
            + " | ".join(_f(x["test"][t]) for t in tasks)
            + f" | {_f(x['avg'])} ± {_f(1.96 * x['se'])} | {_f(x['norm_avg'])} |"
        )
    L.append("")
    # main comparison
    L.append("### Uniform ratio vs TADrop at the same kept-entry budget\n")
    L.append(
        f"TADrop settings: `{s.get('tadrop_cfg')}`. Δ = TADrop − uniform, paired on the same "
        "test items (95% bootstrap CI over items; for random methods averaged over seeds, "
        "with the per-seed Δ listed).\n"
    )
    L.append(
        "| method | kept | uniform: λ | avg | norm. | TADrop: λ | avg | norm. "
        "| Δ avg [95% CI] | Δ norm. | seeds (Δ per seed) |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    cells = {(c["method"], c["density"], c["arm"]): c for c in s["cells"]}
    for cmp in s["comparisons"]:
        m, d = cmp["method"], cmp["density"]
        u, t = cells[(m, d, "uniform")], cells[(m, d, "tadrop")]
        a, n = cmp["abs"], cmp["norm"]
        sig = "**" if a["lo"] > 0 or a["hi"] < 0 else ""
        ps = " ".join(_d(x, 1) for x in a["per_seed"]) if len(a["per_seed"]) > 1 else ""
        L.append(
            f"| {LABELS[m]} | {d:g} | {u['lam']:g} | {_f(u['avg'])} | {_f(u['norm_avg'])} | "
            f"{t['lam']:g} | {_f(t['avg'])} | {_f(t['norm_avg'])} | "
            f"{sig}{_d(a['diff'])}{sig} [{_d(a['lo'])}, {_d(a['hi'])}] | {_d(n['diff'])} | "
            f"{u['seeds']} {('(' + ps + ')') if ps else ''} |"
        )
    if s["comparisons"]:
        allg = [c["abs"]["diff"] for c in s["comparisons"]]
        wins = sum(c["abs"]["lo"] > 0 for c in s["comparisons"])
        losses = sum(c["abs"]["hi"] < 0 for c in s["comparisons"])
        L.append(
            f"\nOver {len(allg)} method × budget pairs: mean Δ {_d(float(np.mean(allg)))} points; "
            f"CI above 0 in {wins}, below 0 in {losses}, overlapping 0 in {len(allg) - wins - losses}.\n"
        )
    # per task
    L.append("### Per-task test accuracy (mean over seeds)\n")
    L.append("| method | kept | arm | " + " | ".join(tasks) + " | avg | norm. |")
    L.append("|---|---|---|" + "---|" * (len(tasks) + 2))
    for c in s["cells"]:
        L.append(
            f"| {LABELS[c['method']]} | {c['density']:g} | {c['arm']} | "
            + " | ".join(_f(c["test"][t]) for t in tasks)
            + f" | {_f(c['avg'])} | {_f(c['norm_avg'])} |"
        )
    L.append("")
    L.append("### Per-task Δ (TADrop − uniform, points)\n")
    L.append("| method | kept | " + " | ".join(tasks) + " | avg |")
    L.append("|---|---|" + "---|" * (len(tasks) + 1))
    for cmp in s["comparisons"]:
        L.append(
            f"| {LABELS[cmp['method']]} | {cmp['density']:g} | "
            + " | ".join(_d(cmp["abs"]["per_task"][t], 1) for t in tasks)
            + f" | {_d(cmp['abs']['diff'], 2)} |"
        )
    L.append("")
    if s.get("ablation"):
        ab = s["ablation"]
        L.append("### Ablation of TADrop's settings (validation split only)\n")
        L.append(
            f"Hosts: {', '.join(f'{LABELS[m]} @ kept {d:g}' for m, d in ab['hosts'])}. "
            "One factor at a time; each configuration and uniform get the best of the same "
            "three λ values (the uniform arm's tuned λ and its √2 neighbours). Gain = validation "
            "accuracy minus uniform's, averaged over hosts.\n"
        )
        hosts = [f"{m}@{d}" for m, d in ab["hosts"]]
        L.append("| statistic | normalize | strength | " + " | ".join(hosts) + " | mean gain |")
        L.append("|---|---|---|" + "---|" * (len(hosts) + 1))
        for row in ab["rows"]:
            c = row["config"]
            L.append(
                f"| {c['statistic']} | {c['normalize']} | {c['strength']:g} | "
                + " | ".join(_d(row["per_host"][h]["val"] - row["per_host"][h]["uniform"]) for h in hosts)
                + f" | {_d(row['gain'])} |"
            )
        L.append(f"\nChosen: `{ab['chosen']}`.\n")
    tm = s.get("timing", {})
    if tm.get("consistency_maxabs") is not None:
        L.append(
            f"Check: the CLI's merge at the chosen λ matched base + λ·(its λ=1 merge − base) "
            f"to max |Δw| = {tm['consistency_maxabs']:.2e}.\n"
        )
    return "\n".join(L)


# ---------------------------------------------------------------- plot


def plot(s: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        print("matplotlib not available: plot skipped")
        return False
    cells = {(c["method"], c["density"], c["arm"]): c for c in s["cells"]}
    methods = list(dict.fromkeys(c["method"] for c in s["comparisons"]))
    dens = sorted(set(c["density"] for c in s["comparisons"]))
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    w = 0.8 / (2 * len(dens))
    colors = {"uniform": "#888888", "tadrop": "#d62728"}
    for j, d in enumerate(dens):
        for a, arm in enumerate(("uniform", "tadrop")):
            xs, ys, es = [], [], []
            for i, m in enumerate(methods):
                c = cells.get((m, d, arm))
                if c is None:
                    continue
                xs.append(i - 0.4 + w * (2 * j + a) + w / 2)
                ys.append(100 * c["norm_avg"])
                es.append(100 * 1.96 * c["se_norm"])
            ax.bar(
                xs,
                ys,
                w,
                yerr=es,
                capsize=2,
                color=colors[arm],
                alpha=0.45 + 0.55 * (j + 1) / len(dens),
                label=f"{arm} (kept {d:g})",
                edgecolor="black",
                linewidth=0.3,
            )
    r = s["refs"]
    for k, ls, name in (("base", ":", "base"), ("average", "--", "plain average"), ("ta_dense", "-.", "TA, no drop")):
        ax.axhline(100 * r[k]["norm_avg"], ls=ls, color="black", lw=1, label=name)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([LABELS[m] for m in methods], rotation=15)
    ax.set_ylabel("normalised accuracy, % of own fine-tune (test)")
    lo = min([100 * c["norm_avg"] for c in s["cells"]] + [100 * r["base"]["norm_avg"]])
    ax.set_ylim(max(0, lo - 5), 101)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.set_title("uniform ratio vs TADrop (error bars: 95% CI over test items)")
    ax = axes[1]
    for j, d in enumerate(dens):
        xs, ys, lo_, hi_ = [], [], [], []
        for i, m in enumerate(methods):
            cmp = [c for c in s["comparisons"] if c["method"] == m and c["density"] == d]
            if not cmp:
                continue
            a = cmp[0]["abs"]
            xs.append(i + (j - (len(dens) - 1) / 2) * 0.2)
            ys.append(100 * a["diff"])
            lo_.append(100 * (a["diff"] - a["lo"]))
            hi_.append(100 * (a["hi"] - a["diff"]))
        ax.errorbar(xs, ys, yerr=[lo_, hi_], fmt="o", capsize=3, label=f"kept {d:g}")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([LABELS[m] for m in methods], rotation=15)
    ax.set_ylabel("Δ avg accuracy, TADrop − uniform (points)")
    ax.set_title("paired difference, 95% CI")
    ax.legend(fontsize=7)
    kind = "text: MiniLM, 8 WordNet/fortune tasks" if s["kind"] == "text" else "images: CNN, 8 (Fashion-)MNIST tasks"
    fig.suptitle(f"TADrop quality benchmark — {kind}{' (QUICK)' if s['quick'] else ''}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(summaries: dict, md_path: Path, png_prefix: Path, header: str = "") -> None:
    parts = [header] if header else []
    for kind in ("text", "images"):
        s = summaries.get(kind)
        if s is None:
            continue
        png = png_prefix.with_name(f"{png_prefix.name}_{kind}.png")
        ok = plot(s, png)
        parts.append(markdown(s))
        if ok:
            rel = png.name if png.parent == md_path.parent else str(png)
            parts.append(f"![uniform vs TADrop, {kind}]({rel})\n")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(parts) + "\n")


def load_summaries(paths: dict) -> dict:
    return {k: read_json(p) for k, p in paths.items() if p and Path(p).exists()}


def save_summary(s, path):
    write_json(path, s)
