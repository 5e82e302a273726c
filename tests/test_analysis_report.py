"""The nightly report: figures equal the statistics on a plain-Python truth, idempotent per
(experiment, date), stored snapshots, warnings, standalone HTML, and the `abrec report` and
`abrec export-users` commands."""

from __future__ import annotations

import csv
import json
import re
from datetime import UTC, date, datetime, timedelta

import pytest
from abrec.analysis import aggregate, report, stats, store
from abrec.analysis.stats import ArmStats
from analysis_eventlog import ARMS, PHASE_STARTS, build_log, local, truth_arm_stats, truth_users
from sqlalchemy import func, select

from abrec.cli import main

DAY = date(2026, 3, 31)


@pytest.fixture
def log(db_url):
    log = build_log(db_url)
    yield log
    log.engine.dispose()


def count(engine, table) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def test_report_figures_match_the_statistics_on_the_truth(log):
    got = report.run_report(log.engine, "home", DAY)
    truth = truth_arm_stats(log, DAY)
    want = stats.analyze(truth, "control", weights={"control": 0.5, "treatment": 0.5}, sequential_tuning=200)
    assert got["phase"]["number"] == 3 and got["date"] == "2026-03-31"
    assert got["srm_p_value"] == pytest.approx(want.srm.p_value)
    for arm in ARMS:
        assert got["arms"][arm]["users"] == int(truth[arm].n)
        assert got["arms"][arm]["clicks"] == truth[arm].sum_x
    t, w = got["arms"]["treatment"], want.comparisons["treatment"]
    assert w.cuped, "the truth has pre-period data in both arms, so CUPED applies"
    assert t["rel_lift"] == pytest.approx(float(w.rel_lift))
    assert t["rel_lift_ci_sequential"] == pytest.approx([float(v) for v in w.rel_lift_ci_sequential])
    assert t["p_value"] == pytest.approx(float(w.p_value))
    assert got["arms"]["control"]["rel_lift"] is None
    assert got["decision"]["verdict"] in ("keep running", "rollback", "inconclusive")
    assert any("Too little data" in w for w in got["warnings"])
    json.dumps(got, allow_nan=False)  # strict JSON: no NaN or infinities


def test_report_is_idempotent_per_experiment_and_date(log):
    first = report.run_report(log.engine, "home", DAY)
    counts = [
        count(log.engine, t) for t in (store.AnalysisReport, store.AnalysisSnapshot, store.AnalysisHealth)
    ]
    second = report.run_report(log.engine, "home", DAY)
    assert [
        count(log.engine, t) for t in (store.AnalysisReport, store.AnalysisSnapshot, store.AnalysisHealth)
    ] == counts
    assert counts[0] == 1
    strip = lambda r: {k: v for k, v in r.items() if k != "generated_at"}  # noqa: E731
    assert strip(first) == strip(second)
    report.run_report(log.engine, "home", date(2026, 3, 30))
    assert count(log.engine, store.AnalysisReport) == 2
    with log.engine.connect() as conn:
        day, stored = store.get_report(conn, log.experiment_id, DAY)
        assert day == DAY and strip(stored) == strip(second)
        assert store.get_report(conn, log.experiment_id)[0] == DAY  # newest
        assert store.latest_reports(conn, [log.experiment_id])[log.experiment_id][0] == "2026-03-31"
        assert [d for d, _ in store.list_reports(conn, log.experiment_id)] == [DAY, date(2026, 3, 30)]


def test_stored_snapshots_and_novelty_feed_the_time_views(log):
    report.run_report(log.engine, "home", DAY)
    with log.engine.connect() as conn:
        snaps = store.load_snapshots(conn, log.phase_id)
        novelty = store.load_novelty(conn, log.phase_id, DAY)
        health = store.load_health(conn, log.phase_id)
    first = local(PHASE_STARTS[2])
    assert sorted({s.key for s in snaps}) == [
        first + timedelta(days=i) for i in range((DAY - first).days + 1)
    ]
    for s in snaps:
        want = truth_arm_stats(log, s.key)[s.arm]
        for name, value in want.to_dict().items():
            assert getattr(s.stats, name) == pytest.approx(value), (s.key, s.arm, name)
    assert {c.key for c in novelty} == set(range((DAY - first).days + 1))
    assert set(health) == {s.key for s in snaps}


def _context(**overrides) -> report.ReportContext:
    values = dict(
        experiment_id=1,
        key="k",
        name="",
        hypothesis="",
        primary_metric="ctr",
        status="running",
        timezone="UTC",
        arms=("control", "treatment"),
        weights={"control": 0.5, "treatment": 0.5},
        phase_id=1,
        phase_number=1,
        phase_started_at=datetime(2026, 1, 1, tzinfo=UTC),
        day=date(2026, 1, 10),
        planned_users=20000,
        target_effect=0.05,
        min_runtime_days=7,
        planned_end_at=None,
    )
    return report.ReportContext(**(values | overrides))


def _arm(n: float, ctr: float, lift: float = 0.0) -> ArmStats:
    """Sums of n users with 10 impressions each and ctr * 10 * (1 + lift) clicks on average (some spread)."""
    import numpy as np

    rng = np.random.default_rng(int(n))
    y = np.full(int(n), 10.0)
    x = rng.binomial(10, ctr * (1 + lift), int(n)).astype(float)
    return ArmStats.from_arrays(x, y)


def _aggregate(
    arms: dict[str, ArmStats], health: dict[str, store.Health], day: date
) -> aggregate.PhaseAggregate:
    return aggregate.PhaseAggregate(
        days=[day], snapshots={day: arms}, novelty={}, health={day: health}, health_total=health
    )


def test_warnings_srm_fallbacks_and_guardrail_rollback():
    ctx = _context()
    arms = {"control": _arm(10000, 0.05), "treatment": _arm(11000, 0.05)}
    health = {
        "control": store.Health(100000, 0, 20.0, 60.0),
        "treatment": store.Health(110000, 2200, 22.0, 400.0),
    }
    r = report.build_report(ctx, _aggregate(arms, health, ctx.day))
    text = " ".join(r["warnings"])
    assert "Sample-ratio mismatch" in text and r["srm"]["alert"]
    assert "treatment: 2200 fallback slates served" in text
    assert r["decision"]["verdict"] == "rollback"
    assert any("fallback rate" in x for x in r["decision"]["reasons"])
    assert any("p99 latency" in x for x in r["decision"]["reasons"])


def test_a_clear_winner_ships_after_the_minimum_runtime():
    arms = {"control": _arm(20000, 0.05), "treatment": _arm(20001, 0.05, lift=0.3)}
    health = {a: store.Health(200000, 0, 20.0, 60.0) for a in arms}
    early = _context(day=date(2026, 1, 3))
    assert (
        report.build_report(early, _aggregate(arms, health, early.day))["decision"]["verdict"]
        == "keep running"
    )
    ctx = _context()
    r = report.build_report(ctx, _aggregate(arms, health, ctx.day))
    assert r["decision"] == {"verdict": "ship", "arm": "treatment", "reasons": r["decision"]["reasons"]}
    assert r["warnings"] == []
    assert r["power"]["total_users"] > 0


def test_default_day_is_yesterday_in_the_experiment_timezone():
    now = datetime(2026, 3, 29, 22, 30, tzinfo=UTC)  # 00:30 on the 30th in Berlin (CEST)
    assert report.default_day("Europe/Berlin", now) == date(2026, 3, 29)
    assert report.default_day("UTC", now) == date(2026, 3, 28)


def test_html_is_standalone_and_offline(log):
    r = report.run_report(log.engine, "home", DAY)
    page = report.render_html(r)
    assert page.startswith("<!doctype html>")
    assert not re.search(r"<script[^>]*\ssrc=", page), "no external script: plotly.js is inline"
    assert len(page) > 1_000_000 and "Plotly.newPlot" in page
    assert "Cumulative relative CTR lift" in page and "treatment" in page


def test_cli_report_and_errors(log, db_url, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", "home", "--date", "2026-03-31", "--db", db_url, "--html", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["date"] == "2026-03-31" and out.read_text().startswith("<!doctype html>")
    assert main(["report", "nope", "--db", db_url]) == 2
    assert "no experiment with key 'nope'" in capsys.readouterr().err
    assert main(["report", "home", "--date", "31/03/2026", "--db", db_url]) == 2
    assert "--date must be YYYY-MM-DD" in capsys.readouterr().err
    assert main(["report", "home", "--date", "2026-01-01", "--db", db_url]) == 2


def test_cli_export_users_streams_the_per_user_table(log, db_url, tmp_path):
    out = tmp_path / "users.csv"
    assert main(["export-users", "home", "--out", str(out), "--db", db_url]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["unit_id", "arm", "impressions", "clicks", "pre_impressions", "pre_clicks"]
    got = {
        r["unit_id"]: (
            r["arm"],
            *(int(r[k]) for k in ("impressions", "clicks", "pre_impressions", "pre_clicks")),
        )
        for r in rows
    }
    assert got == truth_users(log)
    assert main(["export-users", "home", "--phase", "9", "--out", str(out), "--db", db_url]) == 2


def test_init_db_creates_the_analysis_tables(db_url):
    from sqlalchemy import inspect

    from abrec.db import init_db, make_engine

    engine = make_engine(db_url)
    init_db(engine)
    init_db(engine)  # idempotent
    tables = set(inspect(engine).get_table_names())
    assert {
        "analysis_snapshots",
        "analysis_novelty",
        "analysis_health",
        "analysis_reports",
        "analysis_scheduler_lock",
    } <= tables
    uniques = {tuple(u["column_names"]) for u in inspect(engine).get_unique_constraints("analysis_reports")}
    assert ("experiment_id", "day") in uniques
    engine.dispose()


def test_the_nightly_increment_gives_the_full_report(log):
    report.run_report(log.engine, "home", date(2026, 3, 30))  # first run: the whole phase
    nightly = report.run_report(log.engine, "home", DAY)  # then one day on top of the stored ones
    full = report.run_report(log.engine, "home", DAY, full=True)
    strip = lambda r: {k: v for k, v in r.items() if k != "generated_at"}  # noqa: E731
    assert strip(nightly) == strip(full)
    assert len(nightly["timeviews"]["cumulative_lift"]) >= 4 and nightly["timeviews"]["novelty"]


def test_a_phase_without_exposures_reports_too_little_data(log):
    """Phase 2 of the log served slates but exposed nobody: no lift, no verdict from guardrails on
    a few dozen slates, strict JSON."""
    r = report.run_report(log.engine, "home", date(2026, 3, 26), phase_number=2)
    assert r["phase"]["number"] == 2
    assert [row["users"] for row in r["arms"].values()] == [0, 0]
    assert r["arms"]["treatment"]["rel_lift"] is None
    assert r["decision"]["verdict"] == "keep running"
    assert any("Too little data" in w for w in r["warnings"])
    json.dumps(r, allow_nan=False)
