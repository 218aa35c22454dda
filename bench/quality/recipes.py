"""Recipe generation (mergekit's YAML form plus the `tadrop:` block) for the sweep."""

from __future__ import annotations

from pathlib import Path

import yaml

# benchmark name -> (tadrop merge_method, random?, normalized?)  normalized = TIES-style
# disjoint mean over agreeing models (scale near 1); the others sum the task vectors.
# Task arithmetic has no drop ratio of its own (tadrop, like mergekit, ignores `density` for
# `task_arithmetic` and refuses a `tadrop:` block there): task arithmetic *with* a drop is
# `magnitude_prune` (trim each task vector to its largest entries, then task arithmetic), so the
# "task arithmetic" host of the issue is that method; plain task arithmetic is a reference row.
METHODS = {
    "ties": ("ties", False, True),
    "dare": ("dare_linear", True, False),
    "dare_ties": ("dare_ties", True, True),
    "breadcrumbs": ("breadcrumbs", False, False),
    "magnitude_prune": ("magnitude_prune", False, False),
    "breadcrumbs_ties": ("breadcrumbs_ties", False, False),
    # the stronger data-free hosts (issue 6); the rank hosts' "density" is each task's share of
    # the rank (1/T by default), Iso-C has no budget and is a reference row
    "della": ("della", True, True),
    "consensus_ta": ("consensus_ta", False, False),
    "consensus_ties": ("consensus_ties", False, False),
    "tsv_m": ("tsv_m", False, True),
    "iso_cts": ("iso_cts", False, True),
}
RANK_HOSTS = ("tsv_m", "iso_cts")
LABELS = {
    "magnitude_prune": "TA + magnitude drop (magnitude_prune)",
    "ties": "TIES",
    "dare": "DARE",
    "dare_ties": "DARE-TIES",
    "breadcrumbs": "Breadcrumbs",
    "breadcrumbs_ties": "Breadcrumbs-TIES",
    "della": "DELLA",
    "consensus_ta": "Consensus TA (TALL)",
    "consensus_ties": "Consensus TIES (TALL)",
    "tsv_m": "TSV-M (rank share)",
    "iso_cts": "Iso-CTS (rank share)",
}
BREADCRUMBS_GAMMA = 0.01  # fraction of the largest entries breadcrumbs also removes


def is_random(method: str) -> bool:
    return METHODS[method][1]


def scale_start(method: str) -> float:
    return 1.0 if METHODS[method][2] else 0.5


def make_recipe(
    method: str,
    base: Path,
    models: list[Path],
    *,
    density: float | None,
    lam: float,
    seed: int = 0,
    tadrop: dict | None = None,
    out: Path | None = None,
    weight: float = 1.0,
) -> dict:
    """One merge recipe. `density` = kept fraction (1 - drop ratio p); None = no sparsification."""
    mm = METHODS[method][0] if method in METHODS else method
    params = {"weight": float(weight)}
    if density is not None:
        params["density"] = float(density)
    if mm.startswith("breadcrumbs"):
        params["gamma"] = BREADCRUMBS_GAMMA
    r = {
        "merge_method": mm,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": dict(params)} for m in models],
        "parameters": {"lambda": float(lam)},
        "seed": int(seed),
        "output": {"path": str(out) if out else "./merged", "dtype": "float32"},
    }
    if tadrop is not None:
        r["tadrop"] = dict(tadrop)
    return r


def linear_recipe(base: Path, models: list[Path], out: Path | None = None) -> dict:
    """Plain averaging of the fine-tuned weights."""
    w = 1.0 / len(models)
    return {
        "merge_method": "linear",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": w}} for m in models],
        "output": {"path": str(out) if out else "./merged", "dtype": "float32"},
    }


def write_recipe(recipe: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    return path
