"""The recipe: YAML in, a validated `Recipe` out, or a one-line `BadInput` naming the key.

Recipes in mergekit's `models:` form load unchanged; tadrop adds `tadrop:`, `seed`,
`device`, `output:` and `policies:`. Which `parameters` a method takes comes from
the method registry (methods.py), so a new method needs no change here.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from .checkpoint import read_text_file
from .errors import BadInput
from .methods import METHODS, MergeMethod, ParamSpec
from .tadrop import STATISTICS

# the recipe's names for an output dtype, and safetensors' name for each
DTYPES = {
    "float32": "F32",
    "fp32": "F32",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
}
DTypeName = Literal["float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16"]
Policy = Literal["error", "skip_model", "copy_base"]
Number = StrictInt | StrictFloat


def parse_size(value: int | str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", value, re.IGNORECASE)
        if not match:
            raise ValueError(f"not a size: {value!r} (e.g. 5GB, 500MB, 2GiB)")
        unit = match.group(2).upper().rstrip("B")
        factor = {
            "": 1,
            "K": 10**3,
            "M": 10**6,
            "G": 10**9,
            "T": 10**12,
            "KI": 2**10,
            "MI": 2**20,
            "GI": 2**30,
            "TI": 2**40,
        }[unit]
        size = int(float(match.group(1)) * factor)
    if size <= 0:
        raise ValueError("must be positive")
    return size


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConditionalValue(_Strict):
    """mergekit's filtered parameter value: applies to tensors whose name contains `filter`."""

    filter: str | None = None
    value: StrictBool | Number | str


ParamValue = StrictBool | Number | str | list[ConditionalValue] | list[Number]


class TadropOverride(_Strict):
    """TADrop settings for the tensors whose name matches `filter` (a glob, e.g. '*mlp*')."""

    filter: str
    enabled: bool | None = None
    strength: float | None = Field(None, ge=-1.0, le=1.0)
    min_ratio: float | None = Field(None, ge=0.0, le=1.0)
    max_ratio: float | None = Field(None, ge=0.0, le=1.0)


class TadropSettings(_Strict):
    """Every setting of TADrop (see docs/tadrop.md); defaults as documented there."""

    enabled: bool = True
    statistic: Literal[STATISTICS] = "hoyer"  # type: ignore[valid-type]
    normalize: Literal["rank", "minmax"] = "rank"
    # signed: > 0 prunes concentrated tensors less, < 0 more (TADROP.md 2b); -0.2 won the zero-shot benchmark's
    # validation search and beat +0.2 on test, but not the uniform ratio (docs/quality_zeroshot.md)
    strength: float = Field(-0.2, ge=-1.0, le=1.0)
    min_ratio: float = Field(0.0, ge=0.0, le=1.0)
    max_ratio: float = Field(0.99, ge=0.0, le=1.0)
    min_numel: int = Field(4096, ge=0)
    # globs, matched case-insensitively: BERT's LayerNorm, GPT-2's ln_1 / ln_f, Llama's *_layernorm / norm
    exclude: list[str] = ["*norm*", "*.bias", "*.ln_*", "ln_*"]
    excluded_ratio: Literal["global", "none"] = "global"
    topmass_fraction: float = Field(0.01, gt=0.0, le=1.0)
    preserve_budget: bool = True
    overrides: list[TadropOverride] = []
    # which tensors' scores are normalised together (strength allocation); the budget is model-wide always
    scope: Literal["model", "kind", "layer"] = "model"
    # strength: p + strength * (1 - 2 s); mass / mass_reverse / global: kept counts with no knob (plan.py)
    allocation: Literal["strength", "mass", "mass_reverse", "global"] = "strength"
    mass_norm: Literal["l1", "l2"] = "l1"  # the mass of `allocation: mass`: sum |tau| or sum tau^2
    # random hosts (DARE, DELLA) rescale survivors by 1 / (1 - p_t): p_t <= 1 - 1 / max_rescale (never below p)
    max_rescale: float = Field(10.0, ge=1.0)

    @model_validator(mode="after")
    def _ratios_ordered(self) -> TadropSettings:
        if self.min_ratio > self.max_ratio:
            raise ValueError(f"min_ratio ({self.min_ratio}) must not exceed max_ratio ({self.max_ratio})")
        if self.scope != "model" and self.allocation != "strength":
            raise ValueError(
                f"scope: {self.scope} applies to allocation: strength only (got allocation: {self.allocation})"
            )
        return self


class ModelTadropSettings(_Strict):
    """Per-model TADrop settings: any field given replaces the recipe-level one for this model."""

    enabled: bool | None = None
    statistic: Literal[STATISTICS] | None = None  # type: ignore[valid-type]
    normalize: Literal["rank", "minmax"] | None = None
    strength: float | None = Field(None, ge=-1.0, le=1.0)
    min_ratio: float | None = Field(None, ge=0.0, le=1.0)
    max_ratio: float | None = Field(None, ge=0.0, le=1.0)
    min_numel: int | None = Field(None, ge=0)
    exclude: list[str] | None = None
    excluded_ratio: Literal["global", "none"] | None = None
    topmass_fraction: float | None = Field(None, gt=0.0, le=1.0)
    preserve_budget: bool | None = None
    overrides: list[TadropOverride] | None = None
    scope: Literal["model", "kind", "layer"] | None = None
    allocation: Literal["strength", "mass", "mass_reverse", "global"] | None = None
    mass_norm: Literal["l1", "l2"] | None = None
    max_rescale: float | None = Field(None, ge=1.0)


class ModelEntry(_Strict):
    model: str = Field(min_length=1)
    parameters: dict[str, ParamValue] = {}
    tadrop: ModelTadropSettings | None = None


class OutputSettings(_Strict):
    path: str | None = None
    dtype: DTypeName | None = None
    shard_size: StrictInt | str = Field("5GB", validate_default=True)

    @field_validator("shard_size")
    @classmethod
    def _parse_size(cls, value: int | str) -> int:
        return parse_size(value)


class Policies(_Strict):
    """What to do when a model lacks a tensor the base has, or has it in another shape."""

    missing_tensor: Policy = "error"
    shape_mismatch: Policy = "error"


class ModelTokenSource(_Strict):
    """A token's embedding taken from one model's row for a token of its own vocabulary (mergekit's model_token)."""

    kind: Literal["model_token"]
    model: str = Field(min_length=1)
    token_id: StrictInt | None = Field(None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one_token(self) -> ModelTokenSource:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id and token")
        return self


class ZeroSource(_Strict):
    """A token's embedding of zeros (mergekit's zero)."""

    kind: Literal["zero"]


class TokenEmbedding(_Strict):
    """Where one output token's embedding row comes from, for the models that lack the token (or, with
    force, for every model): a model (its row for this token), a model's row for another token, or zeros."""

    source: Annotated[ModelTokenSource | ZeroSource, Field(discriminator="kind")] | str | None = None
    force: StrictBool = False


class TokenizerSettings(_Strict):
    """mergekit's `tokenizer:` block: the output vocabulary (union, base or a model's), tokens to add
    and where their rows come from, and a padding of the vocabulary to a multiple of some number."""

    source: str = Field("union", min_length=1)
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: StrictInt | None = Field(None, ge=0)


class Recipe(_Strict):
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, ParamValue] = {}
    dtype: DTypeName | None = None
    out_dtype: DTypeName | None = None
    tokenizer_source: str | None = Field(None, min_length=1)  # union, base or a model reference
    tokenizer: TokenizerSettings | None = None
    name: str | None = None
    tadrop: TadropSettings | None = None
    seed: int = Field(0, ge=0, lt=2**63)
    device: str = "auto"
    output: OutputSettings = OutputSettings()
    policies: Policies = Policies()

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @property
    def method(self) -> MergeMethod:
        return METHODS[self.merge_method]

    @property
    def tokenizer_settings(self) -> TokenizerSettings | None:
        """The tokenizer merge asked for, in the `tokenizer:` block's form (None: none asked for)."""
        if self.tokenizer is not None:
            return self.tokenizer
        return TokenizerSettings(source=self.tokenizer_source) if self.tokenizer_source is not None else None

    @property
    def output_dtype(self) -> str | None:
        """The dtype to write, as safetensors names it ("BF16"), or None to keep each tensor's dtype in the base."""
        name = self.output.dtype or self.out_dtype or self.dtype
        return DTYPES[name] if name else None


# ---------------------------------------------------------------- values


def value_for_tensor(value: ParamValue, tensor_name: str, layer_position: float | None) -> Any:
    """Resolve a mergekit parameter value for one tensor.

    Scalars apply everywhere; a list of {filter, value} takes the first entry whose
    filter is a substring of the name, case-sensitive, or is "*" or absent (mergekit's
    rule: "*" is every tensor, not a glob); a list of numbers is a
    gradient, interpolated over the tensor's relative layer position (mergekit's rule:
    tensors outside numbered layers take the first value).
    """
    if not isinstance(value, list):
        return value
    if value and isinstance(value[0], ConditionalValue):
        for cond in value:
            if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
                return cond.value
        return None
    if layer_position is None or len(value) == 1:
        return value[0]
    scaled = layer_position * (len(value) - 1)
    low = min(int(scaled), len(value) - 2)
    frac = scaled - low
    return value[low] * (1 - frac) + value[low + 1] * frac


# ---------------------------------------------------------------- loading


def _unwrap_model(annotation: Any) -> type | None:
    """The BaseModel class inside `X | None` / list[...] annotations, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _unwrap_model(arg)
        if found:
            return found
    return None


def _allowed_keys(loc: tuple) -> list[str]:
    cls: type | None = Recipe
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


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'? " if close else ""


def _first_error(error: ValidationError) -> str:
    """One readable line for the most relevant pydantic error."""
    errors = error.errors()
    # Unions report one error per branch; the most specific (longest path) reads best.
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    chosen = unknown[0] if unknown else max(errors, key=lambda e: len(e["loc"]))
    loc = tuple(p for p in chosen["loc"])
    where = _format_loc(loc)
    if chosen["type"] == "extra_forbidden":
        key = str(loc[-1])
        allowed = _allowed_keys(loc[:-1])
        listed = f"allowed keys: {', '.join(allowed)}" if allowed else "not a key of this mapping"
        return f"{where}: unknown key; {_suggest(key, allowed)}{listed}"
    if chosen["type"] == "missing":
        return f"{where}: required key is missing"
    got = chosen.get("input")
    got_text = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
    return f"{where}: {chosen['msg'].removeprefix('Value error, ')}{got_text}"


def check_method_parameters(recipe: Recipe) -> None:
    """Check `parameters` against what the chosen method takes (names, types, ranges)."""
    method = recipe.method

    def check(where: str, params: dict[str, ParamValue], per_model_only: bool) -> None:
        for key, value in params.items():
            spec = method.param(key)
            if spec is None or (per_model_only and not spec.per_model):
                allowed = [p.name for p in method.params if p.per_model or not per_model_only]
                raise BadInput(
                    f"{where}.{key}: not a parameter of {method.name}; "
                    f"{_suggest(key, allowed)}allowed: {', '.join(allowed)}"
                )
            if isinstance(value, list) and not value:
                raise BadInput(
                    f"{where}.{key}: an empty list is neither a value nor a gradient; give a number or a non-empty list"
                )
            values = value if isinstance(value, list) else [value]
            for v in values:
                _check_value(f"{where}.{key}", spec, v.value if isinstance(v, ConditionalValue) else v)

    check("parameters", recipe.parameters, per_model_only=False)
    for i, entry in enumerate(recipe.models):
        check(f"models[{i}].parameters", entry.parameters, per_model_only=True)


def _check_value(where: str, spec: ParamSpec, value: Any) -> None:
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise BadInput(f"{where}: must be true or false (got {value!r})")
        return
    if spec.kind == "rescale":
        if not (isinstance(value, bool) or value in ("none", "paper", "l1", "l2", "linf")):
            raise BadInput(f"{where}: must be true, false, paper, l1, l2, linf or none (got {value!r})")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInput(f"{where}: must be a number (got {value!r})")
    if value != value or value in (float("inf"), float("-inf")):
        raise BadInput(f"{where}: must be a finite number (got {value!r})")
    if spec.low is not None and value < spec.low or spec.high is not None and value > spec.high:
        raise BadInput(f"{where}: must be between {spec.low} and {spec.high} (got {value!r})")


def source_identity(reference: str) -> str:
    """What a model reference points at: the resolved path of a local file or folder (so that
    `m/`, `./m` and a link to m are one model), else the reference itself (a Hub id)."""
    path = Path(reference).expanduser()
    return str(path.resolve()) if path.exists() else reference


def check_consistency(recipe: Recipe) -> None:
    """Rules that span several keys."""
    method = recipe.method
    if recipe.base_model is None and method.name != "linear":
        raise BadInput(f"base_model: required for {method.name} (only linear merges without a base)")
    seen: dict[str, int] = {}
    for i, entry in enumerate(recipe.models):
        key = source_identity(entry.model)
        if key in seen:
            raise BadInput(f"models[{i}].model: {entry.model!r} is listed twice (also models[{seen[key]}])")
        seen[key] = i
    if recipe.output.dtype and recipe.out_dtype and DTYPES[recipe.output.dtype] != DTYPES[recipe.out_dtype]:
        raise BadInput(f"output.dtype: {recipe.output.dtype} contradicts out_dtype: {recipe.out_dtype}; give one")
    if recipe.tokenizer_source is not None and recipe.tokenizer is not None:
        raise BadInput("tokenizer_source: give either tokenizer_source or a tokenizer block, not both (as mergekit)")
    if recipe.tadrop is not None and recipe.tadrop.enabled and method.sparsifier is None:
        hint = (
            " (use magnitude_prune: task arithmetic with a magnitude trim)" if method.name == "task_arithmetic" else ""
        )
        raise BadInput(f"tadrop: {method.name} does not sparsify, so TADrop has nothing to adapt{hint}")


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate an already-parsed YAML document. Raises BadInput with a one-line reason."""
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise BadInput(f"{source}: a recipe must be a mapping of keys (got {kind})")
    method_name = data.get("merge_method")
    if isinstance(method_name, str) and method_name not in METHODS:
        raise BadInput(
            f"{source}: merge_method: unknown method {method_name!r}; "
            f"{_suggest(method_name, list(METHODS))}valid: {', '.join(METHODS)}"
        )
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        raise BadInput(f"{source}: {_first_error(error)}") from None
    try:
        check_method_parameters(recipe)
        check_consistency(recipe)
    except BadInput as error:
        raise BadInput(f"{source}: {error}") from None
    return recipe


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


class _RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice in one mapping (PyYAML keeps the last
    silently, so a recipe could say one thing and do another). Merge keys (<<) may be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
            except TypeError:  # an unhashable key: the constructor refuses it below
                pass
        return super().construct_mapping(node, deep)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: recipe not found")
    if path.is_dir():
        raise BadInput(f"{path}: not a file")
    try:
        text = read_text_file(path)
        data = yaml.load(text, Loader=_RecipeLoader)
    except _DuplicateKey as duplicate:
        raise BadInput(
            f"{path}: key {duplicate.key!r} appears twice in one mapping (the second at line {duplicate.line})"
        ) from None
    except RecursionError:
        raise BadInput(f"{path}: nested too deeply to read") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise BadInput(f"{path}: not valid YAML{where}: {problem}") from None
    return parse_recipe(data, str(path))


def recipe_digest(recipe: Recipe) -> str:
    """A stable digest of the validated recipe (output path excluded), for metadata and resume."""
    data = recipe.model_dump(mode="json")
    data["output"].pop("path", None)
    return hashlib.sha256(yaml.safe_dump(data, sort_keys=True).encode()).hexdigest()
