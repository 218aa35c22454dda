"""Exact selection (sparsify.kth_largest / top_k_mask) against a full sort, on tensors large
enough to take the radix path, with the ties that bf16 checkpoints produce and signed zeros."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tadrop_cli import sparsify

N = 200_003  # above sparsify._SMALL: the histogram path


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    gaussian = torch.randn(N, generator=g)
    bf16_deltas = (
        torch.randn(N, generator=g).to(torch.bfloat16).float() - torch.randn(N, generator=g).to(torch.bfloat16).float()
    ) * 1e-3
    signed_zeros = torch.cat(
        [
            torch.randn(N // 2, generator=g),
            torch.full((500,), -0.0),
            torch.zeros(500),
            -torch.randn(N // 2, generator=g),
        ]
    )
    few_values = torch.randint(-3, 4, (N,), generator=g).float()
    heavy = torch.distributions.StudentT(1.5).sample((N,)) * 1e-4
    return {
        "gaussian": gaussian,
        "magnitudes": gaussian.abs(),
        "bf16 deltas": bf16_deltas,
        "signed zeros": signed_zeros,
        "seven values": few_values,
        "heavy tails": heavy,
        "constant": torch.full((N,), 0.25),
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.3, 0.5, 0.9, 1.0])
def test_kth_largest_equals_the_sorted_value(name, fraction):
    values = CASES[name]
    k = min(values.numel(), max(1, int(fraction * values.numel())))
    expected = np.sort(values.numpy())[::-1][k - 1]
    assert float(sparsify.kth_largest(values, k)) == float(expected)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("fraction", [0.01, 0.3, 0.5, 0.9])
def test_top_k_mask_keeps_exactly_k_and_breaks_ties_by_position(name, fraction):
    values = CASES[name]
    k = int(fraction * values.numel())
    mask = sparsify.top_k_mask(values, k)
    # reference: a stable sort on (-value, position) keeps the lowest positions among ties
    order = np.lexsort((np.arange(values.numel()), -values.numpy().astype(np.float64)))
    expected = np.zeros(values.numel(), dtype=bool)
    expected[order[:k]] = True
    assert int(mask.sum()) == k
    assert np.array_equal(mask.numpy(), expected)
