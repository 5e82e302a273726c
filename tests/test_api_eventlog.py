"""The event log on SQLite and PostgreSQL: group commit really groups, a request's rows are all or nothing,
exposures and clicks are insert-if-absent under concurrency, and an unreachable database fails fast."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from abrec.experiments import service
from abrec.experiments.eventlog import EventLog, LogUnavailable, RowsRejected
from abrec.experiments.schema import Click, Exposure, Impression, utcnow
from sqlalchemy import event, func, select

from abrec.db import init_db, make_engine, session_factory


@pytest.fixture
def db(db_url):
    """A migrated database with one running experiment; yields (engine, experiment id, phase id)."""
    engine = make_engine(db_url)
    init_db(engine)
    with session_factory(engine)() as s:
        service.create_experiment(
            s, key="exp", arms=[service.ArmSpec("a", 1, "m@x"), service.ArmSpec("b", 1, "m@y")], actor="t"
        )
        service.start(s, "exp", "t")
        s.commit()
        snap = service.load_snapshot(s, "exp")
    yield engine, snap.id, snap.phase_id
    engine.dispose()


def _impression(exp_id: int, phase_id: int, user: str, **overrides) -> dict:
    return {
        "id": uuid.uuid4().hex,
        "experiment_id": exp_id,
        "phase_id": phase_id,
        "user_id": user,
        "session_id": "s",
        "arm_name": "a",
        "model_version": "m:1",
        "items": ["i1", "i2", "i3"],
        "fallback": False,
        "latency_ms": 1.0,
        "in_analysis": True,
        "created_at": utcnow(),
    } | overrides


def _exposure(exp_id: int, phase_id: int, user: str, arm: str = "a") -> dict:
    return {
        "experiment_id": exp_id,
        "phase_id": phase_id,
        "user_id": user,
        "arm_name": arm,
        "first_seen_at": utcnow(),
    }


def _count(engine, table) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def _run_threads(n: int, target) -> list:
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = target(i)
        except Exception as exc:  # collected and asserted on by the caller
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_group_commit_puts_many_requests_in_one_transaction(db) -> None:
    engine, exp_id, phase_id = db
    commits = []
    event.listen(engine, "commit", lambda conn: commits.append(1))
    log = EventLog(engine, max_wait_s=0.05, max_rows=10_000).start()
    n = 48
    rows = [_impression(exp_id, phase_id, f"u{i}") for i in range(n)]
    results = _run_threads(
        n, lambda i: log.write(impressions=[rows[i]], exposures=[_exposure(exp_id, phase_id, f"u{i}")])
    )
    log.close()
    assert not [r for r in results if isinstance(r, Exception)]
    assert _count(engine, Impression) == n and _count(engine, Exposure) == n
    # 48 requests, each acknowledged only after its commit, in far fewer transactions.
    assert 1 <= len(commits) == log.batches <= n // 4
    with engine.connect() as conn:
        ids = set(conn.execute(select(Impression.id)).scalars())
    assert ids == {r["id"] for r in rows}


def test_exposures_and_clicks_are_insert_if_absent_across_writers(db, db_url) -> None:
    engine, exp_id, phase_id = db
    # Two writers on two engines, as two API processes would be (SQLite: two connections, one file).
    other = make_engine(db_url)
    logs = [EventLog(engine, max_wait_s=0.005).start(), EventLog(other, max_wait_s=0.005).start()]
    imp = _impression(exp_id, phase_id, "u0")
    logs[0].write(impressions=[imp])

    def work(i: int):
        log = logs[i % 2]
        log.write(exposures=[_exposure(exp_id, phase_id, f"u{j}", arm="ab"[i % 2]) for j in range(10)])
        click = {
            "impression_id": imp["id"],
            "experiment_id": exp_id,
            "phase_id": phase_id,
            "user_id": "u0",
            "arm_name": "a",
            "item_id": "i2",
            "position": 1,
            "in_analysis": True,
            "created_at": utcnow(),
        }
        return log.write(clicks=[click]).duplicate_clicks[0]

    duplicates = _run_threads(16, work)
    for log in logs:
        log.close()
    other.dispose()
    assert not [r for r in duplicates if isinstance(r, Exception)], duplicates
    assert _count(engine, Exposure) == 10 and _count(engine, Click) == 1
    assert sorted(duplicates) == [False] + [True] * 15  # exactly one request recorded the click
    with engine.connect() as conn:
        arms = set(conn.execute(select(Exposure.arm_name)).scalars())
    assert len(arms) == 1  # every user's exposure is the first one written, never overwritten


def test_a_refused_request_fails_alone_and_leaves_no_partial_rows(db) -> None:
    engine, exp_id, phase_id = db
    log = EventLog(engine, max_wait_s=0.05).start()

    def work(i: int):
        if i == 0:  # the exposure is fine, the impression points at no experiment: all or nothing
            return log.write(
                exposures=[_exposure(exp_id, phase_id, "bad")],
                impressions=[_impression(exp_id + 999, phase_id, "bad")],
            )
        return log.write(
            impressions=[_impression(exp_id, phase_id, f"u{i}")],
            exposures=[_exposure(exp_id, phase_id, f"u{i}")],
        )

    results = _run_threads(12, work)
    log.close()
    assert isinstance(results[0], RowsRejected)
    assert not [r for r in results[1:] if isinstance(r, Exception)]
    assert _count(engine, Impression) == 11 and _count(engine, Exposure) == 11
    with engine.connect() as conn:
        assert "bad" not in set(conn.execute(select(Exposure.user_id)).scalars())


def test_unreachable_database_fails_fast_with_log_unavailable() -> None:
    from api_support import free_port

    engine = make_engine(f"postgresql+psycopg://root@127.0.0.1:{free_port()}/nothing")
    log = EventLog(engine, retry_after_s=0.5).start()
    with pytest.raises(LogUnavailable, match="database unavailable"):
        log.write(impressions=[_impression(1, 1, "u")], timeout_s=10)
    # While the database is known to be down, further batches fail at once without trying it.
    with pytest.raises(LogUnavailable, match="unreachable"):
        log.write(impressions=[_impression(1, 1, "u")], timeout_s=10)
    log.close()
    engine.dispose()


def test_rows_hold_what_sqlalchemy_would_have_bound(db) -> None:
    """The writer binds driver values itself: the stored datetimes, JSON and booleans must be the ones
    SQLAlchemy's column types store, or queries that bind them (created_at windows) would miss rows."""
    engine, exp_id, phase_id = db
    log = EventLog(engine).start()
    when = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)  # whole seconds: no microseconds to drop
    later = datetime(2026, 3, 1, 13, 30, 15, 123456, tzinfo=ZoneInfo("Europe/Berlin"))  # another zone
    imp = _impression(exp_id, phase_id, "u1", created_at=when, items=["i1", 7, "ü"], fallback=True)
    log.write(impressions=[imp], exposures=[_exposure(exp_id, phase_id, "u1") | {"first_seen_at": later}])
    click = {
        "impression_id": imp["id"],
        "experiment_id": exp_id,
        "phase_id": phase_id,
        "user_id": "u1",
        "arm_name": "a",
        "item_id": "i1",
        "position": 0,
        "in_analysis": False,
        "created_at": later,
    }
    assert log.write(clicks=[click]).duplicate_clicks == [False]
    log.close()
    with session_factory(engine)() as s:
        # Equality on a bound datetime compares stored values as SQLAlchemy renders them.
        def count(column, value) -> int:
            return s.scalar(select(func.count()).where(column == value))

        assert count(Impression.created_at, when) == 1 and count(Click.created_at, later) == 1
        assert count(Exposure.first_seen_at, later) == 1
        row = s.get(Impression, imp["id"])
        assert row.items == ["i1", 7, "ü"] and row.fallback is True and row.in_analysis is True
        assert row.created_at == when and row.latency_ms == 1.0
        stored = s.scalars(select(Click)).one()
        assert stored.in_analysis is False and stored.created_at == later and stored.position == 0
