"""A tiny in-memory reference merge, ONLY to test the benchmark pipeline before `tadrop` existed.

It follows mergekit's semantics loosely and a minimal TADrop (no streaming, no plan details).
Nothing reported in docs/ comes from here: the report refuses results made with it.
"""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _load(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def _score(t, stat):
    x = t.flatten().float()
    a = x.abs()
    if stat == "kurtosis":
        m = x.mean()
        v = ((x - m) ** 2).mean()
        return float(((x - m) ** 4).mean() / (v**2 + 1e-30) - 3)
    if stat == "hoyer":
        n = x.numel()
        return float((n**0.5 - a.sum() / (a.norm() + 1e-30)) / (n**0.5 - 1))
    if stat == "cv":
        return float(a.std() / (a.mean() + 1e-30))
    raise ValueError(stat)


def plan(recipe):
    base = _load(recipe["base_model"])
    td = recipe.get("tadrop")
    out = {}
    for mi, m in enumerate(recipe["models"]):
        p = 1.0 - m["parameters"].get("density", 1.0)
        ft = _load(m["model"])
        names = [k for k in base if base[k].is_floating_point() and not torch.equal(ft[k], base[k])]
        ratios = {k: p for k in names}
        if td and p > 0:
            big = [k for k in names if base[k].numel() >= td.get("min_numel", 4096)]
            sc = {k: _score(ft[k] - base[k], td.get("statistic", "kurtosis")) for k in big}
            order = sorted(big, key=lambda k: sc[k])
            s = {k: (i / (len(order) - 1) if len(order) > 1 else 0.5) for i, k in enumerate(order)}
            if td.get("normalize", "rank") == "minmax":
                lo, hi = min(sc.values()), max(sc.values())
                s = {k: (sc[k] - lo) / (hi - lo + 1e-30) for k in big}
            g = td.get("strength", 0.2)
            raw = {k: p + g * (1 - 2 * s[k]) for k in big}
            n = {k: base[k].numel() for k in big}
            tot = sum(n.values())

            def clip(v):
                return min(max(v, 0.0), 0.99)

            lo_, hi_ = -1.0, 1.0
            for _ in range(60):
                mid = (lo_ + hi_) / 2
                mean = sum(clip(raw[k] + mid) * n[k] for k in big) / tot
                lo_, hi_ = (mid, hi_) if mean < p else (lo_, mid)
            for k in big:
                ratios[k] = clip(raw[k] + (lo_ + hi_) / 2)
        out[mi] = ratios
    return out


def merge(recipe, out_dir: Path):
    mm = recipe["merge_method"]
    base = _load(recipe["base_model"])
    lam = recipe.get("parameters", {}).get("lambda", 1.0)
    seed = recipe.get("seed", 0)
    models = recipe["models"]
    ratios = plan(recipe) if mm != "linear" else None
    merged = {}
    for k, b in base.items():
        if not b.is_floating_point():
            merged[k] = b
            continue
        taus, ws = [], []
        for mi, m in enumerate(models):
            ft = _load_cached(m["model"])
            tau = ft[k].float() - b.float()
            w = m["parameters"].get("weight", 1.0)
            if mm == "linear":
                taus.append(tau)
                ws.append(w)
                continue
            p = ratios[mi].get(k, 0.0)
            if p > 0:
                if mm.startswith("dare"):
                    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{mi}:{k}".encode()))
                    keep = torch.rand(tau.shape, generator=gen) >= p
                    tau = tau * keep / (1 - p)
                else:
                    n = tau.numel()
                    kk = max(1, round((1 - p) * n))
                    a = tau.abs().flatten()
                    if mm.startswith("breadcrumbs"):
                        top = max(0, round(0.01 * n))
                        idx = a.argsort(descending=True)[top : top + kk]
                    else:
                        idx = a.topk(kk).indices
                    mask = torch.zeros(n, dtype=torch.bool)
                    mask[idx] = True
                    tau = tau * mask.view(tau.shape)
            taus.append(tau)
            ws.append(w)
        T = torch.stack([w * t for w, t in zip(ws, taus, strict=True)])
        if mm == "linear":
            merged[k] = (b.float() + T.sum(0)).to(b.dtype)
            continue
        if mm in ("ties", "dare_ties", "breadcrumbs_ties"):
            sign = torch.sign(T.sum(0))
            agree = (torch.sign(T) == sign) & (T != 0)
            T = T * agree
            cnt = agree.float().sum(0).clamp(min=1)
            mt = T.sum(0) / cnt
        else:
            mt = T.sum(0)
        merged[k] = (b.float() + lam * mt).to(b.dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in merged.items()}, str(out_dir / "model.safetensors"))
    for f in Path(recipe["base_model"]).iterdir():
        if f.is_file() and f.suffix in (".json", ".txt") and f.name != "model.safetensors.index.json":
            shutil.copy(f, out_dir / f.name)


_CACHE = {}


def _load_cached(folder):
    if folder not in _CACHE:
        if len(_CACHE) > 16:
            _CACHE.clear()
        _CACHE[folder] = _load(folder)
    return _CACHE[folder]
