"""SQL aggregation against a plain-Python computation of the same small log, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pytest
from abrec.analysis import aggregate
from abrec.analysis.stats import ArmStats
from abrec.experiments.schema import Impression
from analysis_eventlog import (
    ARMS,
    PHASE_STARTS,
    TZ,
    build_log,
    local,
    truth_arm_stats,
    truth_novelty,
    truth_users,
)
from sqlalchemy import insert

from abrec.db import make_engine

LAST_DAY = date(2026, 3, 31)


def assert_stats_equal(got: ArmStats, want: ArmStats) -> None:
    for name, value in want.to_dict().items():
        assert getattr(got, name) == pytest.approx(value, abs=1e-9), name


@pytest.fixture
def log(db_url):
    log = build_log(db_url)
    yield log
    log.engine.dispose()


def test_day_bounds_follow_the_timezone_across_dst():
    spring = aggregate.day_bounds(date(2026, 3, 28), date(2026, 3, 30), "Europe/Berlin")
    hours = [(b - a).total_seconds() / 3600 for a, b in zip(spring, spring[1:], strict=False)]
    assert hours == [24, 23, 24]
    assert spring[0] == datetime(2026, 3, 27, 23, 0, tzinfo=UTC)  # midnight CET = 23:00 UTC
    assert spring[2] == datetime(2026, 3, 29, 22, 0, tzinfo=UTC)  # midnight CEST = 22:00 UTC
    autumn = aggregate.day_bounds(date(2026, 10, 25), date(2026, 10, 25), "Europe/Berlin")
    assert (autumn[1] - autumn[0]) == timedelta(hours=25)
    assert aggregate.day_bounds(date(2026, 3, 29), date(2026, 3, 29), "UTC")[1] - aggregate.day_start(
        date(2026, 3, 29), "UTC"
    ) == timedelta(hours=24)


def test_user_rows_match_python(log):
    want = truth_users(log)
    with log.engine.connect() as conn:
        got = {r[0]: r[1:] for r in aggregate.iter_user_rows(conn, log.experiment_id, log.phase_id)}
    assert got == want
    # The log is messy enough for the check to mean something.
    assert sum(v[3] for v in want.values()) > 0, "some users have a pre-period"
    assert sum(v[1] == 0 for v in want.values()) > 0, "some exposed users have no analysed impression"


@pytest.mark.parametrize("plan", ["lookup", "grouped"])
def test_both_per_user_plans_match_python_on_either_database(log, plan):
    """Each database gets the plan that suits it; both plans must give the same rows on both."""
    with log.engine.connect() as conn:
        scope = aggregate.PhaseScope.load(conn, log.experiment_id, log.phase_id)
        rows = conn.execute(aggregate.user_rows_query(scope, plan))
        got = {r.unit_id: (r.arm, r.impressions, r.clicks, r.pre_impressions, r.pre_clicks) for r in rows}
    assert got == truth_users(log)


def test_user_rows_cut_at_a_local_midnight(log):
    day = date(2026, 3, 29)
    until = aggregate.day_start(day + timedelta(days=1), TZ)
    with log.engine.connect() as conn:
        got = {r[0]: r[1:] for r in aggregate.iter_user_rows(conn, log.experiment_id, log.phase_id, until)}
    assert got == truth_users(log, day)


def test_cumulative_snapshots_match_python_on_every_day(log):
    with log.engine.begin() as conn:
        agg = aggregate.aggregate_phase(conn, log.experiment_id, log.phase_id, LAST_DAY)
    first = local(PHASE_STARTS[2])
    assert agg.days == [first + timedelta(days=i) for i in range((LAST_DAY - first).days + 1)]
    for day in agg.days:
        want = truth_arm_stats(log, day)
        for arm in ARMS:
            assert_stats_equal(agg.snapshots[day][arm], want[arm])
    final = agg.snapshots[LAST_DAY]
    assert final["control"].sum_py > 0 and final["treatment"].sum_x > 0


def test_utc_days_would_differ(log):
    """The log has events between local and UTC midnight, so the timezone matters for the snapshots."""
    near_midnight = [e for e in log.events if e.phase == 3 and local(e.at) != e.at.date()]
    assert near_midnight


def test_novelty_matches_python(log):
    with log.engine.begin() as conn:
        agg = aggregate.aggregate_phase(conn, log.experiment_id, log.phase_id, LAST_DAY)
    want = truth_novelty(log, LAST_DAY)
    assert sorted(agg.novelty) == sorted(want)
    for k, arms in want.items():
        for arm, stats in arms.items():
            assert_stats_equal(agg.novelty[k][arm], stats)


def test_health_percentiles_and_fallbacks(log):
    with log.engine.begin() as conn:
        agg = aggregate.aggregate_phase(conn, log.experiment_id, log.phase_id, LAST_DAY)
    served = [e for e in log.events if e.phase == 3 and not e.is_click]
    for arm in ARMS:
        mine = [e for e in served if log.exposures.get(e.user_id, ("control",))[0] == arm]
        p99s = []
        for day in agg.days:
            lat = np.array([e.latency_ms for e in mine if local(e.at) == day])
            h = agg.health[day][arm]
            assert h.impressions == lat.size
            if lat.size:
                assert h.latency_p50_ms == pytest.approx(
                    np.percentile(lat, 50, method="inverted_cdf"), abs=1e-9
                )
                assert h.latency_p99_ms == pytest.approx(
                    np.percentile(lat, 99, method="inverted_cdf"), abs=1e-9
                )
                p99s.append(h.latency_p99_ms)
        total = agg.health_total[arm]
        assert total.impressions == len(mine)
        assert total.fallbacks == sum(e.fallback for e in mine)
        assert total.latency_p99_ms == max(p99s)  # the worst day


@pytest.mark.parametrize("plan", ["lookup", "grouped"])
def test_nightly_increments_equal_the_full_recomputation(log, plan, monkeypatch):
    """aggregate_day, chained night after night from the novelty of the day before, gives what
    aggregate_phase computes for every day at once (with either per-user plan)."""
    monkeypatch.setattr(aggregate, "plan_for", lambda conn: plan)
    with log.engine.begin() as conn:
        full = aggregate.aggregate_phase(conn, log.experiment_id, log.phase_id, LAST_DAY)
        novelty: dict = {}
        for day in full.days:
            inc = aggregate.aggregate_day(conn, log.experiment_id, log.phase_id, day, novelty)
            for arm in ARMS:
                assert_stats_equal(inc.snapshot[arm], full.snapshots[day][arm])
                assert inc.health[arm] == full.health[day][arm]
            novelty = inc.novelty
    assert sorted(novelty) == sorted(full.novelty)
    for k, arms in full.novelty.items():
        for arm, stats in arms.items():
            assert_stats_equal(novelty[k][arm], stats)


def _spy_on_parts(monkeypatch) -> list[tuple[str, object]]:
    """Record which thread aggregates each part (users' range or impressions' rowids)."""
    parts: list[tuple[str, object]] = []
    user_cells, histograms = aggregate._user_cells, aggregate._histograms

    def spied_user_cells(conn, scope, bounds, users=None):
        parts.append((threading.current_thread().name, users))
        return user_cells(conn, scope, bounds, users)

    def spied_histograms(conn, scope, bounds, n_days, arms, first=0, rows=None):
        parts.append((threading.current_thread().name, rows))
        return histograms(conn, scope, bounds, n_days, arms, first, rows)

    monkeypatch.setattr(aggregate, "_user_cells", spied_user_cells)
    monkeypatch.setattr(aggregate, "_histograms", spied_histograms)
    return parts


@pytest.mark.parametrize("workers", [2, 3])
def test_parts_on_several_connections_add_up_to_the_serial_run(sqlite_url, workers, monkeypatch):
    """SQLite's first night splits the users (and impressions) into ranges aggregated at once on
    their own connections: the figures must equal those of one connection exactly."""
    log = build_log(sqlite_url)
    try:
        with log.engine.begin() as conn:
            serial = aggregate.aggregate_phase(conn, log.experiment_id, log.phase_id, LAST_DAY, workers=1)
        parts = _spy_on_parts(monkeypatch)
        with log.engine.begin() as conn:
            parallel = aggregate.aggregate_phase(conn, log.experiment_id, log.phase_id, LAST_DAY, workers)
    finally:
        log.engine.dispose()
    assert parallel == serial  # exact: sums of integers, whatever the order
    # In the order of their ranges (the threads may start them in any order).
    user_ranges = [r for _, r in parts if r is None or isinstance(r[0], str | None)]
    user_ranges.sort(key=lambda r: (r is not None and r[0] is not None, r and r[0] or ""))
    assert len(user_ranges) == workers and all(r is not None for r in user_ranges)
    assert user_ranges[0][0] is None and user_ranges[-1][1] is None  # nobody left out at either end
    assert all(a[1] == b[0] for a, b in zip(user_ranges, user_ranges[1:], strict=False))
    assert len(parts) == 2 * workers
    assert all(name.startswith("aggregate") for name, _ in parts)
    for day in serial.days:
        for arm in ARMS:
            assert_stats_equal(parallel.snapshots[day][arm], truth_arm_stats(log, day)[arm])


def test_uncommitted_writes_keep_the_first_night_on_one_connection(sqlite_url, monkeypatch):
    """Other connections would not see the transaction's own writes: then no parts."""
    log = build_log(sqlite_url)
    parts = _spy_on_parts(monkeypatch)
    try:
        with log.engine.begin() as conn:
            user, (arm, first_seen) = next(iter(log.exposures.items()))
            conn.execute(
                insert(Impression).values(
                    id="uncommitted",
                    experiment_id=log.experiment_id,
                    phase_id=log.phase_id,
                    user_id=user,
                    session_id="s",
                    arm_name=arm,
                    model_version="m",
                    items=["a"],
                    fallback=False,
                    latency_ms=1.0,
                    in_analysis=True,
                    created_at=first_seen + timedelta(seconds=1),
                )
            )
            agg = aggregate.aggregate_phase(conn, log.experiment_id, log.phase_id, LAST_DAY, workers=2)
            conn.rollback()
    finally:
        log.engine.dispose()
    assert [r for _, r in parts] == [None, None]  # one part each, on the caller's connection
    before = truth_arm_stats(log, LAST_DAY)[arm]
    assert agg.snapshots[LAST_DAY][arm].sum_y == before.sum_y + 1  # the uncommitted impression counts


def test_default_workers(sqlite_url, monkeypatch):
    engine = make_engine(sqlite_url)
    monkeypatch.setattr(aggregate.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    with engine.connect() as conn:
        assert aggregate.default_workers(conn) == min(3, aggregate.MAX_WORKERS)
    engine.dispose()
    memory = make_engine("sqlite://")
    with memory.connect() as conn:
        assert aggregate.default_workers(conn) == 1  # another connection would be another database
    memory.dispose()


def test_last_day_before_the_phase_is_refused(log):
    with log.engine.begin() as conn, pytest.raises(ValueError, match="started on"):
        aggregate.aggregate_phase(conn, log.experiment_id, log.phase_id, date(2026, 3, 1))


def _all_figures(url: str) -> tuple:
    """Everything aggregate_phase gives for the log, and the chained nightly increments' results."""
    log = build_log(url)
    try:
        with log.engine.begin() as conn:
            full = aggregate.aggregate_phase(conn, log.experiment_id, log.phase_id, LAST_DAY)
            novelty: dict = {}
            nightly = []
            for day in full.days:
                inc = aggregate.aggregate_day(conn, log.experiment_id, log.phase_id, day, novelty)
                nightly.append((inc.snapshot, inc.health))
                novelty = inc.novelty
            users = sorted(aggregate.iter_user_rows(conn, log.experiment_id, log.phase_id))
    finally:
        log.engine.dispose()
    return full, nightly, novelty, users


@pytest.mark.postgres
def test_sqlite_and_postgresql_agree(sqlite_url, pg_url):
    """The same log on both databases (each with its own per-user plan) gives the same figures."""
    lite, pg = _all_figures(sqlite_url), _all_figures(pg_url)
    full_lite, nightly_lite, novelty_lite, users_lite = lite
    full_pg, nightly_pg, novelty_pg, users_pg = pg
    assert users_lite == users_pg
    assert full_lite.days == full_pg.days
    for day in full_lite.days:
        for arm in ARMS:
            assert_stats_equal(full_lite.snapshots[day][arm], full_pg.snapshots[day][arm])
            assert full_lite.health[day][arm] == full_pg.health[day][arm]
    assert full_lite.health_total == full_pg.health_total
    for (snap_lite, health_lite), (snap_pg, health_pg) in zip(nightly_lite, nightly_pg, strict=True):
        assert health_lite == health_pg
        for arm in ARMS:
            assert_stats_equal(snap_lite[arm], snap_pg[arm])
    for novelty_a, novelty_b in ((full_lite.novelty, full_pg.novelty), (novelty_lite, novelty_pg)):
        assert sorted(novelty_a) == sorted(novelty_b)
        for k, arms in novelty_a.items():
            for arm, stats in arms.items():
                assert_stats_equal(novelty_b[k][arm], stats)
