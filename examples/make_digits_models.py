#!/usr/bin/env python
"""Regenerate the small example checkpoints under ``examples/digits/``.

Developer-only script: it is NOT run by the tests or by ``tadrop``; the
checkpoints it writes are committed to the repository.  It needs torch,
safetensors, numpy and scikit-learn (a dev-only dependency, used solely for
the 8x8 digits data set that ships inside the scikit-learn wheel via
``sklearn.datasets.load_digits()``; nothing is downloaded)::

    pip install scikit-learn
    python examples/make_digits_models.py

What it does (all seeds fixed, single-threaded, deterministic algorithms):

1. Splits the 1797 digits into a fixed train / held-out test split and writes
   the test indices and the noise seed to ``examples/digits/splits.json``.
2. Pretrains ``DigitsMLP`` (64 -> 256 -> 256 -> 10, LayerNorm + GELU after
   each hidden Linear, 86,026 parameters) on the plain digits task: ``base``.
3. Fine-tunes a copy of ``base`` (all parameters, same 10-class head) on each
   derived task: ``rotate90``, ``mirror``, ``invert``, ``noise`` (see
   ``TASK_DESCRIPTIONS`` in ``evaluate_digits.py``).
4. Saves each model as ``examples/digits/<name>/model.safetensors`` (float32,
   plain state dict: ``fc1.weight``, ``norm1.weight``, ...; metadata
   ``{"format": "pt"}``) plus ``examples/digits/<name>/config.json``.
5. Prints the held-out accuracy of every model on every task.

Evaluate any checkpoint (or a merged output folder) with::

    python examples/evaluate_digits.py examples/digits/base examples/digits/rotate90 ./merged
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evaluate_digits import (  # noqa: E402
    DIGITS_DIR,
    FINETUNE_TASKS,
    NOISE_SIGMA,
    SPLITS_PATH,
    TASK_DESCRIPTIONS,
    TASKS,
    DigitsMLP,
    evaluate_state,
    load_raw_digits,
    task_split,
)

SPLIT_SEED = 1234
NOISE_SEED = 5678
N_TEST = 450
INPUT_DIM, HIDDEN, NUM_CLASSES = 64, 256, 10

PRETRAIN = dict(seed=0, epochs=60, lr=1e-3, weight_decay=1e-4, batch_size=64)
FINETUNE = dict(epochs=10, lr=2e-4, weight_decay=0.0, batch_size=64)
FINETUNE_SEEDS = {"rotate90": 1, "mirror": 2, "invert": 3, "noise": 4}


def make_splits() -> dict:
    _, labels = load_raw_digits()
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    test = sorted(int(i) for i in perm[:N_TEST])
    return {
        "dataset": "sklearn.datasets.load_digits()",
        "n_samples": int(len(labels)),
        "split_seed": SPLIT_SEED,
        "n_test": N_TEST,
        "noise_seed": NOISE_SEED,
        "noise_sigma": NOISE_SIGMA,
        "note": "train split = all indices not in test_indices; the same split is used for every task",
        "tasks": {t: TASK_DESCRIPTIONS[t] for t in TASKS},
        "test_indices": test,
    }


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = perm[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def save_model(name: str, model: nn.Module, config: dict) -> None:
    out = os.path.join(DIGITS_DIR, name)
    os.makedirs(out, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
        fh.write("\n")


def arch_config() -> dict:
    return {
        "architecture": "DigitsMLP",
        "input_dim": INPUT_DIM,
        "hidden": HIDDEN,
        "num_classes": NUM_CLASSES,
        "layers": ["fc1", "norm1", "gelu", "fc2", "norm2", "gelu", "fc3"],
        "activation": "gelu",
        "norm": "layernorm",
        "input_scaling": "pixel / 16",
        "torch_dtype": "float32",
    }


def main() -> int:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.makedirs(DIGITS_DIR, exist_ok=True)

    splits = make_splits()
    with open(SPLITS_PATH, "w", encoding="utf-8") as fh:
        json.dump(splits, fh, indent=1)
        fh.write("\n")

    train_sets = {t: task_split(t, "train", splits) for t in TASKS}
    test_sets = {t: task_split(t, "test", splits) for t in TASKS}

    torch.manual_seed(PRETRAIN["seed"])
    base = DigitsMLP(INPUT_DIM, HIDDEN, NUM_CLASSES)
    n_params = sum(p.numel() for p in base.parameters())
    train(base, *train_sets["digits"], **PRETRAIN)
    save_model("base", base, {**arch_config(), "task": "digits", "training": {"type": "pretrain", **PRETRAIN}})

    results = {"base": evaluate_state(base.state_dict(), test_sets)}
    for task in FINETUNE_TASKS:
        model = DigitsMLP(INPUT_DIM, HIDDEN, NUM_CLASSES)
        model.load_state_dict(base.state_dict())
        seed = FINETUNE_SEEDS[task]
        train(model, *train_sets[task], seed=seed, **FINETUNE)
        save_model(
            task,
            model,
            {
                **arch_config(),
                "task": task,
                "base_model": "../base",
                "training": {"type": "finetune", "params": "all", "seed": seed, **FINETUNE},
            },
        )
        results[task] = evaluate_state(model.state_dict(), test_sets)

    print(f"DigitsMLP parameters: {n_params}")
    cols = list(TASKS) + ["average"]
    print(f"{'model':<10}" + "".join(f"{c:>10}" for c in cols))
    for name, accs in results.items():
        print(f"{name:<10}" + "".join(f"{100 * accs[c]:>10.2f}" for c in cols))
    for task in FINETUNE_TASKS:
        gain = results[task][task] - results["base"][task]
        if gain < 0.10:
            print(f"WARNING: {task} fine-tune improves its task by only {100 * gain:.1f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
