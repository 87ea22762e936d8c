"""Merging task vectors: each method against results computed by hand on small tensors."""

from __future__ import annotations

import pytest
import torch

from editbank.methods.merging import drop_and_rescale, merge_deltas, trim

D1 = torch.tensor([3.0, -1.0, 2.0, -4.0])
D2 = torch.tensor([-2.0, 2.0, 1.0, 1.0])


def test_linear():
    assert torch.equal(merge_deltas([D1, D2], "linear"), torch.tensor([0.5, 0.5, 1.5, -1.5]))
    # weights 1 and 3, normalized: (D1 + 3 D2) / 4
    assert torch.equal(merge_deltas([D1, D2], "linear", [1, 3]), torch.tensor([-0.75, 1.25, 1.25, -0.25]))
    assert torch.equal(merge_deltas([D1, D2], "linear", [1, 3], normalize=False), torch.tensor([-3.0, 5, 5, -1]))


def test_trim_keeps_the_largest_magnitudes():
    assert torch.equal(trim(D1, 0.5), torch.tensor([3.0, 0, 0, -4]))
    assert torch.equal(trim(D2, 0.5), torch.tensor([-2.0, 2, 0, 0]))
    assert torch.equal(trim(D1, 0.01), torch.tensor([0.0, 0, 0, -4])), "at least one entry is kept"


def test_ties_trim_elect_and_disjoint_mean():
    # trimmed: [3, 0, 0, -4] and [-2, 2, 0, 0]; summed [1, 2, 0, -4] -> signs [+, +, + (zero), -]
    # entry 0: only 3 agrees; entry 1: only 2; entry 2: nothing non-zero; entry 3: only -4
    assert torch.equal(merge_deltas([D1, D2], "ties", density=0.5), torch.tensor([3.0, 2, 0, -4]))
    # no trimming, weights 1 and 3: weighted sum [-3, 5, 5, -1] -> signs [-, +, +, -]
    # entry 0: only -2 (w 3); entry 1: only 2; entry 2: (1*2 + 3*1) / 4; entry 3: only -4 (w 1)
    assert torch.equal(merge_deltas([D1, D2], "ties", [1, 3]), torch.tensor([-2.0, 2, 1.25, -4]))
    assert torch.equal(merge_deltas([D1, D2], "ties", [1, 3], scale=2.0), torch.tensor([-4.0, 4, 2.5, -8]))


def test_consensus_sums_agreeing_entries_and_picks_the_largest_otherwise():
    """REPAIR's merge rule: no trim; per entry the weighted sum where the signs agree, else the largest |w d|."""
    a = torch.tensor([1.0, 2.0, -3.0, 0.0, 0.5])
    b = torch.tensor([2.0, -1.0, -1.0, 4.0, -0.6])
    assert torch.equal(merge_deltas([a, b], "consensus"), torch.tensor([3.0, 2.0, -4.0, 4.0, -0.6]))
    # weights scale each delta before the rule: [2, 4, -6, 0, 1] and [6, -3, -3, 12, -1.8]
    assert torch.allclose(merge_deltas([a, b], "consensus", [2.0, 3.0]), torch.tensor([8.0, 4.0, -9.0, 12.0, -1.8]))


def test_dare_without_dropping_is_linear_or_ties():
    want = torch.tensor([-0.75, 1.25, 1.25, -0.25])
    assert torch.equal(merge_deltas([D1, D2], "dare_linear", [1, 3], density=1.0), want)
    assert torch.equal(merge_deltas([D1, D2], "dare_ties", [1, 3], density=1.0), torch.tensor([-2.0, 2, 1.25, -4]))


def test_dare_drops_and_rescales_reproducibly():
    delta = torch.linspace(-1, 1, 10_000)
    out = drop_and_rescale(delta, 0.25, torch.Generator().manual_seed(0))
    kept = out != 0
    assert torch.equal(out[kept], delta[kept] * 4), "kept entries are rescaled by 1 / density"
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    again = drop_and_rescale(delta, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(out, again), "the same seed drops the same entries"
    # dare_ties = TIES's election and disjoint mean over the dropped-and-rescaled deltas
    g = torch.Generator().manual_seed(1)
    a, b = drop_and_rescale(D1, 0.5, g), drop_and_rescale(D2, 0.5, g)
    got = merge_deltas([D1, D2], "dare_ties", density=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got, merge_deltas([a, b], "ties"))


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "slerp"}, "unknown merge method"),
    ({"density": 0.0}, "density"),
    ({"weights": [1.0]}, "1 weights for 2"),
    ({"weights": [1.0, -1.0]}, ">= 0"),
    ({"method": "linear", "weights": [0.0, 0.0]}, "sum to 0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        merge_deltas([D1, D2], **kwargs)
    with pytest.raises(ValueError, match="one shape"):
        merge_deltas([D1, D2[:3]])
