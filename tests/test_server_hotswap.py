"""Hot swap: an alias move under load fails no request, and every answer is from the version it names."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
from abrec.models import registry
from abrec.models.checkpoint import load_checkpoint
from abrec.models.client import HttpModelClient, ModelUnavailable
from abrec.models.inference import topk_batch
from abrec.models.server import ModelServer
from abrec.models.server_http import HttpServer
from abrec.models.store import DirectoryStore

from abrec.db import init_db, make_engine, session_factory

K = 10


@pytest.fixture
def reg(sqlite_url: str, tmp_path: Path, make_checkpoint):
    """tron:1 and tron:2 registered, tron@champion -> tron:1; expected answers of both versions."""
    engine = make_engine(sqlite_url)
    init_db(engine)
    sessions = session_factory(engine)
    store = DirectoryStore(tmp_path / "store")
    rng = random.Random(0)
    queries = [[f"i{rng.randrange(60)}" for _ in range(rng.randint(1, 6))] for _ in range(16)]
    expected = {}
    with sessions() as s:
        for seed in (1, 2):
            path = make_checkpoint(seed=seed)
            row = registry.register_model(s, store, path, "tron", actor="t")
            ckpt = load_checkpoint(path)
            ids, _ = topk_batch(ckpt.model, [[ckpt.item_map.to_internal(i) for i in q] for q in queries], K)
            expected[row.label] = [[ckpt.item_map.to_external(int(i)) for i in row_ids] for row_ids in ids]
        registry.set_alias(s, "tron@champion", "tron:1", actor="t")
        s.commit()
    assert expected["tron:1"] != expected["tron:2"]
    yield sessions, store, queries, expected
    engine.dispose()


def _move(sessions, version: str) -> None:
    with sessions() as s:
        registry.set_alias(s, "tron@champion", version, actor="t")
        s.commit()


def _wait(predicate, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_hot_swap_under_concurrent_load(reg) -> None:
    sessions, store, queries, expected = reg
    server = ModelServer(sessions, store, aliases=["tron@champion"], discover=False, max_batch=16,
                         max_delay_s=0.002, poll_s=0.05).start()
    http = HttpServer(server, port=0).start()
    try:
        assert server.wait_ready(30)
        stop = threading.Event()
        answers: list[list[tuple[int, str, list[str]]]] = [[] for _ in range(8)]
        failures: list[str] = []

        def caller(n: int) -> None:
            client = HttpModelClient(http.url)
            rng = random.Random(n)
            while not stop.is_set():
                q = rng.randrange(len(queries))
                try:
                    rec = client.recommend("tron@champion", queries[q], K, deadline_s=10)
                except ModelUnavailable as exc:
                    failures.append(str(exc))
                    continue
                answers[n].append((q, rec.version, rec.items))

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        _wait(lambda: sum(map(len, answers)) >= 150)
        _move(sessions, "tron:2")  # the server notices by itself (polling)
        _wait(lambda: any(v == "tron:2" for a in answers for _, v, _ in a[-1:]))
        seen = sum(map(len, answers))
        _wait(lambda: sum(map(len, answers)) >= seen + 150)
        stop.set()
        for t in threads:
            t.join()
    finally:
        http.stop()
        server.close()

    assert failures == []
    versions = {v for a in answers for _, v, _ in a}
    assert versions == {"tron:1", "tron:2"}
    for per_thread in answers:
        for q, version, items in per_thread:
            assert items == expected[version][q]  # computed by the version it names
        tags = [v for _, v, _ in per_thread]
        # One caller's requests are sequential: once it got the new version, never the old again.
        assert tags == sorted(tags)


def test_queued_requests_finish_on_the_old_version(reg) -> None:
    sessions, store, queries, expected = reg
    server = ModelServer(sessions, store, aliases=["tron@champion"], discover=False, max_batch=4,
                         max_delay_s=0.0, poll_s=60, concurrent_batches=1).start()
    try:
        assert server.wait_ready(30)
        with server._device_slots:  # hold the device: submissions wait in tron:1's queue
            queued = [server.submit("tron@champion", queries[q % 16], K) for q in range(12)]
            _move(sessions, "tron:2")
            server.refresh()
            _wait(lambda: server.readiness()["models"]["tron@champion"]["version"] == "tron:2")
            assert not any(f.done() for f in queued)
            after = server.submit("tron@champion", queries[0], K)
            assert "tron:1" not in server.status()["loaded"]  # unrouted; its queue still drains
        answers = [f.result(timeout=30) for f in queued]
        assert [a.version for a in answers] == ["tron:1"] * 12
        assert [a.items for a in answers] == [expected["tron:1"][q % 16] for q in range(12)]
        assert after.result(timeout=30).version == "tron:2"
    finally:
        server.close()


def test_failed_load_keeps_the_old_version_and_says_why(reg, make_checkpoint) -> None:
    sessions, store, queries, expected = reg
    with sessions() as s:
        bad = registry.register_model(s, store, make_checkpoint(seed=3), "tron", actor="t")
        s.commit()
    # The artifact is damaged after registration (disk fault, tampering): the sha256 check catches it.
    (store.root / bad.artifact_key).write_bytes(b"corrupted")
    server = ModelServer(sessions, store, aliases=["tron@champion"], discover=False, poll_s=60).start()
    try:
        assert server.wait_ready(30)
        _move(sessions, "tron:3")
        server.refresh()
        _wait(lambda: "error" in server.readiness()["models"]["tron@champion"])
        state = server.readiness()["models"]["tron@champion"]
        assert state["version"] == "tron:1" and state["ready"]
        assert "loading tron:3 failed" in state["error"] and "sha256" in state["error"]
        answer = server.recommend("tron@champion", queries[0], K, timeout=10)
        assert (answer.version, answer.items) == ("tron:1", expected["tron:1"][0])
        # A later move to a good version clears the error.
        _move(sessions, "tron:2")
        server.refresh()
        _wait(lambda: server.readiness()["models"]["tron@champion"]["version"] == "tron:2")
        assert "error" not in server.readiness()["models"]["tron@champion"]
    finally:
        server.close()


def test_readiness_waits_for_every_model(reg) -> None:
    sessions, store, _, _ = reg
    refs = ["tron@champion", "tron@missing"]
    server = ModelServer(sessions, store, aliases=refs, discover=False, poll_s=60)
    assert not server.is_ready()
    server.start()
    try:
        assert not server.wait_ready(2)
        state = server.readiness()
        assert state["models"]["tron@champion"]["ready"] and not state["models"]["tron@missing"]["ready"]
        assert "no alias tron@missing" in state["models"]["tron@missing"]["error"]
        _move(sessions, "tron:2")
        with sessions() as s:
            registry.set_alias(s, "tron@missing", "tron:1", actor="t")
            s.commit()
        server.refresh()
        assert server.wait_ready(30)
        # Ready at once (tron:1 serves both while tron:2 loads), then both versions resident, each once.
        _wait(lambda: server.readiness()["models"]["tron@champion"]["version"] == "tron:2")
        assert sorted(server.status()["loaded"]) == ["tron:1", "tron:2"]
    finally:
        server.close()


def test_database_outage_keeps_serving_and_recovers(reg) -> None:
    sessions, store, queries, expected = reg
    server = ModelServer(sessions, store, aliases=["tron@champion"], discover=False, poll_s=60).start()
    try:
        assert server.wait_ready(30)

        def down():
            raise OSError("connection refused")

        server.sessions = down
        server.refresh()
        state = server.readiness()
        assert "connection refused" in state["db_error"] and state["ready"]
        answer = server.recommend("tron@champion", queries[1], K, timeout=10)
        assert (answer.version, answer.items) == ("tron:1", expected["tron:1"][1])
        server.sessions = sessions
        _move(sessions, "tron:2")
        server.refresh()
        assert server.readiness()["db_error"] is None
        _wait(lambda: server.readiness()["models"]["tron@champion"]["version"] == "tron:2")
    finally:
        server.close()
