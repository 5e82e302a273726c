"""`abrec serve` as a real process on loopback, in front of the real model server: concurrent round trips,
several workers (granian, gunicorn) on PostgreSQL, the SQLite one-process rule, a database outage
survived without restart."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import requests
from abrec.experiments.schema import Click, Impression
from api_support import ABREC, ROOT, ModelServerThread, ServeProcess, TcpProxy, recommend_body, seed
from sqlalchemy import func, select

from abrec.db import make_engine

pytestmark = pytest.mark.slow


@pytest.fixture
def world(db_url, tmp_path, make_checkpoint):
    return seed(db_url, tmp_path / "store", make_checkpoint)


@pytest.fixture
def model_server(world):
    ms = ModelServerThread(world.url, world.store)
    yield ms
    ms.stop()


def _session_round_trips(base: str, user_ids: list[str]) -> list[tuple[str, str, bool]]:
    """Per user: a recommendation and a click on its third item; (impression id, item, duplicate)."""
    http = requests.Session()
    out = []
    for user in user_ids:
        rec = http.post(base + "/v1/recommendations", json=recommend_body(user, k=5), timeout=30)
        assert rec.status_code == 200, rec.text
        body = rec.json()
        assert body["logged"] and body["impression_id"]
        click = http.post(
            base + "/v1/clicks", json={"impression_id": body["impression_id"], "item_id": body["items"][2]}
        )
        assert click.status_code == 200, click.text
        out.append((body["impression_id"].split(".")[0], body["items"][2], click.json()["duplicate"]))
    return out


def _check_db(url: str, acked: list[tuple[str, str, bool]]) -> None:
    engine = make_engine(url)
    with engine.connect() as conn:
        impressions = set(conn.execute(select(Impression.id)).scalars())
        clicks = {tuple(r) for r in conn.execute(select(Click.impression_id, Click.item_id))}
        n_clicks = conn.execute(select(func.count()).select_from(Click)).scalar_one()
    engine.dispose()
    assert {a[0] for a in acked} <= impressions
    assert {(a[0], a[1]) for a in acked} <= clicks and n_clicks == len(acked)
    assert not any(a[2] for a in acked)


def test_serve_concurrent_round_trips(world, model_server, tmp_path) -> None:
    server = ServeProcess(world.url, model_server.url, threads=8, log=tmp_path / "serve.log").wait_ready()
    try:
        with ThreadPoolExecutor(8) as pool:
            chunks = list(
                pool.map(
                    lambda c: _session_round_trips(server.base, [f"c{c}u{j}" for j in range(12)]), range(8)
                )
            )
        acked = [a for chunk in chunks for a in chunk]
        assert len(acked) == 96
        _check_db(world.url, acked)
        metrics = requests.get(server.base + "/metrics").text
        served = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("abrec_recommendations_total{") and 'logged="true"' in line
        )
        assert served == 96
        assert requests.get(server.base + "/readyz").json()["ready"] is True
    finally:
        server.kill()


def test_serve_refuses_several_processes_on_sqlite(tmp_path) -> None:
    out = subprocess.run(
        [*ABREC, "serve", "--db", f"sqlite:///{tmp_path}/x.db", "--workers", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "needs PostgreSQL" in out.stderr


def test_serve_refuses_waitress_with_several_processes(tmp_path) -> None:
    out = subprocess.run(
        [*ABREC, "serve", "--db", "postgresql://root@127.0.0.1:1/x", "--workers", "2", "--server=waitress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "waitress runs one process" in out.stderr


@pytest.mark.postgres
@pytest.mark.parametrize("wsgi", ["granian", "gunicorn"])
def test_workers_on_postgresql_share_metrics_and_clock(wsgi, pg_url, tmp_path, make_checkpoint) -> None:
    world = seed(pg_url, tmp_path / "store", make_checkpoint)
    ms = ModelServerThread(world.url, world.store)
    metrics_dir = tmp_path / "metrics"
    server = ServeProcess(pg_url, ms.url, workers=3, threads=4, server=wsgi, log=tmp_path / "serve.log",
                          env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    server.wait_ready()

    def live_gauge_pids() -> set[int]:
        pids = {int(p.stem.rsplit("_", 1)[1]) for p in metrics_dir.glob("gauge_live*_*.db")}
        return pids - {server.proc.pid}

    try:
        with ThreadPoolExecutor(6) as pool:
            chunks = list(
                pool.map(
                    lambda c: _session_round_trips(server.base, [f"c{c}u{j}" for j in range(8)]), range(6)
                )
            )
        acked = [a for chunk in chunks for a in chunk]
        _check_db(pg_url, acked)
        text = requests.get(server.base + "/metrics").text
        served = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("abrec_recommendations_total{") and 'logged="true"' in line
        )
        assert served == 48  # summed over the workers (multiprocess mode)
        # The clock set through one worker is the clock of all of them (fresh connection per request).
        set_ = requests.post(
            server.base + "/v1/admin/clock", json={"offset_s": 7200}, headers=world.auth("admin")
        )
        assert set_.status_code == 200
        offsets = {
            requests.get(
                server.base + "/v1/admin/clock", headers={**world.auth("viewer"), "Connection": "close"}
            ).json()["offset_s"]
            for _ in range(20)
        }
        assert offsets == {7200.0}
        # A worker killed outright takes its live gauges with it once the server notices (gunicorn's
        # child_exit; granian has no such hook: the worker it respawns clears them), so a dead
        # worker's last queue depth is not summed forever.
        victim = min(live_gauge_pids())
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while victim in live_gauge_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert victim not in live_gauge_pids()
        assert requests.get(server.base + "/metrics").status_code == 200
    finally:
        server.kill()
        ms.stop()


@pytest.mark.postgres
def test_database_outage_serves_unlogged_then_recovers_by_itself(pg_url, tmp_path, make_checkpoint) -> None:
    world = seed(pg_url, tmp_path / "store", make_checkpoint)
    ms = ModelServerThread(world.url, world.store)
    pg = urlsplit(pg_url)
    proxy = TcpProxy(pg.port or 5432)
    proxied = pg_url.replace(f"{pg.hostname}:{pg.port}", f"127.0.0.1:{proxy.port}")
    server = ServeProcess(proxied, ms.url, threads=4, log=tmp_path / "serve.log").wait_ready()
    http = requests.Session()
    try:
        before = http.post(server.base + "/v1/recommendations", json=recommend_body("early")).json()
        assert before["logged"] is True
        proxy.cut()
        during = [
            http.post(server.base + "/v1/recommendations", json=recommend_body(f"u{i}"), timeout=30)
            for i in range(5)
        ]
        assert all(r.status_code == 200 for r in during)
        assert all(r.json()["logged"] is False and r.json()["impression_id"] is None for r in during)
        assert all(len(r.json()["items"]) == 5 for r in during)  # still a full slate
        click = http.post(
            server.base + "/v1/clicks",
            json={"impression_id": before["impression_id"], "item_id": before["items"][0]},
        )
        assert click.status_code == 503 and click.json()["error"] == "event log unavailable"
        assert http.get(server.base + "/readyz").status_code == 503

        proxy.restore()
        deadline = time.monotonic() + 30
        while True:
            after = http.post(server.base + "/v1/recommendations", json=recommend_body("late")).json()
            if after["logged"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert after["logged"] is True and server.proc.poll() is None  # recovered, same process
        click = http.post(
            server.base + "/v1/clicks",
            json={"impression_id": before["impression_id"], "item_id": before["items"][0]},
        )
        assert click.status_code == 200
    finally:
        server.kill()
        proxy.close()
        ms.stop()
    engine = make_engine(pg_url)
    with engine.connect() as conn:
        users = set(conn.execute(select(Impression.user_id)).scalars())
    engine.dispose()
    assert "early" in users and "late" in users and not users & {f"u{i}" for i in range(5)}
