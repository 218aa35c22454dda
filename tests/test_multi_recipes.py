"""Multi-document recipes (mergekit-multi's: named merges, later ones reading earlier outputs by name) and
`chat_template:` (mergekit's values: a template name, auto, or a Jinja template)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import fine_tune, run_cli, tiny_state, write_checkpoint
from safetensors.torch import load_file


def _write_documents(path: Path, documents: list[dict]) -> Path:
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return path


def _ties(base: str, models: list[str], **extra) -> dict:
    return {
        "merge_method": "ties",
        "base_model": base,
        "models": [{"model": m, "parameters": {"weight": 0.7, "density": 0.5}} for m in models],
        **extra,
    }


def test_a_later_merge_reads_an_earlier_one_by_name(tmp_path, tiny_models):
    m = {k: str(v) for k, v in tiny_models.items()}
    recipe = _write_documents(
        tmp_path / "multi.yaml",
        [
            _ties(m["base"], ["step1", m["ft2"]]),  # the final merge may come first: the order is worked out
            {**_ties(m["base"], [m["ft0"], m["ft1"]]), "name": "step1"},
        ],
    )
    result = run_cli("merge", str(recipe), str(tmp_path / "out"), "-I", str(tmp_path / "parts"))
    assert result.returncode == 0, result.stderr
    assert result.stderr.index("step1: merged") < result.stderr.index("final merge: merged")

    # the same two merges run one after the other by hand
    first = tmp_path / "first.yaml"
    first.write_text(yaml.safe_dump(_ties(m["base"], [m["ft0"], m["ft1"]])))
    assert run_cli("merge", str(first), str(tmp_path / "by_hand_1"), "--quiet").returncode == 0
    second = tmp_path / "second.yaml"
    second.write_text(yaml.safe_dump(_ties(m["base"], [str(tmp_path / "by_hand_1"), m["ft2"]])))
    assert run_cli("merge", str(second), str(tmp_path / "by_hand_2"), "--quiet").returncode == 0
    for got, expected in [
        (tmp_path / "parts" / "step1", tmp_path / "by_hand_1"),
        (tmp_path / "out", tmp_path / "by_hand_2"),
    ]:
        a, b = load_file(str(got / "model.safetensors")), load_file(str(expected / "model.safetensors"))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    again = run_cli("merge", str(recipe), str(tmp_path / "out"), "-I", str(tmp_path / "parts"), "--json")
    assert again.returncode == 0, again.stderr
    assert [s["skipped"] for s in json.loads(again.stdout)["merges"]] == [True, True]


def test_a_redone_merge_redoes_the_merges_that_read_it(tmp_path, tiny_models):
    m = {k: str(v) for k, v in tiny_models.items()}
    documents = [{**_ties(m["base"], [m["ft0"], m["ft1"]]), "name": "step1"}, _ties(m["base"], ["step1", m["ft2"]])]
    recipe = _write_documents(tmp_path / "multi.yaml", documents)
    assert run_cli("merge", str(recipe), str(tmp_path / "out"), "-I", str(tmp_path / "parts")).returncode == 0
    documents[0]["models"][0]["parameters"]["density"] = 0.9  # step1 changes: the final merge reads a new step1
    _write_documents(recipe, documents)
    result = run_cli(
        "merge", str(recipe), str(tmp_path / "out"), "-I", str(tmp_path / "parts"), "--overwrite", "--json"
    )
    assert result.returncode == 0, result.stderr
    assert [s["skipped"] for s in json.loads(result.stdout)["merges"]] == [False, False]


@pytest.mark.parametrize(
    "documents,args,expected",
    [
        (lambda m: [{**_ties(m["base"], ["b"]), "name": "a"}, {**_ties(m["base"], ["a"]), "name": "b"}], True, "cycle"),
        (
            lambda m: [{**_ties(m["base"], [m["ft0"]]), "name": "a"}, {**_ties(m["base"], ["a"]), "name": "a"}],
            True,
            "also names",
        ),
        (lambda m: [_ties(m["base"], [m["ft0"]]), _ties(m["base"], [m["ft1"]])], True, "second unnamed"),
        (
            lambda m: [{**_ties(m["base"], [m["ft0"]]), "name": "a"}, _ties(m["base"], ["a"])],
            False,
            "--intermediate-dir",
        ),
        (
            lambda m: [{**_ties(m["base"], [m["ft0"]]), "name": "../up"}, _ties(m["base"], ["a"])],
            True,
            "plain folder name",
        ),
        (
            lambda m: [{**_ties(m["base"], [m["ft0"]]), "name": "a"}, {"merge_method": "ties", "modles": []}],
            True,
            "document 2",
        ),
    ],
    ids=["cycle", "duplicate name", "two unnamed", "no intermediate dir", "name with a slash", "a bad document"],
)
def test_bad_multi_document_recipes_refused_in_one_line(tmp_path, tiny_models, documents, args, expected):
    m = {k: str(v) for k, v in tiny_models.items()}
    recipe = _write_documents(tmp_path / "multi.yaml", documents(m))
    extra = ["-I", str(tmp_path / "parts")] if args else []
    result = run_cli("merge", str(recipe), str(tmp_path / "out"), *extra)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "parts" / "a").exists()


def test_plan_of_a_multi_document_recipe_says_what_to_run(tmp_path, tiny_models):
    m = {k: str(v) for k, v in tiny_models.items()}
    recipe = _write_documents(
        tmp_path / "multi.yaml", [{**_ties(m["base"], [m["ft0"]]), "name": "a"}, _ties(m["base"], ["a"])]
    )
    result = run_cli("plan", str(recipe))
    assert result.returncode == 2 and "multi-document recipe" in result.stderr, result.stderr


def test_dry_run_checks_what_it_can(tmp_path, tiny_models):
    m = {k: str(v) for k, v in tiny_models.items()}
    recipe = _write_documents(
        tmp_path / "multi.yaml", [{**_ties(m["base"], [m["ft0"]]), "name": "a"}, _ties(m["base"], ["a"])]
    )
    result = run_cli("merge", str(recipe), str(tmp_path / "out"), "-I", str(tmp_path / "parts"), "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    merges = json.loads(result.stdout)["merges"]
    assert [s["checked"] for s in merges] == [True, False] and not (tmp_path / "parts").exists()


# ---------------------------------------------------------------- chat_template


def _with_tokenizer(folder: Path, template: str | None) -> Path:
    """A tokenizer transformers can load (a word-level one), with `template` as its chat template."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]")
    tokenizer.save_pretrained(folder)
    if template is not None:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return folder


@pytest.fixture
def chat_models(tmp_path) -> dict[str, Path]:
    base = tiny_state()
    templates = {"base": None, "ft0": "{{ 'A' }}{% for m in messages %}{{ m.content }}{% endfor %}"}
    templates["ft1"] = templates["ft0"]
    templates["ft2"] = "{{ 'B' }}{% for m in messages %}{{ m.content }}{% endfor %}"
    paths = {}
    for i, (name, template) in enumerate(templates.items()):
        state = base if name == "base" else fine_tune(base, i)
        paths[name] = _with_tokenizer(write_checkpoint(tmp_path / name, state), template)
    return paths


def _rendered(folder: Path) -> str:
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


@pytest.mark.parametrize(
    "value,expected",
    [
        ("chatml", "<|im_start|>user\nhi<|im_end|>\n"),
        ("auto", "Ahi"),  # ft0 and ft1 share a template, ft2 has another: the most common wins
        ("{{ 'C' }}{% for m in messages %}{{ m.content }}{% endfor %}", "Chi"),
    ],
    ids=["named", "auto", "jinja"],
)
def test_chat_template_is_what_the_output_tokenizer_renders(tmp_path, chat_models, value, expected):
    recipe = {
        **_ties(str(chat_models["base"]), [str(chat_models[k]) for k in ("ft0", "ft1", "ft2")]),
        "chat_template": value,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_cli("merge", str(path), str(tmp_path / "out"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert _rendered(tmp_path / "out") == expected
    written = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"]
    assert written == (tmp_path / "out" / "chat_template.jinja").read_text()


def test_bad_chat_template_refused_in_one_line(tmp_path, tiny_models):
    recipe = {**_ties(str(tiny_models["base"]), [str(tiny_models["ft0"])]), "chat_template": "chatmll"}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_cli("merge", str(path), str(tmp_path / "out"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "chat_template" in result.stderr and "chatml" in result.stderr


def test_an_interrupt_in_a_later_merge_says_the_earlier_one_is_complete(tmp_path, tiny_models, monkeypatch):
    """A multi-document recipe interrupted in its second merge: the first one's output is published
    and complete, so the message must not say that nothing was published."""
    from typer.testing import CliRunner

    from tadrop_cli import interrupts, shards
    from tadrop_cli.cli import app

    m = {k: str(v) for k, v in tiny_models.items()}
    documents = [{**_ties(m["base"], [m["ft0"], m["ft1"]]), "name": "step1"}, _ties(m["base"], ["step1", m["ft2"]])]
    recipe = _write_documents(tmp_path / "multi.yaml", documents)
    original = shards.ShardWriter.write

    def write(self, name, tensor):  # a Ctrl-C while the second merge writes (the first one is published)
        if interrupts.published_output() is not None:
            raise KeyboardInterrupt
        original(self, name, tensor)

    monkeypatch.setattr(shards.ShardWriter, "write", write)
    parts, out = tmp_path / "parts", tmp_path / "out"
    result = CliRunner().invoke(app, ["merge", str(recipe), str(out), "-I", str(parts), "--quiet"])
    assert result.exit_code == 130, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "nothing was published" not in line, line
    expected = f"interrupted: {parts / 'step1'} is complete, but the merge after it was not published"
    assert line.startswith(expected), line
    assert (parts / "step1" / "model.safetensors").is_file() and not out.exists()
