"""The model server's inference shortcuts give the full computation's answers: the last-position
forward pass, the chunked top-k, and bf16 or int8 scoring with fp32 re-scoring."""

from __future__ import annotations

import random
from concurrent.futures import Future

import numpy as np
import pytest
import torch
from abrec.models.checkpoint import load_checkpoint
from abrec.models.inference import RAGGED_ROWS, hidden_last, pad_left, top_k, top_within, topk_batch
from abrec.models.server import Bf16Product, Int8Product, LoadedVersion, default_precision, int8_available


@pytest.mark.parametrize(("layers", "heads"), [(1, 1), (2, 1), (3, 4)])
def test_forward_last_equals_the_full_forward(layers: int, heads: int) -> None:
    from abrec.models.presets import build_model, resolve_config

    torch.manual_seed(layers)
    config = resolve_config("tron", {"hidden": 32, "layers": layers, "heads": heads, "max_len": 8})
    model = build_model("tron", config, 100).eval()
    rng = random.Random(layers)
    # Empty sessions, single clicks and sessions longer than max_len (truncated), in one batch.
    sessions = [[rng.randint(1, 100) for _ in range(rng.randint(0, 12))] for _ in range(40)]
    with torch.inference_mode():
        items, mask = pad_left(sessions, 8)
        full = model(items, mask)[:, -1]
        torch.testing.assert_close(model.forward_last(items, mask), full, rtol=1e-5, atol=1e-5)
        alone = torch.cat([model.forward_last(*pad_left([s], 8)) for s in sessions])
        torch.testing.assert_close(alone, full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.forward_ragged(sessions), full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.forward_ragged(sessions[3:4]), full[3:4], rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="inference"):
        model.train().forward_last(items, mask)
    with pytest.raises(RuntimeError, match="inference"):
        model.forward_ragged(sessions)


def test_hidden_last_lays_few_clicks_end_to_end_and_pads_many(monkeypatch) -> None:
    from abrec.models.presets import build_model, resolve_config

    torch.manual_seed(0)
    model = build_model("tron", resolve_config("tron", {"hidden": 16, "max_len": 8}), 50).eval()
    ragged, calls = model.forward_ragged, []
    monkeypatch.setattr(model, "forward_ragged", lambda batch: calls.append(len(batch)) or ragged(batch))
    few = [[1, 2, 3], [], [4] * 20]  # an empty session counts one row, a long one max_len
    many = [[i % 50 + 1] * 8 for i in range(RAGGED_ROWS // 8 + 1)]
    with torch.inference_mode():
        for sessions in (few, many):
            torch.testing.assert_close(hidden_last(model, sessions), model(*pad_left(sessions, 8))[:, -1],
                                       rtol=1e-5, atol=1e-5)
    assert calls == [3]


@pytest.mark.parametrize(("rows", "columns", "k"), [(1, 43_098, 20), (16, 43_098, 32), (5, 10_000, 39),
                                                    (3, 6_400, 25), (2, 500, 20), (4, 64 * 50 + 7, 1)])
def test_chunked_top_k_equals_torch_topk(rows: int, columns: int, k: int) -> None:
    gen = torch.Generator().manual_seed(columns + k)
    scores = torch.randn(rows, columns, generator=gen)
    scores[:, 0] = float("-inf")
    scores[0, -3:] = 10.0 + torch.arange(3.0)  # the best columns in the tail past the last chunk
    values, columns_ = top_k(scores, k)
    expected = torch.topk(scores, k, dim=1)
    assert torch.equal(values, expected.values)
    assert torch.equal(columns_, expected.indices)


@pytest.mark.parametrize(("rows", "columns", "k"), [(1, 43_098, 20), (16, 64 * 700, 32), (3, 6_400, 25),
                                                    (2, 500, 20)])
def test_top_within_holds_every_column_near_the_kth(rows: int, columns: int, k: int) -> None:
    gen = torch.Generator().manual_seed(columns + k)
    scores = torch.randn(rows, columns, generator=gen)
    scores[:, 0] = float("-inf")
    scores[0, -3:] = 10.0 + torch.arange(3.0)  # the best columns in the tail past the last chunk
    margin = torch.rand(rows, generator=gen) * 0.5
    picked = top_within(scores, k, margin)
    floor = torch.topk(scores, k, dim=1).values[:, -1] - margin
    for row in range(rows):
        wanted = set((scores[row] >= floor[row]).nonzero()[:, 0].tolist())
        got = set(picked[row].tolist())
        assert wanted <= got, row  # padded with column 0, or with lesser columns on the short path
    assert picked.shape[1] <= 2 * max(len((scores[r] >= floor[r]).nonzero()) for r in range(rows)) + k


@pytest.mark.skipif(not int8_available(), reason="no fbgemm int8 kernels in this torch build")
def test_int8_scores_lie_within_their_bound() -> None:
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(3_001, 48, generator=gen) * torch.rand(3_001, 1, generator=gen)  # uneven row norms
    hidden = torch.randn(9, 48, generator=gen) * torch.tensor([1e-3, 1, 10, 1, 1, 1, 1, 1, 1])[:, None]
    hidden[1, 5] = 40.0  # one large coordinate
    product = Int8Product(weight)
    scores, slack = product(hidden)
    x = hidden / hidden.abs().amax(1, keepdim=True) * (63 / 64)
    exact = (x.double() @ weight.double().T).float()
    error = (scores[:, : len(weight)] - exact).abs().amax(1)
    assert (error <= slack).all(), (error, slack)
    assert (slack < exact.std(1) * 0.6).all()  # and near enough to shortlist a few of many items
    assert scores.shape[1] % 64 == 0 and (scores[:, len(weight):] == 0).all()


def test_bf16_scores_lie_within_their_bound() -> None:
    gen = torch.Generator().manual_seed(8)
    weight = torch.randn(3_001, 48, generator=gen) * torch.rand(3_001, 1, generator=gen) * 3  # uneven norms
    hidden = torch.randn(9, 48, generator=gen) * torch.tensor([1e-3, 1, 10, 1, 1, 1, 1, 1, 1])[:, None]
    hidden[1, 5] = 40.0  # one large coordinate
    outliers = weight.clone()
    outliers[:5] *= 40  # a few large items: the bound must still hold (it grows with them)
    for w in (weight, outliers):
        scores, slack = Bf16Product(w)(hidden)
        exact = (hidden.double() @ w.double().T).float()
        error = (scores - exact).abs().amax(1)
        assert (error <= slack).all(), (error, slack)
        assert (error > 0).any()  # bf16 really is rough, so the bound is exercised
        if w is weight:  # near enough to shortlist a few of many items
            assert (slack < exact.std(1) * 0.6).all()


def _answers(lv: LoadedVersion, sessions: list[list[str]], k: int, exclude: bool) -> list:
    results = []
    for start in range(0, len(sessions), 16):
        batch = []
        for items in sessions[start : start + 16]:
            future: Future = Future()
            request = lv.prepare(items, k, exclude, future)
            assert request is not None
            future.set_running_or_notify_cancel()
            batch.append(request)
        lv.run(batch)
        results += [r.future.result() for r in batch]
    return results


class _Row:
    label, id, sha256, kind = "tron:1", 1, "", "tron"


@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_shortlist_scoring_answers_as_fp32(make_checkpoint, exclude: bool, precision: str) -> None:
    # A catalogue large enough for the chunked top-k; the bf16 or int8 shortlist is re-scored in fp32.
    if precision == "int8" and not int8_available():
        pytest.skip("no fbgemm int8 kernels in this torch build")
    ckpt = load_checkpoint(make_checkpoint(seed=3, n_items=12_000, hidden=64, layers=2, max_len=20))
    rng = random.Random(0)
    sessions = [[f"i{rng.randrange(12_000)}" for _ in range(rng.randint(1, 25))] for _ in range(96)]
    exact = LoadedVersion(_Row, ckpt.model, ckpt.item_map, ckpt.popular, "cpu", "fp32")
    rough = LoadedVersion(_Row, ckpt.model, ckpt.item_map, ckpt.popular, "cpu", precision)
    for k in (20, 100):
        fp32, short = _answers(exact, sessions, k, exclude), _answers(rough, sessions, k, exclude)
        # The rough scores only choose the candidates: the same items in the same order, with fp32's
        # scores (the two products round differently in the last bit, so exact ties may swap).
        np.testing.assert_allclose([a.scores for a in short], [a.scores for a in fp32], rtol=1e-5, atol=1e-5)
        for a, b in zip(fp32, short, strict=True):
            assert len(a.items) == len(b.items) == k
            for rank in (r for r in range(k) if a.items[r] != b.items[r]):
                tied = [a.scores[j] for j in (rank - 1, rank + 1) if 0 <= j < k]
                assert any(abs(t - a.scores[rank]) < 1e-5 for t in tied), (rank, a.items, b.items)
        assert np.mean([a.items == b.items for a, b in zip(fp32, short, strict=True)]) >= 0.95
    # And fp32 answers (k=100 here) begin with topk_batch's top 20.
    internal = [[ckpt.item_map.to_internal(i) for i in s] for s in sessions[:8]]
    ids, _ = topk_batch(ckpt.model, internal, 20, exclude_seen=exclude)
    external = ckpt.item_map.to_external
    assert [a.items[:20] for a in fp32[:8]] == [[external(int(i)) for i in row] for row in ids]
    if precision == "bf16":  # a bf16 copy of the scoring matrix, not fp32
        assert rough.memory_bytes < exact.memory_bytes
    else:  # an int8 copy (a quarter of fp32's), and without VNNI fp32's too, for single sessions
        assert (rough.memory_bytes < exact.memory_bytes) == torch.cpu._is_vnni_supported()


def test_one_session_batches_of_every_size_agree(make_checkpoint) -> None:
    """_Request batches of 1 and of many give the same answers, in every precision."""
    ckpt = load_checkpoint(make_checkpoint(seed=4, n_items=9_000, hidden=32, max_len=10))
    rng = random.Random(1)
    sessions = [[f"i{rng.randrange(9_000)}" for _ in range(rng.randint(1, 14))] for _ in range(32)]
    for precision in ("fp32", "bf16", "int8") if int8_available() else ("fp32", "bf16"):
        lv = LoadedVersion(_Row, ckpt.model, ckpt.item_map, ckpt.popular, "cpu", precision)
        batched = _answers(lv, sessions, 20, True)
        single = [_answers(lv, [s], 20, True)[0] for s in sessions]
        assert [a.items for a in batched] == [a.items for a in single], precision
        np.testing.assert_allclose([a.scores for a in batched], [a.scores for a in single],
                                   rtol=1e-4, atol=1e-4)


def test_default_precision_follows_the_hardware(monkeypatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert default_precision("cpu") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    # AVX512-BF16 without AMX (Zen 4) multiplies bf16 matrices slower than fbgemm's int8.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert default_precision("cpu") == ("int8" if int8_available() else "fp32")
