"""bench/quality/bench_zeroshot.py and zeroshot.py: the fine-tuning length and its cache folder."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "quality"))

import bench_zeroshot  # noqa: E402
import plot  # noqa: E402
from common import CACHE  # noqa: E402


def test_the_full_benchmark_fine_tunes_400_steps_and_quick_60():
    assert bench_zeroshot.FULL["steps"] == 400
    assert bench_zeroshot.QUICK["steps"] == 60


def test_each_step_count_has_its_own_cache_folder():
    roots = {(q, s): bench_zeroshot.bench_root(q, s) for q in (False, True) for s in (10, 150, 400)}
    assert len(set(roots.values())) == 6
    assert roots[(False, 400)] == CACHE / "zeroshot" / "steps400"
    assert roots[(True, 150)] == CACHE / "zeroshot_quick" / "steps150"
    # no folder inside another's: a different length can never read a cached file of this one
    for a in roots.values():
        for b in roots.values():
            assert a == b or a not in b.parents


def test_the_plot_reads_the_default_length_report():
    default = bench_zeroshot.bench_root(False, bench_zeroshot.FULL["steps"])
    assert plot.DEFAULT_JSON["zeroshot"] == default / "report" / "zeroshot.json"


class _StubBench:
    """What class_head uses of a bench: the classes, a tokenizer, batching and pooling."""

    data = {"pos_def": {"classes": ["adj", "adv", "noun", "verb"]}}

    def tok(self, texts, truncation, max_length):
        return {"input_ids": [[1, 2]] * len(texts)}

    def _batch(self, ids):
        return torch.ones(len(ids), 2), None

    def _pooled(self, model, x, mask):
        return model(x)


def test_freshly_computed_heads_can_be_fine_tuned_through():
    # the heads are computed without autograd, then a fine-tune of the same process backpropagates
    # through them: in inference mode they could not be saved for backward
    torch.manual_seed(0)
    W, b = bench_zeroshot.class_head(_StubBench(), torch.nn.Linear(2, 3), "pos_def")
    assert W.shape == (4, 3) and torch.equal(b, torch.zeros(4))
    feats = torch.randn(5, 3, requires_grad=True)
    (feats @ W.T + b).sum().backward()
    assert torch.allclose(feats.grad, W.sum(0).expand(5, 3))
