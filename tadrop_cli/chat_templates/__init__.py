"""mergekit 0.1.5's named chat templates (its mergekit/_data/chat_templates), and choosing a recipe's template."""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from pathlib import Path

from ..checkpoint import read_text_file

NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def named_template(name: str) -> str:
    """The Jinja text of a named template (chatml, ...)."""
    return resources.files(__name__).joinpath(f"{name}.jinja").read_text(encoding="utf-8")


def model_template(folder: Path | None) -> str | None:
    """A model's own chat template, as transformers finds it: chat_template.jinja, else tokenizer_config.json's
    chat_template (a string, or a list of named templates: the one named default); stripped."""
    if folder is None:
        return None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return read_text_file(jinja).strip() or None
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(read_text_file(config)).get("chat_template")
    except (ValueError, AttributeError):
        return None
    if isinstance(template, list):
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
        )
    return template.strip() if isinstance(template, str) and template.strip() else None


def chosen_template(value: str, folders: list[Path | None]) -> str | None:
    """The template a recipe's chat_template names (mergekit's rules): `auto`, the most common among the
    models' own templates (a tie: the first in recipe order; None if no model has one); a known name, its
    text; otherwise the value itself, a Jinja template (recipe.check_chat_template checked it)."""
    if value == "auto":
        found = [t for t in (model_template(folder) for folder in folders) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value and value in NAMES:
        return named_template(value)
    return value
