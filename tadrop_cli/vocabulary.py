"""Aligning embedding rows to a merged vocabulary (mergekit's PermutedVocabulary), as maths on
arrays: no files here (tokenizer_files.py reads them; aligned_checkpoint.py serves the result).

Each model's vocabulary tensor (input embedding, lm_head, their biases: the token axis first) is
re-indexed to the output vocabulary: row i of model m's aligned tensor is m's row for token i when
m has that token, else the token's default row, the same for every model lacking it. The default
(mergekit's rules, in this order): the recipe's `tokens:` source for the token; the one model that
has the token; zeros when none has it; the base's row when the base has it; else the mean of the rows
of the models that have it. `force` gives every model the default, its own row or not. Rows past the
vocabulary (pad_to_multiple_of) are each model's mean aligned row (padding_mean). These functions
work on a block of output rows at a time: aligned_checkpoint.py reads a block's rows and assembles it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .errors import BadInput

# the input and output embeddings (and output biases) of the architectures mergekit knows, by module name
VOCABULARY_TENSOR = re.compile(
    r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings|embed_in|embed_out|lm_head|lm_head\.linear|"
    r"lm_head\.decoder|output_layer|vocab_projector|backbone\.embeddings)\.(weight|bias)$"
    r"|^(shared|output)\.weight$|(^|\.)cls\.predictions(\.decoder)?\.(weight|bias)$"
)


def vocabulary_tensor_names(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The names that look like embedding or output-head tensors, whatever their shape."""
    return [name for name, shape in shapes.items() if VOCABULARY_TENSOR.search(name) and len(shape) in (1, 2)]


def permutation(output: dict[str, int], tokens: dict[str, int], vocab_size: int) -> np.ndarray:
    """p[i] = the model's row for output token i, or -1 where it lacks the token (or has it at an id of
    vocab_size or more: no row)."""
    p = np.full(len(output), -1, dtype=np.int64)
    for token, i in output.items():
        row = tokens.get(token)
        if row is not None and row < vocab_size:
            p[i] = row
    return p


@dataclass(frozen=True)
class RowOf:
    """Model `model`'s stored row `row` (a token of its own vocabulary)."""

    model: int
    row: int


@dataclass(frozen=True)
class MeanOf:
    """The mean of the stored rows of some models: sum in the models' order, then a division (as mergekit)."""

    rows: tuple[RowOf, ...]


ZERO = "zero"
Default = RowOf | MeanOf | str  # str: ZERO


@dataclass(frozen=True)
class TokenRule:
    """The recipe's `tokens:` entry for one token, its models given as indices: `source` a model (its row
    for this token), RowOf (a model's row for another token), ZERO, or None (mergekit's rules)."""

    source: int | RowOf | str | None
    force: bool


def default_rows(
    permutations: list[np.ndarray], base: int | None, rules: dict[int, TokenRule]
) -> tuple[dict[int, Default], set[int]]:
    """({output token: its default row}, {forced tokens}), for the tokens some model lacks or that are
    forced; `permutations` of the models that have the tensor, `base` the base's index among them, `rules`
    the recipe's tokens by output index."""
    present = np.stack([p >= 0 for p in permutations])  # models x tokens
    missing = np.flatnonzero(~present.all(axis=0))
    defaults: dict[int, Default] = {}
    forced = {i for i, rule in rules.items() if rule.force}
    for i in sorted({*missing.tolist(), *forced}):
        have = np.flatnonzero(present[:, i]).tolist()
        rule = rules.get(i)
        if rule is not None and rule.source is not None:
            defaults[i] = _from_rule(rule.source, permutations, i)
        elif len(have) == 1:
            defaults[i] = RowOf(have[0], int(permutations[have[0]][i]))
        elif not have:
            defaults[i] = ZERO
        elif base is not None and present[base, i]:
            defaults[i] = RowOf(base, int(permutations[base][i]))
        else:
            defaults[i] = MeanOf(tuple(RowOf(m, int(permutations[m][i])) for m in have))
    return defaults, forced


def _from_rule(source: int | RowOf | str, permutations: list[np.ndarray], i: int) -> Default:
    if isinstance(source, int):  # a model: its row for this very token
        if permutations[source][i] < 0:
            raise BadInput(f"token index {i}: its source model does not have the token")
        return RowOf(source, int(permutations[source][i]))
    return source


def needed_rows(defaults: dict[int, Default], tokens: Iterable[int]) -> dict[int, np.ndarray]:
    """{model: its stored rows (sorted, distinct)} that the defaults of `tokens` are made of."""
    rows: dict[int, set[int]] = {}
    for i in tokens:
        default = defaults[i]
        for row in default.rows if isinstance(default, MeanOf) else (default,) if isinstance(default, RowOf) else ():
            rows.setdefault(row.model, set()).add(row.row)
    return {model: np.array(sorted(found), dtype=np.int64) for model, found in rows.items()}


def default_values(
    defaults: dict[int, Default], tokens: np.ndarray, rows: dict[int, tuple[np.ndarray, np.ndarray]], row_length: int
) -> np.ndarray:
    """The default rows of `tokens`, float32, one per token: a model's row; a MeanOf's rows summed in
    the models' order, then divided by their count (float32, as mergekit); or zeros. `rows`: {model:
    (its stored row numbers, those rows in float32)}, from needed_rows."""
    values = np.zeros((len(tokens), row_length), dtype=np.float32)
    where = {model: {int(r): k for k, r in enumerate(numbers)} for model, (numbers, _) in rows.items()}

    def value(row: RowOf) -> np.ndarray:
        return rows[row.model][1][where[row.model][row.row]]

    for k, i in enumerate(tokens.tolist()):
        default = defaults[i]
        if isinstance(default, RowOf):
            values[k] = value(default)
        elif isinstance(default, MeanOf):
            total = np.zeros(row_length, dtype=np.float32)
            for row in default.rows:
                total = total + value(row)
            values[k] = total / np.float32(len(default.rows))
    return values


def own_rows(p: np.ndarray, forced: set[int]) -> np.ndarray:
    """s[i] = the stored row that output token i keeps (p[i]); -1 where the model takes the token's
    default instead (it lacks the token, or the token is forced)."""
    own = p.copy()
    own[sorted(forced)] = -1
    return own


def padding_mean(block_sums: Iterable[np.ndarray], tokens: int) -> np.ndarray:
    """A padding row: the mean of a model's aligned rows [0, tokens), from the float64 sums of its
    blocks of rows (each model's float32 rows summed in float64, so the result does not depend on the
    blocks), rounded once to float32."""
    total = None
    for block_sum in block_sums:
        total = block_sum if total is None else total + block_sum
    return (total / tokens).astype(np.float32)


def check_rows(label: str, name: str, rows: int, tokens: dict[str, int], vocab_size: int) -> None:
    """A vocabulary tensor must have a row for each token its tokenizer gives an id below vocab_size."""
    used = [(index, token) for token, index in tokens.items() if index < vocab_size]
    if not used:
        raise BadInput(f"{label}: its tokenizer has no token below vocab_size {vocab_size}")
    index, token = max(used)
    if index >= rows:
        raise BadInput(
            f"{label}: tensor {name} has {rows} rows, but its tokenizer gives token {token!r} id {index} "
            f"(the embedding does not match the tokenizer)"
        )
