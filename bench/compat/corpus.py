"""Run the corpus of real mergekit recipes (tests/data/mergekit_corpus/) with tadrop, and
optionally with mergekit 0.1.5 as an oracle, on tiny stand-in models.

    python bench/compat/corpus.py                       # which recipes tadrop runs unchanged
    python bench/compat/corpus.py --mergekit /work/mkvenv/bin   # and compare with mergekit

A recipe "runs" when `tadrop merge RECIPE OUT` exits 0 on the recipe as written (only the model
names are replaced by the stand-ins' folders). With --mergekit, every recipe is run again by
both tools at `dtype: float32` and the outputs are compared tensor by tensor: deterministic
methods by their largest absolute difference, random ones (DARE, DELLA) by their keys, shapes
and the fraction of entries that moved off the base (over all tensors of 256 entries or more).
Results: a Markdown table on stdout and bench/compat/results/corpus.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from mergekit_standins import layers_needed, localize, standin_models  # noqa: E402

CORPUS = REPO / "tests" / "data" / "mergekit_corpus"
RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear")


def _run(command: list[str], timeout: int = 600) -> tuple[int, str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
    return done.returncode, (lines[-1] if lines else "")


def _tadrop(recipe: Path, out: Path, multi: bool) -> tuple[int, str]:
    steps = ["-I", str(out.parent / f"{out.name}-intermediate")] if multi else []
    return _run([sys.executable, "-m", "tadrop_cli", "merge", str(recipe), str(out), "--quiet", *steps])


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _compare(ours: Path, theirs: Path, base: Path, random: bool) -> dict:
    a, b, ref = _tensors(ours), _tensors(theirs), _tensors(base)
    if set(a) != set(b):
        return {
            "match": False,
            "why": f"keys differ: only tadrop {sorted(set(a) - set(b))[:3]}, "
            f"only mergekit {sorted(set(b) - set(a))[:3]}",
        }
    worst, worst_name, moved = 0.0, "", []
    for name in a:
        if a[name].shape != b[name].shape:
            return {"match": False, "why": f"{name}: shape {tuple(a[name].shape)} vs {tuple(b[name].shape)}"}
        x, y = a[name].float(), b[name].float()
        if random and name in ref and ref[name].shape == x.shape and x.numel() >= 256:
            base_t = ref[name].float()
            moved.append(((x != base_t).sum().item(), (y != base_t).sum().item(), x.numel()))
            continue
        if random:
            continue  # small tensors: too few entries for a kept fraction to say anything
        diff = (x - y).abs().max().item() if x.numel() else 0.0
        if diff > worst:
            worst, worst_name = diff, name
    if random:
        # over all those tensors together: one tensor's fraction is too noisy to compare
        entries = max(1, sum(n for _, _, n in moved))
        gap = abs(sum(p for p, _, _ in moved) - sum(q for _, q, _ in moved)) / entries
        return {"match": gap < 0.02, "moved_fraction_gap": gap}
    return {"match": worst <= 1e-5, "max_abs_diff": worst, "worst_tensor": worst_name}


def _method(text: str) -> str:
    import yaml

    docs = [d for d in yaml.safe_load_all(text) if d]
    return str(docs[-1].get("merge_method", "")) if docs else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mergekit", type=Path, help="folder holding mergekit-yaml and mergekit-multi (0.1.5)")
    parser.add_argument("--only", nargs="*", help="recipe names (file stems) to run")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "compat" / "results" / "corpus.json")
    args = parser.parse_args(argv)

    recipes = sorted(CORPUS.glob("*.yaml"))
    if args.only:
        recipes = [r for r in recipes if r.stem in args.only]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tadrop-corpus-") as tmp:
        tmp = Path(tmp)
        for recipe in recipes:
            text = recipe.read_text()
            layers = layers_needed(text)
            folders = standin_models(tmp / f"models-{layers}", layers)
            work = tmp / recipe.stem
            work.mkdir()
            (work / "recipe.yaml").write_text(localize(text, folders))
            multi = "\n---" in text  # mergekit-multi's form: the named merges go to an intermediate folder
            started = time.perf_counter()
            rc, last = _tadrop(work / "recipe.yaml", work / "tadrop", multi)
            row = {
                "recipe": recipe.stem,
                "method": _method(text),
                "tadrop_rc": rc,
                "tadrop_message": "" if rc == 0 else last,
                "seconds": round(time.perf_counter() - started, 2),
            }
            if args.mergekit:
                (work / "f32.yaml").write_text(localize(text, folders, {"dtype": "float32"}))
                if multi:
                    cmd = [
                        str(args.mergekit / "mergekit-multi"),
                        str(work / "f32.yaml"),
                        "--intermediate-dir",
                        str(work / "mk-intermediate"),
                        "--out-path",
                        str(work / "mergekit"),
                    ]
                else:
                    cmd = [str(args.mergekit / "mergekit-yaml"), str(work / "f32.yaml"), str(work / "mergekit")]
                mk_rc, mk_last = _run(
                    [*cmd, "--allow-crimes", "--out-shard-size", "1B", "--lora-merge-cache", str(tmp / "lora-cache")]
                )
                row["mergekit_rc"], row["mergekit_message"] = mk_rc, "" if mk_rc == 0 else mk_last
                if mk_rc == 0:
                    rc32, last32 = _tadrop(work / "f32.yaml", work / "tadrop32", multi)
                    if rc32 == 0:
                        row.update(
                            _compare(
                                work / "tadrop32", work / "mergekit", folders["base"], row["method"] in RANDOM_METHODS
                            )
                        )
                    else:
                        row.update({"match": False, "why": f"tadrop at float32: {last32}"})
            rows.append(row)
            print(json.dumps(row), flush=True)
    runs = sum(r["tadrop_rc"] == 0 for r in rows)
    print(f"\n{runs} of {len(rows)} recipes run unchanged ({100 * runs / max(1, len(rows)):.0f}%)\n")
    print("| recipe | method | tadrop | mergekit | comparison |\n|---|---|---|---|---|")
    for r in rows:
        ours = "runs" if r["tadrop_rc"] == 0 else f"exit {r['tadrop_rc']}: {r['tadrop_message'][:90]}"
        theirs = "" if "mergekit_rc" not in r else ("runs" if r["mergekit_rc"] == 0 else "fails")
        if "max_abs_diff" in r:
            comparison = f"max abs diff {r['max_abs_diff']:.2e}"
        elif "moved_fraction_gap" in r:
            comparison = f"random: moved-fraction gap {r['moved_fraction_gap']:.3f}"
        else:
            comparison = r.get("why", "")
        print(f"| {r['recipe']} | {r['method']} | {ours} | {theirs} | {comparison} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
