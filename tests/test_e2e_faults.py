"""Fault drills of the whole serving path, driven by the traffic replay (`abrec simulate`'s client).

Real parts throughout: `abrec serve` as a child process, the real model server on loopback, SQLite
or PostgreSQL, shoppers replayed concurrently over HTTP.

- The API process is SIGKILLed in the middle of a replay and restarted on the same port: the
  replay rides through the outage, and every impression and click the API acknowledged is in the
  database exactly once, in the right arm.
- One model arm raises on every request: its shoppers get the fallback slate (marked, counted,
  logged as "popular"), the other arm is untouched, and the nightly report flags the fallbacks.
  (The fault is injected into that arm's model inside the real model server.)
- The database is cut off for a few seconds by a TCP proxy: recommendations keep flowing
  (unlogged), clicks wait and retry, no partial rows appear, and logging resumes in the same process.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from abrec.experiments.schema import Click, Exposure, Impression
from abrec.experiments.simulate import ApiClient, ClickModel, Replay, ReplayResult, user_ids
from api_support import ModelServerThread, TcpProxy, free_port, seed
from sqlalchemy import select

from abrec.db import make_engine

pytestmark = pytest.mark.slow

N_ITEMS = 60  # the seeded world's checkpoints know items i0..i59


def shop_sessions(n: int, seed_: int = 0) -> list[list[str]]:
    """Random sessions of 2-7 clicks over the world's items."""
    rng = np.random.default_rng(seed_)
    return [[f"i{j}" for j in rng.integers(0, N_ITEMS, size=int(length))]
            for length in rng.integers(2, 8, size=n)]


class Api:
    """`abrec serve` on a fixed port, so that a restarted process answers at the same address."""

    def __init__(self, db_url: str, model_server: str, log: Path) -> None:
        self.db_url, self.model_server, self.log = db_url, model_server, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> Api:
        import subprocess
        import sys

        import requests

        env = {**os.environ, "ABREC_SECRET_KEY": "e2e-secret", "ABREC_MODEL_DEADLINE_MS": "2000"}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        cmd = [str(Path(sys.executable).parent / "abrec"), "serve", "--db", self.db_url, "--port",
               str(self.port), "--threads", "8", "--model-server", self.model_server]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError("abrec serve did not come up")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)


def replay_in_background(api_url: str, token: str, sessions: list[list[str]], seed_: int = 0):
    """Start a replay on a thread; -> (the Replay, the thread, a one-item list that gets the result)."""
    client = ApiClient(api_url, pool_size=16, retry_s=90, admin_token=token)
    replay = Replay(client, "exp", ClickModel(k=5, noise=0.05), seed=seed_, concurrency=6, progress=False)
    box: list[ReplayResult | BaseException] = []

    def run() -> None:
        try:
            box.append(replay.run(sessions, user_ids(len(sessions), seed_)))
        except BaseException as exc:  # surfaced by the test, not lost on the thread
            box.append(exc)
        finally:
            client.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return replay, thread, box


def wait_for(replay: Replay, impressions: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while replay.completed < impressions:
        assert time.monotonic() < deadline, f"the replay stalled at {replay.completed} impressions"
        time.sleep(0.05)


def finish(thread: threading.Thread, box: list) -> ReplayResult:
    thread.join(timeout=240)
    assert box, "the replay did not finish"
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def logged_rows(db_url: str):
    engine = make_engine(db_url)
    with engine.connect() as conn:
        impressions = {r.id: r for r in conn.execute(select(Impression))}
        clicks = list(conn.execute(select(Click.impression_id, Click.item_id, Click.arm_name)))
        exposures = {(r.user_id, r.arm_name) for r in conn.execute(select(Exposure))}
    engine.dispose()
    return impressions, clicks, exposures


def assert_acknowledged_events_logged_once(result: ReplayResult, db_url: str) -> None:
    impressions, clicks, exposures = logged_rows(db_url)
    click_keys = [(c.impression_id, c.item_id) for c in clicks]
    assert len(click_keys) == len(set(click_keys)), "a click is logged twice"
    acked = [r for r in result.records if r.impression_id is not None]
    assert acked, "nothing was acknowledged"
    for r in acked:
        row = impressions.get(r.impression_id.split(".")[0])
        assert row is not None, f"acknowledged impression {r.impression_id} is not in the log"
        assert (row.user_id, row.arm_name) == (r.user_id, r.arm)
        for item in r.clicks:
            assert (row.id, item) in set(click_keys), f"acknowledged click {item} on {row.id} is lost"
    # No partial rows: every logged impression is a full slate of an exposed user; every click
    # belongs to a logged impression of the same arm.
    for row in impressions.values():
        assert len(row.items) == 5 and (row.user_id, row.arm_name) in exposures
    assert all(c.impression_id in impressions and impressions[c.impression_id].arm_name == c.arm_name
               for c in clicks)


def test_api_killed_mid_replay_and_restarted_loses_no_acknowledged_event(sqlite_url, tmp_path,
                                                                          make_checkpoint) -> None:
    world = seed(sqlite_url, tmp_path / "store", make_checkpoint)
    models = ModelServerThread(world.url, world.store)
    api = Api(sqlite_url, models.url, tmp_path / "serve.log").start()
    try:
        replay, thread, box = replay_in_background(api.url, world.tokens["admin"], shop_sessions(160))
        wait_for(replay, 150)
        api.kill(signal.SIGKILL)
        killed_at = replay.completed
        time.sleep(0.5)  # the replay hits a dead port meanwhile and keeps retrying
        api.start()
        result = finish(thread, box)
    finally:
        api.kill()
        models.stop()
    assert killed_at < len(result.records), "the kill did not land mid-replay"
    assert result.retries > 0, "the replay never noticed the outage"
    assert len(result.records) == sum(len(s) - 1 for s in shop_sessions(160))
    assert_acknowledged_events_logged_once(result, sqlite_url)


def test_a_failing_arm_serves_the_fallback_and_the_other_arm_is_untouched(
        sqlite_url, tmp_path, make_checkpoint, monkeypatch) -> None:
    world = seed(sqlite_url, tmp_path / "store", make_checkpoint)
    models = ModelServerThread(world.url, world.store)

    def failing(*args, **kwargs):
        raise RuntimeError("injected fault in the tron arm")

    # The tron arm's resident model raises on every forward pass (the full one and the serving
    # paths' padded and unpadded ones); sasrec's model is untouched.
    tron = models.server._routes["tron@champion"].model
    for method in ("forward", "forward_last", "forward_ragged"):
        monkeypatch.setattr(tron, method, failing)
    api = Api(sqlite_url, models.url, tmp_path / "serve.log").start()
    try:
        replay, thread, box = replay_in_background(api.url, world.tokens["admin"], shop_sessions(60, seed_=1))
        result = finish(thread, box)
    finally:
        api.kill()
        models.stop()
    treatment, control = result.arms["treatment"], result.arms["control"]
    assert treatment.impressions > 0 and treatment.fallbacks == treatment.impressions
    assert control.impressions > 0 and control.fallbacks == 0
    assert all(r.model_version == "popular" for r in result.records if r.arm == "treatment")
    assert all(r.model_version == "sasrec:1" for r in result.records if r.arm == "control")
    assert_acknowledged_events_logged_once(result, sqlite_url)
    impressions, _clicks, _exposures = logged_rows(sqlite_url)
    assert {r.arm_name for r in impressions.values() if r.fallback} == {"treatment"}

    # The nightly report flags it.
    from abrec.analysis.report import run_report

    engine = make_engine(sqlite_url)
    last_day = max(row.created_at for row in impressions.values()).date()  # UTC, the experiment's zone
    report = run_report(engine, "exp", last_day)
    engine.dispose()
    assert report["arms"]["treatment"]["health"]["fallback_rate"] == 1.0
    assert report["arms"]["control"]["health"]["fallbacks"] == 0
    assert any(w.startswith(f"treatment: {treatment.impressions} fallback slates served")
               for w in report["warnings"]), report["warnings"]


@pytest.mark.postgres
def test_database_cut_off_mid_replay_keeps_serving_and_recovers_without_restart(pg_url, tmp_path,
                                                                               make_checkpoint) -> None:
    world = seed(pg_url, tmp_path / "store", make_checkpoint)
    models = ModelServerThread(world.url, world.store)
    pg = urlsplit(pg_url)
    proxy = TcpProxy(pg.port or 5432)
    proxied = pg_url.replace(f"{pg.hostname}:{pg.port}", f"127.0.0.1:{proxy.port}")
    api = Api(proxied, models.url, tmp_path / "serve.log").start()
    try:
        sessions = shop_sessions(200, seed_=2)
        replay, thread, box = replay_in_background(api.url, world.tokens["admin"], sessions)
        wait_for(replay, 120)
        proxy.cut()
        cut_at = replay.completed
        time.sleep(3)
        served_while_cut = replay.completed - cut_at
        proxy.restore()
        result = finish(thread, box)
        # Shoppers who arrive after the database is back are logged again, by the same process.
        _, thread, box = replay_in_background(api.url, world.tokens["admin"], shop_sessions(40, seed_=3), 3)
        after = finish(thread, box)
        pid_alive = api.proc.poll() is None
    finally:
        api.kill()
        proxy.close()
        models.stop()
    assert pid_alive, "the API had to restart"
    assert served_while_cut > 0, "recommendations stopped while the database was away"
    unlogged = [r for r in result.records if r.impression_id is None]
    assert unlogged, "no recommendation was served unlogged during the cut"
    assert all(not r.clicks and r.arm in ("control", "treatment") for r in unlogged)
    logged_after = sum(r.impression_id is not None for r in after.records)
    assert logged_after >= 0.9 * len(after.records), f"only {logged_after} of {len(after.records)} logged"
    assert_acknowledged_events_logged_once(result, pg_url)
    assert_acknowledged_events_logged_once(after, pg_url)
