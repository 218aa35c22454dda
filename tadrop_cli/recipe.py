"""The recipe: YAML in, a validated `Recipe` out, or a one-line `BadInput` naming the key.

Recipes in mergekit's `models:` form load unchanged; tadrop adds `tadrop:`, `seed`,
`device`, `output:` and `policies:`. Which `parameters` a method takes comes from
the method registry (methods.py), so a new method needs no change here.
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from .chat_templates import NAMES as CHAT_TEMPLATES
from .checkpoint import read_text_file
from .errors import BadInput
from .methods import METHODS, MergeMethod, ParamSpec
from .parameter_values import ParamValue, scalars
from .recipe_errors import first_error, not_yet, suggest
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
    # signed: > 0 prunes concentrated tensors less, < 0 more (TADROP.md 2b). Default 0, the uniform ratio:
    # no strength beat it on the quality benchmarks (docs/tadrop.md: the sign that helps changes with the
    # benchmark and with the pretrained base)
    strength: float = Field(0.0, ge=-1.0, le=1.0)
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


class SliceSource(_Strict):
    """One model's layers [start, stop) in an output slice (mergekit's InputSliceDefinition)."""

    model: str = Field(min_length=1)
    layer_range: tuple[StrictInt, StrictInt]
    parameters: dict[str, ParamValue] = {}

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 0 or value[1] <= value[0]:
            raise ValueError(f"must be [start, stop] with 0 <= start < stop (got {list(value)})")
        return value


class OutputSlice(_Strict):
    """Consecutive output layers, each merged from one layer of every source (mergekit's OutputSliceDefinition)."""

    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None  # this slice's base; the recipe's where absent
    residual_weight: float | None = None  # accepted as mergekit 0.1.5 accepts it; it has no effect there either
    parameters: dict[str, ParamValue] = {}

    @property
    def layers(self) -> int:
        start, stop = self.sources[0].layer_range
        return stop - start


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
    models: list[ModelEntry] | None = Field(None, min_length=1)
    slices: list[OutputSlice] | None = Field(None, min_length=1)  # instead of models: layers stacked by slices
    chat_template: str | None = None  # mergekit's: a template's name (chatml, ...), auto, or a Jinja template
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

    @model_validator(mode="after")
    def _models_or_slices(self) -> Recipe:
        if (self.models is None) == (self.slices is None):
            where = "models" if self.models is None else "slices"
            raise ValueError(
                f"{where}: give either models (a merge of whole models) or slices (layer ranges), not "
                + ("neither" if self.models is None else "both")
            )
        return self

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


# ---------------------------------------------------------------- loading


def check_method_parameters(recipe: Recipe) -> None:
    """Check `parameters` against what the chosen method takes (names, types, ranges)."""
    method = recipe.method

    def check(where: str, params: dict[str, ParamValue], per_model_only: bool) -> None:
        for key, value in params.items():
            spec = method.param(key)
            if spec is None or (per_model_only and not spec.per_model):
                allowed = [p.name for p in method.params if p.per_model or not per_model_only]
                listed = (
                    f"allowed: {', '.join(allowed)}"
                    if allowed
                    else f"{method.name} takes none{' per model' * per_model_only}"
                )
                raise BadInput(f"{where}.{key}: not a parameter of {method.name}; {suggest(key, allowed)}{listed}")
            for v in scalars(f"{where}.{key}", value):
                _check_value(f"{where}.{key}", spec, v)

    check("parameters", recipe.parameters, per_model_only=False)
    for i, entry in enumerate(recipe.models or []):
        check(f"models[{i}].parameters", entry.parameters, per_model_only=True)
    for i, output_slice in enumerate(recipe.slices or []):
        check(f"slices[{i}].parameters", output_slice.parameters, per_model_only=False)
        for j, source in enumerate(output_slice.sources):
            check(f"slices[{i}].sources[{j}].parameters", source.parameters, per_model_only=True)
    for spec in method.params:
        if spec.required and not spec.per_model and not _given_everywhere(recipe, spec.name):
            raise BadInput(f"parameters.{spec.name}: required by {method.name} ({spec.doc})")


def _given_everywhere(recipe: Recipe, name: str) -> bool:
    """Whether a global parameter is given for the whole recipe, or in every slice of a slices recipe."""
    if name in recipe.parameters:
        return True
    return bool(recipe.slices) and all(name in output_slice.parameters for output_slice in recipe.slices)


def _check_value(where: str, spec: ParamSpec, value: Any) -> None:
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise BadInput(f"{where}: must be true or false (got {value!r})")
        return
    if spec.kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise BadInput(f"{where}: must be a whole number (got {value!r})")
    if spec.kind == "rescale":
        if not (isinstance(value, bool) or value in ("none", "paper", "l1", "l2", "linf")):
            raise BadInput(f"{where}: must be true, false, paper, l1, l2, linf or none (got {value!r})")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInput(f"{where}: must be a number (got {value!r})")
    if value != value or value in (float("inf"), float("-inf")):
        raise BadInput(f"{where}: must be a finite number (got {value!r})")
    if spec.low is not None and value < spec.low or spec.high is not None and value > spec.high:
        if spec.high is None:
            raise BadInput(f"{where}: must be at least {spec.low} (got {value!r})")
        if spec.low is None:
            raise BadInput(f"{where}: must be at most {spec.high} (got {value!r})")
        raise BadInput(f"{where}: must be between {spec.low} and {spec.high} (got {value!r})")


def source_identity(reference: str) -> str:
    """What a model reference points at: the resolved path of a local file or folder (so that
    `m/`, `./m` and a link to m are one model), else the reference itself (a Hub id)."""
    path = Path(reference).expanduser()
    return str(path.resolve()) if path.exists() else reference


def check_consistency(recipe: Recipe) -> None:
    """Rules that span several keys."""
    method = recipe.method
    if recipe.slices is not None:
        check_slices(recipe)
    else:
        if recipe.base_model is None and method.name not in BASELESS and not method.base_optional:
            baseless = ", ".join(m.name for m in METHODS.values() if m.base_optional or m.name in BASELESS)
            raise BadInput(f"base_model: required for {method.name} (methods that merge without a base: {baseless})")
        if method.name == "passthrough" and len(recipe.models) > 1:
            raise BadInput(
                f"models: passthrough takes one model (got {len(recipe.models)}); to stack layers, use slices"
            )
        check_model_count(recipe)
    seen: dict[str, int] = {}
    for i, entry in enumerate(recipe.models or []):
        key = source_identity(entry.model)
        if key in seen:
            raise BadInput(f"models[{i}].model: {entry.model!r} is listed twice (also models[{seen[key]}])")
        seen[key] = i
    if recipe.chat_template is not None:
        check_chat_template(recipe.chat_template)
    if recipe.output.dtype and recipe.out_dtype and DTYPES[recipe.output.dtype] != DTYPES[recipe.out_dtype]:
        raise BadInput(f"output.dtype: {recipe.output.dtype} contradicts out_dtype: {recipe.out_dtype}; give one")
    if recipe.tokenizer_source is not None and recipe.tokenizer is not None:
        raise BadInput("tokenizer_source: give either tokenizer_source or a tokenizer block, not both (as mergekit)")
    if recipe.tadrop is not None and recipe.tadrop.enabled and method.sparsifier is None:
        hint = (
            " (use magnitude_prune: task arithmetic with a magnitude trim)" if method.name == "task_arithmetic" else ""
        )
        reason = method.no_tadrop or f"{method.name} does not sparsify"
        raise BadInput(f"tadrop: {reason}, so TADrop has nothing to adapt{hint}")


def check_model_count(recipe: Recipe) -> None:
    """A method that merges a set number of models (MergeMethod.model_count: slerp the base and one
    other, nuslerp two) is given that many besides the base (a base listed among them is not counted)."""
    base = source_identity(recipe.base_model) if recipe.base_model else None
    count = sum(source_identity(entry.model) != base for entry in recipe.models)
    _check_count("models", recipe.method, count, recipe.base_model is not None)


def _check_count(where: str, method: MergeMethod, count: int, has_base: bool) -> None:
    low, high = method.model_count
    if low <= count and (high is None or count <= high):
        return
    wanted = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
    noun = "model" if wanted.endswith(" 1") else "models"
    besides = " besides the base" if has_base else ""
    raise BadInput(f"{where}: {method.name} merges {wanted} {noun}{besides} (got {count})")


BASELESS = ("linear", "passthrough")  # mergekit ignores their base_model: the models themselves are merged


def slice_base(recipe: Recipe, output_slice: OutputSlice) -> str | None:
    """The base model of one slice: its own base_model, else the recipe's (None for linear and passthrough,
    which mergekit merges without one)."""
    if recipe.method.name in BASELESS:
        return None
    return output_slice.base_model or recipe.base_model


def check_slices(recipe: Recipe) -> None:
    """A slices recipe's rules that need no model: each slice's sources span the same number of layers,
    name a model once, and include the slice's base (mergekit merges a slice's sources only)."""
    method = recipe.method
    for i, output_slice in enumerate(recipe.slices):
        where = f"slices[{i}]"
        if method.name == "passthrough" and len(output_slice.sources) > 1:
            raise BadInput(f"{where}.sources: passthrough takes one source per slice (got {len(output_slice.sources)})")
        seen: dict[str, int] = {}
        for j, source in enumerate(output_slice.sources):
            start, stop = source.layer_range
            if stop - start != output_slice.layers:
                first = output_slice.sources[0].layer_range
                raise BadInput(
                    f"{where}.sources[{j}].layer_range: [{start}, {stop}] spans {stop - start} layer(s), "
                    f"sources[0]'s [{first[0]}, {first[1]}] spans {output_slice.layers}; "
                    f"a slice's sources must span the same number of layers"
                )
            key = source_identity(source.model)
            if key in seen:
                raise BadInput(
                    f"{where}.sources[{j}].model: {source.model!r} is listed twice in this slice "
                    f"(also sources[{seen[key]}]); give it another slice"
                )
            seen[key] = j
        base = slice_base(recipe, output_slice)
        if base is None and method.name not in BASELESS and not method.base_optional:
            raise BadInput(f"{where}: {method.name} needs a base model (base_model: in the recipe or the slice)")
        if base is not None and source_identity(base) not in seen:
            raise BadInput(
                f"{where}.sources: the base model {base!r} is not among this slice's sources; "
                f"give it a layer_range here (mergekit merges a slice's sources only)"
            )
        if method.interpolates or method.model_count[1] is not None:  # (a slice of the base alone is the base)
            _check_count(f"{where}.sources", method, len(seen) - (base is not None), base is not None)


def check_chat_template(value: str) -> None:
    """mergekit's rule for chat_template: a known name, auto, or a Jinja template (with '{', at least 20 characters)."""
    if value == "auto" or value in CHAT_TEMPLATES:
        return
    if len(value) < 20 or "{" not in value:
        raise BadInput(
            f"chat_template: {value[:60]!r} is neither a template name ({', '.join(CHAT_TEMPLATES)}, auto) "
            f"nor a Jinja template"
        )


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate an already-parsed YAML document. Raises BadInput with a one-line reason."""
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise BadInput(f"{source}: a recipe must be a mapping of keys (got {kind})")
    method_name = data.get("merge_method")
    if isinstance(method_name, str) and method_name not in METHODS:
        unsupported = not_yet(method_name, "merge_method")
        typo = suggest(method_name, list(METHODS))
        reason = f"{unsupported}; " if unsupported else f"unknown method {method_name!r}; {typo}"
        raise BadInput(f"{source}: merge_method: {reason}valid: {', '.join(METHODS)}")
    if "models" not in data and "slices" not in data:
        raise BadInput(f"{source}: models: required key is missing (or give slices: layer ranges of models)")
    models = data.get("models")
    for i, entry in enumerate(models if isinstance(models, list) else []):
        if isinstance(entry, dict) and "layer_range" in entry:
            raise BadInput(
                f"{source}: models[{i}].layer_range: a models: entry is a whole model (mergekit 0.1.5 ignores "
                f"layer_range there); to take layers, write slices: [{{sources: [{{model, layer_range}}]}}]"
            )
    if "models" in data and "slices" in data:
        raise BadInput(f"{source}: slices: give either models (whole models) or slices (layer ranges), not both")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        raise BadInput(f"{source}: {first_error(error, Recipe)}") from None
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


def read_documents(path: str | Path) -> list[Any]:
    """The YAML documents of a recipe file (a multi-document recipe has several, separated by ---)."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: recipe not found")
    if path.is_dir():
        raise BadInput(f"{path}: not a file")
    try:
        text = read_text_file(path)
        return list(yaml.load_all(text, Loader=_RecipeLoader))
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


def load_recipe(path: str | Path) -> Recipe:
    documents = [d for d in read_documents(path) if d is not None] or [None]
    if len(documents) > 1:
        raise BadInput(
            f"{path}: holds {len(documents)} recipes (a multi-document recipe); "
            f"`tadrop merge` runs it, one merge at a time"
        )
    return parse_recipe(documents[0], str(path))


# ---------------------------------------------------------------- multi-document recipes


@dataclass(frozen=True)
class Step:
    """One merge of a multi-document recipe: its recipe (earlier merges' names replaced by their outputs),
    its name (None: the final, unnamed merge), its output (None: --output or its own output.path), and the
    names of the merges whose outputs it reads."""

    name: str | None
    recipe: Recipe
    output: Path | None
    uses: frozenset[str]


def _step_name(document: Any, where: str) -> str | None:
    name = document.get("name")
    if name is None:
        return None
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise BadInput(f"{where}: name: {name!r} must be a plain folder name (it names the merge's output folder)")
    return name


def _list(value: Any) -> list:
    """A YAML value where a list is expected; anything else is refused later, by parse_recipe."""
    return value if isinstance(value, list) else []


def _with_outputs(document: dict, outputs: dict[str, str]) -> tuple[dict, set[str]]:
    """The document with every model reference that is a merge's name replaced by that merge's output
    (mergekit-multi's rule), and the names it used."""
    used: set[str] = set()

    def resolved(value: Any) -> Any:
        if isinstance(value, str) and value in outputs:
            used.add(value)
            return outputs[value]
        return value

    document = copy.deepcopy(document)
    document.pop("name", None)
    if "base_model" in document:
        document["base_model"] = resolved(document["base_model"])
    for entry in _list(document.get("models")):
        if isinstance(entry, dict) and "model" in entry:
            entry["model"] = resolved(entry["model"])
    for output_slice in _list(document.get("slices")):
        if not isinstance(output_slice, dict):
            continue
        if "base_model" in output_slice:
            output_slice["base_model"] = resolved(output_slice["base_model"])
        for source in _list(output_slice.get("sources")):
            if isinstance(source, dict) and "model" in source:
                source["model"] = resolved(source["model"])
    return document, used


def _in_order(steps: dict[str | None, Step], path: Path) -> list[Step]:
    """The steps with every merge after the merges it reads; a cycle is refused."""
    ordered: list[Step] = []
    state: dict[str | None, str] = {}

    def visit(name: str | None) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise BadInput(f"{path}: the merge {name!r} reads its own output, through the merges it uses (a cycle)")
        state[name] = "visiting"
        for used in sorted(steps[name].uses):
            visit(used)
        state[name] = "done"
        ordered.append(steps[name])

    for name in steps:
        visit(name)
    return ordered


def load_merges(path: str | Path, intermediate: Path | None) -> list[Step] | None:
    """A multi-document recipe (mergekit-multi's): several merges, each named by `name:` but the final one;
    a later merge reads an earlier one's output by naming it as a model. A named merge is written to its
    output.path, else to `intermediate`/name. In the order they can run; None for a one-document recipe."""
    path = Path(path)
    documents = [d for d in read_documents(path) if d is not None]
    if len(documents) < 2:
        return None
    named: dict[str | None, tuple[str, dict]] = {}
    for i, document in enumerate(documents):
        where = f"{path} (document {i + 1})"
        if not isinstance(document, dict):
            parse_recipe(document, where)  # the usual message for a document that is not a recipe
        name = _step_name(document, where)
        if name in named:
            first = named[name][0]
            raise BadInput(
                f"{where}: name: {name!r} also names {first}"
                if name
                else f"{where}: a second unnamed merge (also {first}); only the final merge may go without a name"
            )
        named[name] = (where, document)
    outputs: dict[str, str] = {}
    for name, (where, document) in named.items():
        if name is None:
            continue
        own = document.get("output", {}).get("path") if isinstance(document.get("output"), dict) else None
        if isinstance(own, str) and own:
            outputs[name] = own
        elif intermediate is None:
            raise BadInput(
                f"{where}: the merge {name!r} needs --intermediate-dir (or its own output.path) to be written"
            )
        else:
            outputs[name] = str(intermediate / name)
    steps: dict[str | None, Step] = {}
    for name, (where, document) in named.items():
        resolved, used = _with_outputs(document, outputs)
        recipe = parse_recipe(resolved, where + (f" {name!r}" if name else ""))
        output = Path(outputs[name]) if name is not None else None
        steps[name] = Step(name, recipe, output, frozenset(used))
    return _in_order(steps, path)


def recipe_digest(recipe: Recipe) -> str:
    """A stable digest of the validated recipe (output path excluded), for metadata and resume."""
    data = recipe.model_dump(mode="json")
    data["output"].pop("path", None)
    return hashlib.sha256(yaml.safe_dump(data, sort_keys=True).encode()).hexdigest()
