"""Negative samplers: shapes, exclusions, accidental-hit masking, top-k selection, and that
length bucketing does not change the loss."""

from __future__ import annotations

import torch
from abrec.models import negatives
from abrec.models.presets import build_model, resolve_config
from abrec.models.train import batch_loss, collate

N = 50


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch():
    sessions = [[1, 2, 3, 4], [5, 6], [7, 8, 9], [10, 11, 12, 13, 14, 15]]
    return collate(sessions, max_len=10)


def test_uniform_ids_are_real_items() -> None:
    ids = negatives.uniform(N, (2000,), _gen())
    assert ids.min() >= 1 and ids.max() <= N
    assert len(ids.unique()) > N * 0.9  # every item can be drawn


def test_sample_shapes_per_style() -> None:
    inputs, labels, mask = _batch()
    p = int(mask.sum())
    base = {"uniform_negatives": 7, "in_batch_negatives": 0, "reject_session_items": False}
    negs = negatives.sample(base | {"sampling": "batch"}, inputs, labels, mask, N, _gen())
    assert negs.shared.shape == (7,) and negs.per_session is None and negs.per_position is None
    negs = negatives.sample(base | {"sampling": "session"}, inputs, labels, mask, N, _gen())
    assert negs.per_session.shape == (4, 7)
    negs = negatives.sample(base | {"sampling": "position"}, inputs, labels, mask, N, _gen())
    assert negs.per_position.shape == (p, 7)
    mixed = base | {"sampling": "session", "in_batch_negatives": 5}
    negs = negatives.sample(mixed, inputs, labels, mask, N, _gen())
    assert negs.per_session.shape == (4, 12)


def test_in_batch_negatives_come_from_other_sessions_only() -> None:
    inputs, labels, mask = _batch()
    targets = labels[mask]
    counts = mask.sum(1)
    ids = negatives.in_batch(targets, counts, 200, _gen())
    own = [set(row[row > 0].tolist()) for row in labels]
    every = set(targets.tolist())
    for b in range(4):
        assert set(ids[b].tolist()) <= every - own[b]
        # with 200 draws every other session's target shows up
        assert set(ids[b].tolist()) == every - own[b]


def test_in_batch_with_a_single_session_gives_padding() -> None:
    ids = negatives.in_batch(torch.tensor([3, 4]), torch.tensor([2]), 5, _gen())
    assert ids.tolist() == [[0] * 5]


def test_reject_session_items() -> None:
    neg = negatives.uniform(5, (300, 3), _gen())
    session = torch.tensor([[1, 2, 3]]).expand(300, 3)
    cleaned = negatives.reject_in_session(neg, session, 5, _gen(1), rounds=50)
    assert set(cleaned.unique().tolist()) <= {4, 5}


def _model(kind: str = "tron", **over):
    cfg = resolve_config(kind, {"hidden": 8, "layers": 1, "max_len": 10, "dropout": 0.0} | over)
    torch.manual_seed(0)
    return build_model(kind, cfg, N), cfg


def test_accidental_hits_and_padding_are_masked() -> None:
    model, _ = _model()
    inputs, labels, mask = _batch()
    hidden = model(inputs, mask)
    positives = labels[mask]
    # Every position's own positive appears among the shared negatives, and so does padding.
    shared = torch.cat([positives.unique(), torch.tensor([0, 20, 21])])
    pos, neg = negatives.scores(model, hidden, mask, labels, negatives.Negatives(shared=shared))
    assert neg.shape == (len(positives), len(shared))
    for p, target in enumerate(positives.tolist()):
        for j, item in enumerate(shared.tolist()):
            assert torch.isinf(neg[p, j]) == (item == target or item == 0)
    # Unmasked scores are dot products with the item embedding.
    w = model.output_weight()
    h = hidden[mask]
    assert torch.allclose(pos, (h * w[positives]).sum(-1), atol=1e-5)
    j = shared.tolist().index(20)
    assert torch.allclose(neg[:, j], h @ w[20], atol=1e-5)


def test_topk_keeps_the_highest_scoring_negatives() -> None:
    model, _ = _model()
    inputs, labels, mask = _batch()
    hidden = model(inputs, mask)
    negs = negatives.sample({"uniform_negatives": 30, "sampling": "batch", "in_batch_negatives": 4,
                             "reject_session_items": False}, inputs, labels, mask, N, _gen())
    _, all_neg = negatives.scores(model, hidden, mask, labels, negs)
    _, top = negatives.scores(model, hidden, mask, labels, negs, topk=5)
    expected = torch.topk(all_neg, 5, dim=1).values
    assert torch.allclose(torch.sort(top, dim=1, descending=True).values, expected, atol=1e-5)
    _, top_bf16 = negatives.scores(model, hidden, mask, labels, negs, topk=5, selection_bf16=True)
    # bf16 only picks the candidates; the kept ones are scored in full precision
    assert top_bf16.dtype == torch.float32
    assert (torch.sort(top_bf16, 1, descending=True).values - expected).abs().max() < 0.05


def test_bucketed_and_padded_batches_give_the_same_loss() -> None:
    sessions = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    for kind in ("tron", "sasrec", "sasrec-ssm", "gru4rec"):
        model, cfg = _model(kind, uniform_negatives=20) if kind != "sasrec" else _model(kind)
        model.eval()  # no dropout: the two forward passes must be comparable
        values = []
        for pad_to in (None, 10):
            inputs, labels, mask = collate(sessions, max_len=10, pad_to=pad_to)
            negs = negatives.sample(cfg, inputs, labels, mask, N, _gen(3))
            values.append(batch_loss(model, cfg, inputs, labels, mask, negs))
        assert inputs.shape[1] == 10
        assert torch.allclose(values[0], values[1], atol=1e-5), kind
