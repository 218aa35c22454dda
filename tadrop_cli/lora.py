"""PEFT LoRA adapters as models: the model an adapter makes of its base, read one tensor at a time.

An adapter folder (adapter_config.json + adapter_model.safetensors, or adapter_model.bin) is
given as `X+path/to/adapter` (mergekit's syntax: the adapter applied to model X) or alone (applied
to the recipe's base model). It opens as an AdapterModel: a Checkpoint whose tensors are the base's,
except that each tensor the adapter targets reads as

    W + scale * B @ A        (transposed, (B @ A)^T, for fan_in_fan_out layers and embeddings)

with scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (r and alpha per module
from rank_pattern / alpha_pattern), computed in float32 when the tensor (or a slice of it) is read,
as PEFT's merge_and_unload computes it (with DoRA, scaled to the adapter's magnitudes per
output: m / ||W + delta|| * (W + delta)); and each full tensor the adapter saved (modules_to_save,
trained biases) reads as the adapter's. Nothing else of the base is touched or held.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import (
    HUB_ID,
    Checkpoint,
    TensorInfo,
    _download_from_hub,
    _escapes,
    _safetensors_file,
    _torch_infos,
    check_regular,
    parse_json,
    read_text_file,
)
from .dtypes import FLOATS, Stored
from .errors import BadInput
from .lazy import torch
from .tensor_names import shown_name

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's names, in the order preferred
PEFT_PREFIX = "base_model.model."  # PEFT's prefix of a saved adapter's tensor names
# base_model.model.<module>.lora_A.weight, ....lora_A.default.weight, ....lora_B.bias, ....lora_embedding_A,
# ....lora_magnitude_vector (DoRA)
LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.default)?(?:\.(?P<param>weight|bias))?$"
)
# LoRA variants whose merged weight is not W + scale * B @ A, or that need more than the adapter's tensors
REFUSED_VARIANTS = {
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA), which cannot be merged",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer replication",
    "megatron_config": "Megatron parallel layers",
    "kasa_config": "KaSA (it changes the base weights too)",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
}
# initialisations that change the base's weights as well: the adapter fits that changed base, not the base
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


# ---------------------------------------------------------------- references


def split_reference(reference: str) -> tuple[str, str] | None:
    """(model, adapter) of mergekit's `model+adapter`, or None for a plain reference (a path that
    exists is taken whole, `+` and all)."""
    if "+" not in reference or os.path.lexists(Path(reference).expanduser()):
        return None
    parts = reference.split("+")
    if len(parts) != 2 or not all(part.strip() for part in parts):
        raise BadInput(f"{reference}: not a model reference (expected a path, a Hub id, or model+adapter)")
    return parts[0], parts[1]


def is_adapter_folder(folder: Path) -> bool:
    """A PEFT adapter: adapter_config.json and adapter weights (a folder with full weights beside a
    stray adapter_config.json is a model)."""
    return os.path.lexists(folder / ADAPTER_CONFIG) and any(os.path.lexists(folder / name) for name in ADAPTER_WEIGHTS)


def adapter_folder(reference: str, label: str) -> Path:
    """The local folder of the adapter part of `model+adapter` (`label`): a folder, or a Hub id fetched."""
    path = Path(reference).expanduser()
    if path.is_dir():
        folder = path
    elif os.path.lexists(path):
        raise BadInput(f"{label}: the adapter {reference} is not a folder (adapter_config.json + adapter weights)")
    elif HUB_ID.match(reference) and not reference.startswith((".", "/", "~")):
        folder = _download_from_hub(reference)
    else:
        raise BadInput(f"{label}: adapter {reference} not found (no such folder)")
    if not is_adapter_folder(folder):
        raise BadInput(f"{label}: {reference} is not a PEFT adapter folder ({ADAPTER_CONFIG} + adapter weights)")
    return folder


# ---------------------------------------------------------------- adapter_config.json


def pattern_key(patterns: dict[str, Any], module: str) -> str:
    """The rank_pattern / alpha_pattern key that applies to a module, as PEFT's get_pattern_key
    finds it: the first key that matches the end of the module's name, `(.*\\.)?(key)$`."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


@dataclass(frozen=True)
class AdapterConfig:
    """What of adapter_config.json decides the merged weights."""

    file: Path
    r: int
    alpha: float
    rslora: bool
    dora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    base_model: str | None  # base_model_name_or_path

    def rank_and_scale(self, module: str) -> tuple[int, float]:
        """(r, scale) of one module: scale = alpha / r, or alpha / sqrt(r) with use_rslora."""
        r = self.rank_pattern.get(pattern_key(self.rank_pattern, module), self.r)
        alpha = self.alpha_pattern.get(pattern_key(self.alpha_pattern, module), self.alpha)
        return r, alpha / math.sqrt(r) if self.rslora else alpha / r


def _number(value: Any, where: str, integer: bool = False) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value <= 0:
        raise BadInput(f"{where}: expected a positive {'integer' if integer else 'number'}, got {value!r}")
    return value


def _pattern(config: dict, key: str, file: Path, integer: bool) -> dict:
    patterns = config.get(key) or {}
    if not isinstance(patterns, dict):
        raise BadInput(f"{file}: {key} must be a mapping of module patterns to numbers")
    for pattern, value in patterns.items():
        _number(value, f"{file}: {key}[{pattern!r}]", integer)
        try:
            re.compile(rf"(.*\.)?({pattern})$")
        except re.error as error:
            raise BadInput(f"{file}: {key}: {pattern!r} is not a regular expression ({error})") from None
    return dict(patterns)


def _flag(config: dict, key: str, file: Path) -> bool:
    value = config.get(key, False)
    if not isinstance(value, bool):
        raise BadInput(f"{file}: {key} must be true or false, got {value!r}")
    return value


def read_config(folder: Path) -> AdapterConfig:
    """The adapter's config; a PEFT type, variant or initialisation whose merge is not
    W + scale * B @ A is refused, naming the key."""
    file = folder / ADAPTER_CONFIG
    if _escapes(file, folder):
        raise BadInput(f"{file}: a link that points outside its folder")
    config = parse_json(read_text_file(file), str(file))
    if not isinstance(config, dict):
        raise BadInput(f"{file}: expected a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise BadInput(f"{file}: peft_type {peft_type!r}: tadrop applies LoRA adapters only")
    for key, what in REFUSED_VARIANTS.items():
        if config.get(key):
            raise BadInput(
                f"{file}: {key} is set: {what} adapters are not supported "
                f"(merge it into its base with PEFT's merge_and_unload, and give that model)"
            )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise BadInput(
            f"{file}: init_lora_weights {init!r} changes the base weights too: the adapter does not apply "
            f"to the base as saved (convert it to a plain LoRA with PEFT's path_initial_model_for_weight_conversion)"
        )
    base = config.get("base_model_name_or_path")
    return AdapterConfig(
        file=file,
        r=_number(config.get("r", 8), f"{file}: r", integer=True),
        alpha=_number(config.get("lora_alpha", 8), f"{file}: lora_alpha"),
        rslora=_flag(config, "use_rslora", file),
        dora=_flag(config, "use_dora", file),
        fan_in_fan_out=_flag(config, "fan_in_fan_out", file),
        rank_pattern=_pattern(config, "rank_pattern", file, integer=True),
        alpha_pattern=_pattern(config, "alpha_pattern", file, integer=False),
        base_model=base if isinstance(base, str) and base.strip() else None,
    )


# ---------------------------------------------------------------- the adapter's base


def _repo_id(reference: str) -> str | None:
    """The Hub repository a reference names, where that is knowable: a Hub id, or a snapshot in
    the Hugging Face cache (models--org--name/snapshots/<commit>)."""
    path = Path(reference).expanduser()
    if not os.path.lexists(path):
        return reference.partition("@")[0].lower() if HUB_ID.match(reference) else None
    resolved = path.resolve()
    if resolved.parent.name == "snapshots" and resolved.parent.parent.name.startswith("models--"):
        return resolved.parent.parent.name.removeprefix("models--").replace("--", "/").lower()
    return None


def base_note(config: AdapterConfig, label: str, base: str) -> str | None:
    """Whether the adapter's own base_model_name_or_path agrees with the model it is applied to:
    None when it does, a note when that is unknowable (no name, or a local folder: the shapes are
    what is checked); BadInput when both name Hub repositories and they differ."""
    named = config.base_model
    if named is None:
        return f"{label}: {ADAPTER_CONFIG} names no base model; applied to {base}, whose tensor shapes fit"
    same_path = os.path.lexists(Path(named).expanduser()) and os.path.lexists(Path(base).expanduser())
    if named == base or (same_path and Path(named).expanduser().resolve() == Path(base).expanduser().resolve()):
        return None
    theirs, ours = _repo_id(named), _repo_id(base)
    if theirs is not None and ours is not None:
        if theirs == ours:
            return None
        raise BadInput(
            f"{config.file}: base_model_name_or_path is {named}, but the adapter is applied to {base} "
            f"(if they are the same weights, set base_model_name_or_path to {base})"
        )
    if Path(named.rstrip("/")).name.lower() == Path(base.rstrip("/")).name.lower():
        return None
    return f"{label}: {ADAPTER_CONFIG} names base {named}; applied to {base}, whose tensor shapes fit"


# ---------------------------------------------------------------- the adapter's tensors


@dataclass(frozen=True)
class Delta:
    """What an adapter adds to one base tensor of shape `shape`, seen as a matrix of shape[0] rows:
    scale * B @ A (A and B with their trailing dimensions flattened: conv layers), or its transpose
    (B @ A)^T = A^T @ B^T for fan_in_fan_out layers and embeddings; for a bias (`a` None),
    scale * B's bias. With DoRA's magnitude vector m the tensor becomes
    m / ||W + delta|| * (W + delta), the norm over each output's weights: a row of the matrix,
    or a column when transposed (dora_rescaled)."""

    name: str
    shape: tuple[int, ...]
    a: str | None  # the adapter's tensor names
    b: str
    transposed: bool
    scale: float
    magnitude: str | None = None


def _matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def _factors(adapter: Checkpoint, delta: Delta) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(left, right) of a delta as float32 matrices, the delta being scale * left @ right: (B, A),
    or (A^T, B^T) transposed; (B's bias, None) for a bias."""
    b = adapter.read(delta.b).to(torch.float32)
    if delta.a is None:
        return b.reshape(-1), None
    a = adapter.read(delta.a).to(torch.float32)
    a, b = a.reshape(_matrix(a.shape)), b.reshape(_matrix(b.shape))
    return (a.T, b.T) if delta.transposed else (b, a)


def delta_entries(delta: Delta, left: torch.Tensor, right: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    """Entries [start, stop) of the flattened delta, float32: only the rows they fall in are computed,
    (left[rows] @ right) * scale, in the order of PEFT's (B @ A) * scale."""
    if right is None:
        return left[start:stop] * delta.scale
    row = right.shape[1]
    first, last = start // row, -(-stop // row)
    block = (left[first:last] @ right) * delta.scale
    return block.reshape(-1)[start - first * row : stop - first * row]


def dora_rescaled(merged: torch.Tensor, magnitude: torch.Tensor, by_columns: bool) -> torch.Tensor:
    """DoRA's merged weight from W + delta (a matrix, scaled in place): each output's weights
    brought to the magnitude m, m / ||W + delta||_2 * (W + delta), as PEFT's merge computes it; an
    output is a row of the matrix, or a column (`by_columns`: fan_in_fan_out layers, embeddings)."""
    if by_columns:
        return merged.mul_((magnitude / torch.linalg.norm(merged.T, dim=1)).view(1, -1))
    return merged.mul_((magnitude / torch.linalg.norm(merged, dim=1)).view(-1, 1))


def _module_name(key: str) -> str:
    return key.removeprefix(PEFT_PREFIX)


def _fits(delta: Delta, adapter: Checkpoint) -> bool:
    """A is (r, in) and B (out, r), their product (out, in), or (in, out) transposed: the base's shape."""
    (a_rows, a_columns), (b_rows, b_columns) = (_matrix(adapter.tensors[key].shape) for key in (delta.a, delta.b))
    product = (a_columns, b_rows) if delta.transposed else (b_rows, a_columns)
    return len(delta.shape) >= 2 and b_columns == a_rows and product == _matrix(delta.shape)


def _oriented(delta: Delta, adapter: Checkpoint, linear: bool, where: str) -> Delta:
    """The delta, transposed or not as its layer needs. PEFT decides fan_in_fan_out by the layer's
    type (GPT-2's Conv1D stores (in, out), nn.Linear (out, in)), which the weights do not say: the
    config's value, unless only the other orientation fits a (linear, non-square) tensor."""
    if _fits(delta, adapter):
        return delta
    flipped = replace(delta, transposed=not delta.transposed)
    if linear and _fits(flipped, adapter):
        return flipped
    a_shape, b_shape = adapter.tensors[delta.a].shape, adapter.tensors[delta.b].shape
    raise BadInput(
        f"{where}: LoRA factors of shapes {list(a_shape)} (A) and {list(b_shape)} (B) do not fit "
        f"tensor {shown_name(delta.name)} of shape {list(delta.shape)} in the base"
    )


def _check_rank(delta: Delta, adapter: Checkpoint, rank: int, where: str) -> None:
    """A's rows are the rank adapter_config.json gives the module (PEFT refuses to load it otherwise)."""
    rows = adapter.tensors[delta.a].shape[0]
    if rows != rank:
        raise BadInput(
            f"{where}: tensor {shown_name(delta.a)} has rank {rows}, "
            f"but {ADAPTER_CONFIG} gives r = {rank} for it (r, rank_pattern)"
        )


@dataclass
class _Pair:
    a: str | None = None
    b: str | None = None
    bias: str | None = None
    magnitude: str | None = None
    embedding: bool = False


def _pairs(adapter: Checkpoint, where: str) -> tuple[dict[str, _Pair], dict[str, str]]:
    """The adapter's tensor names sorted out: LoRA factors per module, and full tensors by the
    base name they replace."""
    pairs: dict[str, _Pair] = {}
    full: dict[str, str] = {}
    for key in adapter.tensors:
        if adapter.tensors[key].dtype not in FLOATS:
            raise BadInput(f"{where}: tensor {shown_name(key)} has dtype {adapter.tensors[key].dtype}, not a float")
        match = LORA_KEY.match(key)
        if match is None:
            if "lora_" in key:  # another adapter's name, another PEFT method's tensor, ...
                raise BadInput(f"{where}: tensor {shown_name(key)} is no LoRA tensor tadrop knows")
            # modules_to_save, trained biases, embeddings saved whole (save_embedding_layers: base_layer)
            name = _module_name(key).replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
            if name in full:
                raise BadInput(f"{where}: tensors {shown_name(full[name])} and {shown_name(key)} are one tensor")
            full[name] = key
            continue
        module, part, param = match["module"], match["part"], match["param"]
        pair = pairs.setdefault(_module_name(module), _Pair())
        embedding = part.startswith("lora_embedding")
        magnitude = part == "lora_magnitude_vector"
        if (
            (embedding and param is not None)
            or (not embedding and not magnitude and param is None)
            or (param == "bias" and part != "lora_B")
        ):
            raise BadInput(f"{where}: tensor {shown_name(key)} is no LoRA tensor tadrop knows")
        slot = "magnitude" if magnitude else "bias" if param == "bias" else part[-1].lower()
        if getattr(pair, slot) is not None:
            raise BadInput(f"{where}: tensors {shown_name(getattr(pair, slot))} and {shown_name(key)} are one tensor")
        setattr(pair, slot, key)
        pair.embedding = pair.embedding or embedding
    return pairs, full


def _with_magnitude(delta: Delta, pair: _Pair, config: AdapterConfig, adapter: Checkpoint, where: str) -> Delta:
    """The delta with its DoRA magnitude vector, checked: one entry per output (row, or column when
    transposed). DoRA on a conv layer is refused (its norm and factor are shaped otherwise)."""
    if pair.magnitude is None:
        if config.dora:
            raise BadInput(f"{where}: use_dora is set, but {shown_name(pair.a)} has no lora_magnitude_vector")
        return delta
    if not config.dora:
        raise BadInput(f"{where}: tensor {shown_name(pair.magnitude)} is DoRA's, but use_dora is not set")
    if len(delta.shape) != 2:
        raise BadInput(f"{where}: DoRA on a conv layer ({shown_name(delta.name)}) is not supported")
    outputs = delta.shape[1] if delta.transposed else delta.shape[0]
    if adapter.tensors[pair.magnitude].numel != outputs:
        raise BadInput(
            f"{where}: tensor {shown_name(pair.magnitude)} has {adapter.tensors[pair.magnitude].numel} entries, "
            f"but tensor {shown_name(delta.name)} has {outputs} outputs"
        )
    return replace(delta, magnitude=pair.magnitude)


def _not_in_base(where: str, what: str, base: Checkpoint) -> BadInput:
    return BadInput(
        f"{where}: PEFT/LoRA adapter {what}, which is not a tensor of {base.label} "
        f"(e.g. {shown_name(min(base.tensors))}): not an adapter of that model"
    )


def plan_deltas(
    config: AdapterConfig, adapter: Checkpoint, base: Checkpoint, where: str
) -> tuple[list[Delta], dict[str, str]]:
    """The deltas the adapter adds to base tensors, and the full tensors it replaces (base name ->
    adapter name; a delta then adds to the replacement, as PEFT loads it). Every adapter tensor
    must land on a base tensor: an adapter of another model is refused, never applied in part."""
    pairs, full = _pairs(adapter, where)
    for name, key in full.items():
        if name not in base.tensors:
            raise _not_in_base(where, f"holds {shown_name(key)} for tensor {shown_name(name)}", base)
    shapes = {name: info.shape for name, info in base.tensors.items()}
    shapes.update({name: adapter.tensors[key].shape for name, key in full.items()})
    deltas = []
    for module, pair in sorted(pairs.items()):
        if pair.a is None or pair.b is None:
            raise BadInput(f"{where}: module {shown_name(module)} lacks its {'lora_B' if pair.a else 'lora_A'} tensor")
        target = f"{module}.weight"
        if target not in shapes:
            raise _not_in_base(where, f"targets {shown_name(target)}", base)
        rank, scale = config.rank_and_scale(module)
        linear = not pair.embedding and len(shapes[target]) == 2  # conv layers ignore fan_in_fan_out
        delta = Delta(
            target, shapes[target], pair.a, pair.b, pair.embedding or (linear and config.fan_in_fan_out), scale
        )
        delta = _oriented(delta, adapter, linear, where)
        _check_rank(delta, adapter, rank, where)
        delta = _with_magnitude(delta, pair, config, adapter, where)
        deltas.append(delta)
        if pair.bias is not None:
            bias = f"{module}.bias"
            if bias not in shapes or math.prod(shapes[bias]) != adapter.tensors[pair.bias].numel:
                raise _not_in_base(where, f"has a lora_bias {shown_name(pair.bias)} for {shown_name(bias)}", base)
            deltas.append(Delta(bias, shapes[bias], None, pair.bias, False, scale))
    if not deltas and not full:
        raise BadInput(f"{where}: a PEFT/LoRA adapter with no tensors")
    return deltas, full


# ---------------------------------------------------------------- the model an adapter makes


def _adapter_weights(folder: Path, label: str) -> Checkpoint:
    """The adapter's own tensors, read as any input is: regular files inside the folder,
    safetensors, or a .bin unpickled weights-only."""
    for name in ADAPTER_WEIGHTS:
        file = folder / name
        if not os.path.lexists(file):
            continue
        if _escapes(file, folder):
            raise BadInput(f"{file}: a link that points outside its folder")
        check_regular(file)
        if file.suffix == ".safetensors":
            return Checkpoint(label, None, _safetensors_file(file), {})
        state, infos = _torch_infos(file)
        return Checkpoint(label, None, infos, {file: state})
    raise BadInput(f"{folder}: a PEFT adapter folder without {' or '.join(ADAPTER_WEIGHTS)}")


class AdapterModel(Checkpoint):
    """The model an adapter makes of its base: the base's tensors, with the adapter's deltas added
    (read as float32, "F32") and its full tensors in place of the base's."""

    def __init__(self, label: str, base: Checkpoint, adapter: Checkpoint, config: AdapterConfig, deltas, full):
        tensors = dict(base.tensors)
        adapter_file = next(iter(adapter.tensors.values())).file
        for name, key in full.items():
            tensors[name] = replace(adapter.tensors[key], name=name)
        for delta in deltas:  # over a replaced tensor too: the delta adds to the replacement
            tensors[delta.name] = TensorInfo(delta.name, "F32", delta.shape, adapter_file)
        super().__init__(label, base.folder, tensors, {})
        self.base, self.adapter, self.config = base, adapter, config
        self.deltas = {delta.name: delta for delta in deltas}
        self.full = full
        self._cached: tuple[str, tuple] | None = None  # the last delta's factors: a tensor is read in slices
        self._whole: tuple[str, torch.Tensor] | None = None  # the last DoRA tensor normed by columns

    def _source(self, name: str) -> tuple[Checkpoint, str]:
        return (self.adapter, self.full[name]) if name in self.full else (self.base, name)

    def _factors(self, name: str) -> tuple:
        if self._cached is None or self._cached[0] != name:
            self._cached = (name, _factors(self.adapter, self.deltas[name]))
        return self._cached[1]

    def read(self, name: str, start: int | None = None, stop: int | None = None, pinned: bool = False) -> torch.Tensor:
        if name not in self.deltas:
            source, key = self._source(name)
            return source.read(key, start, stop, pinned)
        info, delta = self.tensors[name], self.deltas[name]
        first, last = start or 0, info.numel if stop is None else stop
        if delta.magnitude is None:
            merged = self._merged(name, first, last)
        elif delta.transposed:  # a norm per column: the whole tensor, kept while it is read in slices
            if self._whole is None or self._whole[0] != name:
                self._whole = None  # let the last one go first
                self._whole = (name, self._dora(name, 0, info.numel))
            merged = self._whole[1][first:last].clone()
        else:  # a norm per row: the whole rows the entries fall in
            row = info.numel // info.shape[0]
            rows = (first // row * row, -(-last // row) * row)
            merged = self._dora(name, *rows)[first - rows[0] : last - rows[0]]
        return merged.reshape(info.shape) if start is None and stop is None else merged

    def _merged(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Entries [start, stop) of W + delta, flattened, float32."""
        source, key = self._source(name)
        delta = delta_entries(self.deltas[name], *self._factors(name), start, stop)
        return source.read(key, start, stop).to(torch.float32).add_(delta)

    def _dora(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Entries [start, stop) of DoRA's merged weight, flattened: whole rows, or the whole tensor
        when normed by columns."""
        delta, columns = self.deltas[name], self.tensors[name].shape[1]
        magnitude = self.adapter.read(delta.magnitude).to(torch.float32).reshape(-1)
        if not delta.transposed:
            magnitude = magnitude[start // columns : stop // columns]
        merged = self._merged(name, start, stop).view(-1, columns)
        return dora_rescaled(merged, magnitude, delta.transposed).reshape(-1)

    def read_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        if name in self.deltas:  # W + delta: by read()
            return super().read_rows(name, rows)
        source, key = self._source(name)
        return source.read_rows(key, rows)

    def mapped(self, name: str, start: int, stop: int) -> Stored:
        if name in self.deltas:
            return Stored.from_torch(self.read(name, start, stop))
        source, key = self._source(name)
        return source.mapped(key, start, stop)

    def unmap(self, name: str, start: int, stop: int) -> None:
        if name not in self.deltas:
            source, key = self._source(name)
            source.unmap(key, start, stop)

    def input_files(self) -> list[Path]:
        return [*self.base.input_files(), *self.adapter.input_files(), self.config.file]

    def close(self) -> None:
        self._cached = self._whole = None
        self.base.close()
        self.adapter.close()


def open_adapter_model(label: str, base: Checkpoint, folder: Path, base_reference: str) -> AdapterModel:
    """The model the adapter in `folder` makes of `base` (closed here if that fails)."""
    try:
        config = read_config(folder)
        adapter = _adapter_weights(folder, label)
        deltas, full = plan_deltas(config, adapter, base, label)
        model = AdapterModel(label, base, adapter, config, deltas, full)
        note = base_note(config, label, base_reference)
        if note:
            model.notes.append(note)
        return model
    except BaseException:
        base.close()
        raise
