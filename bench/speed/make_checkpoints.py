#!/usr/bin/env python3
"""Build synthetic Llama-shaped checkpoints for the speed benchmark.

A preset gives the shape (by parameter count); the script writes a base model
and N fine-tunes, each a Hugging Face style folder:

    config.json                          (a valid transformers LlamaConfig)
    model-00001-of-0000K.safetensors     (bfloat16 shards, ~250 MB each by default)
    model.safetensors.index.json

The fine-tune deltas (tau = fine-tune - base) differ in distribution from
tensor to tensor, so a tensor-adaptive method such as TADrop has something to
adapt to: per (model, tensor) a seeded RNG picks one of

    dense   small Gaussian deltas everywhere,
    heavy   Student-t deltas (heavy tails, every entry non-zero),
    sparse  a few large Laplace entries (0.05% - 2% of the tensor) on top of
            a faint Gaussian floor,

with scales drawn per tensor. Everything is deterministic in (seed, model,
tensor name), whatever the order in which tensors are made, so a cached
model can be extended with more fine-tunes later.

Tensors are generated one at a time and written shard by shard: memory stays
around one shard (plus one tensor in float32).

Models are cached under bench/.cache/ckpt/<preset>-s<seed>/{base,ft1,...}; a
folder is reused when its `.complete` marker is present and matches.

Usage:
    python bench/speed/make_checkpoints.py --preset 168m --n-models 4
    python bench/speed/make_checkpoints.py --list
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO / "bench" / ".cache" / "ckpt"
GENERATOR_VERSION = 1  # bump when the generated content changes


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# Parameter counts are printed by --list; names are rounded.
PRESETS: dict[str, Shape] = {
    # ~42M: tiny, for --quick runs and development
    "40m": Shape(512, 1408, 8, 8, 8, 16000),
    # ~168.6M: the main benchmark size
    "168m": Shape(768, 3072, 12, 12, 12, 36000),
    # ~502M
    "500m": Shape(1024, 4096, 26, 16, 16, 32000),
    # ~1.01B (TinyLlama-like width, grouped-query attention)
    "1b": Shape(2048, 5632, 20, 32, 4, 32000),
}


def tensor_shapes(s: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """Llama tensor names and shapes, in the order transformers saves them."""
    h, i, kv = s.hidden_size, s.intermediate_size, s.num_key_value_heads * s.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (s.vocab_size, h))]
    for layer in range(s.num_hidden_layers):
        p = f"model.layers.{layer}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (s.vocab_size, h))]
    return out


def n_params(s: Shape) -> int:
    return sum(math.prod(shape) for _, shape in tensor_shapes(s))


def llama_config(s: Shape) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_hidden_layers,
        "num_attention_heads": s.num_attention_heads,
        "num_key_value_heads": s.num_key_value_heads,
        "head_dim": s.head_dim,
        "vocab_size": s.vocab_size,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.0",
    }


def _seed(*parts) -> int:
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _gen(*parts) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_seed(*parts))
    return g


def base_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Base weights in float32: N(0, 0.02) matrices, norms near 1."""
    g = _gen("base", seed, name)
    if len(shape) == 1:
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    return 0.02 * torch.randn(shape, generator=g)


def delta_profile(name: str, model: int, seed: int) -> dict:
    """The per-(model, tensor) delta distribution, drawn with a seeded RNG."""
    g = _gen("profile", seed, model, name)
    u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
    kind = "dense" if u[0] < 0.45 else ("heavy" if u[0] < 0.7 else "sparse")
    # Scales are relative to the base std (0.02) and kept well above the bf16
    # spacing of the base values (~1e-4), so the deltas survive the cast.
    scale = 0.02 * (0.03 + 0.09 * u[1])  # 6e-4 .. 2.4e-3
    prof = {"kind": kind, "scale": scale}
    if kind == "heavy":
        prof["df"] = 2.5 + 3.0 * u[2]  # Student-t degrees of freedom
    elif kind == "sparse":
        prof["frac"] = 10 ** (-3.3 + 1.6 * u[2])  # 0.05% .. 2% of entries
        prof["big"] = 0.02 * (0.3 + 1.2 * u[3])  # large entries: 0.3 .. 1.5 base std
    return prof


def delta_tensor(name: str, shape: tuple[int, ...], model: int, seed: int) -> torch.Tensor:
    g = _gen("delta", seed, model, name)
    if len(shape) == 1:  # norms: small dense change
        return 0.002 * torch.randn(shape, generator=g)
    prof = delta_profile(name, model, seed)
    scale = prof["scale"]
    if prof["kind"] == "dense":
        return scale * torch.randn(shape, generator=g)
    if prof["kind"] == "heavy":
        # Student-t via normal / sqrt(chi2 / df); chi2 from a Gamma draw.
        df = prof["df"]
        z = torch.randn(shape, generator=g)
        gam = torch._standard_gamma(torch.full(shape, df / 2.0), generator=g) * 2.0
        t = z / torch.sqrt(gam / df)
        t.mul_(scale * math.sqrt((df - 2) / df))  # unit variance times scale
        return t
    # sparse: faint floor plus a few big Laplace entries
    d = (0.1 * scale) * torch.randn(shape, generator=g)
    n = d.numel()
    k = max(1, int(round(prof["frac"] * n)))
    idx = torch.randperm(n, generator=g)[:k]
    lap = torch.empty(k).exponential_(generator=g) * prof["big"]
    sign = torch.randint(0, 2, (k,), generator=g).float().mul_(2).sub_(1)
    d.view(-1)[idx] += lap * sign
    return d


def plan_shards(shapes, shard_bytes: int, itemsize: int = 2) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list] = [[]]
    size = 0
    for name, shape in shapes:
        nb = math.prod(shape) * itemsize
        if shards[-1] and size + nb > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nb
    return shards


def write_model(out: Path, shape: Shape, model: int, seed: int, shard_bytes: int) -> None:
    """model 0 is the base; model k >= 1 is fine-tune k."""
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shards = plan_shards(tensor_shapes(shape), shard_bytes)
    k = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for si, shard in enumerate(shards, 1):
        fname = f"model-{si:05d}-of-{k:05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for name, shp in shard:
            w = base_tensor(name, shp, seed)
            if model > 0:
                w.add_(delta_tensor(name, shp, model, seed))
            tensors[name] = w.to(torch.bfloat16)
            del w
            weight_map[name] = fname
            total += tensors[name].numel() * 2
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    (tmp / "config.json").write_text(json.dumps(llama_config(shape), indent=2) + "\n")
    (tmp / ".complete").write_text(json.dumps(_marker(shape, model, seed, shard_bytes)) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _marker(shape: Shape, model: int, seed: int, shard_bytes: int) -> dict:
    return {
        "version": GENERATOR_VERSION,
        "shape": asdict(shape),
        "model": model,
        "seed": seed,
        "shard_bytes": shard_bytes,
    }


def is_complete(out: Path, shape: Shape, model: int, seed: int, shard_bytes: int) -> bool:
    m = out / ".complete"
    try:
        return json.loads(m.read_text()) == _marker(shape, model, seed, shard_bytes)
    except (OSError, ValueError):
        return False


def model_dirs(preset: str, n_models: int, seed: int = 0, cache: Path = DEFAULT_CACHE) -> tuple[Path, list[Path]]:
    root = cache / f"{preset}-s{seed}"
    return root / "base", [root / f"ft{k}" for k in range(1, n_models + 1)]


def ensure(
    preset: str, n_models: int, seed: int = 0, cache: Path = DEFAULT_CACHE, shard_mb: int = 250, log=print
) -> tuple[Path, list[Path]]:
    """Make (or reuse) the base and fine-tunes 1..n_models; return their folders."""
    shape = PRESETS[preset]
    shard_bytes = shard_mb * 1000 * 1000
    base, fts = model_dirs(preset, n_models, seed, cache)
    for model, d in enumerate([base, *fts]):
        if is_complete(d, shape, model, seed, shard_bytes):
            continue
        t0 = time.perf_counter()
        write_model(d, shape, model, seed, shard_bytes)
        log(f"[make_checkpoints] wrote {d} in {time.perf_counter() - t0:.1f} s")
    return base, fts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="40m", choices=sorted(PRESETS))
    ap.add_argument("--n-models", type=int, default=4, help="number of fine-tunes (2..8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-mb", type=int, default=250)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--list", action="store_true", help="list presets and exit")
    ap.add_argument(
        "--describe", action="store_true", help="print the delta profile of each tensor of fine-tune 1 and exit"
    )
    a = ap.parse_args(argv)
    if a.list:
        for k, s in PRESETS.items():
            p = n_params(s)
            print(f"{k:>5}: {p / 1e6:8.1f}M params, {2 * p / 1e6:8.1f} MB bf16 per model  {s}")
        return 0
    if a.describe:
        for name, shape in tensor_shapes(PRESETS[a.preset]):
            if len(shape) > 1:
                print(name, delta_profile(name, 1, a.seed))
        return 0
    if not 1 <= a.n_models <= 16:
        ap.error("--n-models must be in 1..16")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    # progress to stderr: stdout carries only the folders, for bench/speed/run.py to read
    base, fts = ensure(a.preset, a.n_models, a.seed, a.cache, a.shard_mb, log=lambda m: print(m, file=sys.stderr))
    print(base)
    for d in fts:
        print(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
