"""Losses against the golden values of the reference repository (otto-de/TRON test/test_loss.py)
and hand computations; masking of accidental hits."""

from __future__ import annotations

import math

import pytest
import torch
from abrec.models import losses

# The reference's fixture: 2 sessions x 5 positions, 3 negatives each; position (1, 0) is padding.
POS = torch.tensor([[1, 2, 3, 4, 4], [0, 3, 2, 1, 4]], dtype=torch.float)
NEG = torch.tensor([[[1, 2, 3], [4, 5, 6], [7, 8, 9], [6, 3, 8], [6, 3, 8]],
                    [[0, 0, 0], [9, 8, 7], [6, 5, 4], [3, 2, 1], [6, 3, 8]]], dtype=torch.float)
MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)


def test_sampled_softmax_matches_reference_golden_values() -> None:
    per_position = losses.sampled_softmax(POS.reshape(-1), NEG.reshape(10, 3), reduction="none").reshape(2, 5)
    expected = torch.tensor([[2.4938, 4.4197, 6.4093, 4.1488, 4.1488], [0.0, 6.4093, 4.4197, 2.4938, 4.1488]])
    # The reference zeroes its padded position; here it is log(4): four equal scores.
    expected[1, 0] = math.log(4)
    assert torch.allclose(per_position, expected, atol=1e-4)
    assert torch.allclose(losses.sampled_softmax(POS[MASK], NEG[MASK]), torch.tensor(39.0920 / 9), atol=1e-4)


def test_bce_matches_reference_golden_value() -> None:
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    pos = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    neg = torch.tensor([[[1.1, 1.2], [1.2, 2.1]], [[-1.0, 4.0], [1.0, -4.0]]])
    assert torch.allclose(losses.bce(pos[mask], neg[mask]), torch.tensor(2.6397), atol=1e-3)


def test_bce_by_hand() -> None:
    # -log sigmoid(2) - mean(log(1 - sigmoid(0)), log(1 - sigmoid(-1)))
    expected = math.log1p(math.exp(-2)) + (math.log(2) + math.log1p(math.exp(-1))) / 2
    got = losses.bce(torch.tensor([2.0]), torch.tensor([[0.0, -1.0]]))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_bpr_max_matches_reference_golden_values() -> None:
    per_position = losses.bpr_max(POS.reshape(-1), NEG.reshape(10, 3), 0.0, reduction="none").reshape(2, 5)
    expected = torch.tensor([[1.6602, 3.3726, 5.3391, 3.3785, 3.3785],
                             [0.6929, 5.3391, 3.3726, 1.6602, 3.3785]])
    # The reference's golden values were derived from 4-decimal intermediate values, hence its
    # tolerances (0.1 per position, 0.01 for the mean); e.g. position (0, 2) is exactly
    # -log(sum softmax([7, 8, 9]) * sigmoid([-4, -5, -6])) = 5.3181.
    assert torch.allclose(per_position, expected, atol=0.1)
    assert per_position[0, 2].item() == pytest.approx(5.3181, abs=1e-4)
    assert losses.bpr_max(POS[MASK], NEG[MASK], 0.0).item() == pytest.approx(30.8793 / 9, abs=0.01)


def test_bpr_max_regulariser_matches_reference_golden_value() -> None:
    # Equal negatives: softmax is uniform, regulariser = penalty * score^2; positive far above so
    # the ranking term vanishes.
    neg = torch.arange(1, 11, dtype=torch.float).repeat_interleave(3).reshape(10, 3)
    pos = torch.full((10,), 1e4)
    mask = MASK.reshape(-1)
    got = losses.bpr_max(pos[mask], neg[mask], 1.0)
    assert got.item() == pytest.approx(349 / 9, rel=1e-5)


def test_bpr_max_by_hand() -> None:
    pos, neg, lam = 1.0, torch.tensor([0.5, -1.0]), 0.5
    s = torch.softmax(neg, 0)
    ranking = -math.log(float((s * torch.sigmoid(pos - neg)).sum()))
    expected = ranking + lam * float((s * neg**2).sum())
    assert losses.bpr_max(torch.tensor([pos]), neg[None], lam).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["bce", "bpr-max", "ssm"])
def test_masked_negative_is_the_same_as_no_negative(name: str) -> None:
    pos = torch.tensor([0.3, -0.2])
    neg = torch.tensor([[0.1, 2.0, -0.5], [1.5, 0.2, 0.7]])
    masked = neg.clone()
    masked[:, 1] = float("-inf")
    without = neg[:, [0, 2]]
    got = losses.compute(name, pos, masked, bpr_penalty=0.5)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(losses.compute(name, pos, without, bpr_penalty=0.5).item(), rel=1e-6)


@pytest.mark.parametrize("name", ["bce", "bpr-max", "ssm"])
def test_all_negatives_masked_gives_finite_loss_and_gradient(name: str) -> None:
    pos = torch.tensor([0.3], requires_grad=True)
    neg = torch.full((1, 4), float("-inf"))
    loss = losses.compute(name, pos, neg, bpr_penalty=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pos.grad).all()
