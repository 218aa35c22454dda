"""How the sweep produces merged checkpoints.

`CliMerger` runs `tadrop merge RECIPE --output DIR --overwrite --quiet --json` in a subprocess,
exactly as a user would; every reported number comes from it (`TADROP_CMD`, if set, replaces the
`tadrop` command). `ReferenceMerger` is a small
in-process stand-in, used only to test this pipeline while the CLI did not exist
(`run.py --merger reference`); its numbers are never reported.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml


class MergeError(RuntimeError):
    pass


def _tadrop_exe() -> list[str]:
    if os.environ.get("TADROP_CMD"):  # e.g. a frozen copy of the package, for long runs
        return shlex.split(os.environ["TADROP_CMD"])
    exe = shutil.which("tadrop")
    if exe is None:
        cand = Path(sys.executable).with_name("tadrop")
        if cand.exists():
            exe = str(cand)
    if exe is None:
        raise MergeError("the `tadrop` command was not found: pip install -e . (repo root)")
    return [exe]


def _env():
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    return env


class CliMerger:
    name = "tadrop-cli"

    def __init__(self, log=print, timeout=900):
        self.exe = _tadrop_exe()
        self.log = log
        self.timeout = timeout

    def version(self) -> str:
        try:
            p = subprocess.run(self.exe + ["--version"], capture_output=True, text=True, env=_env(), timeout=120)
            return (p.stdout or p.stderr).strip().splitlines()[-1] if (p.stdout or p.stderr) else "?"
        except Exception as e:  # noqa: BLE001
            return f"? ({e})"

    def merge(self, recipe_path: Path, out_dir: Path) -> dict:
        cmd = self.exe + ["merge", str(recipe_path), "--output", str(out_dir), "--overwrite", "--quiet", "--json"]
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=self.timeout)
        dt = time.time() - t0
        if p.returncode != 0:
            raise MergeError(
                f"exit {p.returncode}: {' '.join(cmd)}\nstdout: {p.stdout[-2000:]}\nstderr: {p.stderr[-4000:]}"
            )
        info = _parse_json(p.stdout)
        return {"seconds": dt, "cli": info, "cmd": " ".join(cmd)}

    def plan(self, recipe_path: Path) -> dict | None:
        cmd = self.exe + ["plan", str(recipe_path), "--json"]
        p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=self.timeout)
        if p.returncode != 0:
            raise MergeError(f"exit {p.returncode}: {' '.join(cmd)}\nstderr: {p.stderr[-4000:]}")
        return _parse_json(p.stdout)


def _parse_json(text: str):
    text = text.strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        # tolerate log lines before the JSON document
        i = text.find("{")
        try:
            return json.loads(text[i:]) if i >= 0 else {"raw": text[-2000:]}
        except json.JSONDecodeError:
            return {"raw": text[-2000:]}


class ReferenceMerger:
    """Pipeline-test stand-in. NOT the tool under test; its numbers are never reported."""

    name = "reference-standin"

    def __init__(self, log=print):
        self.log = log

    def version(self):
        return "reference stand-in"

    def merge(self, recipe_path: Path, out_dir: Path) -> dict:
        import refmerge

        t0 = time.time()
        with open(recipe_path) as f:
            recipe = yaml.safe_load(f)
        refmerge.merge(recipe, Path(out_dir))
        return {"seconds": time.time() - t0, "cli": None, "cmd": "reference"}

    def plan(self, recipe_path: Path):
        import refmerge

        with open(recipe_path) as f:
            recipe = yaml.safe_load(f)
        return refmerge.plan(recipe)


def make_merger(kind: str, log=print):
    if kind == "tadrop":
        return CliMerger(log=log)
    if kind == "reference":
        return ReferenceMerger(log=log)
    raise ValueError(kind)
