"""The tensor operations of adapter combination (unipeft.ops.combine_ops) on tiny tensors with values worked out by
hand from the equations (TIES: Yadav et al. 2023; DARE: Yu et al. 2023)."""

from __future__ import annotations

import pytest
import torch

from unipeft.ops.combine_ops import elect_sign, merge_tensors, random_drop, svd_factors, trim

T1 = torch.tensor([1.0, -2.0, 0.5, 3.0])
T2 = torch.tensor([-3.0, 1.0, 0.5, 1.0])
W = [1.0, 2.0]


def test_trim_keeps_the_largest_magnitudes():
    t = torch.tensor([[3.0, -1.0], [0.5, -4.0]])
    assert torch.equal(trim(t, 0.5), torch.tensor([[3.0, 0.0], [0.0, -4.0]]))
    assert trim(t, 1.0) is t


def test_elect_sign_by_total_mass_and_by_frequency():
    stacked = torch.tensor([[1.0, -2.0, 0.0], [-3.0, 1.0, 0.0]])
    # masses -2, -1, 0 → γ = -1, -1, +1 (ties go to +1); zeros never agree
    assert elect_sign(stacked, "total").tolist() == [[False, True, False], [True, False, False]]
    # sign counts 0, 0, 0 → γ = +1 everywhere
    assert elect_sign(stacked, "frequency").tolist() == [[True, False, False], [False, True, False]]
    with pytest.raises(ValueError, match="unknown majority sign method 'mean'; valid: total, frequency"):
        elect_sign(stacked, "mean")


@pytest.mark.parametrize("method, density, expected", [
    ("linear", 1.0, [-5.0, 0.0, 1.5, 5.0]),  # T1 + 2 T2
    # trim to 3 of 4: T1 → [1, -2, 0, 3], T2 → [-3, 1, 0, 1]; then 1·T1 + 2·T2
    ("magnitude_prune", 0.75, [-5.0, 0.0, 0.0, 5.0]),
    # same trim; masses [-2, -1, 0, 4] → γ = [-1, -1, +1, +1]; weighted [1, -2, 0, 3] and [-6, 2, 0, 2];
    # agreeing means: -6/1, -2/1, 0/max(1, 0), (3 + 2)/2
    ("ties", 0.75, [-6.0, -2.0, 0.0, 2.5]),
    # no trim: masses [-2, -1, 1, 4] → γ = [-1, -1, +1, +1]; weighted [1, -2, .5, 3] and [-6, 2, 1, 2]
    ("ties", 1.0, [-6.0, -2.0, 0.75, 2.5]),
    ("dare_ties", 1.0, [-6.0, -2.0, 0.75, 2.5]),  # ρ = 1 drops nothing: TIES without trimming
    ("dare_linear", 1.0, [-5.0, 0.0, 1.5, 5.0]),
])
def test_merge_by_hand(method, density, expected):
    assert merge_tensors(method, [T1, T2], W, density=density).tolist() == expected


def test_ties_frequency_sign():
    # no trim; sign counts [0, 0, 2, 2] → γ = +1 everywhere; agreeing: T1 at 0, 2, 3; T2 at 1, 2, 3
    got = merge_tensors("ties", [T1, T2], W, density=1.0, majority_sign="frequency")
    assert got.tolist() == [1.0, 2.0, 0.75, 2.5]


def test_dare_drops_and_rescales_with_the_generator():
    t = torch.arange(1.0, 201.0)
    got = random_drop(t, 0.25, torch.Generator().manual_seed(3))
    mask = torch.bernoulli(torch.full((200,), 0.25), generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, t * mask / 0.25)  # kept entries are rescaled by 1/ρ = 4
    assert set(torch.unique(got / t).tolist()) == {0.0, 4.0}
    assert random_drop(t, 1.0) is t


def test_dare_linear_is_the_sum_of_the_dropped_tensors():
    masks = torch.bernoulli(torch.full((2, 4), 0.5), generator=torch.Generator().manual_seed(7))
    expected = 1.0 * T1 * masks[0] / 0.5 + 2.0 * T2 * masks[1] / 0.5
    got = merge_tensors("dare_linear", [T1, T2], W, density=0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(got, expected)


def test_merge_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown task-arithmetic method 'mean'; valid: linear, ties"):
        merge_tensors("mean", [T1], [1.0])
    with pytest.raises(ValueError, match="got 2 tensors and 1 weights"):
        merge_tensors("linear", [T1, T2], [1.0])


def test_svd_factors_truncate_and_pad():
    delta = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    b, a = svd_factors(delta, 2)
    assert b.shape == (3, 2) and a.shape == (2, 3)
    assert torch.allclose(b @ a, torch.diag(torch.tensor([3.0, 2.0, 0.0])), atol=1e-6)  # best rank-2 approximation
    small = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b, a = svd_factors(small, 4)  # more components than singular values: zero padding
    assert b.shape == (2, 4) and a.shape == (4, 2) and torch.allclose(b @ a, small, atol=1e-5)
    assert (b[:, 2:] == 0).all() and (a[2:] == 0).all()


def test_svd_clamp_bounds_the_factors():
    delta = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    b, a = svd_factors(delta, 3)
    high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), 0.9)
    cb, ca = svd_factors(delta, 3, clamp=0.9)
    assert torch.equal(cb, b.clamp(-high, high)) and torch.equal(ca, a.clamp(-high, high))
    assert cb.abs().max() <= high
