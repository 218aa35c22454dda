"""Aligning embedding rows to a merged vocabulary (mergekit's PermutedVocabulary), as maths on
arrays: no files here (tokenizer_files.py reads them; aligned_checkpoint.py serves the result).

Each model's vocabulary tensor (input embedding, lm_head, their biases: the token axis first) is
re-indexed to the output vocabulary: row i of model m's aligned tensor is m's row for token i when
m has that token, else the token's default row, the same for every model lacking it. The default
(mergekit's rules, in this order): the recipe's `tokens:` source for the token; the one model that
has the token; zeros when none has it; the base's row when the base has it; else the mean of the rows
of the models that have it. `force` gives every model the default, its own row or not. Rows past the
vocabulary (pad_to_multiple_of) are each model's mean aligned row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import BadInput
from .lazy import torch

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


def default_tensor(default: Default, tensors: list[torch.Tensor], token_shape: tuple[int, ...]) -> torch.Tensor:
    """One default row, in float32."""
    if isinstance(default, RowOf):
        return tensors[default.model][default.row].to(torch.float32)
    if isinstance(default, MeanOf):
        total = torch.zeros(token_shape, dtype=torch.float32)
        for row in default.rows:
            total = total + tensors[row.model][row.row].to(torch.float32)
        return total / len(default.rows)
    return torch.zeros(token_shape, dtype=torch.float32)


def default_matrix(
    defaults: dict[int, Default], tensors: list[torch.Tensor], token_shape: tuple[int, ...]
) -> tuple[np.ndarray, torch.Tensor]:
    """(the output tokens that have a default, their default rows stacked, float32)."""
    indices = np.array(sorted(defaults), dtype=np.int64)
    if not len(indices):
        return indices, torch.zeros((0, *token_shape), dtype=torch.float32)
    return indices, torch.stack([default_tensor(defaults[i], tensors, token_shape) for i in indices.tolist()])


def aligned_tensor(
    tensor: torch.Tensor,
    p: np.ndarray,
    defaults: tuple[np.ndarray, torch.Tensor],
    forced: set[int],
    rows: int,
) -> torch.Tensor:
    """One model's tensor re-indexed to the output vocabulary, in float32: out[i] = tensor[p[i]] where
    p[i] >= 0 and i is not forced, else i's default (default_matrix); rows past len(p) (padding) = the
    mean of out[:len(p)]."""
    own = p >= 0
    own[sorted(forced)] = False
    kept = np.flatnonzero(own)
    out = torch.zeros((rows, *tensor.shape[1:]), dtype=torch.float32)
    out[torch.from_numpy(kept)] = tensor[torch.from_numpy(p[kept])].to(torch.float32)
    indices, values = defaults
    instead = ~own[indices]  # the defaults this model takes: tokens it lacks, or forced
    out[torch.from_numpy(indices[instead])] = values[torch.from_numpy(instead)]
    if rows > len(p):  # torch's float32 mean (pairwise sums), as mergekit: the same bits, which a trim's ties need
        out[len(p) :] = out[: len(p)].mean(dim=0)
    return out


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
