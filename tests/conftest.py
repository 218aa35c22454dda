"""Shared fixtures: tiny checkpoints built on the fly, recipes, and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small model: two 'layers' with weights big enough for TADrop (>= 4096 entries), norms and biases."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(2):
        state[f"model.layers.{layer}.mlp.weight"] = torch.randn(96, 64, generator=g)
        state[f"model.layers.{layer}.attn.weight"] = torch.randn(64, 64, generator=g)
        state[f"model.layers.{layer}.norm.weight"] = torch.ones(64)
        state[f"model.layers.{layer}.mlp.bias"] = torch.randn(96, generator=g) * 0.1
    state["model.embed.weight"] = torch.randn(128, 64, generator=g)
    return state


def fine_tune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A 'fine-tune': some tensors get dense small deltas, others a few large ones."""
    g = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for i, (name, tensor) in enumerate(sorted(base.items())):
        if (i + seed) % 2 == 0:
            delta = torch.randn(tensor.shape, generator=g) * 0.01
        else:
            delta = torch.zeros_like(tensor)
            flat = delta.view(-1)
            idx = torch.randperm(flat.numel(), generator=g)[: max(1, flat.numel() // 50)]
            flat[idx] = torch.randn(idx.numel(), generator=g) * 0.5
        out[name] = tensor + delta
    return out


def write_checkpoint(
    folder: Path,
    state: dict[str, torch.Tensor],
    *,
    shards: int = 1,
    fmt: str = "safetensors",
    dtype: torch.dtype | None = None,
    config: bool = True,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in state.items()}
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    elif shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = sorted(state)
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: state[n] for n in part}, str(folder / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config:
        (folder / "config.json").write_text(json.dumps({"architecture": "Tiny", "hidden": 64}))
    return folder


@pytest.fixture
def tiny_models(tmp_path: Path) -> dict[str, Path]:
    """base + three fine-tunes as safetensors folders."""
    base = tiny_state()
    paths = {"base": write_checkpoint(tmp_path / "base", base)}
    for i in range(3):
        paths[f"ft{i}"] = write_checkpoint(tmp_path / f"ft{i}", fine_tune(base, i))
    return paths


def tiny_llama_config(**changes):
    """The tiny LlamaForCausalLM config the end-to-end tests build models from (random weights), with `changes`."""
    transformers = pytest.importorskip("transformers")
    settings = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    settings.update(changes)
    return transformers.LlamaConfig(**settings)


def write_recipe(folder: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def basic_recipe(models: dict[str, Path], output: Path, method: str = "ties", **extra) -> dict:
    recipe = {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [
            {"model": str(p), "parameters": {"weight": 0.6, "density": 0.4}} for k, p in models.items() if k != "base"
        ],
        "output": {"path": str(output)},
    }
    recipe.update(extra)
    return recipe


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m tadrop_cli ARGS` as a user would, capturing stdout and stderr."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tadrop_cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=REPO,
    )
