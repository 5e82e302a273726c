"""Training, evaluation, checkpoints and batched inference on small real models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from abrec.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from abrec.models.data import Dataset, ItemMap, synthetic_shop
from abrec.models.evaluate import evaluate, popularity_baseline, ranks
from abrec.models.inference import score_batch, topk_batch
from abrec.models.presets import PRESETS, build_model, resolve_config
from abrec.models.train import train
from torch import nn

SMALL = {"hidden": 16, "layers": 1, "max_len": 8, "dropout": 0.0, "valid_sessions": 50}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and the shared 2-core machine stays usable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_dataset(n_items: int = 60) -> Dataset:
    """Deterministic sessions walking a fixed permutation: the next item is always knowable."""
    rng = np.random.default_rng(0)
    succ = rng.permutation(n_items) + 1
    sessions = []
    for start in range(1, n_items + 1):
        s = [start]
        for _ in range(4):
            s.append(int(succ[s[-1] - 1]))
        sessions.append(s)
    pop = np.bincount([i for s in sessions for i in s], minlength=n_items + 1)
    item_map = ItemMap([f"i{j}" for j in range(1, n_items + 1)])
    return Dataset(sessions, sessions[-20:], sessions[:20], item_map, pop)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tron", "gru4rec"])
def test_small_model_overfits_tiny_dataset(kind: str) -> None:
    ds = _tiny_dataset()
    over = SMALL | {"epochs": 15, "valid_sessions": 0, "uniform_negatives": 64, "batch_size": 16, "lr": 3e-2}
    if kind == "gru4rec":
        over |= {"epochs": 20, "hidden": 32, "lr": 0.2, "batch_size": 8}
    result = train(ds, kind, over, progress=False)
    metrics = evaluate(result.model, ds.test)
    assert metrics["recall@20"] == pytest.approx(1.0)
    assert metrics["mrr@20"] > 0.5


class _Constant(nn.Module):
    """Scores every item alike."""

    max_len, num_items = 5, 30

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(31, 4))

    def forward(self, items, mask):
        return torch.zeros(*items.shape, 4)

    def output_weight(self):
        return self.w


def test_pessimistic_ties_give_a_constant_model_zero() -> None:
    metrics = evaluate(_Constant(), [[1, 2, 3], [4, 5]])
    assert metrics["targets"] == 3
    assert metrics["recall@20"] == 0.0 and metrics["mrr@20"] == 0.0


def test_ranks_by_hand() -> None:
    scores = torch.tensor([[float("-inf"), 0.5, 0.9, 0.5, 0.1]])
    assert ranks(scores, torch.tensor([2])).item() == 0
    assert ranks(scores, torch.tensor([1])).item() == 2  # item 2 above, item 3 tied: counted against
    assert ranks(scores, torch.tensor([4])).item() == 3


def test_excluding_seen_items_and_popularity_baseline() -> None:
    ds = _tiny_dataset()
    popular = ds.popular(100)
    base = popularity_baseline(popular, ds.test)
    # A model whose scores are the popularity ranking reproduces the baseline exactly.
    model = _Constant()
    model.num_items = ds.num_items
    model.w = nn.Parameter(torch.zeros(ds.num_items + 1, 4))
    with torch.no_grad():
        for r, item in enumerate(popular):
            model.w[item, 0] = -float(r)
    model.forward = lambda items, mask: torch.ones(*items.shape, 4)
    got = evaluate(model, ds.test)
    assert got["recall@20"] == pytest.approx(base["recall@20"])
    assert got["mrr@20"] == pytest.approx(base["mrr@20"])
    assert got["recall@20_excl"] <= 1.0


def _checkpoint(tmp_path: Path, kind: str = "tron") -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    cfg = resolve_config(kind, SMALL)
    model = build_model(kind, cfg, 40).eval()
    path = save_checkpoint(tmp_path / "m.safetensors", model, kind=kind, config=cfg,
                           item_map=ItemMap([f"x{i}" for i in range(40)]), metrics={"valid": {"r": 0.5}},
                           popular=[3, 1, 2], data_fingerprint="abc")
    return path, model


@pytest.mark.parametrize("kind", sorted(PRESETS))
def test_checkpoint_round_trip(tmp_path: Path, kind: str) -> None:
    path, model = _checkpoint(tmp_path, kind)
    ck = load_checkpoint(path)
    assert ck.kind == kind and ck.popular == [3, 1, 2] and ck.data_fingerprint == "abc"
    assert ck.metrics == {"valid": {"r": 0.5}} and ck.item_map.to_external(1) == "x0"
    assert not ck.model.training
    sessions = [[1, 2, 3], [7]]
    assert torch.equal(score_batch(ck.model, sessions), score_batch(model, sessions))


def test_corrupt_truncated_and_foreign_files_are_rejected(tmp_path: Path) -> None:
    path, _ = _checkpoint(tmp_path)
    data = path.read_bytes()
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    pickled = tmp_path / "p.pt"
    torch.save({"x": torch.ones(2)}, pickled)
    for bad in (truncated, garbage, pickled, tmp_path / "missing.safetensors"):
        with pytest.raises(CheckpointError, match=bad.name):
            load_checkpoint(bad)
    from safetensors.torch import save_file

    foreign = tmp_path / "f.safetensors"
    save_file({"x": torch.ones(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not an abrec checkpoint"):
        load_checkpoint(foreign)
    assert issubclass(CheckpointError, ValueError)


@pytest.mark.parametrize("kind", ["tron", "gru4rec"])
def test_batched_scores_equal_one_at_a_time(tmp_path: Path, kind: str) -> None:
    _, model = _checkpoint(tmp_path, kind)
    sessions = [[1, 2, 3], [], [5], list(range(1, 30)), [9, 9, 9, 4]]
    batched = score_batch(model, sessions)
    assert batched.shape == (5, 41) and torch.isinf(batched[:, 0]).all()
    for row, s in enumerate(sessions):
        alone = score_batch(model, [s])[0]
        assert torch.allclose(batched[row, 1:], alone[1:], atol=1e-4)
    # Truncation keeps the newest max_len clicks.
    if kind == "tron":
        newest = score_batch(model, [list(range(22, 30))])
        assert torch.allclose(score_batch(model, [list(range(1, 30))]), newest, atol=1e-5)
    ids, scores = topk_batch(model, sessions, 5, exclude_seen=True)
    assert ids.shape == (5, 5) and (ids > 0).all()
    assert not set(ids[0].tolist()) & {1, 2, 3}
    assert torch.all(scores[:, :-1] >= scores[:, 1:])


def test_training_writes_checkpoint_and_resumes(tmp_path: Path) -> None:
    ds = synthetic_shop(seed=3, n_items=80, n_sessions=300)
    over = SMALL | {"epochs": 2, "uniform_negatives": 64, "batch_size": 32, "valid_sessions": 10}
    first = train(ds, "tron", over | {"epochs": 1}, out_dir=tmp_path, progress=False)
    assert first.epochs == 1 and (tmp_path / "resume.pt").exists()
    ck = load_checkpoint(tmp_path / "model.safetensors")
    assert ck.data_fingerprint == ds.fingerprint() and ck.popular == ds.popular(100)
    resumed = train(ds, "tron", over, out_dir=tmp_path, resume=True, progress=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    straight = train(ds, "tron", over, progress=False)
    # Resuming continues the same run: same weights as training two epochs in one go.
    pairs = zip(resumed.model.state_dict().items(), straight.model.state_dict().values(), strict=True)
    for (name, a), b in pairs:
        assert torch.allclose(a, b, atol=1e-5), name
