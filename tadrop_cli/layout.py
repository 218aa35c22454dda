"""The layout of a merge: which tensors are written, which models feed each one, and with
which parameters. Built from the recipe and the input headers alone (no tensor data),
so it is also what `--dry-run` checks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .aligned_checkpoint import merged_vocabulary
from .checkpoint import (
    Checkpoint,
    config_files,
    layer_positions,
    module_files,
    open_checkpoint,
    shown_name,
    tensor_order,
)
from .dtypes import FLOATS
from .errors import BadInput
from .recipe import ModelEntry, Recipe, TadropSettings, source_identity, value_for_tensor
from .tokenizer_files import TOKENIZER_FILE, OutputTokenizer
from .writer import OutputTensor


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

    def model_parameter(self, model: ModelInput, name: str, tensor: str, missing: Any = None) -> Any:
        """A per-model parameter for one tensor: the model's value, else the recipe's, else the
        default; `missing` if the method has no such parameter."""
        spec = self.recipe.method.param(name)
        if spec is None:
            return missing
        for source in (model.entry.parameters, self.recipe.parameters):
            if name in source:
                value = value_for_tensor(source[name], tensor, self.positions.get(tensor))
                if value is not None:
                    return value
        return spec.default

    def method_parameters(self, tensor: str) -> dict[str, Any]:
        """The method's global parameters (normalize, lambda, ...) for one tensor."""
        result = {}
        for spec in self.recipe.method.params:
            if spec.per_model:
                continue
            value = (
                value_for_tensor(self.recipe.parameters[spec.name], tensor, self.positions.get(tensor))
                if spec.name in self.recipe.parameters
                else None
            )
            result[spec.name] = spec.default if value is None else value
        return result

    def close(self) -> None:
        self.reference.close()
        for model in self.models:
            model.checkpoint.close()


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
    opened: list[Checkpoint] = []
    try:
        reference = open_checkpoint(recipe.base_model) if recipe.base_model else None
        if reference:
            opened.append(reference)
        models: list[ModelInput] = []
        notes: list[str] = []
        for i, entry in enumerate(recipe.models):
            if (
                recipe.base_model
                and recipe.method.name != "linear"
                and source_identity(entry.model) == source_identity(recipe.base_model)
            ):
                notes.append(f"models[{i}] is the base model: it has no task vector and is skipped (as in mergekit)")
                continue
            checkpoint = open_checkpoint(entry.model)
            opened.append(checkpoint)
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
    tokenizer, views = merged_vocabulary(recipe, reference, distinct)
    aligned = [dataclasses.replace(m, checkpoint=views.get(id(m.checkpoint), m.checkpoint)) for m in models]
    return tokenizer, views.get(id(reference), reference), aligned


ADAPTER_TENSOR = re.compile(r"\.(lora|ia3|hada|lokr)_")  # PEFT's names: ...q_proj.lora_A.weight, ...ia3_l


def _looks_like_adapter(checkpoint: Checkpoint) -> bool:
    """A PEFT adapter: adapter_config.json beside the weights, or LoRA-style tensor names."""
    if checkpoint.folder is not None and (checkpoint.folder / "adapter_config.json").exists():
        return True
    return any(ADAPTER_TENSOR.search(name) for name in checkpoint.tensors)


def check_shares_tensors(model: Checkpoint, reference: Checkpoint) -> None:
    """A model that has no tensor name of the base is not a fine-tune of it: an adapter, another
    architecture, or differently prefixed names. Refused, rather than skipped tensor by tensor."""
    if model is reference or not set(model.tensors).isdisjoint(reference.tensors):
        return
    if _looks_like_adapter(model):
        raise BadInput(
            f"{model.label}: looks like a PEFT/LoRA adapter: tadrop does not take adapters yet "
            f"(merge the adapter into its base model first, e.g. PEFT's merge_and_unload)"
        )
    raise BadInput(
        f"{model.label}: shares no tensor name with the base {reference.label} "
        f"(e.g. {shown_name(min(model.tensors))} vs {shown_name(min(reference.tensors))}); "
        f"not a fine-tune of it"
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


def _tensor_job(
    recipe: Recipe, reference: Checkpoint, models: list[ModelInput], name: str, notes: list[str]
) -> TensorJob:
    info = reference.tensors[name]
    mergeable = info.dtype in FLOATS
    job = TensorJob(OutputTensor(name, _output_dtype(recipe, info.dtype), info.shape), mergeable, [])
    if not mergeable:  # integer buffers (position_ids, ...) are copied from the base: say so where a model lacks one
        notes.extend(
            f"{model.label} lacks tensor {name} ({info.dtype}, not merged): the base's is written"
            for model in models
            if name not in model.checkpoint.tensors and model.checkpoint is not reference
        )
        return job
    for j, model in enumerate(models):
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
