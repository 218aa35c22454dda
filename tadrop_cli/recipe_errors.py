"""One-line messages for bad recipes: pydantic's errors made readable, typo suggestions, and the
mergekit features tadrop knows of but does not read yet.

Free of the recipe's schema: the schema to read keys from is passed in (recipe.py passes `Recipe`).
"""

from __future__ import annotations

import difflib
import typing
from typing import Any, Literal

from pydantic import BaseModel, ValidationError


def _unwrap_model(annotation: Any) -> type | None:
    """The BaseModel class inside `X | None` / list[...] annotations, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _unwrap_model(arg)
        if found:
            return found
    return None


def _allowed_keys(schema: type[BaseModel], loc: tuple) -> list[str]:
    """The keys the mapping at `loc` of `schema` takes ([] when unknown)."""
    cls: type | None = schema
    for part in loc:
        if isinstance(part, int) or cls is None:
            continue
        field = cls.model_fields.get(part)
        cls = _unwrap_model(field.annotation) if field else None
    return list(cls.model_fields) if cls else []


def _format_loc(loc: tuple) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not (
            isinstance(part, str)
            and (
                part in ("list[ConditionalValue]", "list[union[int,float]]")
                or part[:1].isupper()
                or part.startswith(("function-", "constrained-", "literal[", "tagged-union["))
            )
        ):
            text += f".{part}" if text else str(part)
    return text or "(top level)"


# mergekit 0.1.5 methods and top-level recipe keys that tadrop knows of but does not read yet:
# name -> (merge_method or key, what it is). An unknown name found here is named as such rather
# than matched to a look-alike. Remove a row when its feature lands.
MERGEKIT_NOT_YET: dict[str, tuple[Literal["merge_method", "key"], str]] = {
    "ram": ("merge_method", "mergekit's Reinforced Agent Merging"),
    "ramplus_tl": ("merge_method", "mergekit's Reinforced Agent Merging Plus (tensor-local)"),
    "modules": ("key", "mergekit's per-module recipe form (a recipe per module of a multi-module model)"),
}
SUGGESTION_RATIO = 0.8  # difflib's similarity from which an unknown name is taken for a typo


def _one_edit_apart(a: str, b: str) -> bool:
    """Whether b is a with one character inserted, deleted, replaced, or two neighbours swapped."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diffs = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        return len(diffs) == 1 or (len(diffs) == 2 and diffs[1] == diffs[0] + 1 and a[diffs[0]] == b[diffs[1]])
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def _close_match(word: str, choices: list[str]) -> str | None:
    """The choice `word` is likely a typo of (case aside): one edit away, or difflib ratio >= 0.8."""
    lowered = {c.lower(): c for c in choices}
    key = word.lower()
    if key in lowered:
        return lowered[key]
    edits = [c for k, c in lowered.items() if _one_edit_apart(key, k)]
    if edits:
        return edits[0]
    close = difflib.get_close_matches(key, list(lowered), n=1, cutoff=SUGGESTION_RATIO)
    return lowered[close[0]] if close else None


def suggest(word: str, choices: list[str]) -> str:
    close = _close_match(word, choices)
    return f"did you mean '{close}'? " if close else ""


def not_yet(name: str, kind: Literal["merge_method", "key"]) -> str | None:
    """The sentence for a mergekit method or key that tadrop does not read yet, or None."""
    found_kind, what = MERGEKIT_NOT_YET.get(name, (None, ""))
    return f"'{name}' is {what}; tadrop does not support it yet" if found_kind == kind else None


def first_error(error: ValidationError, schema: type[BaseModel]) -> str:
    """One readable line for the most relevant pydantic error of validating `schema` (the recipe's model)."""
    errors = error.errors()
    # Unions report one error per branch; the most specific (longest path) reads best.
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    chosen = unknown[0] if unknown else max(errors, key=lambda e: len(e["loc"]))
    loc = tuple(p for p in chosen["loc"])
    where = _format_loc(loc)
    if chosen["type"] == "extra_forbidden":
        key = str(loc[-1])
        # the key itself is printed as given (_format_loc drops capitalised parts, pydantic's class names)
        parent = _format_loc(loc[:-1]) if len(loc) > 1 else ""
        where = f"{parent}.{key}" if parent and parent != "(top level)" else key
        allowed = ["filter", "value"] if _in_parameter_value(loc[:-1]) else _allowed_keys(schema, loc[:-1])
        unsupported = not_yet(key, "key") if len(loc) == 1 else None
        if unsupported:
            return f"{where}: {unsupported}"
        listed = f"allowed keys: {', '.join(allowed)}" if allowed else "not a key of this mapping"
        return f"{where}: unknown key; {suggest(key, allowed)}{listed}"
    if chosen["type"] == "missing":
        return f"{where}: required key is missing"
    got = chosen.get("input")
    got_text = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
    if _in_parameter_value(loc):  # one error per type a value may have: name them all instead
        return f"{_format_loc(_without_type_tags(loc))}: {PARAMETER_VALUE_FORMS}{got_text}"
    return f"{where}: {chosen['msg'].removeprefix('Value error, ')}{got_text}"


PARAMETER_VALUE_FORMS = (
    "not a parameter value: give a number, true/false, a name, a gradient (list of numbers) "
    "or {filter, value} entries (a value may be a gradient)"
)


def _in_parameter_value(loc: tuple) -> bool:
    """Whether an error's path lies inside a `parameters` value (the recipe's or a model's)."""
    return (len(loc) > 1 and loc[0] == "parameters") or (len(loc) > 3 and loc[0] == "models" and loc[2] == "parameters")


def _without_type_tags(loc: tuple) -> tuple:
    """The path without pydantic's names of union members (bool, int, float, str, list[...])."""
    return tuple(p for p in loc if not (isinstance(p, str) and (p in ("bool", "int", "float", "str") or "[" in p)))
