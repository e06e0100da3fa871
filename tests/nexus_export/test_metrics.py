"""metrics.max_abs_diff: the largest logit difference, in float64, chunk by chunk."""

import numpy as np
import pytest
import torch

from nexus_export import metrics


def test_max_abs_diff_finds_the_largest_difference_in_any_chunk():
    gen = torch.Generator().manual_seed(0)
    expected = torch.randn(2, 300, 50_000, generator=gen) * 20
    actual = expected + torch.randn(2, 300, 50_000, generator=gen) * 1e-5
    actual[1, 290, 7] += 0.25  # in a late chunk (20 positions of 50k logits a chunk)
    whole = float((expected.double() - actual.double()).abs().max())
    assert metrics.max_abs_diff(expected, actual.numpy()) == whole
    assert whole == pytest.approx(0.25, abs=1e-4)
    assert metrics.max_abs_diff(expected, expected.clone()) == 0.0


def test_max_abs_diff_refuses_different_shapes():
    with pytest.raises(ValueError, match="logit shapes differ"):
        metrics.max_abs_diff(torch.zeros(1, 4, 8), np.zeros((1, 5, 8), dtype=np.float32))
