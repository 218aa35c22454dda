#!/usr/bin/env python3
"""Compare two merged checkpoints tensor by tensor; print a JSON summary.

    python bench/speed/compare_outputs.py DIR_A DIR_B [--tensors NAME ...]

Both folders hold safetensors (sharded with model.safetensors.index.json, or
one or more *.safetensors files). Tensors are compared in float32. The summary
has, over all common tensors (or the ones named):

    max_abs_diff       largest |a - b|
    mean_abs_diff      mean |a - b| over all entries
    frac_differ        share of entries where a != b
    frac_over_1ulp     share of entries where |a - b| is more than one bf16
                       spacing of max(|a|, |b|) (i.e. not explained by one
                       rounding of a bfloat16 output)
    worst              the tensor with the largest max_abs_diff
    frac_differ_outside_ties / max_abs_diff_outside_ties
                       only with --inputs BASE FT... --density D: the same,
                       leaving out entries where some fine-tune's |delta| (in
                       float32) equals that tensor's top-k magnitude threshold
                       (k = int(D * numel), as mergekit's `magnitude`). Which
                       of several equal magnitudes a top-k keeps is arbitrary
                       (mergekit uses an unstable argsort), so differences
                       there say nothing about correctness.
    missing_in_a/b     tensor names present in only one folder
    dtypes             the stored dtypes seen in each folder

Run it with an interpreter that has torch and safetensors (the main venv).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def tensor_files(d: Path) -> dict[str, Path]:
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
        return {k: d / v for k, v in wm.items()}
    out: dict[str, Path] = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = f
    return out


class Reader:
    def __init__(self, d: Path):
        self.map = tensor_files(d)
        self.handles: dict[Path, object] = {}

    def get(self, name: str) -> torch.Tensor:
        f = self.map[name]
        if f not in self.handles:
            self.handles[f] = safe_open(str(f), "pt")
        return self.handles[f].get_tensor(name)


def bf16_spacing(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bfloat16 numbers at |x| (8 significant bits)."""
    ax = x.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(ax)) - 7)


def tie_mask(name: str, base: Reader, fts: list[Reader], density: float) -> torch.Tensor:
    """Entries where some fine-tune's |delta| sits exactly at its top-k threshold."""
    bt = base.get(name).float()
    n = bt.numel()
    k = max(1, int(density * n))
    mask = torch.zeros(bt.shape, dtype=torch.bool)
    for ft in fts:
        d = (ft.get(name).float() - bt).abs_()
        thr = d.reshape(-1).kthvalue(n - k + 1).values
        mask |= d == thr
    return mask


def compare(
    a_dir: Path,
    b_dir: Path,
    names: list[str] | None = None,
    inputs: list[Path] | None = None,
    density: float | None = None,
) -> dict:
    a, b = Reader(a_dir), Reader(b_dir)
    tie_base = Reader(inputs[0]) if inputs and density is not None else None
    tie_fts = [Reader(p) for p in inputs[1:]] if tie_base else []
    n_out = 0
    max_out = 0.0
    common = sorted(set(a.map) & set(b.map))
    if names:
        common = [n for n in names if n in a.map and n in b.map]
    n_tot = 0
    n_diff = 0
    n_ulp = 0
    abs_sum = 0.0
    max_abs = 0.0
    worst = None
    dtypes_a, dtypes_b = set(), set()
    per: dict[str, float] = {}
    for name in common:
        ta, tb = a.get(name), b.get(name)
        dtypes_a.add(str(ta.dtype).replace("torch.", ""))
        dtypes_b.add(str(tb.dtype).replace("torch.", ""))
        if ta.shape != tb.shape:
            per[name] = float("inf")
            worst = name
            max_abs = float("inf")
            continue
        fa, fb = ta.float(), tb.float()
        d = (fa - fb).abs()
        m = float(d.max()) if d.numel() else 0.0
        per[name] = m
        n_tot += d.numel()
        n_diff += int((d > 0).sum())
        n_ulp += int((d > bf16_spacing(torch.maximum(fa.abs(), fb.abs()))).sum())
        if tie_base is not None:
            outside = d.masked_fill(tie_mask(name, tie_base, tie_fts, density), 0)
            n_out += int((outside > 0).sum())
            if outside.numel():
                max_out = max(max_out, float(outside.max()))
        abs_sum += float(d.double().sum())
        if m >= max_abs:
            max_abs, worst = m, name
    extra = {}
    if tie_base is not None:
        extra = {"frac_differ_outside_ties": n_out / n_tot if n_tot else 0.0, "max_abs_diff_outside_ties": max_out}
    return {
        **extra,
        "a": str(a_dir),
        "b": str(b_dir),
        "tensors": len(common),
        "elements": n_tot,
        "max_abs_diff": max_abs,
        "mean_abs_diff": abs_sum / n_tot if n_tot else 0.0,
        "frac_differ": n_diff / n_tot if n_tot else 0.0,
        "frac_over_1ulp": n_ulp / n_tot if n_tot else 0.0,
        "worst": worst,
        "missing_in_a": sorted(set(b.map) - set(a.map)),
        "missing_in_b": sorted(set(a.map) - set(b.map)),
        "dtypes_a": sorted(dtypes_a),
        "dtypes_b": sorted(dtypes_b),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--tensors", nargs="*", default=None)
    ap.add_argument(
        "--inputs",
        nargs="+",
        type=Path,
        default=None,
        help="base and fine-tune folders of the merge, for the top-k tie analysis",
    )
    ap.add_argument("--density", type=float, default=None, help="the merge's top-k density")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    print(json.dumps(compare(args.a, args.b, args.tensors, args.inputs, args.density)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
