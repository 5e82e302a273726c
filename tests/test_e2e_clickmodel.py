"""The replay's click model and its CTR prediction, checked against simulation and brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from abrec.experiments.simulate import ClickModel, predict, steps, user_ids


def test_examination_falls_with_rank_and_top_is_always_seen() -> None:
    cm = ClickModel()
    probs = [cm.examine(r) for r in range(1, 21)]
    assert probs[0] == 1.0
    assert all(a > b for a, b in zip(probs, probs[1:], strict=False))
    assert cm.examine(None) == 0.0
    assert cm.examine(10) == pytest.approx(10**-0.8)


@pytest.mark.parametrize("rank", [1, 3, 20, None])
def test_simulated_clicks_match_the_expected_clicks(rank: int | None) -> None:
    cm = ClickModel(k=20, eta=0.8, noise=0.2)  # a large noise rate makes its term visible
    slate = [f"i{j}" for j in range(20)]
    target = slate[rank - 1] if rank else "absent"
    u = np.random.default_rng(1).random((40_000, 3))
    clicks = np.array([len(cm.clicks(slate, target, row)) for row in u])
    expected = cm.expected_clicks(rank, len(slate))
    # 5 standard errors of the mean: fails only on a wrong formula, not by chance.
    assert abs(clicks.mean() - expected) < 5 * clicks.std() / np.sqrt(len(clicks)) + 1e-9


def test_a_repeated_click_counts_once() -> None:
    cm = ClickModel(k=1, noise=1.0)
    assert cm.clicks(["a"], "a", [0.0, 0.0, 0.0]) == ["a"]
    assert cm.expected_clicks(1, 1) == pytest.approx(1.0)


def test_steps_send_the_newest_clicks_and_target_the_next_one() -> None:
    assert steps([5, 6, 7, 8], max_items=2) == [([5], 6), ([5, 6], 7), ([6, 7], 8)]
    assert steps([5], max_items=50) == []


def test_returning_users_are_drawn_from_n() -> None:
    assert len(set(user_ids(100, seed=0))) == 100
    users = user_ids(1000, seed=0, n_users=50)
    assert len(set(users)) == 50
    assert users == user_ids(1000, seed=0, n_users=50)


def test_prediction_equals_brute_force_over_the_full_ranking() -> None:
    from abrec.models.presets import build_model, resolve_config

    torch.manual_seed(0)
    config = resolve_config("sasrec", {"hidden": 16, "max_len": 5})
    model = build_model("sasrec", config, 30).eval()
    rng = np.random.default_rng(0)
    sessions = [list(rng.integers(1, 31, size=int(n))) for n in rng.integers(1, 9, size=40)]
    cm = ClickModel(k=5, eta=0.8, noise=0.05)
    pred = predict(model, sessions, cm, max_items=5, batch_size=7)

    expected, rr = np.zeros(len(sessions)), np.zeros(len(sessions))
    for i, s in enumerate(sessions):
        for prefix, target in steps(s, 5):
            with torch.inference_mode():
                scores = model(torch.tensor([prefix]), torch.ones(1, len(prefix), dtype=torch.bool))[:, -1]
                scores = (scores @ model.output_weight().T)[0]
                scores[0] = -np.inf
            order = torch.argsort(scores, descending=True)[:5].tolist()
            rank = order.index(target) + 1 if target in order else None
            expected[i] += cm.expected_clicks(rank, 5)
            rr[i] += 1 / rank if rank else 0.0
    np.testing.assert_allclose(pred.expected_clicks, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(pred.reciprocal_ranks, rr, rtol=1e-9, atol=1e-12)
    assert pred.impressions.tolist() == [max(len(s) - 1, 0) for s in sessions]
    assert pred.ctr() == pytest.approx(expected.sum() / sum(max(len(s) - 1, 0) for s in sessions))
