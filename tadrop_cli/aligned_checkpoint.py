"""The tokenizer merge's inputs: each model seen through a Checkpoint whose vocabulary tensors
(embeddings, lm_head) are re-indexed to the merged vocabulary, and the merged tokenizer itself.

The rest of the engine (kernels, TADrop's pass 1, resume) reads these views as it reads any
checkpoint. A read of entries [start, stop) of a vocabulary tensor assembles the block of output
rows they lie in, and nothing more: each model's own rows gathered from its memory-mapped tensor,
the default rows of the block's tokens (vocabulary.py), and for padding rows the model's mean row
(one pass over its rows by blocks, kept: one row per model). So a merge that reads a tensor in
slices (the kernels, PyTorch's element-wise hosts, TADrop's Hoyer scores and magnitude profiles)
holds a slice's rows, whatever the vocabulary; a method that needs whole tensors (the SVD hosts, a
rescale by a norm, TADrop's other statistics) reads each model's whole aligned tensor, as it would a
plain checkpoint's.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import Checkpoint, TensorInfo, config_files
from .dtypes import Stored, float32_of, numpy_dtype, stored_from_float32
from .errors import BadInput
from .lazy import torch
from .recipe import ModelTokenSource, Recipe, TokenizerSettings, ZeroSource, source_identity
from .tokenizer_files import (
    OutputTokenizer,
    config_vocab_size,
    copied_tokenizer,
    has_tokenizer,
    load_tokenizer,
    padded_rows,
    stripped_tokenizer,
    union_tokenizer,
    vocabulary,
)
from .vocabulary import (
    ZERO,
    RowOf,
    TokenRule,
    check_rows,
    default_rows,
    default_values,
    needed_rows,
    own_rows,
    padding_mean,
    permutation,
    vocabulary_tensor_names,
)


@dataclasses.dataclass
class _Source:
    """One distinct input model (the base first) and its vocabulary."""

    checkpoint: Checkpoint
    tokens: dict[str, int]  # its tokenizer's token -> id (the base's, for a model without tokenizer files)
    vocab_size: int  # ids below this have a row (config.json's vocab_size, else the tokenizer's size)
    permutation: np.ndarray | None = None  # output token -> its row, -1 where it lacks the token


# the rows of one block the alignment assembles at a time where a whole pass is needed (a padding mean)
BLOCK_ENTRIES = 1 << 20


class VocabularyAlignment:
    """Every model's vocabulary tensors re-indexed to the output vocabulary, served by blocks of output
    rows: a block gathers each model's own rows for it from the model's mapped tensor, and the default
    rows of its tokens, so a read holds the rows it asks for, never a whole tensor it does not."""

    def __init__(
        self, sources: list[_Source], names: set[str], rows: int, base: int | None, rules: dict[int, TokenRule]
    ):
        self.sources, self.names, self.rows, self.base, self.rules = sources, names, rows, base, rules
        self._tensors: dict[str, _TensorAlignment] = {}

    def block(self, source: int, name: str, first: int, stop: int) -> np.ndarray:
        """Rows [first, stop) of source `source`'s aligned tensor `name`, as stored (its numpy
        dtype.Stored array), shaped (rows, entries per row): a fresh array."""
        if name not in self._tensors:
            self._tensors[name] = _TensorAlignment(self, name)
        for other, alignment in self._tensors.items():
            if other != name:
                alignment.let_go()  # another tensor's block: the merge holds one tensor name's inputs
        return self._tensors[name].block(source, first, stop)

    def close(self) -> None:
        self._tensors = {}


class _TensorAlignment:
    """One vocabulary tensor's alignment: which stored row or default each output row of each model
    is (small: an index per token and model), and the last block's default rows."""

    def __init__(self, alignment: VocabularyAlignment, name: str):
        sources = alignment.sources
        having = [s for s, source in enumerate(sources) if name in source.checkpoint.tensors]
        position = {s: k for k, s in enumerate(having)}
        rules = {i: _rule_among(rule, position, sources, name) for i, rule in alignment.rules.items()}
        base = position.get(alignment.base) if alignment.base is not None else None
        self.defaults, forced = default_rows([sources[s].permutation for s in having], base, rules)
        self.tokens = len(sources[having[0]].permutation)  # the output vocabulary (rows past it: padding)
        self.having = having  # the sources with the tensor; default_rows' models are indices into it
        self.checkpoints = {s: sources[s].checkpoint for s in having}
        self.own = {s: own_rows(sources[s].permutation, forced) for s in having}
        shape = sources[having[0]].checkpoint.tensors[name].shape
        self.name, self.row_length = name, math.prod(shape[1:])
        self.default_tokens = np.array(sorted(self.defaults), dtype=np.int64)
        self._block_defaults: tuple[int, int, np.ndarray, np.ndarray] | None = None
        self._padding: dict[int, np.ndarray] = {}  # a model's padding row, float32 (see padding_mean)

    def let_go(self) -> None:
        """Drop the last block's default rows (the padding rows, one per model, stay)."""
        self._block_defaults = None

    def block(self, s: int, first: int, stop: int) -> np.ndarray:
        """Rows [first, stop) of model s's aligned tensor, as stored: its own rows copied bit for bit,
        default and padding rows (float32) cast to its dtype as torch casts."""
        dtype = self._dtype(s)
        out = np.empty((stop - first, self.row_length), dtype=numpy_dtype(dtype))
        end = min(stop, self.tokens)
        if first < end:
            kept, own, lacking, defaults = self._token_rows(s, first, end)
            out[: end - first][kept] = own
            out[lacking] = stored_from_float32(defaults, dtype)
        if stop > self.tokens:
            out[max(first, self.tokens) - first :] = stored_from_float32(self._padding_row(s)[None, :], dtype)
        return out

    def _float32_block(self, s: int, first: int, stop: int) -> np.ndarray:
        """Rows [first, stop) (all below `tokens`) of model s's aligned tensor in float32, as they are
        before the cast to its dtype."""
        out = np.empty((stop - first, self.row_length), dtype=np.float32)
        kept, own, lacking, defaults = self._token_rows(s, first, stop)
        out[kept] = float32_of(own, self._dtype(s))
        out[lacking] = defaults
        return out

    def _token_rows(self, s: int, first: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Model s's rows for output tokens [first, stop): (which are its own, those as stored, where
        the others are in the block, their default rows in float32)."""
        rows = self.own[s][first:stop]
        kept = rows >= 0
        own = (
            self.checkpoints[s].read_rows(self.name, rows[kept])
            if kept.any()
            else np.empty((0, self.row_length), numpy_dtype(self._dtype(s)))
        )
        lacking = np.flatnonzero(~kept)  # every such token has a default (default_rows)
        if not len(lacking):
            return kept, own, lacking, np.empty((0, self.row_length), np.float32)
        tokens, values = self._defaults(first, stop)
        return kept, own, lacking, values[np.searchsorted(tokens, lacking + first)]

    def _dtype(self, s: int) -> str:
        return self.checkpoints[s].tensors[self.name].dtype

    def _defaults(self, first: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(the tokens in [first, stop) that have a default, their default rows in float32); the last
        block's are kept: every model reads the same block in turn."""
        cached = self._block_defaults
        if cached is not None and cached[:2] == (first, stop):
            return cached[2], cached[3]
        low, high = np.searchsorted(self.default_tokens, [first, stop])
        tokens = self.default_tokens[low:high]
        rows = {
            k: (
                numbers,
                float32_of(self.checkpoints[self.having[k]].read_rows(self.name, numbers), self._dtype(self.having[k])),
            )
            for k, numbers in needed_rows(self.defaults, tokens).items()
        }
        values = default_values(self.defaults, tokens, rows, self.row_length)
        self._block_defaults = (first, stop, tokens, values)
        return tokens, values

    def _padding_row(self, s: int) -> np.ndarray:
        """Model s's padding row: the mean of its aligned rows, from one pass over them by blocks."""
        if s not in self._padding:
            step = max(1, BLOCK_ENTRIES // self.row_length)
            sums = (
                self._float32_block(s, first, min(first + step, self.tokens)).sum(axis=0, dtype=np.float64)
                for first in range(0, self.tokens, step)
            )
            self._padding[s] = padding_mean(sums, self.tokens)
        return self._padding[s]


def _rule_among(rule: TokenRule, position: dict[int, int], sources: list[_Source], name: str) -> TokenRule:
    """A token rule with its model (a source index) as an index among the models that have tensor `name`."""
    source = rule.source
    model = source.model if isinstance(source, RowOf) else source if isinstance(source, int) else None
    if model is None:
        return rule
    if model not in position:
        raise BadInput(
            f"tokenizer.tokens: a token's source {sources[model].checkpoint.label} has no tensor {name} "
            f"(as mergekit, refused)"
        )
    moved = RowOf(position[model], source.row) if isinstance(source, RowOf) else position[model]
    return TokenRule(moved, rule.force)


class AlignedCheckpoint(Checkpoint):
    """A checkpoint whose vocabulary tensors are the alignment's (their shape the output vocabulary's);
    every other tensor is the model's own."""

    def __init__(self, inner: Checkpoint, alignment: VocabularyAlignment, source: int):
        tensors = dict(inner.tensors)
        for name in alignment.names & set(inner.tensors):
            info = inner.tensors[name]
            # offset -1: not bytes in a file (read_float32 then copies, mapped() is ours)
            tensors[name] = TensorInfo(name, info.dtype, (alignment.rows, *info.shape[1:]), info.file, -1)
        super().__init__(inner.label, inner.folder, tensors, {})
        self.inner, self.alignment, self.source = inner, alignment, source

    def aligns(self, name: str) -> bool:
        """Whether tensor `name` is aligned to the output vocabulary (else it is the model's own)."""
        return name in self.alignment.names and name in self.inner.tensors

    def input_files(self) -> list[Path]:
        return self.inner.input_files()

    def read(self, name: str, start: int | None = None, stop: int | None = None, pinned: bool = False) -> torch.Tensor:
        if not self.aligns(name):
            return self.inner.read(name, start, stop, pinned)
        entries = self._entries(name, start, stop).to_torch()
        return entries.reshape(self.tensors[name].shape) if start is None and stop is None else entries

    def mapped(self, name: str, start: int, stop: int) -> Stored:
        if not self.aligns(name):
            return self.inner.mapped(name, start, stop)
        return self._entries(name, start, stop)

    def _entries(self, name: str, start: int | None, stop: int | None) -> Stored:
        """Entries [start, stop) of the aligned tensor, flattened: the block of the rows they lie in,
        assembled afresh (the alignment keeps no tensor)."""
        info = self.tensors[name]
        length = info.numel // info.shape[0]
        start, stop = start or 0, info.numel if stop is None else stop
        first, end = start // length, -(-stop // length)
        block = self.alignment.block(self.source, name, first, end).reshape(-1)
        return Stored(info.dtype, block[start - first * length : stop - first * length])

    def unmap(self, name: str, start: int, stop: int) -> None:
        if not self.aligns(name):
            self.inner.unmap(name, start, stop)

    def close(self) -> None:
        self.alignment.close()
        self.inner.close()


# ---------------------------------------------------------------- building the merged vocabulary


def _base_tokenizer(reference: Checkpoint) -> tuple[Any, bool]:
    """The base's tokenizer cut to its vocab_size (mergekit's), and whether that cut anything."""
    tokenizer = load_tokenizer(reference.folder, reference.label)
    count = len(tokenizer.get_vocab())
    stripped = stripped_tokenizer(tokenizer, config_vocab_size(reference.folder), reference.label)
    return stripped, len(stripped.get_vocab()) != count


def _tokenizers(checkpoints: list[Checkpoint], base_tokenizer: Any, union: bool) -> list[Any]:
    """Each distinct model's tokenizer (the base's own for a model without tokenizer files, as mergekit assumes;
    refused for a union, which needs them all)."""
    tokenizers = [base_tokenizer]
    for checkpoint in checkpoints[1:]:
        if has_tokenizer(checkpoint.folder):
            tokenizers.append(load_tokenizer(checkpoint.folder, checkpoint.label))
        elif union:
            raise BadInput(
                f"{checkpoint.label}: no tokenizer files (tokenizer.json, tokenizer.model, ...) in its folder; "
                f"tokenizer source union needs every model's tokenizer"
            )
        else:
            tokenizers.append(base_tokenizer)
    return tokenizers


def _find_model(reference: str, checkpoints: list[Checkpoint]) -> int | None:
    identity = source_identity(reference)
    for i, checkpoint in enumerate(checkpoints):
        if source_identity(checkpoint.label) == identity:
            return i
    return None


def _output_tokenizer(
    settings: TokenizerSettings, checkpoints: list[Checkpoint], tokenizers: list[Any], stripped: bool
) -> tuple[Any, Path | None]:
    """(the output tokenizer before the recipe's added tokens, the folder whose files it is unchanged)."""
    if settings.source == "base":
        return tokenizers[0], None if stripped else checkpoints[0].folder
    if settings.source == "union":
        sizes = [_vocab_size(c, t) for c, t in zip(checkpoints, tokenizers, strict=True)]
        return union_tokenizer(tokenizers[0], list(zip(tokenizers, sizes, strict=True))), None
    found = _find_model(settings.source, checkpoints)
    if found is not None:
        return load_tokenizer(checkpoints[found].folder, checkpoints[found].label), checkpoints[found].folder
    folder = Path(settings.source).expanduser()
    if folder.is_dir() and has_tokenizer(folder):
        return load_tokenizer(folder, settings.source), folder
    raise BadInput(
        f"tokenizer source {settings.source!r}: not union, base, one of the recipe's models, "
        f"or a folder with tokenizer files"
    )


def _vocab_size(checkpoint: Checkpoint, tokenizer: Any) -> int:
    return config_vocab_size(checkpoint.folder) or len(tokenizer.get_vocab())


def _with_added_tokens(tokenizer: Any, tokens: list[str]) -> Any:
    """The tokenizer with the recipe's tokens it lacks added (on a copy: the inputs' stay as they are)."""
    missing = [token for token in tokens if token not in tokenizer.get_vocab()]
    if not missing:
        return tokenizer
    tokenizer = copied_tokenizer(tokenizer)
    for token in missing:
        tokenizer.add_tokens(token)
    return tokenizer


def _token_rules(
    settings: TokenizerSettings, output: dict[str, int], checkpoints: list[Checkpoint], sources: list[_Source]
) -> dict[int, TokenRule]:
    """The recipe's `tokens:` entries, by output token index, their models as source indices."""
    rules = {}
    for token, entry in (settings.tokens or {}).items():
        where = f"tokenizer.tokens.{token}.source"
        source: int | RowOf | str | None = None
        if isinstance(entry.source, ZeroSource):
            source = ZERO
        elif isinstance(entry.source, ModelTokenSource):
            model = _model_index(entry.source.model, checkpoints, where)
            row = entry.source.token_id
            if row is None:
                row = sources[model].tokens.get(entry.source.token)
                if row is None:
                    raise BadInput(f"{where}: {entry.source.model} has no token {entry.source.token!r}")
            if row >= sources[model].vocab_size:
                raise BadInput(
                    f"{where}: token id {row} is out of range for {entry.source.model} "
                    f"(vocab_size {sources[model].vocab_size})"
                )
            source = RowOf(model, row)
        elif isinstance(entry.source, str):
            source = _model_index(entry.source, checkpoints, where)
            if sources[source].permutation[output[token]] < 0:
                raise BadInput(f"{where}: {entry.source} has no token {token!r}")
        rules[output[token]] = TokenRule(source, entry.force)
    return rules


def _model_index(reference: str, checkpoints: list[Checkpoint], where: str) -> int:
    found = _find_model(reference, checkpoints)
    if found is None:
        raise BadInput(f"{where}: {reference!r} is not one of the recipe's models (nor its base)")
    return found


def _vocabulary_names(reference: Checkpoint, sources: list[_Source]) -> set[str]:
    """The base's vocabulary tensors; each model's copy of them checked against its tokenizer."""
    names = set(vocabulary_tensor_names({n: i.shape for n, i in reference.tensors.items()}))
    if not names:
        raise BadInput(
            f"{reference.label}: no embedding tensor found (embed_tokens, wte, word_embeddings, lm_head, ...); "
            f"a tokenizer merge re-indexes their rows"
        )
    for source in sources:
        configured = config_vocab_size(source.checkpoint.folder)
        for name in sorted(names & set(source.checkpoint.tensors)):
            rows = source.checkpoint.tensors[name].shape[0]
            if configured is not None and rows != configured:
                raise BadInput(
                    f"{source.checkpoint.label}: tensor {name} has {rows} rows, but its config's vocab_size is "
                    f"{configured} (the embedding does not match the tokenizer)"
                )
            check_rows(source.checkpoint.label, name, rows, source.tokens, source.vocab_size)
    return names


def _needs_alignment(sources: list[_Source], names: set[str], rows: int, rules: dict[int, TokenRule]) -> bool:
    """False where every model's vocabulary tensors already hold the output's rows in the output's order."""
    if any(rule.force for rule in rules.values()):
        return True
    identity = np.arange(rows)
    for source in sources:
        if len(source.permutation) != rows or not np.array_equal(source.permutation, identity):
            return True
        if any(source.checkpoint.tensors[name].shape[0] != rows for name in names & set(source.checkpoint.tensors)):
            return True
    return False


def _folders(checkpoints: list[Checkpoint], copy_from: Path | None) -> list[Path]:
    return [folder for folder in [*(c.folder for c in checkpoints), copy_from] if folder is not None]


def _note(settings: TokenizerSettings, base_count: int, count: int, rows: int, names: set[str]) -> str:
    padding = f", padded to {rows} rows" if rows > count else ""
    return (
        f"tokenizer: {settings.source}: {count} tokens ({count - base_count:+d} against the base){padding}; "
        f"{', '.join(sorted(names))} aligned by token"
    )


def merged_vocabulary(
    recipe: Recipe, reference: Checkpoint, checkpoints: list[Checkpoint]
) -> tuple[OutputTokenizer, dict[int, Checkpoint]]:
    """The output tokenizer, and for each input checkpoint (by id) its view aligned to it; `checkpoints`
    the distinct inputs, the reference first. No view where nothing needs re-indexing."""
    settings = recipe.tokenizer_settings
    base_tokenizer, stripped = _base_tokenizer(reference)
    tokenizers = _tokenizers(checkpoints, base_tokenizer, settings.source == "union")
    out, copy_from = _output_tokenizer(settings, checkpoints, tokenizers, stripped)
    with_tokens = _with_added_tokens(out, list(settings.tokens or {}))
    if with_tokens is not out:  # no longer the unchanged tokenizer of any folder
        out, copy_from = with_tokens, None
    output = vocabulary(out)
    if list(output.values()) != list(range(len(output))):
        raise BadInput(f"tokenizer source {settings.source!r}: the merged tokenizer's ids are not 0..{len(output) - 1}")
    rows = padded_rows(len(output), settings.pad_to_multiple_of)
    sources = [_Source(c, vocabulary(t), _vocab_size(c, t)) for c, t in zip(checkpoints, tokenizers, strict=True)]
    for source in sources:
        source.permutation = permutation(output, source.tokens, source.vocab_size)
    rules = _token_rules(settings, output, checkpoints, sources)
    names = _vocabulary_names(reference, sources)
    config = next((file for file in config_files(reference.folder) if file.name == "config.json"), None)
    inputs = [file for folder in _folders(checkpoints, copy_from) for file in config_files(folder)]
    note = _note(settings, len(vocabulary(base_tokenizer)), len(output), rows, names)
    loaded = sum(len(source.tokens) for source in sources) + len(output)
    result = OutputTokenizer(out, output, rows, copy_from, config, list(dict.fromkeys(inputs)), note, loaded)
    if not _needs_alignment(sources, names, rows, rules):
        return result, {}
    base = 0 if recipe.base_model else None
    alignment = VocabularyAlignment(sources, names, rows, base, rules)
    return result, {id(c): AlignedCheckpoint(c, alignment, i) for i, c in enumerate(checkpoints)}
