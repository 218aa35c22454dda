"""Real mergekit recipes run unchanged (issue 13).

tests/data/mergekit_corpus/ holds real mergekit recipes (mergekit's examples, docs and tests,
and the kinds people publish on model cards), with their model names replaced by placeholders
(tests/mergekit_standins.py builds tiny Llama stand-ins for them). Each recipe must merge as
written and its output must load in transformers with the layer count and vocabulary its
config states; the recipes tadrop refuses are listed in REFUSED, each with the reason, and must
be refused in one line with exit 2 (never a traceback, never a silent no-op). The
comparison of the outputs with mergekit's is bench/compat/corpus.py (it needs mergekit).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mergekit_standins import layers_needed, localize, standin_models
from typer.testing import CliRunner

from tadrop_cli.cli import app

CORPUS = Path(__file__).parent / "data" / "mergekit_corpus"
RECIPES = sorted(CORPUS.glob("*.yaml"))

# recipe -> why tadrop refuses it (each a documented difference, docs/mergekit.md)
REFUSED: dict[str, str] = {
    "sce-weights": "a parameter the method does not have (sce takes no weight): mergekit ignores it silently",
}


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    root = tmp_path_factory.mktemp("standins")
    return lambda layers: standin_models(root / f"layers-{layers}", layers)


def test_corpus_is_the_size_the_target_is_measured_on():
    assert len(RECIPES) >= 57
    assert len(REFUSED) <= 0.05 * len(RECIPES), f"{len(REFUSED)} of {len(RECIPES)} recipes do not run"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_mergekit_recipe_runs_unchanged(recipe, standins, tmp_path):
    text = recipe.read_text()
    folders = standins(layers_needed(text))
    local = tmp_path / "recipe.yaml"
    local.write_text(localize(text, folders))
    out = tmp_path / "merged"
    # several documents: mergekit-multi's form, whose --intermediate-dir holds the named merges
    multi = ["-I", str(tmp_path / "intermediate")] if "\n---" in text else []
    result = CliRunner().invoke(app, ["merge", str(local), str(out), "--quiet", *multi])
    if recipe.stem in REFUSED:
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        return
    assert result.exit_code == 0, result.output
    _assert_loads(out)


def _assert_loads(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    config = json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == config["num_hidden_layers"]
    assert model.get_input_embeddings().weight.shape[0] == config["vocab_size"]
