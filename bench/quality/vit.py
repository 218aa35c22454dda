"""Image benchmark in the paper's regime: a small timm-style ViT with its own frozen classifier.

The paper (8 ViT-B/32 tasks under CLIP zero-shot heads) merges encoders fine-tuned under heads
that never move, so a task vector is the encoder's change only, the base with the heads is
weak, the fine-tunes are strong and their merge interferes. Here, in miniature:

- **Model.** A ViT in plain PyTorch with timm's parameter names (`patch_embed.proj`,
  `cls_token`, `pos_embed`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`,
  `head`), pre-norm blocks, the cls token's final state classified by `head`. 28x28 grey images,
  patch 7 (16 patches + cls), width 96, depth 6, 3 heads, MLP x4: 0.68M parameters.
- **Base.** Pretrained on 50,000 Fashion-MNIST training images (its 10 classes; light shifts
  and horizontal flips), from Debian's `dataset-fashion-mnist`.
- **Tasks.** Eight derived tasks that keep Fashion-MNIST's 10 labels, so the base's own `head`
  is every task's frozen head, and change the input domain strongly (TASKS). Train and
  validation images come from the 10,000 training images the base never saw, test images from
  the official test set: 500 validation, 1,000 test, the rest of the 10,000 to train.
- **Fine-tunes.** Everything but `head` is fine-tuned under the frozen head, embeddings
  included, as Ilharco et al. fine-tune CLIP's whole image encoder; some tasks (a fixed pixel
  permutation inside each patch, a fixed patch shuffle) can only be learnt through
  `patch_embed` and `pos_embed`, which is the point of a domain shift. `head` is identical
  in every checkpoint, so its task vector is zero and every merge keeps it.

Checkpoints are folders with model.safetensors and a config.json (timm-like fields; not a
transformers model): `tadrop merge` reads them as any state dict.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from bench_images import _fetch_fashion, _idx
from common import CACHE, read_json, seed_all, write_json
from safetensors.torch import load_file, save_file

CLASSES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]

TASKS = {
    "rot90": "rotated 90°",
    "rot180": "rotated 180°",
    "invert": "inverted intensities",
    "patch_shuffle": "the 16 7x7 patches in a fixed shuffled order",
    "pixel_perm": "the 49 pixels of every 7x7 patch in a fixed permuted order",
    "noise": "salt-and-pepper noise on 40% of the pixels",
    "checker_invert": "every other patch (checkerboard) inverted",
    "lowres": "downsampled to 7x7 and blown up again (nearest)",
}

# fixed before any fine-tune was scored; sized for 2 shared CPU cores
ARCH = dict(img_size=28, patch_size=7, embed_dim=96, depth=6, num_heads=3, mlp_ratio=4, num_classes=10)
FULL = dict(
    tasks=list(TASKS),
    n_val=500,
    n_test=1000,
    pre_images=50000,
    pre_steps=800,
    pre_batch=128,
    pre_lr=1e-3,
    steps=250,
    batch=64,
    lr=2e-4,
    arch=ARCH,
)
QUICK = dict(FULL, tasks=["rot90", "invert", "pixel_perm"], pre_steps=300, steps=60)
MEAN, STD = 0.2860, 0.3530


# ---------------------------------------------------------------- model


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """timm's VisionTransformer, cut down: cls token, learnt positions, pre-norm blocks, head on cls."""

    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, num_classes):
        super().__init__()
        n = (img_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, embed_dim) * 0.02)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def features(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]

    def forward(self, x):
        return self.head(self.features(x))


# ---------------------------------------------------------------- data


def fashion_dir() -> Path:
    """$TADROP_FMNIST if set, else Debian's package unpacked in the cache (bench_images fetches it
    with apt-get download once: the previous default, a folder of one machine, is not on every one)."""
    env = os.environ.get("TADROP_FMNIST")
    return Path(env) if env else _fetch_fashion()


def load_fashion() -> dict:
    d = fashion_dir()
    return {
        "x_train": _idx(d / "train-images-idx3-ubyte.gz"),
        "y_train": _idx(d / "train-labels-idx1-ubyte.gz").astype(np.int64),
        "x_test": _idx(d / "t10k-images-idx3-ubyte.gz"),
        "y_test": _idx(d / "t10k-labels-idx1-ubyte.gz").astype(np.int64),
    }


def _patches(x: np.ndarray, p: int = 7) -> np.ndarray:
    """[n, 28, 28] -> [n, 16, 49]: patches in row-major order, pixels row-major inside."""
    n, h, w = x.shape
    return x.reshape(n, h // p, p, w // p, p).transpose(0, 1, 3, 2, 4).reshape(n, (h // p) * (w // p), p * p)


def _unpatches(z: np.ndarray, p: int = 7, side: int = 28) -> np.ndarray:
    n = len(z)
    g = side // p
    return z.reshape(n, g, g, p, p).transpose(0, 1, 3, 2, 4).reshape(n, side, side)


def transform(name: str, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A task's input transform of uint8 images [n, 28, 28]. The permutations are fixed per task
    (seeded by the task's name, not by `rng`), the noise drawn per image from `rng`."""
    fixed = np.random.default_rng(sum(map(ord, name)))
    if name == "rot90":
        return np.rot90(x, 1, axes=(1, 2))
    if name == "rot180":
        return np.rot90(x, 2, axes=(1, 2))
    if name == "invert":
        return 255 - x
    if name == "patch_shuffle":
        return _unpatches(_patches(x)[:, fixed.permutation(16)])
    if name == "pixel_perm":
        return _unpatches(_patches(x)[:, :, fixed.permutation(49)])
    if name == "noise":
        u = rng.random(x.shape)
        y = x.copy()
        y[u < 0.2] = 0
        y[u > 0.8] = 255
        return y
    if name == "checker_invert":
        z = _patches(x).copy()
        odd = (np.add.outer(np.arange(4), np.arange(4)) % 2 == 1).reshape(16)
        z[:, odd] = 255 - z[:, odd]
        return _unpatches(z)
    if name == "lowres":
        small = x.reshape(len(x), 7, 4, 7, 4).mean(axis=(2, 4))
        return np.repeat(np.repeat(small, 4, axis=1), 4, axis=2).round().astype(np.uint8)
    raise KeyError(name)


def build_tasks(names, n_val, n_test, pre_images, seed=1717) -> dict:
    """task -> split -> (uint8 images, labels). Validation and train from the training images the
    base never saw (disjoint), test from the official test set."""
    d = load_fashion()
    pool_x, pool_y = d["x_train"][pre_images:], d["y_train"][pre_images:]
    out = {}
    for i, name in enumerate(TASKS):
        rng = np.random.default_rng(seed + i)
        pt = rng.permutation(len(d["y_test"]))[:n_test]
        pp = rng.permutation(len(pool_y))
        parts = {
            "test": (d["x_test"][pt], d["y_test"][pt]),
            "val": (pool_x[pp[:n_val]], pool_y[pp[:n_val]]),
            "train": (pool_x[pp[n_val:]], pool_y[pp[n_val:]]),
        }
        out[name] = {s: (np.ascontiguousarray(transform(name, x, rng)), y) for s, (x, y) in parts.items()}
    return {n: out[n] for n in names}


def to_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1).sub_(MEAN).div_(STD)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Pretraining only: one random shift (up to 2 px, zero-padded) per batch, random horizontal flips."""
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
    x = torch.roll(F.pad(x, (2, 2, 2, 2), value=-MEAN / STD), shifts=(dy, dx), dims=(2, 3))[:, :, 2:-2, 2:-2]
    flip = torch.rand(len(x), generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def _schedule(steps: int):
    """10% linear warm-up, then cosine to 0."""
    warm = max(1, steps // 10)

    def f(s):
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + np.cos(np.pi * (s - warm) / max(1, steps - warm)))

    return f


# ---------------------------------------------------------------- bench


def base_home(quick: bool, base_seed: int = 0) -> Path:
    """The folder of one pretrained base and everything built on it: vit/ for base 0 (the first
    run's paths and caches), vit/base_seedN/ for base N > 0. The base itself is in its base/."""
    home = CACHE / ("vit_quick" if quick else "vit")
    return home if base_seed == 0 else home / f"base_seed{base_seed}"


def set_root(quick: bool, ft_seed: int, base_seed: int = 0) -> Path:
    """The folder of a set of fine-tunes (fine-tunes, records, evaluations) of one base: the base's
    home (base_home) for set 0, its ft_seedN/ for set N > 0, so that base 0's set 0 keeps the
    paths and caches of the first run."""
    home = base_home(quick, base_seed)
    return home if ft_seed == 0 else home / f"ft_seed{ft_seed}"


def pretrain_seed(base_seed: int) -> int:
    """The seed of a base's pretraining: its init (seed_all) and its minibatch and augmentation
    order (the generator). Base 0's is the first run's, 0; base N's is N."""
    return base_seed


def finetune_seed(task: str, ft_seed: int) -> int:
    """The torch seed of a task's fine-tune (its minibatch order; the model starts from the base):
    sum of the name's character codes for set 0 (the first run's), + 100,003 * N for set N.
    The same for every base: bases differ by their weights, not by the fine-tunes' order."""
    return sum(map(ord, task)) + 100_003 * ft_seed


class ViTBench:
    """The interface sweep.Sweep needs: tasks, cfg, root, base_dir, base_state, finetune_all,
    load_state, evaluate (per-item correctness under the frozen head)."""

    kind = "vit"

    def __init__(self, quick=False, log=print, ft_seed=0, base_seed=0):
        self.quick = quick
        self.cfg = QUICK if quick else FULL
        self.log = log
        self.ft_seed = ft_seed
        self.base_seed = base_seed
        self.root = set_root(quick, ft_seed, base_seed)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tasks = self.cfg["tasks"]
        c = self.cfg
        self.data = build_tasks(self.tasks, c["n_val"], c["n_test"], c["pre_images"])
        self._t = {
            (t, s): (to_tensor(x), torch.from_numpy(y)) for t, sp in self.data.items() for s, (x, y) in sp.items()
        }
        self.base_dir = base_home(quick, base_seed) / "base"
        self._pretrain()
        self.model = ViT(**c["arch"])
        self.base_state = load_file(str(self.base_dir / "model.safetensors"))
        self.model.load_state_dict(self.base_state)
        self.model.eval()

    def task_description(self, t):
        return TASKS[t]

    def n_items(self, t, split):
        return len(self.data[t][split][1])

    def _save(self, model, folder: Path, meta: dict):
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(
            {k: v.detach().contiguous() for k, v in model.state_dict().items()},
            str(tmp / "model.safetensors"),
            metadata={"format": "pt"},
        )
        write_json(
            tmp / "config.json",
            dict(
                self.cfg["arch"], architecture="ViT (bench/quality/vit.py)", note="timm-style names; not transformers"
            ),
        )
        write_json(tmp / "finetune.json", meta)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)

    def _pretrain(self):
        if (self.base_dir / "model.safetensors").exists():
            return
        c = self.cfg
        d = load_fashion()
        X, Y = to_tensor(d["x_train"][: c["pre_images"]]), torch.from_numpy(d["y_train"][: c["pre_images"]])
        seed = pretrain_seed(self.base_seed)
        seed_all(seed)
        model = ViT(**c["arch"])
        opt = torch.optim.AdamW(model.parameters(), lr=c["pre_lr"], weight_decay=0.05)
        steps = c["pre_steps"]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps))
        g = torch.Generator().manual_seed(seed)
        t0 = time.time()
        model.train()
        losses = []
        for s in range(steps):
            idx = torch.randint(0, len(Y), (c["pre_batch"],), generator=g)
            loss = F.cross_entropy(model(_augment(X[idx], g)), Y[idx])
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if s % 100 == 0:
                self.log(f"pretrain step {s}/{steps} loss {np.mean(losses[-100:]):.3f} ({time.time() - t0:.0f}s)")
        model.eval()
        acc = float((self._logits(model, to_tensor(d["x_test"])).argmax(1).numpy() == d["y_test"]).mean())
        meta = {"pretrain_steps": steps, "fashion_test_acc": acc, "seconds": time.time() - t0}
        if self.base_seed:  # base 0's record as the first run's
            meta["base_seed"] = self.base_seed
        self._save(model, self.base_dir, meta)
        self.log(f"pretrained ViT on Fashion-MNIST: {steps} steps, test acc {acc:.3f} ({time.time() - t0:.0f}s)")

    @staticmethod
    @torch.inference_mode()
    def _logits(model, X, bs=1000):
        return torch.cat([model(X[i : i + bs]) for i in range(0, len(X), bs)])

    def ft_dir(self, t):
        return self.root / "ft" / t

    def finetune_all(self):
        for t in self.tasks:
            if not (self.ft_dir(t) / "model.safetensors").exists():
                self.finetune(t)
        return {t: self.ft_dir(t) for t in self.tasks}

    def finetune(self, task):
        """AdamW on everything but the frozen head, under that head (the base's classifier)."""
        c = self.cfg
        seed = finetune_seed(task, self.ft_seed)
        seed_all(seed)
        model = ViT(**c["arch"])
        model.load_state_dict(self.base_state)
        for p in model.head.parameters():
            p.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=c["lr"], weight_decay=0.0)
        steps = c["steps"]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps))
        X, y = self._t[(task, "train")]
        g = torch.Generator().manual_seed(seed)
        model.train()
        t0 = time.time()
        losses = []
        for _ in range(steps):
            idx = torch.randint(0, len(y), (c["batch"],), generator=g)
            loss = F.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        model.eval()
        meta = dict(
            task=task,
            steps=steps,
            lr=c["lr"],
            seconds=time.time() - t0,
            loss_first=float(np.mean(losses[:20])),
            loss_last=float(np.mean(losses[-20:])),
            # base 0's set 0's record as the first run's
            **({"ft_seed": self.ft_seed} if self.ft_seed else {}),
            **({"base_seed": self.base_seed} if self.base_seed else {}),
        )
        self._save(model, self.ft_dir(task), meta)
        self.log(
            f"fine-tuned {task}: {steps} steps in {time.time() - t0:.0f}s, loss "
            f"{meta['loss_first']:.3f} -> {meta['loss_last']:.3f}"
        )

    def load_state(self, folder):
        from bench_text import load_state_folder

        return load_state_folder(folder)

    @torch.inference_mode()
    def evaluate(self, state, split, tasks=None):
        self.model.load_state_dict(state, strict=True)
        res = {}
        for t in tasks or self.tasks:
            X, y = self._t[(t, split)]
            res[t] = (self._logits(self.model, X).argmax(1) == y).numpy()
        return res


def pretrain_info(bench) -> dict:
    return read_json(bench.base_dir / "finetune.json", {})
