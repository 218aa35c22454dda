"""bench/quality/replication.py: the statistics over sets of fine-tunes, against loops written out."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("scipy")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "quality"))

import replication  # noqa: E402

T_975_DF2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (tables)


def _diffs(seed=3, n_sets=3, sizes=(7, 5)):
    rng = np.random.default_rng(seed)
    return [
        {f"t{i}": rng.integers(-1, 2, size=n).astype(np.float64) for i, n in enumerate(sizes)} for _ in range(n_sets)
    ]


def test_set_diff_is_the_mean_over_tasks_of_item_means():
    d = {"a": np.array([1.0, 0.0, 0.0, 1.0]), "b": np.array([-1.0, 0.0])}
    assert replication.set_diff(d) == pytest.approx((0.5 + -0.5) / 2)


def test_t_interval_three_sets():
    x = np.array([0.01, 0.03, -0.005])
    m = sum(x) / 3
    sd = math.sqrt(sum((v - m) ** 2 for v in x) / 2)
    lo, hi = replication.t_interval(x)
    assert lo == pytest.approx(m - T_975_DF2 * sd / math.sqrt(3))
    assert hi == pytest.approx(m + T_975_DF2 * sd / math.sqrt(3))
    assert all(math.isnan(v) for v in replication.t_interval(np.array([0.2])))


def test_two_way_bootstrap_matches_a_loop_over_replicates():
    diffs = _diffs()
    sizes = {t: len(v) for t, v in diffs[0].items()}
    sets, items = replication.draws(3, sizes, n_boot=50, seed=11)
    got = replication.two_way_boot(diffs, sets, items)
    for b in range(50):
        total = 0.0
        for s in sets[b]:  # the drawn sets, repeats included
            per_task = [sum(diffs[s][t][i] for i in items[t][b]) / sizes[t] for t in sizes]
            total += sum(per_task) / len(per_task)
        assert got[b] == pytest.approx(total / len(sets[b]))


def test_two_way_bootstrap_draws_sets_and_items():
    # sets that disagree widen the interval beyond what the items alone give
    same = _diffs(seed=5, n_sets=1) * 3
    spread = [{t: v + k * 0.5 for t, v in same[0].items()} for k in (-1, 0, 1)]
    sizes = {t: len(v) for t, v in same[0].items()}
    sets, items = replication.draws(3, sizes, n_boot=400, seed=2)
    w_same = np.ptp(np.percentile(replication.two_way_boot(same, sets, items), [2.5, 97.5]))
    w_spread = np.ptp(np.percentile(replication.two_way_boot(spread, sets, items), [2.5, 97.5]))
    assert w_spread > w_same + 0.3
