"""ExactScorer: the same top k (items and fp32 scores) as the full fp32 product, for every method."""

from __future__ import annotations

import pytest
import torch
from abrec.models.scoring import ExactScorer, auto_method, fbgemm_available

NEG = float("-inf")
METHODS = ["fp32", "bf16", *(["int8", "fp16"] if fbgemm_available() else [])]
CHEAP = [m for m in METHODS if m != "fp32"]


def reference(weight: torch.Tensor, hidden: torch.Tensor, exclude: list[list[int]] | None = None
              ) -> torch.Tensor:
    scores = hidden @ weight.T
    scores[:, 0] = NEG
    for row, ids in enumerate(exclude or []):
        scores[row, ids] = NEG
    return scores


def assert_exact(scorer: ExactScorer, weight: torch.Tensor, hidden: torch.Tensor, k: int,
                 exclude: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Values equal the reference top k's; the items are the reference's, except where reference
    scores tie to fp32 rounding at the k-th place."""
    values, ids = scorer.topk(hidden, k, exclude)
    ref = reference(weight, hidden, exclude)
    ref_values, ref_ids = ref.topk(k, dim=1)
    assert values.shape == ids.shape == (len(hidden), k)
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-6)
    finite = torch.isfinite(ref_values)
    tol = 1e-5 * ref_values[finite].abs().max().clamp_min(1) if finite.any() else 0
    for row in range(len(hidden)):
        n = int(finite[row].sum())
        got = ids[row, :n]
        assert len(set(got.tolist())) == n, "an item returned twice"
        assert 0 not in got.tolist()
        torch.testing.assert_close(ref[row, got], values[row, :n], rtol=1e-5, atol=1e-6)
        nxt = ref[row].topk(min(k + 1, ref.shape[1])).values[-1] if n == k else NEG
        if n and ref_values[row, n - 1] - nxt > tol:  # no tie at the k-th place: the very same items
            assert set(got.tolist()) == set(ref_ids[row, :n].tolist())
    return values, ids


@pytest.fixture(scope="module")
def trained_like() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    spread = torch.exp(torch.randn(6001, 1, generator=gen) * 0.2)
    weight = torch.randn(6001, 200, generator=gen) * 0.029 * spread
    weight[0] = 0
    return weight


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch", [1, 64])
def test_random_weights_give_the_fp32_top_k(trained_like: torch.Tensor, method: str, batch: int) -> None:
    scorer = ExactScorer(trained_like, method)
    gen = torch.Generator().manual_seed(batch)
    for scale in (1.0, 30.0):
        hidden = torch.randn(batch, 200, generator=gen) * scale
        _, ids = assert_exact(scorer, trained_like, hidden, 20)
        ref_ids = reference(trained_like, hidden).topk(20, dim=1).indices
        assert torch.equal(ids.sort(1).values, ref_ids.sort(1).values)  # Gaussian scores: no ties


@pytest.mark.parametrize("method", CHEAP)
def test_bound_holds_for_every_item(trained_like: torch.Tensor, method: str) -> None:
    scorer = ExactScorer(trained_like, method)
    gen = torch.Generator().manual_seed(3)
    hidden = torch.cat([torch.randn(32, 200, generator=gen), torch.randn(32, 200, generator=gen) * 50,
                        trained_like[1:33] * 100])
    approx, r, s = scorer.approx(hidden)
    bound = scorer.bound(r, s, approx)
    # int8 scores rows scaled to max |h| = 1; the others score h itself.
    scale = hidden.abs().amax(1, keepdim=True) if method == "int8" else torch.ones(len(hidden), 1)
    exact64 = (hidden.double() @ trained_like.double().T) / scale.double()
    exact32 = (hidden @ trained_like.T) / scale
    assert ((approx.double() - exact64).abs() <= bound.double()).all()
    assert ((approx - exact32).abs() <= bound).all()
    # ... and is not vacuous: a small fraction of each row's range of scores.
    spread = exact32[:, 1:].amax(1) - exact32[:, 1:].amin(1)
    assert (bound.amax(1) < 0.2 * spread).all()


def adversarial(seed: int) -> torch.Tensor:
    """Near-ties (copies of 40 vectors differing far below int8's and fp16's steps), large-norm
    outliers, and items whose differences lie in one coordinate only."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(40, 64, generator=gen)
    weight = base.repeat(100, 1) + 1e-4 * torch.randn(4000, 64, generator=gen)
    weight[::97] *= 40  # outliers
    one_coordinate = torch.zeros(200, 64)
    one_coordinate[:, 5] = torch.linspace(0, 2e-4, 200)
    weight[1000:1200] = base[0] + one_coordinate
    return torch.cat([torch.zeros(1, 64), weight])


@pytest.mark.parametrize("method", METHODS)
def test_adversarial_weights(method: str) -> None:
    weight = adversarial(1)
    scorer = ExactScorer(weight, method)
    gen = torch.Generator().manual_seed(2)
    hidden = torch.cat([torch.randn(16, 64, generator=gen),
                        weight[1:9] * 3,  # rows aligned with the near-tied copies
                        torch.eye(64)[:4] * 1000,  # one huge coordinate
                        torch.randn(4, 64, generator=gen) * torch.tensor([100.0] + [1e-3] * 63)])
    values, ids = assert_exact(scorer, weight, hidden, 20)
    # Rows aligned with the copies: their top 20 are copies differing by ~1e-4 per coordinate,
    # far below int8's quantisation step (~0.02), yet ordered as fp32 orders them.
    ref_ids = reference(weight, hidden).topk(20, dim=1).indices
    assert torch.equal(ids[16:24], ref_ids[16:24])
    if method != "fp32":
        assert scorer.stats.rows == len(hidden)


@pytest.mark.skipif(not fbgemm_available(), reason="int8 needs fbgemm")
def test_int8_pair_sums_never_saturate() -> None:
    """Activations and weights all at the top of their ranges: fbgemm's u8 x s8 pair sums would
    overflow int16 with 8-bit activations; the 7-bit ones used here stay exact."""
    weight = torch.cat([torch.zeros(1, 64), torch.ones(50, 64), -torch.ones(50, 64), torch.rand(200, 64)])
    weight[1:51] *= torch.linspace(0.5, 1.0, 50)[:, None]
    scorer = ExactScorer(weight, "int8")
    hidden = torch.ones(3, 64)
    hidden[1] = -1
    hidden[2, ::2] = -1
    approx, r, s = scorer.approx(hidden)
    exact = hidden @ weight.T
    assert ((approx - exact).abs() <= scorer.bound(r, s, approx)).all()
    assert_exact(scorer, weight, hidden, 20)


@pytest.mark.parametrize("method", METHODS)
def test_exclusion_and_padding(trained_like: torch.Tensor, method: str) -> None:
    scorer = ExactScorer(trained_like, method)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, 200, generator=gen)
    best = reference(trained_like, hidden).topk(10, dim=1).indices
    exclude = [best[0].tolist(), [], best[2, :3].tolist() + [7, 7], [0]]
    values, ids = assert_exact(scorer, trained_like, hidden, 20, exclude)
    for row, seen in enumerate(exclude):
        assert not set(ids[row].tolist()) & set(seen)
    assert torch.isfinite(values).all()
    # The same exclusion as a [B, L] tensor padded with item 0.
    padded = torch.zeros(4, 12, dtype=torch.long)
    for row, seen in enumerate(exclude):
        padded[row, :len(seen)] = torch.tensor(seen)
    values2, ids2 = scorer.topk(hidden, 20, padded)
    assert torch.equal(ids2, ids) and torch.equal(values2, values)


@pytest.mark.parametrize("method", METHODS)
def test_k_beyond_the_items_left(method: str) -> None:
    """k above what exclusion leaves (and above any shortlist): the items left, then -inf."""
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(301, 32, generator=gen)
    scorer = ExactScorer(weight, method)
    hidden = torch.randn(2, 32, generator=gen)
    exclude = [list(range(1, 290)), list(range(100, 140))]
    values, ids = assert_exact(scorer, weight, hidden, 250, exclude)
    assert torch.isfinite(values[0]).sum() == 11 and torch.isinf(values[0, 11:]).all()
    assert torch.isfinite(values[1]).all()
    values, _ = assert_exact(scorer, weight, hidden, 300)  # every item but the padding
    assert torch.isfinite(values).all()


@pytest.mark.parametrize("method", METHODS)
def test_zero_session_vector(trained_like: torch.Tensor, method: str) -> None:
    """Every score 0: any 20 items are right, but they are real items with score 0."""
    values, ids = ExactScorer(trained_like, method).topk(torch.zeros(2, 200), 20)
    assert (values == 0).all() and (ids > 0).all()


def test_auto_memory_and_arguments(trained_like: torch.Tensor) -> None:
    assert auto_method("cpu") in ("int8", "fp16", "bf16", "fp32")
    scorer = ExactScorer(trained_like)
    assert scorer.method == auto_method("cpu")
    assert scorer.nbytes > 0
    assert ExactScorer(trained_like, "fp32").nbytes == trained_like.numel() * 4
    with pytest.raises(ValueError):
        ExactScorer(trained_like, "int4")
    with pytest.raises(ValueError):
        ExactScorer(trained_like.double(), "fp32")
    with pytest.raises(ValueError):
        scorer.topk(torch.zeros(1, 200), 0)
    with pytest.raises(ValueError):
        scorer.topk(torch.zeros(1, 199), 5)
    with pytest.raises(ValueError):
        scorer.topk(torch.zeros(2, 200), 5, [[1]])
    if fbgemm_available():
        big = trained_like * 1e7
        with pytest.raises(ValueError):
            ExactScorer(big, "fp16")  # beyond fp16's range
        assert torch.equal(big, trained_like * 1e7)  # and left as it was
