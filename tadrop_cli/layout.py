"""The layout of a merge: which tensors are written, which models feed each one, and with
which parameters. Built from the recipe and the input headers alone (no tensor data),
so it is also what `--dry-run` checks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .aligned_checkpoint import merged_vocabulary
from .chat_templates import chosen_template
from .checkpoint import Checkpoint, config_files, module_files, open_checkpoint
from .dtypes import FLOATS
from .errors import BadInput
from .parameter_values import ConditionalValue, value_for_tensor
from .recipe import ModelEntry, Recipe, TadropSettings, source_identity
from .shards import OutputTensor
from .tensor_names import layer_positions, shown_name, tensor_order
from .tokenizer_files import TOKENIZER_FILE, OutputTokenizer


@dataclass
class ModelInput:
    index: int  # position in the recipe's models list
    entry: ModelEntry
    checkpoint: Checkpoint
    tadrop: TadropSettings | None  # the settings in force for this model; None when TADrop is off

    @property
    def label(self) -> str:
        return self.entry.model


@dataclass
class TensorJob:
    """One output tensor: its header and the models that feed it."""

    out: OutputTensor
    mergeable: bool  # floating point: merged; otherwise copied from the reference model
    contributors: list[int]  # indices into Layout.models
    copy_base: bool = False  # a policy chose to keep the base tensor as it is

    @property
    def name(self) -> str:
        return self.out.name


@dataclass
class Layout:
    recipe: Recipe
    reference: Checkpoint  # the base (or, for linear without a base, the first model)
    models: list[ModelInput]
    jobs: list[TensorJob]
    positions: dict[str, float | None]
    notes: list[str] = field(default_factory=list)
    config_files: list[Path] = field(default_factory=list)  # copied from the reference into the output
    # files of a sentence-transformers model's module folders: (file, its path in the output, "1_Pooling/config.json")
    module_files: list[tuple[Path, str]] = field(default_factory=list)
    tokenizer: OutputTokenizer | None = None  # a tokenizer merge's: written with config.json instead of the base's
    # a slices recipe's parameters of each output tensor's slice (slices.py); empty for a models recipe
    slice_parameters: dict[str, SliceParameters] = field(default_factory=dict)
    # keys to change in a JSON config file as it is copied (config.json's layer count, a chat template)
    json_changes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # checkpoints opened for the layout besides the reference and the models (a slices recipe's views show them)
    opened: list[Checkpoint] = field(default_factory=list)
    # files the output gets instead of the reference's copy: name -> text (None: not written at all)
    written_files: dict[str, str | None] = field(default_factory=dict)

    def _parameter_sources(self, model: ModelInput | None, tensor: str) -> tuple[dict, ...]:
        """Where a parameter's value is looked for, first to last (mergekit's precedence): the model's
        own (a slice's source's), the slice's, the recipe's."""
        sliced = self.slice_parameters.get(tensor)
        if sliced is None:
            return (self.recipe.parameters,) if model is None else (model.entry.parameters, self.recipe.parameters)
        own = () if model is None else (sliced.per_model.get(model.index, {}),)
        return (*own, sliced.shared, self.recipe.parameters)

    def model_parameter(self, model: ModelInput, name: str, tensor: str, missing: Any = None) -> Any:
        """A per-model parameter for one tensor: the model's value, else the slice's, else the recipe's,
        else the default; `missing` if the method has no such parameter."""
        spec = self.recipe.method.param(name)
        if spec is None:
            return missing
        for source in self._parameter_sources(model, tensor):
            if name in source:
                value = value_for_tensor(source[name], tensor, self.positions.get(tensor))
                if value is not None:
                    return value
        return spec.default

    def uniform_parameters(self) -> bool:
        """Whether every parameter has one value for every tensor: no filtered value, no gradient, no
        slices' own parameters (a lookup can then be made once for all the tensors)."""
        sources = [self.recipe.parameters, *(model.entry.parameters for model in self.models)]
        return not self.slice_parameters and not any(
            isinstance(value, (list, ConditionalValue)) for source in sources for value in source.values()
        )

    def method_parameters(self, tensor: str) -> dict[str, Any]:
        """The method's global parameters (normalize, lambda, ...) for one tensor."""
        result = {}
        sources = self._parameter_sources(None, tensor)
        for spec in self.recipe.method.params:
            if spec.per_model:
                continue
            value = None
            for source in sources:
                if spec.name in source:
                    value = value_for_tensor(source[spec.name], tensor, self.positions.get(tensor))
                    if value is not None:
                        break
            result[spec.name] = spec.default if value is None else value
        return result

    def close(self) -> None:
        self.reference.close()
        for model in self.models:
            model.checkpoint.close()
        for checkpoint in self.opened:
            checkpoint.close()


@dataclass(frozen=True)
class SliceParameters:
    """The parameters of one output slice: each source's (by index into Layout.models), and the slice's own."""

    per_model: dict[int, dict[str, Any]]
    shared: dict[str, Any]


def tensor_seed(recipe_seed: int, model_label: str, tensor_name: str) -> int:
    """The random seed of one (model, tensor): independent of order, device and resume."""
    digest = hashlib.sha256(f"{recipe_seed}\0{model_label}\0{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def model_tadrop(recipe: Recipe, entry: ModelEntry) -> TadropSettings | None:
    """The recipe's TADrop settings with this model's own settings laid over them."""
    if recipe.tadrop is None:
        return None
    settings = recipe.tadrop
    if entry.tadrop is not None:
        changes = {k: v for k, v in entry.tadrop.model_dump(exclude_none=True).items()}
        if "overrides" in changes:  # the model's overrides are tried before the recipe's
            changes["overrides"] = [*entry.tadrop.overrides, *settings.overrides]
        try:
            settings = TadropSettings.model_validate({**settings.model_dump(), **changes})
        except ValidationError as error:  # a model's setting contradicts the recipe's (min_ratio > max_ratio, ...)
            reason = error.errors()[0]["msg"].removeprefix("Value error, ")
            raise BadInput(f"{entry.model}: tadrop: {reason} (this model's settings over the recipe's)") from None
    return settings if settings.enabled else None


def _output_dtype(recipe: Recipe, stored: str) -> str:
    if recipe.output_dtype is None or stored not in FLOATS:
        return stored
    return recipe.output_dtype


def build_layout(recipe: Recipe) -> Layout:
    """Open every input (headers only), apply the policies, and list the output tensors."""
    if recipe.slices is not None:
        from .slices import build_sliced_layout  # it builds on this module's pieces

        return build_sliced_layout(recipe)
    opened: list[Checkpoint] = []
    try:
        # passthrough copies its one model: mergekit ignores a base_model there
        with_base = recipe.base_model is not None and recipe.method.name != "passthrough"
        reference = open_checkpoint(recipe.base_model) if with_base else None
        if reference:
            opened.append(reference)
        models: list[ModelInput] = []
        notes: list[str] = list(reference.notes) if reference else []
        if recipe.base_model and not with_base:
            notes.append(f"base_model: {recipe.method.name} takes no base; ignored (as in mergekit)")
        for i, entry in enumerate(recipe.models):
            if (
                with_base
                and recipe.method.name != "linear"
                and source_identity(entry.model) == source_identity(recipe.base_model)
            ):
                role = (
                    "it is the base of the merge, not one more model"
                    if recipe.method.interpolates
                    else "it has no task vector and is skipped"
                )
                notes.append(f"models[{i}] is the base model: {role} (as in mergekit)")
                continue
            checkpoint = open_checkpoint(entry.model, adapter_base=recipe.base_model)
            opened.append(checkpoint)
            notes.extend(checkpoint.notes)
            models.append(ModelInput(i, entry, checkpoint, model_tadrop(recipe, entry)))
        if reference is None:
            reference = models[0].checkpoint
        if not models:
            raise BadInput("models: no model other than the base to merge")
        tokenizer = None
        if recipe.tokenizer_settings is not None:  # the models seen with their embeddings in the merged vocabulary
            tokenizer, reference, models = _aligned_inputs(recipe, reference, models)
            notes.append(tokenizer.note)
        for model in models:
            check_shares_tensors(model.checkpoint, reference)
        configs = config_files(reference.folder)  # listed (and links refused) now, not after the merge
        if tokenizer is not None:
            configs = [file for file in configs if file.name != "config.json" and not TOKENIZER_FILE.match(file.name)]
        names = tensor_order(list(reference.tensors))
        jobs = [_tensor_job(recipe, reference, models, name, notes) for name in names]
        for model in models:
            extra = sorted(set(model.checkpoint.tensors) - set(reference.tensors))
            if extra:
                notes.append(f"{model.label}: {len(extra)} tensor(s) not in the base are ignored (e.g. {extra[0]})")
        modules = module_files(reference.folder)
        notes.extend(
            f"{relative}: copied from {reference.label} as it is (weights outside the model files are not merged)"
            for _, relative in modules
            if relative.endswith((".safetensors", ".bin", ".pt", ".pth"))
        )
        layout = Layout(recipe, reference, models, jobs, layer_positions(names), notes, configs, modules, tokenizer)
        check_linear_weights(layout)
        check_interpolation_inputs(layout)
        copy_unscaled_passthrough(layout)
        set_chat_template(layout)
        return layout
    except BaseException:
        for checkpoint in opened:
            checkpoint.close()
        raise


def _aligned_inputs(
    recipe: Recipe, reference: Checkpoint, models: list[ModelInput]
) -> tuple[OutputTokenizer, Checkpoint, list[ModelInput]]:
    """The merged tokenizer, and the reference and models as views aligned to its vocabulary."""
    distinct = list({id(c): c for c in [reference, *(m.checkpoint for m in models)]}.values())
    started = time.perf_counter()
    tokenizer, views = merged_vocabulary(recipe, reference, distinct)
    tokenizer = dataclasses.replace(tokenizer, build_seconds=time.perf_counter() - started)
    aligned = [dataclasses.replace(m, checkpoint=views.get(id(m.checkpoint), m.checkpoint)) for m in models]
    return tokenizer, views.get(id(reference), reference), aligned


ADAPTER_TENSOR = re.compile(r"\.(lora|ia3|hada|lokr)_")  # PEFT's names: ...q_proj.lora_A.weight, ...ia3_l


def _looks_like_adapter(checkpoint: Checkpoint) -> bool:
    """PEFT adapter weights without their folder (a folder with adapter_config.json opens as the
    model the adapter makes, lora.AdapterModel): LoRA-style tensor names."""
    return any(ADAPTER_TENSOR.search(name) for name in checkpoint.tensors)


def _matches(model: Checkpoint, reference: Checkpoint, name: str) -> bool:
    """The model has the base's floating-point tensor `name`, in the same shape: something to merge."""
    mine, base = model.tensors.get(name), reference.tensors[name]
    return mine is not None and mine.shape == base.shape and mine.dtype in FLOATS and base.dtype in FLOATS


def check_shares_tensors(model: Checkpoint, reference: Checkpoint) -> None:
    """A model none of whose tensors matches a floating-point tensor of the base in name and shape is
    not a fine-tune of it: adapter weights without their config, another architecture, or
    differently prefixed names. Refused, whatever the policies, rather than skipped tensor by tensor."""
    if model is reference or any(_matches(model, reference, name) for name in reference.tensors):
        return
    if _looks_like_adapter(model):
        raise BadInput(
            f"{model.label}: looks like PEFT/LoRA adapter weights: give the adapter's folder "
            f"(adapter_config.json beside adapter_model.safetensors), alone or as base+adapter"
        )
    shared = sorted(set(model.tensors) & set(reference.tensors))
    if not shared:
        raise BadInput(
            f"{model.label}: shares no tensor name with the base {reference.label} "
            f"(e.g. {shown_name(min(model.tensors))} vs {shown_name(min(reference.tensors))}); "
            f"not a fine-tune of it"
        )
    name = shared[0]
    raise BadInput(
        f"{model.label}: none of its tensors matches the base {reference.label} in name and shape "
        f"(e.g. {shown_name(name)}: {model.tensors[name].dtype} {list(model.tensors[name].shape)} vs "
        f"{reference.tensors[name].dtype} {list(reference.tensors[name].shape)}); not a fine-tune of it"
    )


def check_linear_weights(layout: Layout) -> None:
    """A linear merge with normalize divides by the sum of the weights: a sum of zero would give
    the difference of the models, near-zero weights that look like a model. Refused per tensor,
    as weights may differ per tensor (filters, gradients)."""
    if layout.recipe.method.name != "linear":
        return
    for job in layout.jobs:
        if not job.contributors or not layout.method_parameters(job.name).get("normalize"):
            continue
        weights = [layout.model_parameter(layout.models[j], "weight", job.name) for j in job.contributors]
        if abs(sum(weights)) < 1e-8:
            raise BadInput(
                f"parameters.weight: the weights of tensor {job.name} sum to {sum(weights):g} "
                f"({', '.join(f'{w:g}' for w in weights)}); a linear merge with normalize: true divides by that sum "
                f"(give weights that do not cancel, or normalize: false)"
            )


def check_interpolation_inputs(layout: Layout) -> None:
    """An interpolating method gets, for every tensor it merges, as many models as it takes (a
    model skipped for a tensor by policies.missing_tensor / shape_mismatch may leave too few) and a
    value of each required parameter (filtered values may match no entry for some tensor)."""
    method = layout.recipe.method
    if not method.interpolates:
        return
    low, high = method.model_count
    required = [spec for spec in method.params if spec.required]
    for job in layout.jobs:
        if not job.mergeable or job.copy_base or not job.contributors:
            continue  # the base's tensor is written as it is
        count = len(job.contributors)
        if count < low or (high is not None and count > high):
            raise BadInput(
                f"tensor {job.name}: {method.name} merges {low if low == high else f'at least {low}'} model(s) "
                f"besides the base, only {count} of them have it (see the notes of policies.missing_tensor)"
            )
        parameters = layout.method_parameters(job.name)
        for spec in required:
            if parameters[spec.name] == spec.default:
                raise BadInput(
                    f"parameters.{spec.name}: no value for tensor {job.name} (no filter matches it; "
                    f"end the list with an entry without a filter)"
                )


def set_chat_template(layout: Layout) -> None:
    """The recipe's chat_template, written as chat_template.jinja (which transformers reads first, and which
    mergekit's tokenizer save writes) and into tokenizer_config.json (which older transformers read)."""
    value = layout.recipe.chat_template
    if value is None:
        return
    folders = [
        layout.reference.folder,
        *(m.checkpoint.folder for m in layout.models),
        *(c.folder for c in layout.opened),
    ]
    template = chosen_template(value, list(dict.fromkeys(folders)))
    if template is None:
        layout.notes.append("chat_template: auto: no input model has a chat template; none is set (as in mergekit)")
        return
    layout.written_files["chat_template.jinja"] = template
    layout.written_files["chat_template.json"] = None  # an older file of the reference's would contradict it
    if any(file.name == "tokenizer_config.json" for file in layout.config_files):
        layout.json_changes.setdefault("tokenizer_config.json", {})["chat_template"] = template
    else:
        layout.notes.append(
            f"chat_template: {layout.reference.label} has no tokenizer_config.json; "
            f"chat_template.jinja is written alone"
        )


def copy_unscaled_passthrough(layout: Layout) -> None:
    """A passthrough tensor whose scale is 1 is the reference's (its one source's) as stored: copied, not
    read twice for a merge. (Only a scaled tensor goes through the merge: scale * tensor in float32.)"""
    if layout.recipe.method.name != "passthrough":
        return
    for job in layout.jobs:
        if job.contributors and all(
            layout.model_parameter(layout.models[j], "scale", job.name) == 1 for j in job.contributors
        ):
            job.contributors = []


def _tensor_job(
    recipe: Recipe,
    reference: Checkpoint,
    models: list[ModelInput],
    name: str,
    notes: list[str],
    candidates: list[int] | None = None,
) -> TensorJob:
    """The job of one output tensor; `candidates`: the models that may feed it (indices into `models`; all
    where None: a slices recipe's tensor has only its slice's sources)."""
    info = reference.tensors[name]
    mergeable = info.dtype in FLOATS
    job = TensorJob(OutputTensor(name, _output_dtype(recipe, info.dtype), info.shape), mergeable, [])
    if not mergeable:  # integer buffers (position_ids, ...) are copied from the base: say so where a model lacks one
        notes.extend(
            f"{model.label} lacks tensor {name} ({info.dtype}, not merged): the base's is written"
            for j, model in enumerate(models)
            if (candidates is None or j in candidates)
            and name not in model.checkpoint.tensors
            and model.checkpoint is not reference
        )
        return job
    for j, model in enumerate(models):
        if candidates is not None and j not in candidates:
            continue
        other = model.checkpoint.tensors.get(name)
        if other is None:
            problem, policy, key = "lacks tensor", recipe.policies.missing_tensor, "missing_tensor"
        elif other.shape != info.shape:
            problem, policy, key = (
                f"has shape {list(other.shape)} (base {list(info.shape)}) for tensor",
                recipe.policies.shape_mismatch,
                "shape_mismatch",
            )
        elif other.dtype not in FLOATS:
            raise BadInput(f"{other.file}: tensor {name} has dtype {other.dtype}, the base has {info.dtype}")
        else:
            job.contributors.append(j)
            continue
        if policy == "error":
            raise BadInput(
                f"{model.label} {problem} {name} (set policies.{key} to skip_model or copy_base to merge anyway)"
            )
        if policy == "copy_base":
            notes.append(f"{model.label} {problem} {name}: base tensor kept (policies.{key}: copy_base)")
            job.copy_base = True
        else:
            notes.append(f"{model.label} {problem} {name}: model skipped for this tensor (policies.{key}: skip_model)")
    if job.copy_base:
        job.contributors = []
    return job
