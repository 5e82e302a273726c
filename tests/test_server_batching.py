"""Dynamic batching gives the same answers as one request at a time, with per-request options."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from abrec.models import registry
from abrec.models.checkpoint import load_checkpoint
from abrec.models.inference import score_batch, topk_batch
from abrec.models.server import ModelServer
from abrec.models.store import DirectoryStore

from abrec.db import init_db, make_engine, session_factory

N_ITEMS = 300


@pytest.fixture(autouse=True)
def no_tf32():
    # Exactness is only promised in full fp32; TF32 (CUDA) would round the matmuls.
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(params=["fp32", "bf16", "int8"])
def served(request, sqlite_url: str, tmp_path: Path, make_checkpoint):
    engine = make_engine(sqlite_url)
    init_db(engine)
    sessions = session_factory(engine)
    store = DirectoryStore(tmp_path / "store")
    path = make_checkpoint(seed=1, n_items=N_ITEMS, max_len=8, hidden=32)
    with sessions() as s:
        registry.register_model(s, store, path, "tron", actor="t")
        registry.set_alias(s, "tron@champion", "tron:1", actor="t")
        s.commit()
    # A long queue delay makes sure concurrent submissions really share forward passes.
    # bf16 and int8 shortlist and re-score in fp32: they must give fp32's answers too.
    # Two versions' batches may compute at once (as on a 2-core CPU with one torch thread each).
    server = ModelServer(sessions, store, aliases=["tron@champion"], discover=False, max_batch=32,
                         max_delay_s=0.05, poll_s=60, precision=request.param, concurrent_batches=2).start()
    assert server.wait_ready(30), server.readiness()
    yield server, load_checkpoint(path)
    server.close()
    engine.dispose()


def _sessions(rng: random.Random, count: int) -> list[list[int]]:
    # Lengths from 1 to beyond max_len (8), so truncation and left padding both matter.
    return [[rng.randint(1, N_ITEMS) for _ in range(rng.randint(1, 14))] for _ in range(count)]


def test_batched_scores_equal_one_at_a_time(served) -> None:
    _, ckpt = served
    sessions = _sessions(random.Random(0), 48)
    batched = score_batch(ckpt.model, sessions)
    single = torch.cat([score_batch(ckpt.model, [s]) for s in sessions])
    torch.testing.assert_close(batched[:, 1:], single[:, 1:], rtol=1e-4, atol=1e-4)
    assert torch.equal(batched.topk(20).indices, single.topk(20).indices)


def test_server_batches_match_single_requests(served) -> None:
    server, ckpt = served
    rng = random.Random(1)
    sessions = _sessions(rng, 60)
    options = [(rng.choice([1, 5, 20, 50]), rng.random() < 0.5) for _ in sessions]
    external = ckpt.item_map.to_external
    futures = [
        server.submit("tron@champion", [external(i) for i in s] + ["nope"] * (j % 3), k, exclude_seen=ex)
        for j, (s, (k, ex)) in enumerate(zip(sessions, options, strict=True))
    ]
    results = [f.result(timeout=30) for f in futures]
    # They were computed in shared forward passes, not one by one.
    assert _batched_requests(server, "tron:1") == len(sessions)
    sizes = _batch_sizes(server)
    assert max(sizes) > 1, sizes

    for j, (s, (k, ex), result) in enumerate(zip(sessions, options, results, strict=True)):
        ids, scores = topk_batch(ckpt.model, [s], k, exclude_seen=ex)
        finite = torch.isfinite(scores[0])
        expected_items = [external(int(i)) for i in ids[0][finite]]
        assert result.items == expected_items, j
        np.testing.assert_allclose(result.scores, scores[0][finite].numpy(), rtol=1e-4, atol=1e-4)
        assert result.version == "tron:1" and result.unknown == j % 3
        if ex:
            assert not set(result.items) & {external(i) for i in s}


def _batched_requests(server: ModelServer, version: str) -> float | None:
    return server.metrics.get_sample_value("abrec_model_batch_size_sum", {"version": version})


def _batch_sizes(server: ModelServer) -> list[float]:
    """Upper bounds of the batch-size histogram buckets that were hit."""
    sizes = []
    for metric in server.metrics.collect():
        if metric.name == "abrec_model_batch_size":
            previous = 0.0
            for sample in metric.samples:
                if sample.name.endswith("_bucket"):
                    if sample.value > previous:
                        sizes.append(float(sample.labels["le"]))
                    previous = sample.value
    return sizes


def test_unknown_and_empty_sessions(served) -> None:
    server, ckpt = served
    result = server.recommend("tron@champion", ["nope", "nada"], 5, timeout=10)
    # No known click: the version's most popular training items, tagged with that version.
    assert result.items == [ckpt.item_map.to_external(i) for i in ckpt.popular[:5]]
    assert result.unknown == 2 and result.version == "tron:1"
    assert server.recommend("tron@champion", [], 3, timeout=10).items == ["i0", "i1", "i2"]
    # k beyond the catalogue returns the whole catalogue, minus seen items when asked.
    everything = server.recommend("tron@champion", ["i5"], 1000, exclude_seen=True, timeout=10)
    assert len(everything.items) == N_ITEMS - 1 and "i5" not in everything.items


def test_a_batch_never_mixes_versions(served, make_checkpoint) -> None:
    server, _ = served
    with server.sessions() as s:
        path = make_checkpoint(seed=2, n_items=N_ITEMS, max_len=8, hidden=32)
        registry.register_model(s, server.store, path, "tron", actor="t")
        s.commit()
    server.explicit.append("tron:2")
    server.refresh()
    assert server.wait_ready(30), server.readiness()
    futures = [server.submit(ref, ["i1", "i2"], 5) for _ in range(20) for ref in ("tron@champion", "tron:2")]
    versions = [f.result(timeout=30).version for f in futures]
    assert versions == ["tron:1", "tron:2"] * 20
    # Each version has its own batcher, so each batch is one version's.
    assert _batched_requests(server, "tron:1") == _batched_requests(server, "tron:2") == 20
