"""Tokenizer files: reading the inputs' tokenizers, building the merged one (mergekit's union, base or
a model's tokenizer, plus the recipe's added tokens), and writing it into the output.

Tokenizers are loaded by transformers' AutoTokenizer from local files only, never with
trust_remote_code. The maths of aligning embedding rows to the merged vocabulary is vocabulary.py's.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import config_files, parse_json, read_text_file
from .errors import BadInput

# the files a tokenizer is made of; the output's come from the merged tokenizer, not from the base
TOKENIZER_FILE = re.compile(
    r"^(tokenizer(_config)?\.json|special_tokens_map\.json|added_tokens\.json|vocab\.(txt|json)|merges\.txt|"
    r"tokenizer\.model|spiece\.model|sentencepiece\.bpe\.model|chat_template\.(jinja|json))$"
)
# a folder holds a tokenizer if it has one of these (tokenizer_config.json alone names a class, not a vocabulary)
VOCABULARY_FILE = re.compile(
    r"^(tokenizer\.json|vocab\.(txt|json)|tokenizer\.model|spiece\.model|sentencepiece\.bpe\.model)$"
)


def tokenizer_files(folder: Path | None) -> list[Path]:
    """The tokenizer files of a model folder (links out of it refused, as for every copied file)."""
    return [file for file in config_files(folder) if TOKENIZER_FILE.match(file.name)]


def has_tokenizer(folder: Path | None) -> bool:
    return any(VOCABULARY_FILE.match(file.name) for file in tokenizer_files(folder))


def load_tokenizer(folder: Path | None, label: str) -> Any:
    """A model's tokenizer (a transformers fast tokenizer) from its folder's files; BadInput if it has none
    or they do not load."""
    if not has_tokenizer(folder):
        raise BadInput(f"{label}: no tokenizer files (tokenizer.json, tokenizer.model, vocab.txt...) in its folder")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False, use_fast=True)
    except Exception as error:  # transformers raises many kinds (ValueError, OSError, KeyError, its own)
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise BadInput(f"{label}: its tokenizer does not load ({reason})") from None


def config_vocab_size(folder: Path | None) -> int | None:
    """config.json's vocab_size (or its text_config's, for models with a vision part), if any."""
    if folder is None or not (folder / "config.json").is_file():
        return None
    config = parse_json(read_text_file(folder / "config.json"), str(folder / "config.json"))
    if not isinstance(config, dict):
        return None
    for section in (config, config.get("text_config")):
        if isinstance(section, dict) and isinstance(section.get("vocab_size"), int) and section["vocab_size"] > 0:
            return section["vocab_size"]
    return None


def vocabulary(tokenizer: Any) -> dict[str, int]:
    """token -> id, added tokens included, in id order (transformers' own order is a hash map's)."""
    return dict(sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]))


def stripped_tokenizer(tokenizer: Any, vocab_size: int | None, label: str) -> Any:
    """The tokenizer without the tokens whose id is vocab_size or more (they have no embedding row);
    mergekit's get_stripped_tokenizer, which the base's tokenizer goes through. BPE only, as there."""
    unused = [token for token, index in tokenizer.get_vocab().items() if vocab_size is not None and index >= vocab_size]
    if not unused:
        return tokenizer
    import tokenizers

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise BadInput(
            f"{label}: its tokenizer has {len(unused)} token(s) at ids of vocab_size ({vocab_size}) or more, and is "
            f"{data['model']['type']}: only a BPE tokenizer can be cut to its model's vocabulary (as in mergekit)"
        )
    dropped = set(unused)
    data["added_tokens"] = [entry for entry in data["added_tokens"] if entry["id"] < vocab_size]
    data["model"]["vocab"] = {token: i for token, i in data["model"]["vocab"].items() if token not in dropped}
    data["model"]["merges"] = [
        merge
        for merge in data["model"]["merges"]
        if not any(part in dropped for part in (merge.split(" ") if isinstance(merge, str) else merge))
    ]
    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tokenizer


def copied_tokenizer(tokenizer: Any) -> Any:
    """A fresh copy of a tokenizer (saved and loaded again, as mergekit does before adding tokens)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False, use_fast=True)


def union_tokenizer(base: Any, tokenizers: list[tuple[Any, int]]) -> Any:
    """mergekit's build_union_tokenizer: the base's tokenizer, then every other token of the models'
    tokenizers (each as (tokenizer, vocab_size); ids of vocab_size or more are left out) as a plain added
    token, then every added token of theirs with its settings (the first model's where they differ).
    mergekit's order of new tokens follows hash maps and varies from run to run; here it is the models'
    order (base first), then each model's ids: the same vocabulary, each token's row the same."""
    new_tokens: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tokenizer, vocab_size in tokenizers:
        for token, index in vocabulary(tokenizer).items():
            if index < vocab_size:
                new_tokens.setdefault(token)
        for index, info in sorted(tokenizer.added_tokens_decoder.items()):
            if index < vocab_size:
                added.setdefault(info.content, info)
    result = copied_tokenizer(base)
    base_vocabulary = base.get_vocab()
    # in two calls, not one per token as mergekit (the same ids): each call rebuilds the added-token matcher
    result.add_tokens([token for token in new_tokens if token not in added and token not in base_vocabulary])
    result.add_tokens(list(added.values()))
    return result


@dataclass
class OutputTokenizer:
    """The merged tokenizer and what the output needs of it."""

    tokenizer: Any  # a transformers tokenizer
    vocabulary: dict[str, int]  # token -> output row
    rows: int  # output embedding rows: len(vocabulary), padded to pad_to_multiple_of
    copy_from: Path | None  # a folder whose tokenizer files are the output's as they are (None: save `tokenizer`)
    config_file: Path | None  # the reference's config.json, written with vocab_size set to `rows`
    input_files: list[Path]  # the tokenizer and config files it was built from (a resume checks them unchanged)
    note: str  # what the merged vocabulary is, for the summary
    loaded_tokens: int = 0  # the tokens of every tokenizer loaded to build it (the inputs' and the output's)
    build_seconds: float = 0.0  # how long building it took (a dry run's time estimate: a merge builds it again)


def padded_rows(count: int, multiple: int | None) -> int:
    """count rounded up to a multiple of `multiple` (none or 0: count)."""
    if not multiple or count % multiple == 0:
        return count
    return (count // multiple + 1) * multiple


def with_vocab_size(config: Any, rows: int) -> Any:
    """config.json's content with vocab_size set (in text_config where that is where it lives)."""
    if isinstance(config, dict):
        text = config.get("text_config")
        if "vocab_size" not in config and isinstance(text, dict) and "vocab_size" in text:
            return {**config, "text_config": {**text, "vocab_size": rows}}
        return {**config, "vocab_size": rows}
    return config


def write_tokenizer(staging: Any, output: OutputTokenizer, config_changes: dict | None = None) -> list[str]:
    """Write the merged tokenizer's files and config.json (vocab_size set, and `config_changes`, e.g. a
    slices merge's layer count) into the staging folder; returns the names written."""
    written = []
    if output.config_file is not None:
        config = parse_json(read_text_file(output.config_file), str(output.config_file))
        staging.write_json("config.json", with_vocab_size({**config, **(config_changes or {})}, output.rows))
        written.append("config.json")
    if output.copy_from is not None:
        for file in tokenizer_files(output.copy_from):
            staging.copy_in(file)
            written.append(file.name)
        return written
    with tempfile.TemporaryDirectory() as folder:
        output.tokenizer.save_pretrained(folder)
        for file in sorted(Path(folder).iterdir()):
            if file.is_file() and not file.is_symlink():
                staging.copy_in(file)
                written.append(file.name)
    return written
