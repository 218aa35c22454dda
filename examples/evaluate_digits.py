#!/usr/bin/env python
"""Evaluate digits-MLP checkpoints on every example task's held-out test split.

Usage::

    python examples/evaluate_digits.py examples/digits/base examples/digits/rotate90 ./merged
    python examples/evaluate_digits.py --json examples/digits/base ./merged

Each argument is a checkpoint folder holding either ``model.safetensors`` or a
sharded ``model-0000x-of-0000y.safetensors`` set with
``model.safetensors.index.json`` (as written by ``tadrop``), or a path to a
single ``.safetensors`` file.  Tensors stored in bfloat16/float16 are cast to
float32 before evaluation.  The architecture is inferred from the tensor
shapes, so a merged folder does not need a ``config.json``.

For every checkpoint the script prints the accuracy on each task's held-out
test split (the split is fixed in ``examples/digits/splits.json``) and the
average over the fine-tuning tasks (rotate90, mirror, invert, noise; the plain
``digits`` column is the base model's pretraining task and is shown but not
averaged).

Dependencies: torch, safetensors, numpy and scikit-learn (for the bundled
``load_digits`` data; no download happens).  This file is also imported by
``make_digits_models.py`` for the model definition and the task transforms.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
DIGITS_DIR = os.path.join(HERE, "digits")
SPLITS_PATH = os.path.join(DIGITS_DIR, "splits.json")

# Order matters: it is the column order of the table.  "digits" is the base
# model's pretraining task; the others are the fine-tuning tasks whose task
# vectors get merged, and only those enter the "average" column.
TASKS = ("digits", "rotate90", "mirror", "invert", "noise")
FINETUNE_TASKS = ("rotate90", "mirror", "invert", "noise")

TASK_DESCRIPTIONS = {
    "digits": "plain 8x8 digits (pretraining task of the base model)",
    "rotate90": "digits rotated 90 degrees counter-clockwise (np.rot90)",
    "mirror": "digits mirrored left-right (np.fliplr)",
    "invert": "colour-inverted digits (16 - x)",
    "noise": "digits + Gaussian pixel noise (sigma 6 on the 0..16 scale, clipped), fixed per-image seed",
}

NOISE_SIGMA = 6.0


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------
class DigitsMLP(nn.Module):
    """64 -> hidden -> hidden -> 10 MLP with LayerNorm after each hidden Linear."""

    def __init__(self, input_dim: int = 64, hidden: int = 256, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.fc3 = nn.Linear(hidden, num_classes)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.fc1(x)))
        x = self.act(self.norm2(self.fc2(x)))
        return self.fc3(x)


def model_from_state_dict(state: dict[str, torch.Tensor]) -> DigitsMLP:
    """Build a DigitsMLP sized from the tensors and load them (strict)."""
    try:
        hidden, input_dim = state["fc1.weight"].shape
        num_classes = state["fc3.weight"].shape[0]
    except KeyError as exc:
        raise ValueError(f"not a DigitsMLP state dict: missing tensor {exc}") from None
    model = DigitsMLP(int(input_dim), int(hidden), int(num_classes))
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


# ---------------------------------------------------------------------------
# Checkpoint loading
# ---------------------------------------------------------------------------
def load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Load a single-file or sharded safetensors checkpoint as float32 tensors."""
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        single = os.path.join(path, "model.safetensors")
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(single):
            files = [single]
        elif os.path.isfile(index):
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
            files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        else:
            raise FileNotFoundError("no model.safetensors or model.safetensors.index.json in this folder")
    else:
        raise FileNotFoundError("no such file or directory")

    state: dict[str, torch.Tensor] = {}
    for fname in files:
        for name, tensor in load_file(fname, device="cpu").items():
            state[name] = tensor.to(torch.float32) if tensor.is_floating_point() else tensor
    return state


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------
def load_raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 (N, 8, 8) on the 0..16 scale, and int64 labels."""
    from sklearn.datasets import load_digits  # bundled with the wheel; no download

    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


def load_splits(path: str = SPLITS_PATH) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def apply_task(task: str, images: np.ndarray, indices: np.ndarray, noise_seed: int) -> np.ndarray:
    """Apply ``task``'s transform to ``images`` (N, 8, 8); returns (N, 64) in [0, 1].

    ``indices`` are the dataset indices of the rows; the noise of image ``i`` is
    drawn from ``np.random.default_rng([noise_seed, i])`` so it does not depend on
    the split or on the order of the rows.
    """
    if task == "digits":
        out = images
    elif task == "rotate90":
        out = np.rot90(images, k=1, axes=(1, 2))
    elif task == "mirror":
        out = images[:, :, ::-1]
    elif task == "invert":
        out = 16.0 - images
    elif task == "noise":
        noise = np.stack([np.random.default_rng([noise_seed, int(i)]).standard_normal((8, 8)) for i in indices]).astype(
            np.float32
        )
        out = np.clip(images + NOISE_SIGMA * noise, 0.0, 16.0)
    else:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    out = np.ascontiguousarray(out, dtype=np.float32).reshape(len(images), 64) / 16.0
    return out


def task_split(task: str, split: str, splits: dict | None = None):
    """(x, y) tensors for ``task`` on ``split`` ('train' or 'test')."""
    if splits is None:
        splits = load_splits()
    images, labels = load_raw_digits()
    test_idx = np.asarray(splits["test_indices"], dtype=np.int64)
    if split == "test":
        idx = test_idx
    elif split == "train":
        mask = np.ones(len(labels), dtype=bool)
        mask[test_idx] = False
        idx = np.nonzero(mask)[0]
    else:
        raise ValueError(split)
    x = apply_task(task, images[idx], idx, int(splits["noise_seed"]))
    return torch.from_numpy(x), torch.from_numpy(labels[idx])


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return int((model(x).argmax(dim=1) == y).sum().item()) / len(y)


def evaluate_state(state: dict[str, torch.Tensor], test_sets: dict) -> dict[str, float]:
    model = model_from_state_dict(state)
    accs = {task: accuracy(model, x, y) for task, (x, y) in test_sets.items()}
    avg_over = [t for t in test_sets if t in FINETUNE_TASKS] or list(test_sets)
    accs["average"] = float(np.mean([accs[t] for t in avg_over]))
    return accs


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Accuracy of digits-MLP checkpoints on each example task's test split."
    )
    parser.add_argument("checkpoints", nargs="+", help="checkpoint folders or .safetensors files")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help=f"comma-separated tasks to evaluate (default: {','.join(TASKS)})",
    )
    args = parser.parse_args(argv)

    try:
        import sklearn  # noqa: F401
    except ImportError:
        print(
            "evaluate_digits.py needs scikit-learn for the digits data: pip install scikit-learn",
            file=sys.stderr,
        )
        return 2

    torch.set_num_threads(1)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")

    splits = load_splits()
    test_sets = {t: task_split(t, "test", splits) for t in tasks}

    results: dict[str, dict[str, float]] = {}
    for ckpt in args.checkpoints:
        try:
            state = load_checkpoint(ckpt)
            results[ckpt] = evaluate_state(state, test_sets)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            print(f"error: {ckpt}: {exc}", file=sys.stderr)
            return 1

    if args.json:
        print(json.dumps(results, indent=2))
        return 0

    cols = tasks + ["average"]
    name_w = max(len("checkpoint"), *(len(c) for c in results))
    col_w = max(8, *(len(c) for c in cols))
    print(f"{'checkpoint':<{name_w}}  " + "  ".join(f"{c:>{col_w}}" for c in cols))
    for ckpt, accs in results.items():
        print(f"{ckpt:<{name_w}}  " + "  ".join(f"{100 * accs[c]:>{col_w}.2f}" for c in cols))
    n_test = len(splits["test_indices"])
    print(
        f"(accuracy in %, {n_test} held-out test images per task; "
        "average = mean over the fine-tuning tasks shown, excluding 'digits')"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
