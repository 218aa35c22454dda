"""Every shipped recipe in configs/ loads and merges the shipped example checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, run_cli

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_there_is_a_config_for_every_method():
    from tadrop_cli.methods import METHODS

    assert {p.stem for p in CONFIGS} >= set(METHODS) | {"example"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_merges(config: Path, tmp_path: Path):
    result = run_cli("merge", str(config), "--output", str(tmp_path / "out"), "--quiet", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["tensors"] == 10
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "config.json").exists()
    verified = run_cli("verify", str(tmp_path / "out"), "--json")
    assert verified.returncode == 0 and json.loads(verified.stdout)["tensors"] == 10
