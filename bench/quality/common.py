"""Shared helpers for the quality benchmark: paths, cache, seeding, small statistics."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CACHE = Path(os.environ.get("TADROP_QUALITY_CACHE", REPO / "bench" / ".cache" / "quality"))
DOCS = REPO / "docs"


def set_threads(n: int = 1) -> None:
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def stable_hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def read_json(path: Path, default=None):
    path = Path(path)
    if not path.exists():
        return default
    with open(path) as f:
        return json.load(f)


def write_json(path: Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=_json_default)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


class Log:
    """Timestamped progress log to stderr and to a file in the run folder."""

    def __init__(self, path: Path | None = None, quiet: bool = False):
        self.t0 = time.time()
        self.path = path
        self.quiet = quiet
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, *msg) -> None:
        line = f"[{time.time() - self.t0:7.1f}s] " + " ".join(str(m) for m in msg)
        if not self.quiet:
            print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")


# ---------------------------------------------------------------- statistics


def paired_bootstrap(
    pairs: list[tuple[dict, dict]], tasks: list[str], n_boot: int = 2000, seed: int = 0, norm: dict | None = None
) -> dict:
    """Paired difference B - A of the average (over tasks) accuracy.

    pairs: one (A, B) per seed, each a dict task -> per-item correctness on the SAME test items.
    Items are resampled within each task, with the same indices for both arms and all seeds, so
    the interval is that of the comparison on these items (the seed spread is reported apart).
    norm: optional task -> divisor (normalised accuracy).
    """
    rng = np.random.default_rng(seed)
    norm = norm or {t: 1.0 for t in tasks}
    per_task = {}
    boots = np.zeros(n_boot)
    for t in tasks:
        d = np.mean([b[t].astype(np.float64) - a[t].astype(np.float64) for a, b in pairs], axis=0)
        d = d / norm[t]
        per_task[t] = float(d.mean())
        n = len(d)
        idx = rng.integers(0, n, size=(n_boot, n))
        boots += d[idx].mean(axis=1)
    boots /= len(tasks)
    per_seed = [float(np.mean([(b[t].mean() - a[t].mean()) / norm[t] for t in tasks])) for a, b in pairs]
    return {
        "diff": float(np.mean(list(per_task.values()))),
        "lo": float(np.percentile(boots, 2.5)),
        "hi": float(np.percentile(boots, 97.5)),
        "se": float(boots.std()),
        "per_task": per_task,
        "per_seed": per_seed,
    }


def mean_ci(values, z: float = 1.96) -> tuple[float, float]:
    """Mean and half-width of a normal 95% interval over independent repeats (e.g. seeds)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()), 0.0
    return float(v.mean()), float(z * v.std(ddof=1) / np.sqrt(len(v)))


def acc_se(correct: list[np.ndarray]) -> float:
    """Standard error of the average (over tasks) accuracy, items independent."""
    var = sum(c.mean() * (1 - c.mean()) / len(c) for c in correct) / len(correct) ** 2
    return float(np.sqrt(var))
