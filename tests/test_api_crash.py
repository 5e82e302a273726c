"""Crash test: SIGKILL `abrec serve` in the middle of a load, restart it on the same database, load again,
and find every acknowledged impression and click in the database exactly once (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
import time

import pytest
import requests
from abrec.experiments.schema import Click, Impression
from api_support import ModelServerThread, ServeProcess, recommend_body, seed
from sqlalchemy import func, select, text

from abrec.db import make_engine

pytestmark = pytest.mark.slow


class Load:
    """Threads that recommend and click as fast as they can, keeping what the server acknowledged."""

    def __init__(self, base: str, threads: int = 8, tag: str = "") -> None:
        self.base = base
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.impressions: list[str] = []
        self.clicks: list[tuple[str, str]] = []
        self.errors = 0
        self.threads = [threading.Thread(target=self._run, args=(f"{tag}{i}",)) for i in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, name: str) -> None:
        http = requests.Session()
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                rec = http.post(
                    self.base + "/v1/recommendations", json=recommend_body(f"{name}-{n % 50}"), timeout=10
                )
                body = rec.json()
                if rec.status_code != 200 or not body["logged"]:
                    continue
                row_id = body["impression_id"].split(".")[0]
                with self.lock:
                    self.impressions.append(row_id)
                item = body["items"][n % len(body["items"])]
                click = http.post(
                    self.base + "/v1/clicks",
                    json={"impression_id": body["impression_id"], "item_id": item},
                    timeout=10,
                )
                if click.status_code == 200 and not click.json()["duplicate"]:
                    with self.lock:
                        self.clicks.append((row_id, item))
            except (requests.RequestException, ValueError):
                with self.lock:
                    self.errors += 1
                time.sleep(0.05)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def test_sigkill_mid_load_loses_no_acknowledged_event(db_url, tmp_path, make_checkpoint) -> None:
    world = seed(db_url, tmp_path / "store", make_checkpoint)
    ms = ModelServerThread(world.url, world.store)
    try:
        first = ServeProcess(db_url, ms.url, threads=8, log=tmp_path / "serve1.log").wait_ready()
        load = Load(first.base, tag="a")
        deadline = time.monotonic() + 30
        while len(load.impressions) < 40 and time.monotonic() < deadline:
            time.sleep(0.1)
        first.kill()  # SIGKILL to the whole process group, requests in flight
        time.sleep(0.5)
        load.finish()
        assert load.errors > 0  # requests were in flight when it died
        acked_before = len(load.impressions)

        second = ServeProcess(db_url, ms.url, threads=8, log=tmp_path / "serve2.log").wait_ready()
        again = Load(second.base, tag="b")
        deadline = time.monotonic() + 30
        while len(again.impressions) < 20 and time.monotonic() < deadline:  # the machine may be busy
            time.sleep(0.2)
        again.finish()
        second.kill()
    finally:
        ms.stop()

    impressions = load.impressions + again.impressions
    clicks = load.clicks + again.clicks
    assert acked_before > 20 and len(again.impressions) >= 20
    engine = make_engine(db_url)
    with engine.connect() as conn:
        stored = {
            r[0]: r[1] for r in conn.execute(select(Impression.id, func.count()).group_by(Impression.id))
        }
        stored_clicks = {
            (r[0], r[1]): r[2]
            for r in conn.execute(
                select(Click.impression_id, Click.item_id, func.count()).group_by(
                    Click.impression_id, Click.item_id
                )
            )
        }
        orphans = conn.execute(
            select(func.count()).select_from(Click).where(Click.impression_id.not_in(select(Impression.id)))
        ).scalar_one()
        if engine.dialect.name == "sqlite":
            assert conn.execute(text("PRAGMA integrity_check")).scalar_one() == "ok"
    engine.dispose()
    assert len(set(impressions)) == len(impressions)
    missing = [i for i in impressions if stored.get(i) != 1]
    assert missing == [], f"{len(missing)} acknowledged impressions lost"
    lost_clicks = [c for c in clicks if stored_clicks.get(c) != 1]
    assert lost_clicks == [], f"{len(lost_clicks)} acknowledged clicks lost"
    assert orphans == 0
