"""The model server over HTTP: protocol, bad input, fallbacks for the client, arm discovery, the CLI."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
import requests
from abrec.experiments import service
from abrec.models import registry
from abrec.models import server as server_module
from abrec.models.client import HttpModelClient, InProcessModelClient, ModelUnavailable, Recommendation
from abrec.models.server import ModelServer
from abrec.models.server_http import MAX_ITEMS, HttpServer
from abrec.models.store import DirectoryStore

from abrec.cli import main
from abrec.db import init_db, make_engine, session_factory


def _registry(url: str, root: Path, make_checkpoint):
    engine = make_engine(url)
    init_db(engine)
    sessions = session_factory(engine)
    store = DirectoryStore(root)
    with sessions() as s:
        registry.register_model(s, store, make_checkpoint(seed=1), "tron", actor="t")
        registry.register_model(s, store, make_checkpoint(seed=2), "sasrec", actor="t")
        registry.set_alias(s, "tron@champion", "tron:1", actor="t")
        registry.set_alias(s, "sasrec@champion", "sasrec:1", actor="t")
        s.commit()
    return engine, sessions, store


@pytest.fixture
def live(sqlite_url: str, tmp_path: Path, make_checkpoint):
    engine, sessions, store = _registry(sqlite_url, tmp_path / "store", make_checkpoint)
    server = ModelServer(sessions, store, aliases=["tron@champion"], discover=False, poll_s=60).start()
    http = HttpServer(server, port=0).start()
    assert server.wait_ready(30)
    yield server, http
    http.stop()
    server.close()
    engine.dispose()


def test_recommend_over_http(live) -> None:
    server, http = live
    client = HttpModelClient(http.url)
    assert client.ready()
    rec = client.recommend("tron@champion", ["i3", "i4", "unknown-id"], 7, exclude_seen=True, deadline_s=5)
    direct = server.recommend("tron@champion", ["i3", "i4", "unknown-id"], 7, exclude_seen=True)
    assert rec == Recommendation(items=direct.items, version="tron:1", unknown_items=1)
    assert len(rec.items) == 7 and not {"i3", "i4"} & set(rec.items)
    # Integer ids are the shop's ids too.
    raw = requests.post(f"{http.url}/v1/recommend", json={"model": "tron@champion", "items": [3], "k": 2})
    assert raw.status_code == 200 and raw.json()["unknown"] == 1  # "3" is not an id of this shop
    # The in-process client gives the same answer through the same interface.
    assert InProcessModelClient(server).recommend("tron@champion", ["i3", "i4", "unknown-id"], 7,
                                                  exclude_seen=True, deadline_s=5) == rec


BAD_REQUESTS = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"items": []}', 400, "'model'"),
    (b'{"model": "tron@champion", "items": "i1"}', 400, "'items'"),
    (b'{"model": "tron@champion", "items": [true]}', 400, "'items'"),
    (b'{"model": "tron@champion", "items": [], "k": 0}', 400, "'k'"),
    (b'{"model": "tron@champion", "items": [], "k": "5"}', 400, "'k'"),
    (b'{"model": "tron@champion", "items": [], "exclude_seen": 1}', 400, "exclude_seen"),
    (b'{"model": "tron@champion", "items": [], "extra": 1}', 400, "extra"),
    (b'{"model": "tron@champion", "items": [], "timeout_ms": 0}', 400, "timeout_ms"),
    (b'{"model": "tron@champion", "items": [], "timeout_ms": "50"}', 400, "timeout_ms"),
    (b'{"model": "tron@other", "items": []}', 404, "not served"),
    (b'{"model": "tron@champion", "items": ["x"]}' + b" " * 300_000, 413, "larger"),
]


def test_bad_requests_get_4xx_naming_the_problem(live) -> None:
    _, http = live
    for body, status, needle in BAD_REQUESTS:
        resp = requests.post(f"{http.url}/v1/recommend", data=body, headers={"Content-Type": "text/json"})
        assert (resp.status_code, needle in resp.json()["error"]) == (status, True), body[:60]


def test_too_many_items_and_wrong_methods(live) -> None:
    _, http = live
    body = {"model": "tron@champion", "items": ["i1"] * (MAX_ITEMS + 1)}
    assert requests.post(f"{http.url}/v1/recommend", json=body).status_code == 400
    assert requests.get(f"{http.url}/v1/recommend").status_code == 405
    assert requests.post(f"{http.url}/readyz").status_code == 405
    assert requests.get(f"{http.url}/nothing").status_code == 404


def test_health_readiness_status_and_metrics(live) -> None:
    _, http = live
    assert requests.get(f"{http.url}/healthz").json() == {"status": "ok"}
    ready = requests.get(f"{http.url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["models"] == {"tron@champion": {"ready": True, "version": "tron:1"}}
    HttpModelClient(http.url).recommend("tron@champion", ["i1", "zz"], 3, deadline_s=5)
    status = requests.get(f"{http.url}/status").json()
    loaded = status["loaded"]["tron:1"]
    # 61 item rows x 16 + 10 positions x 16 + one transformer block of width 16 + LayerNorms, fp32.
    assert loaded["memory_bytes"] > 61 * 16 * 4 and loaded["items"] == 60 and status["device"] == "cpu"
    assert status["precision"] in ("fp32", "bf16", "int8")
    metrics = requests.get(f"{http.url}/metrics").text
    memory = float(loaded["memory_bytes"])
    assert f'abrec_model_memory_bytes{{device="cpu",version="tron:1"}} {memory}' in metrics
    assert 'abrec_model_requests_total{outcome="ok",version="tron:1"} 1.0' in metrics
    assert 'abrec_model_unknown_items_total{version="tron:1"} 1.0' in metrics
    assert "abrec_model_server_ready 1.0" in metrics


def test_model_fault_makes_both_clients_raise_model_unavailable(live, monkeypatch) -> None:
    server, http = live

    def broken(model, sessions):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(server_module, "hidden_last", broken)
    with pytest.raises(ModelUnavailable, match="injected fault"):
        HttpModelClient(http.url).recommend("tron@champion", ["i1"], 5, deadline_s=5)
    with pytest.raises(ModelUnavailable, match="injected fault"):
        InProcessModelClient(server).recommend("tron@champion", ["i1"], 5, deadline_s=5)
    monkeypatch.undo()  # the batcher survived the fault
    assert HttpModelClient(http.url).recommend("tron@champion", ["i1"], 5, deadline_s=5).version == "tron:1"
    assert 'outcome="error"' in requests.get(f"{http.url}/metrics").text


def test_slow_model_past_the_deadline_is_unavailable(live, monkeypatch) -> None:
    server, http = live
    real = server_module.hidden_last

    def slow(model, sessions):
        time.sleep(0.5)
        return real(model, sessions)

    monkeypatch.setattr(server_module, "hidden_last", slow)
    with pytest.raises(ModelUnavailable, match="timed out"):
        HttpModelClient(http.url).recommend("tron@champion", ["i1"], 5, deadline_s=0.05)
    with pytest.raises(ModelUnavailable):
        InProcessModelClient(server).recommend("tron@champion", ["i1"], 5, deadline_s=0.05)


def test_requests_queued_past_their_timeout_are_dropped_uncomputed(live, monkeypatch) -> None:
    server, http = live
    real = server_module.hidden_last
    computed: list[list[list[int]]] = []

    def slow(model, sessions):
        computed.append(sessions)
        time.sleep(0.4)
        return real(model, sessions)

    monkeypatch.setattr(server_module, "hidden_last", slow)
    url = f"{http.url}/v1/recommend"
    with ThreadPoolExecutor(4) as pool:
        blocker = pool.submit(requests.post, url, json={"model": "tron@champion", "items": ["i1"], "k": 3})
        time.sleep(0.1)  # the blocker holds the device now
        body = {"model": "tron@champion", "items": ["i2", "i3"], "k": 3, "timeout_ms": 50}
        short = [pool.submit(requests.post, url, json=body) for _ in range(3)]
        answers = [f.result(timeout=10) for f in short]
        assert blocker.result(timeout=10).status_code == 200
    assert [a.status_code for a in answers] == [504] * 3
    assert all("deadline passed" in a.json()["error"] for a in answers)
    # Only the blocker's one-click session ever reached the model (the others had two clicks).
    assert [[len(session) for session in batch] for batch in computed] == [[1]]
    assert 'abrec_model_requests_total{outcome="expired",version="none"} 3.0' in requests.get(
        f"{http.url}/metrics").text
    # The HTTP client sends its deadline, so the same happens to an API process that gave up.
    monkeypatch.undo()
    assert HttpModelClient(http.url).recommend("tron@champion", ["i1"], 3, deadline_s=5).version == "tron:1"


def _read_answers(sock: socket.socket, count: int) -> list[tuple[int, bytes, bytes]]:
    """`count` HTTP answers from a raw socket -> (status, head, body) each."""
    data, answers = b"", []
    sock.settimeout(10)
    while len(answers) < count:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(answers)} answers"
            data += chunk
        head, _, data = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        while len(data) < length:
            data += sock.recv(65536)
        answers.append((int(head[9:12]), head, data[:length]))
        data = data[length:]
    return answers


def _post(body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST /v1/recommend HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n" % (len(body), extra)
            + body)


def test_pipelined_requests_are_answered_in_order_and_connection_close_is_honoured(live) -> None:
    server, http = live
    with socket.create_connection((http.host, http.port)) as sock:
        # Three requests in one write: a model answer, an immediate 404, a model answer.
        sock.sendall(_post(b'{"model": "tron@champion", "items": ["i1"], "k": 2}')
                     + b"GET /nothing HTTP/1.1\r\nHost: t\r\n\r\n"
                     + _post(b'{"model": "tron@champion", "items": ["i2"], "k": 3}'))
        first, missing, third = _read_answers(sock, 3)
        assert (first[0], missing[0], third[0]) == (200, 404, 200)
        expected = [server.recommend("tron@champion", [i], k).items for i, k in (("i1", 2), ("i2", 3))]
        assert [orjson.loads(a[2])["items"] for a in (first, third)] == expected
        # The connection stays open, until a request asks to close it.
        sock.sendall(_post(b'{"model": "tron@champion", "items": ["i1"], "k": 1}', b"Connection: close\r\n"))
        (status, head, _), = _read_answers(sock, 1)
        assert status == 200 and b"connection: close" in head.lower()
        assert sock.recv(1) == b""


def test_malformed_http_gets_400_and_a_closed_connection(live) -> None:
    _, http = live
    with socket.create_connection((http.host, http.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nNOT HTTP AT ALL\r\n\r\n")
        ok, bad = _read_answers(sock, 2)
        assert (ok[0], bad[0]) == (200, 400) and b"malformed" in bad[2]
        assert sock.recv(1) == b""


def test_a_dropped_connection_cancels_its_queued_request(live, monkeypatch) -> None:
    server, http = live
    real = server_module.hidden_last
    computed: list[list[list[int]]] = []

    def recording(model, sessions):
        computed.append(sessions)
        return real(model, sessions)

    monkeypatch.setattr(server_module, "hidden_last", recording)
    slots = [server._device_slots for _ in range(server.concurrent_batches)]
    for slot in slots:  # hold the device: the request waits in the queue
        slot.acquire()
    try:
        with socket.create_connection((http.host, http.port)) as sock:
            sock.sendall(_post(b'{"model": "tron@champion", "items": ["i1", "i2", "i3"], "k": 2}'))
            time.sleep(0.3)  # parsed and queued
        time.sleep(0.3)  # the server saw the connection close
    finally:
        for slot in slots:
            slot.release()
    client = HttpModelClient(http.url)
    assert client.recommend("tron@champion", ["i1"], 2, deadline_s=5).version == "tron:1"
    # Only the later one-click request reached the model; the abandoned three-click one never did.
    assert [[len(session) for session in batch] for batch in computed] == [[1]]


def test_stopped_server_is_unavailable(live) -> None:
    server, http = live
    client = HttpModelClient(http.url)
    assert client.recommend("tron@champion", ["i1"], 5, deadline_s=5).version == "tron:1"
    http.stop()
    with pytest.raises(ModelUnavailable):
        client.recommend("tron@champion", ["i1"], 5, deadline_s=0.05)
    assert not client.ready()
    # Nothing listens on a fresh port either: refused at once.
    with pytest.raises(ModelUnavailable, match="refused|Failed to establish"):
        HttpModelClient(f"http://127.0.0.1:{_free_port()}").recommend("tron@champion", [], 5)


def test_server_discovers_the_aliases_of_serving_arms(db_url: str, tmp_path: Path, make_checkpoint) -> None:
    engine, sessions, store = _registry(db_url, tmp_path / "store", make_checkpoint)
    with sessions() as s:
        for key in ("running-exp", "draft-exp"):
            service.create_experiment(
                s,
                key=key,
                arms=[
                    service.ArmSpec("control", 1, "sasrec@champion"),
                    service.ArmSpec("t", 1, "tron@champion"),
                ],
                actor="t",
            )
        registry.set_alias(s, "tron@draft-only", "tron:1", actor="t")
        service.start(s, "running-exp", "t")
        s.commit()
    server = ModelServer(sessions, store, poll_s=60).start()
    try:
        assert server.wait_ready(30)
        assert sorted(server.readiness()["models"]) == ["sasrec@champion", "tron@champion"]
        with sessions() as s:  # paused: only the control arm still serves traffic
            service.pause(s, "running-exp", "t")
            s.commit()
        server.refresh()
        assert sorted(server.readiness()["models"]) == ["sasrec@champion"]
        assert sorted(server.status()["loaded"]) == ["sasrec:1"]
    finally:
        server.close()
        engine.dispose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_model_server_command(sqlite_url: str, tmp_path: Path, make_checkpoint) -> None:
    engine, _, store = _registry(sqlite_url, tmp_path / "store", make_checkpoint)
    engine.dispose()
    port = _free_port()
    cmd = [sys.executable, "-m", "abrec.cli", "model-server", "--db", sqlite_url, "--store", str(store.root),
           "--port", str(port), "--aliases", "tron@champion,sasrec:1", "--no-discover", "--max-batch", "8",
           "--precision", "bf16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        client = HttpModelClient(f"http://127.0.0.1:{port}")
        end = time.monotonic() + 60
        while not client.ready():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < end, "the model server did not become ready in 60 s"
            time.sleep(0.1)
        assert client.recommend("sasrec:1", ["i1"], 3, deadline_s=5).version == "sasrec:1"
        assert client.recommend("tron@champion", ["i1"], 3, deadline_s=5).version == "tron:1"
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, output
    assert f"listening on http://127.0.0.1:{port}" in output


def test_model_server_command_usage_errors(capsys) -> None:
    assert main(["model-server", "--no-discover"]) == 2
    assert "--aliases" in capsys.readouterr().err
    assert main(["model-server", "--aliases", "a@b", "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err
    assert main(["model-server", "--aliases", "not an alias", "--db", "sqlite://"]) == 2
    assert "not a version" in capsys.readouterr().err
