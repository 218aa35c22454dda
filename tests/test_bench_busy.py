"""bench/speed/busy.py: each variant runs the tadrop found on its own PYTHONPATH."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench" / "speed"))

import busy  # noqa: E402


def test_a_compared_checkout_is_the_one_that_runs_even_from_the_repository_root(tmp_path, monkeypatch):
    """`python -m` puts the working directory ahead of PYTHONPATH: started from the repository root,
    busy.py ran this checkout's tadrop_cli for the compared variant too."""
    other = tmp_path / "other" / "tadrop_cli"
    other.mkdir(parents=True)
    marker = tmp_path / "ran"
    (other / "__init__.py").write_text("")
    (other / "__main__.py").write_text(f"open({str(marker)!r}, 'w').write('the other checkout')\n")
    recipe = tmp_path / "work" / "recipe.yaml"
    recipe.parent.mkdir()
    recipe.write_text("merge_method: ties\n")
    monkeypatch.chdir(REPO)
    busy.timed_merge(recipe, dict(os.environ, PYTHONPATH=str(other.parent)))
    assert marker.read_text() == "the other checkout"
