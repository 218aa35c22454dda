"""The sweep: references, scale tuning on validation, uniform vs TADrop per host method.

Scale (lambda) tuning: `tadrop merge` is run once at lambda = 1 and the validation accuracy of
base + lambda * (merged - base) is measured on a geometric grid (factor sqrt 2) by hill climbing
from a per-method start until the best point is interior. Every merge method multiplies its
merged task vector by lambda last, so this equals a merge at lambda; the chosen lambda is then
merged again by `tadrop merge` and *that* checkpoint is scored on the test split (the maximum
difference between the two is recorded as a check of the CLI). Both arms get exactly the same
procedure. Random methods are tuned on seed 0; every seed is scored on test.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from common import read_json, stable_hash, write_json
from recipes import is_random, linear_recipe, make_recipe, scale_start, write_recipe

K_MIN, K_MAX = -10, 6  # lambda grid 2^(k/2): 0.031 ... 8
MAX_EVALS = 8


def lam_of(k: int) -> float:
    return round(2.0 ** (k / 2.0), 6)


def k_of(lam: float) -> int:
    return int(round(2 * math.log2(lam)))


def state_digest(state: dict) -> str:
    """sha1 over the sorted tensors' names, dtypes, shapes and bytes: equal iff the weights are equal."""
    h = hashlib.sha1()
    for name in sorted(state):
        v = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.view(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


class LazyMerge:
    """A merged state dict, produced by the merger on first use."""

    def __init__(self, sweep, recipe):
        self.sweep = sweep
        self.recipe = recipe
        self._state = None
        self.info = None

    def state(self):
        if self._state is None:
            self._state, self.info = self.sweep.merge_state(self.recipe)
        return self._state

    @property
    def loaded(self):
        return self._state is not None

    def drop(self):
        self._state = None


def _strip(recipe):
    r = dict(recipe)
    r.pop("output", None)
    return r


class Sweep:
    def __init__(self, bench, merger, log=print, tag="main", remerge=True, max_evals=MAX_EVALS):
        self.max_evals = max_evals  # lambda values tried per tuning (3 = no extension)
        self.remerge = remerge  # False (quick mode): test scored on the interpolated lambda=1 merge
        self.b = bench
        self.m = merger
        self.log = log
        self.root = bench.root / "runs" / merger.name
        self.evals_dir = self.root / "evals"
        self.evals_dir.mkdir(parents=True, exist_ok=True)
        self.tmp = bench.root / "tmp"
        self.ft = bench.finetune_all()
        self.models = [self.ft[t] for t in bench.tasks]
        self.fingerprint = stable_hash([bench.cfg, [read_json(Path(d) / "finetune.json") for d in self.models]])
        self.rec_path = self.root / f"records_{tag}.json"
        self.records = read_json(self.rec_path, {})
        self.merge_seconds = []
        self.eval_seconds = {"val": [], "test": []}
        self.consistency = []

    # ------------------------------------------------------------ plumbing
    def save(self):
        write_json(self.rec_path, self.records)

    def merge_state(self, recipe):
        h = stable_hash(_strip(recipe))
        out = self.tmp / f"m_{h}"
        r = dict(recipe)
        r["output"] = dict(recipe.get("output", {}), path=str(out))
        rp = write_recipe(r, self.root / "recipes" / f"{h}.yaml")
        info = self.m.merge(rp, out)
        self.merge_seconds.append(info["seconds"])
        state = self.b.load_state(out)
        shutil.rmtree(out, ignore_errors=True)
        return state, info

    def evaluate(self, key_obj, split, state_fn, tasks=None) -> dict:
        tasks = list(tasks or self.b.tasks)
        k = stable_hash([self.fingerprint, key_obj, split, tasks])
        f = self.evals_dir / f"{k}.npz"
        if f.exists():
            with np.load(f) as z:
                return {t: z[t] for t in tasks}
        st = state_fn()
        # a merge may write the very bytes another recipe wrote (e.g. a random host whose ratios all
        # hit the rescale cap): its scores are those of that checkpoint, so they are reused
        same = self.evals_dir / "by_content" / f"{stable_hash([self.fingerprint, state_digest(st), split, tasks])}.npz"
        if same.exists():
            shutil.copyfile(same, f)
            self.log(f"evaluation {k}: the same weights were scored already ({same.name}); reused")
            with np.load(f) as z:
                return {t: z[t] for t in tasks}
        t0 = time.time()
        res = self.b.evaluate(st, split, tasks)
        self.eval_seconds[split].append(time.time() - t0)
        np.savez_compressed(f, **res)
        same.parent.mkdir(exist_ok=True)
        shutil.copyfile(f, same)
        return res

    def interp(self, merged, lam):
        base = self.b.base_state
        out = {}
        for k, v in merged.items():
            bv = base[k]
            if v.is_floating_point() and lam != 1.0:
                out[k] = (bv.float() + lam * (v.float() - bv.float())).to(v.dtype)
            else:
                out[k] = v
        return out

    @staticmethod
    def avg(res):
        return float(np.mean([v.mean() for v in res.values()]))

    # ------------------------------------------------------------ scale tuning
    def val_at(self, r1, lazy, k):
        lam = lam_of(k)
        res = self.evaluate(["interp", _strip(r1), lam], "val", lambda: self.interp(lazy.state(), lam))
        return self.avg(res)

    def tune(self, recipe_fn, start: float, ks=None):
        """Hill-climb lambda on validation. Returns (best lambda, {lambda: val}, lazy merge)."""
        r1 = recipe_fn(1.0)
        lazy = LazyMerge(self, r1)
        vals = {}
        k0 = k_of(start)
        for k in ks if ks is not None else (k0 - 1, k0, k0 + 1):
            vals[k] = self.val_at(r1, lazy, k)
        if ks is None:
            while len(vals) < self.max_evals:
                best = max(vals, key=lambda k: (vals[k], -abs(k - k0)))
                if best == min(vals) and best > K_MIN:
                    nk = best - 1
                elif best == max(vals) and best < K_MAX:
                    nk = best + 1
                else:
                    break
                vals[nk] = self.val_at(r1, lazy, nk)
        best = max(vals, key=lambda k: (vals[k], -abs(k - k0)))
        return lam_of(best), [[lam_of(k), v] for k, v in sorted(vals.items())], lazy

    def test_at(self, recipe_fn, lam, seed, lazy1=None):
        """Merge with the CLI at the chosen lambda and score that checkpoint on test."""
        r = recipe_fn(lam) if seed is None else recipe_fn(lam, seed)
        first = seed in (None, 0) and lazy1 is not None
        if first and not self.remerge:
            r1 = lazy1.recipe
            key = ["interp", _strip(r1), lam]
            res = self.evaluate(key, "test", lambda: self.interp(lazy1.state(), lam))
            return res, None, None, key
        lz = lazy1 if (lam == 1.0 and first) else LazyMerge(self, r)
        res = self.evaluate(["cli", _strip(r)], "test", lz.state)
        cons = None
        if lz is not lazy1 and lz.loaded and first and lazy1.loaded:
            a, b = lz.state(), self.interp(lazy1.state(), lam)
            cons = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())
            self.consistency.append(cons)
        if lz is not lazy1:
            lz.drop()
        return res, None, cons, ["cli", _strip(r)]

    # ------------------------------------------------------------ references
    def references(self):
        b = self.b
        out = self.records.setdefault("refs", {})
        base_val = self.evaluate(["base"], "val", lambda: b.base_state)
        self.evaluate(["base"], "test", lambda: b.base_state)  # scored and cached for the report
        out["base"] = {"val": self.avg(base_val), "test_key": ["base"]}
        ft = {}
        for t in b.tasks:
            st = lambda t=t: b.load_state(self.ft[t])  # noqa: E731
            v = self.evaluate(["ft", t], "val", st, tasks=[t])
            self.evaluate(["ft", t], "test", st, tasks=[t])
            ft[t] = {"val": float(v[t].mean())}
        out["finetuned"] = ft
        self.log(
            "references: base val",
            f"{out['base']['val']:.3f}",
            "| fine-tuned val",
            {t: round(x["val"], 3) for t, x in ft.items()},
        )
        # plain averaging of the fine-tuned weights
        rl = linear_recipe(b.base_dir, self.models)
        lz = LazyMerge(self, rl)
        v = self.evaluate(["cli", _strip(rl)], "val", lz.state)
        self.evaluate(["cli", _strip(rl)], "test", lz.state)
        out["average"] = {"val": self.avg(v), "test_key": ["cli", _strip(rl)]}
        lz.drop()

        # task arithmetic without any drop (tuned lambda)
        def fn(lam):
            return make_recipe("task_arithmetic", b.base_dir, self.models, density=None, lam=lam)

        lam, vals, lazy1 = self.tune(fn, 0.5)
        _, _, _, key = self.test_at(fn, lam, None, lazy1)
        lazy1.drop()
        out["ta_dense"] = {"lam": lam, "val_grid": vals, "val": dict(vals)[lam], "test_key": key}
        # Iso-C: no drop ratio or rank budget, so no TADrop arm; a reference like dense TA
        fn = lambda lam: make_recipe("iso_c", b.base_dir, self.models, density=None, lam=lam)  # noqa: E731
        lam, vals, lazy1 = self.tune(fn, 2.0)
        _, _, _, key = self.test_at(fn, lam, None, lazy1)
        lazy1.drop()
        out["iso_c"] = {"lam": lam, "val_grid": vals, "val": dict(vals)[lam], "test_key": key}
        self.log(
            f"references: average val {out['average']['val']:.3f}, TA dense val "
            f"{out['ta_dense']['val']:.3f} at lambda {lam}"
        )
        self.save()

    def test_result(self, key):
        tasks = list(self.b.tasks)
        k = stable_hash([self.fingerprint, key, "test", tasks])
        with np.load(self.evals_dir / f"{k}.npz") as z:
            return {t: z[t] for t in tasks}

    def ft_test(self, t):
        k = stable_hash([self.fingerprint, ["ft", t], "test", [t]])
        with np.load(self.evals_dir / f"{k}.npz") as z:
            return z[t]

    # ------------------------------------------------------------ main comparison
    def recipe_fn(self, method, density, td):
        b = self.b

        def fn(lam, seed=0):
            return make_recipe(method, b.base_dir, self.models, density=density, lam=lam, seed=seed, tadrop=td)

        return fn

    def run_cell(self, method, density, arm, td, seeds, start=None):
        """One host x budget x arm: lambda hill-climbed on validation from `start` (default: the
        host's scale_start; every arm of a host-budget must get the same), then test per seed."""
        key = f"{method}|{density}|{arm}|{stable_hash(td)}"
        rec = self.records.setdefault("cells", {}).get(key)
        if rec and all(str(s) in rec["seeds"] for s in seeds):
            return rec
        fn = self.recipe_fn(method, density, td)
        t0 = time.time()
        start = scale_start(method) if start is None else start
        lam, vals, lazy1 = self.tune(fn, start)
        rec = {
            "method": method,
            "density": density,
            "arm": arm,
            "tadrop": td,
            "lam": lam,
            "lam_start": start,
            "val_grid": vals,
            "seeds": {},
        }
        rec["val"] = dict(vals)[lam]
        for s in seeds:
            res, _, cons, tkey = self.test_at(fn, lam, s, lazy1)
            rec["seeds"][str(s)] = {"test_key": tkey, "test": self.avg(res)}
            if cons is not None:
                rec["consistency_maxabs"] = cons
        lazy1.drop()
        self.records["cells"][key] = rec
        self.save()
        self.log(
            f"{method:16s} d={density:<5} {arm:8s} lambda={lam:<6} val={rec['val']:.4f} test="
            + " ".join(f"{v['test']:.4f}" for v in rec["seeds"].values())
            + f"  ({time.time() - t0:.0f}s)"
        )
        return rec

    def main(self, methods, densities, arms: dict, n_seeds: int, densities_by_method=None):
        for method in methods:
            for d in (densities_by_method or {}).get(method, densities):
                for arm, td in arms.items():
                    seeds = list(range(n_seeds)) if is_random(method) else [0]
                    self.run_cell(method, d, arm, td, seeds)

    # ------------------------------------------------------------ ablation (validation only)
    def ablate(self, hosts, base_cfg: dict, stats, norms, strengths):
        """One factor at a time on validation; each config gets the 3-point neighbourhood of the
        uniform arm's tuned lambda, and so does uniform. Returns (chosen config, table)."""
        abl = self.records.setdefault("ablation", {"rows": []})
        rows = []
        uni = {}
        for method, d in hosts:
            ru = self.run_cell(method, d, "uniform", None, [0])
            k = k_of(ru["lam"])
            uni[(method, d)] = (k, max(self._val_grid_point(method, d, None, j) for j in (k - 1, k, k + 1)))

        def score(cfg):
            gains = []
            per = {}
            for method, d in hosts:
                k, u = uni[(method, d)]
                fn = self.recipe_fn(method, d, cfg)
                lam, vals, lazy = self.tune(fn, lam_of(k), ks=(k - 1, k, k + 1))
                lazy.drop()
                v = max(x for _, x in vals)
                per[f"{method}@{d}"] = {"val": v, "uniform": u, "lam": lam}
                gains.append(v - u)
            row = {"config": dict(cfg), "gain": float(np.mean(gains)), "per_host": per}
            rows.append(row)
            self.log(f"ablation {cfg} gain over uniform (val) {row['gain']:+.4f}")
            return row["gain"]

        cfg = dict(base_cfg)
        best_stat = max(stats, key=lambda s: score(dict(cfg, statistic=s)))
        cfg["statistic"] = best_stat
        base_gain = [r for r in rows if r["config"] == cfg][0]["gain"]
        gains_n = {cfg["normalize"]: base_gain}
        for n in norms:
            if n != cfg["normalize"]:
                gains_n[n] = score(dict(cfg, normalize=n))
        cfg["normalize"] = max(gains_n, key=lambda n: (gains_n[n], n == base_cfg["normalize"]))
        cur = [r for r in rows if r["config"] == cfg][0]["gain"]
        gains_s = {cfg["strength"]: cur}
        for g in strengths:
            if g != cfg["strength"]:
                gains_s[g] = score(dict(cfg, strength=g))
        cfg["strength"] = max(gains_s, key=lambda g: (gains_s[g], -abs(g - base_cfg["strength"])))
        abl["rows"] = rows
        abl["chosen"] = cfg
        abl["hosts"] = [list(h) for h in hosts]
        self.save()
        self.log("ablation chose", cfg)
        return cfg, rows

    def _val_grid_point(self, method, d, td, k):
        fn = self.recipe_fn(method, d, td)
        r1 = fn(1.0)
        lazy = LazyMerge(self, r1)
        v = self.val_at(r1, lazy, k)
        lazy.drop()
        return v

    # ------------------------------------------------------------ plans (for the analysis)
    def plan(self, method, density, td):
        fn = self.recipe_fn(method, density, td)
        r = fn(1.0)
        h = stable_hash(_strip(r))
        path = self.root / "plans" / f"{h}.json"
        p = read_json(path)
        if p is None:
            rp = write_recipe(
                dict(r, output={"path": str(self.tmp / "plan"), "dtype": "float32"}),
                self.root / "recipes" / f"{h}.yaml",
            )
            p = self.m.plan(rp)
            write_json(path, p)
        return p
