"""Slices recipes (mergekit's `slices:`): the output's layers are stacked from layer ranges of models.

Each output slice lists sources, one layer range per model, all of one length; output layer k of
the slice is merged from layer start + k of every source with the recipe's method (the slice's base
being the source that is its base model), so `passthrough` with one source per slice stacks copies
(a "frankenmerge", overlapping ranges allowed). As in mergekit 0.1.5 (plan.py):
- output layers are numbered on from 0 across the slices, in order;
- tensors outside the numbered layers come from the first slice's sources (embeddings: before the
  layers) or the last slice's (final norm, lm_head: after them);
- a gradient parameter runs over each slice: layer k of n takes t = k / (n - 1) (t = 1 for n = 1),
  tensors outside the layers t = 0;
- a parameter is looked for in the slice's source, then the slice, then the recipe.

The layout reads each contributor's source tensor under the output tensor's name through a
CheckpointView, so that the merge (tensor_merge.py, the kernels), TADrop's pass 1 (plan.py) and
resume work on a slices recipe unchanged: one output tensor's inputs at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import Checkpoint, config_files, module_files, open_checkpoint, parse_json, read_text_file
from .dtypes import Stored
from .errors import BadInput
from .layout import (
    Layout,
    ModelInput,
    SliceParameters,
    _aligned_inputs,
    _tensor_job,
    check_linear_weights,
    copy_unscaled_passthrough,
    model_tadrop,
    set_chat_template,
)
from .lazy import torch
from .recipe import BASELESS, ModelEntry, OutputSlice, Recipe, slice_base, source_identity
from .tensor_names import LAYER_NUMBER, layer_number, tensor_order
from .tokenizer_files import TOKENIZER_FILE

# keys that hold a transformers config's number of layers (Llama & most: num_hidden_layers; GPT-2: n_layer)
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# tensors outside the numbered layers that come before them (embeddings); every other one comes after
BEFORE_LAYERS = re.compile(r"embed|(?:^|\.)(?:wte|wpe)\.", re.IGNORECASE)


class CheckpointView(Checkpoint):
    """Tensors of other checkpoints shown under new names: `sources` maps each name shown to (the
    checkpoint holding it, its name there). Reads go to those checkpoints; closing them is their owner's."""

    def __init__(self, label: str, folder: Path | None, sources: dict[str, tuple[Checkpoint, str]]):
        tensors = {shown: checkpoint.tensors[name] for shown, (checkpoint, name) in sources.items()}
        super().__init__(label, folder, tensors, {})
        self.sources = sources

    def read(self, name: str, start: int | None = None, stop: int | None = None, pinned: bool = False) -> torch.Tensor:
        checkpoint, source = self.sources[name]
        return checkpoint.read(source, start, stop, pinned)

    def read_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        checkpoint, source = self.sources[name]
        return checkpoint.read_rows(source, rows)

    def mapped(self, name: str, start: int, stop: int) -> Stored:
        checkpoint, source = self.sources[name]
        return checkpoint.mapped(source, start, stop)

    def unmap(self, name: str, start: int, stop: int) -> None:
        checkpoint, source = self.sources[name]
        checkpoint.unmap(source, start, stop)

    def input_files(self) -> list[Path]:
        """The files of the checkpoints it shows (an adapter's too, not only its tensors' files)."""
        shown = dict.fromkeys(id(checkpoint) for checkpoint, _ in self.sources.values())
        by_id = {id(checkpoint): checkpoint for checkpoint, _ in self.sources.values()}
        return list(dict.fromkeys(file for key in shown for file in by_id[key].input_files()))

    def close(self) -> None:
        pass


@dataclass(frozen=True, order=True)
class LayerName:
    """A tensor name of a numbered layer with the number cut out: prefix + layer + suffix."""

    prefix: str
    suffix: str

    def at(self, layer: int) -> str:
        return f"{self.prefix}{layer}{self.suffix}"


def numbered_layers(checkpoint: Checkpoint) -> dict[int, dict[LayerName, str]]:
    """Each numbered layer's tensors: layer -> {its names' pattern: name}."""
    layers: dict[int, dict[LayerName, str]] = {}
    for name in checkpoint.tensors:
        match = LAYER_NUMBER.search(name)
        if match is None:
            continue
        layer = layer_number(name)
        layers.setdefault(layer, {})[LayerName(name[: match.start(1)], name[match.end(1) :])] = name
    return layers


def before_layers(name: str) -> bool:
    """Whether a tensor outside the numbered layers comes before them (an embedding): the first slice's."""
    return BEFORE_LAYERS.search(name) is not None


def gradient_position(k: int, n: int) -> float:
    """mergekit's t of layer k of an n-layer slice: k / (n - 1), or 1 for a one-layer slice."""
    return k / (n - 1) if n > 1 else 1.0


@dataclass
class _Source:
    """One source of one slice, opened: its checkpoint, its layers, and its model's index in Layout.models
    (None: the slice's base, which has no task vector)."""

    where: str  # its recipe key, for messages: slices[0].sources[1]
    start: int
    checkpoint: Checkpoint
    layers: dict[int, dict[LayerName, str]]
    model: int | None
    parameters: dict[str, Any]  # the source's own parameters


class _Builder:
    """Gathers, slice by slice, which tensor of which checkpoint each output tensor is made from."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.checkpoints: dict[str, Checkpoint] = {}  # by source_identity: each model opened once
        self.layers: dict[str, dict[int, dict[LayerName, str]]] = {}
        self.models: list[tuple[ModelEntry, dict[str, tuple[Checkpoint, str]]]] = []  # (entry, its view's sources)
        self.model_of: dict[str, int] = {}  # source_identity -> index into self.models
        self.reference: dict[str, tuple[Checkpoint, str]] = {}
        self.positions: dict[str, float | None] = {}
        self.parameters: dict[str, SliceParameters] = {}
        self.candidates: dict[str, list[int]] = {}
        self.reference_layers: list[int] = []  # the reference's source layer of each output layer
        self.notes: list[str] = []

    def open(self, reference: str, where: str) -> Checkpoint:
        key = source_identity(reference)
        if key not in self.checkpoints:
            try:
                self.checkpoints[key] = open_checkpoint(reference, adapter_base=self.recipe.base_model)
            except BadInput as error:
                raise BadInput(f"{where}: {error}") from None
            self.notes.extend(self.checkpoints[key].notes)
            self.layers[key] = numbered_layers(self.checkpoints[key])
        return self.checkpoints[key]

    def model_index(self, reference: str) -> int:
        key = source_identity(reference)
        if key not in self.model_of:
            self.model_of[key] = len(self.models)
            self.models.append((ModelEntry(model=reference), {}))
        return self.model_of[key]

    def sources(self, i: int, output_slice: OutputSlice) -> tuple[_Source, list[_Source]]:
        """The slice's reference source (its base; without one, its first source) and its contributors."""
        base = slice_base(self.recipe, output_slice)
        opened = []
        for j, source in enumerate(output_slice.sources):
            where = f"slices[{i}].sources[{j}]"
            checkpoint = self.open(source.model, f"{where}.model")
            layers = self.layers[source_identity(source.model)]
            start, stop = source.layer_range
            count = max(layers) + 1 if layers else 0
            if stop > count:
                have = f"{count} layers (0 to {count - 1})" if count else "no numbered layers (model.layers.N...)"
                raise BadInput(f"{where}.layer_range: [{start}, {stop}] goes past {source.model}'s {have}")
            is_base = base is not None and source_identity(source.model) == source_identity(base)
            model = None if is_base else self.model_index(source.model)
            opened.append(_Source(where, start, checkpoint, layers, model, source.parameters))
        reference = next((s for s in opened if s.model is None), opened[0])
        contributors = [s for s in opened if s.model is not None]
        return reference, contributors

    def add(self, name: str, reference: tuple[Checkpoint, str], position: float | None, parameters: SliceParameters):
        self.reference[name] = reference
        self.positions[name] = position
        self.parameters[name] = parameters
        self.candidates[name] = []

    def add_slice(self, i: int, output_slice: OutputSlice) -> None:
        reference, contributors = self.sources(i, output_slice)
        parameters = SliceParameters({s.model: s.parameters for s in contributors}, output_slice.parameters)
        n = output_slice.layers
        for k in range(n):
            layer = reference.start + k
            patterns = reference.layers.get(layer)
            if not patterns:
                raise BadInput(f"{reference.where}.layer_range: layer {layer} has no tensors in that model")
            out_layer = len(self.reference_layers)
            self.reference_layers.append(layer)
            for pattern, name in sorted(patterns.items()):
                out = pattern.at(out_layer)
                self.add(out, (reference.checkpoint, name), gradient_position(k, n), parameters)
                for source in contributors:
                    source_name = pattern.at(source.start + k)
                    if source_name in source.checkpoint.tensors:
                        self.models[source.model][1][out] = (source.checkpoint, source_name)
                    self.candidates[out].append(source.model)

    def add_outside_layers(self, i: int, output_slice: OutputSlice, before: bool) -> None:
        """The tensors outside the numbered layers that come before them (from the first slice) or after."""
        reference, contributors = self.sources(i, output_slice)
        parameters = SliceParameters({s.model: s.parameters for s in contributors}, output_slice.parameters)
        for name in reference.checkpoint.tensors:
            if LAYER_NUMBER.search(name) is not None or before_layers(name) != before:
                continue
            self.add(name, (reference.checkpoint, name), None, parameters)
            for source in contributors:
                if name in source.checkpoint.tensors:
                    self.models[source.model][1][name] = (source.checkpoint, name)
                self.candidates[name].append(source.model)

    def close(self) -> None:
        for checkpoint in self.checkpoints.values():
            checkpoint.close()


def build_sliced_layout(recipe: Recipe) -> Layout:
    """The layout of a slices recipe: headers only, as layout.build_layout's."""
    builder = _Builder(recipe)
    try:
        slices = recipe.slices
        builder.add_outside_layers(0, slices[0], before=True)
        for i, output_slice in enumerate(slices):
            builder.add_slice(i, output_slice)
        builder.add_outside_layers(len(slices) - 1, slices[-1], before=False)
        if not builder.models:
            raise BadInput("slices: no source other than the base model to merge")
        donor_reference = recipe.base_model or slices[0].sources[0].model
        donor = builder.open(donor_reference, "base_model" if recipe.base_model else "slices[0].sources[0].model")
        reference = CheckpointView(donor_reference, donor.folder, builder.reference)
        models = [
            ModelInput(
                j, entry, CheckpointView(entry.model, folder_of(builder, entry), shown), model_tadrop(recipe, entry)
            )
            for j, (entry, shown) in enumerate(builder.models)
        ]
        notes = builder.notes
        tokenizer = None
        if recipe.tokenizer_settings is not None:  # the sources seen with their embeddings in the merged vocabulary
            tokenizer, reference, models = _aligned_inputs(recipe, reference, models)
            notes.append(tokenizer.note)
        names = tensor_order(list(builder.reference))
        jobs = [_tensor_job(recipe, reference, models, name, notes, builder.candidates[name]) for name in names]
        notes.extend(
            f"slices[{i}].residual_weight: no effect (as in mergekit 0.1.5, which accepts it and does not use it)"
            for i, s in enumerate(slices)
            if s.residual_weight is not None
        )
        if recipe.base_model and recipe.method.name in BASELESS:
            notes.append(f"base_model: {recipe.method.name} takes no base; ignored (as in mergekit)")
        configs = config_files(donor.folder)
        if tokenizer is not None:  # written by the tokenizer merge (config.json with its vocab_size)
            configs = [file for file in configs if file.name != "config.json" and not TOKENIZER_FILE.match(file.name)]
        layout = Layout(
            recipe,
            reference,
            models,
            jobs,
            builder.positions,
            notes,
            configs,
            module_files(donor.folder),
            tokenizer,
            slice_parameters=builder.parameters,
            opened=list(builder.checkpoints.values()),
        )
        layout.json_changes["config.json"] = layer_count_changes(configs, builder.reference_layers, notes)
        check_linear_weights(layout)
        copy_unscaled_passthrough(layout)
        set_chat_template(layout)
        return layout
    except BaseException:
        builder.close()
        raise


def folder_of(builder: _Builder, entry: ModelEntry) -> Path | None:
    return builder.checkpoints[source_identity(entry.model)].folder


def layer_count_changes(configs: list[Path], reference_layers: list[int], notes: list[str]) -> dict[str, Any]:
    """What config.json needs for the output's layers: its layer count (as mergekit sets it), and a per-layer
    `layer_types` list (attention kinds, Qwen/Gemma) taken at each output layer's source layer."""
    config = next((file for file in configs if file.name == "config.json"), None)
    if config is None:
        return {}
    data = parse_json(read_text_file(config), str(config))
    if not isinstance(data, dict):
        return {}
    key = next((k for k in LAYER_COUNT_KEYS if isinstance(data.get(k), int) and not isinstance(data[k], bool)), None)
    if key is None:
        notes.append(
            f"{config}: no layer count ({', '.join(LAYER_COUNT_KEYS)}) to set; the output has "
            f"{len(reference_layers)} layers: set it by hand"
        )
        return {}
    changes: dict[str, Any] = {key: len(reference_layers)}
    types = data.get("layer_types")
    if isinstance(types, list) and len(types) == data[key] and all(layer < len(types) for layer in reference_layers):
        changes["layer_types"] = [types[layer] for layer in reference_layers]
    return changes
