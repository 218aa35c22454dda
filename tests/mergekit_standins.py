"""Tiny stand-in models for the recipes of tests/data/mergekit_corpus/.

The corpus holds real mergekit recipes with their model names replaced by placeholders:
`base`, `model_a`, `model_b`, `model_c` (fine-tunes of `base`, same vocabulary), `model_x` (a
fine-tune of `base` whose tokenizer adds two chat tokens, so its embedding has two more rows)
and `adapter_a` (a PEFT LoRA adapter for `base`'s attention projections, used as `X+adapter_a`).
`standin_models` builds them as tiny LlamaForCausalLM checkpoints with as many layers as a
recipe needs, and `localize` writes a recipe's text with the placeholders replaced by their
folders. Both the corpus test (tests/test_mergekit_corpus.py) and the comparison with mergekit
(bench/compat/corpus.py) use them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

PLACEHOLDERS = ("base", "model_a", "model_b", "model_c", "model_x", "adapter_a")
VOCAB = 64
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
HIDDEN, INTERMEDIATE, HEADS = 16, 32, 2
LORA_RANK, LORA_ALPHA = 4, 8
LORA_TARGETS = ("q_proj", "v_proj")


def layers_needed(text: str) -> int:
    """The layer count a recipe's stand-ins need: its largest `layer_range` end, at least 8."""
    ends = [int(m) for m in re.findall(r"layer_range:\s*\[\s*\d+\s*,\s*(\d+)\s*\]", text)]
    return max([8, *ends])


def _config(layers: int, vocab: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def _write_tokenizer(folder: Path, extra_tokens: tuple[str, ...] = ()) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    if extra_tokens:
        fast.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
    fast.save_pretrained(folder)


def _perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=generator)).contiguous() for k, v in state.items()}


def _save_model(folder: Path, config: Any, state: dict[str, torch.Tensor], extra_tokens: tuple[str, ...] = ()) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _write_tokenizer(folder, extra_tokens)


def _write_adapter(folder: Path, base_state: dict[str, torch.Tensor], layers: int, seed: int) -> None:
    """A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) for q_proj and v_proj."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for target in LORA_TARGETS:
            name = f"model.layers.{layer}.self_attn.{target}"
            out_features, in_features = base_state[f"{name}.weight"].shape
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = 0.1 * torch.randn(LORA_RANK, in_features, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = 0.1 * torch.randn(out_features, LORA_RANK, generator=generator)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": LORA_RANK,
        "lora_alpha": LORA_ALPHA,
        "target_modules": list(LORA_TARGETS),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def standin_models(root: Path, layers: int) -> dict[str, Path]:
    """Build (once per `root`) the placeholder models with `layers` layers; returns name -> folder."""
    from transformers import LlamaForCausalLM

    folders = {name: root / name for name in PLACEHOLDERS}
    if all((folder / "done").exists() for folder in folders.values()):
        return folders
    torch.manual_seed(layers)
    config = _config(layers, VOCAB)
    base_state = {k: v.detach().clone().contiguous() for k, v in LlamaForCausalLM(config).state_dict().items()}
    _save_model(folders["base"], config, base_state)
    for seed, name in enumerate(("model_a", "model_b", "model_c"), start=1):
        _save_model(folders[name], config, _perturbed(base_state, seed))
    extended = _perturbed(base_state, 4)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        new_rows = 0.02 * torch.randn(len(CHAT_TOKENS), HIDDEN, generator=torch.Generator().manual_seed(5))
        extended[key] = torch.cat([extended[key], new_rows]).contiguous()
    _save_model(folders["model_x"], _config(layers, VOCAB + len(CHAT_TOKENS)), extended, CHAT_TOKENS)
    _write_adapter(folders["adapter_a"], base_state, layers, seed=6)
    for folder in folders.values():
        (folder / "done").write_text("")
    return folders


def _replace_names(value: str, folders: dict[str, Path]) -> str:
    """`model_a` -> its folder; `model_a+adapter_a` -> both folders, joined as mergekit writes them."""
    return "+".join(str(folders[part]) if part in folders else part for part in value.split("+"))


MODEL_KEYS = ("model", "base_model")


def _localize_node(node: Any, folders: dict[str, Path], key: str | None = None) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k in ("tokenizer_source", "source") and isinstance(v, str) and v in ("base", "union"):
                out[k] = v  # keywords, not model names
            elif k in (*MODEL_KEYS, "tokenizer_source", "source") and isinstance(v, str):
                out[k] = _replace_names(v, folders)
            elif k == "tokens" and isinstance(v, dict):
                out[k] = {token: _localize_node(spec, folders) for token, spec in v.items()}
            else:
                out[k] = _localize_node(v, folders, k)
        return out
    if isinstance(node, list):
        return [_localize_node(item, folders, key) for item in node]
    return node


def localize(text: str, folders: dict[str, Path], overrides: dict | None = None) -> str:
    """The recipe's YAML (one or several documents) with placeholders replaced by folders, and
    `overrides` (e.g. {"dtype": "float32"}) set at the top level of every document."""
    documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    localized = []
    for doc in documents:
        doc = _localize_node(doc, folders)
        doc.update(overrides or {})
        localized.append(doc)
    return yaml.safe_dump_all(localized, sort_keys=False)
