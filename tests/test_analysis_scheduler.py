"""The nightly scheduler: APScheduler settings, schedules reconciled from the experiments table, the
database lease (one scheduler runs jobs), a missed run caught up after a restart, `--once`."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from abrec.analysis import report, scheduler, store
from abrec.experiments import service
from abrec.experiments.schema import Experiment
from analysis_eventlog import build_log, make_experiment
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import update

from abrec.cli import main
from abrec.db import init_db, make_engine, session_factory, session_scope


@pytest.fixture
def log(db_url):
    log = build_log(db_url)
    yield log
    log.engine.dispose()


@pytest.fixture
def empty_db(db_url):
    engine = make_engine(db_url)
    init_db(engine)
    engine.dispose()
    return db_url


@pytest.fixture
def make_scheduler(db_url):
    made = []

    def make(**kwargs) -> scheduler.ReportScheduler:
        s = scheduler.ReportScheduler(db_url, **kwargs)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()
        s.shutdown()


def wait_for(condition, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_misfire_coalesce_and_timezone_settings(log, make_scheduler):
    s = make_scheduler()
    assert str(s.scheduler.timezone) == "UTC"
    s.scheduler.start(paused=True)
    changes = s.reconcile()
    assert changes == {"report:home": "added", "report:other": "added"}
    job = s.scheduler.get_job("report:home", jobstore="default")
    assert job.coalesce is True
    assert job.misfire_grace_time >= 3600
    assert job.max_instances == 1
    assert isinstance(job.trigger, CronTrigger) and str(job.trigger.timezone) == "Europe/Berlin"
    assert str(job.trigger) == str(CronTrigger(hour=2, minute=0, timezone="Europe/Berlin"))
    assert job.next_run_time.astimezone(job.trigger.timezone).strftime("%H:%M") == "02:00"


def test_reconcile_follows_the_experiments_table(log, make_scheduler):
    s = make_scheduler()
    s.scheduler.start(paused=True)
    s.reconcile()
    assert s.reconcile() == {}  # nothing changed
    factory = session_factory(log.engine)
    with session_scope(factory) as session:
        session.execute(update(Experiment).where(Experiment.key == "home").values(report_time="06:30"))
        service.stop(session, "other", "test")
    make_experiment(log.engine, "fresh", timezone="America/New_York")
    with session_scope(factory) as session:
        service.create_experiment(
            session,
            key="draft-one",
            arms=[service.ArmSpec("a", 1, "m@x"), service.ArmSpec("b", 1, "m@y")],
            actor="test",
        )
    assert s.reconcile() == {"report:home": "rescheduled", "report:fresh": "added", "report:other": "removed"}
    jobs = {j.id: j for j in s.scheduler.get_jobs(jobstore="default")}
    assert set(jobs) == {"report:home", "report:fresh"}
    assert str(jobs["report:home"].trigger) == str(CronTrigger(hour=6, minute=30, timezone="Europe/Berlin"))
    assert str(jobs["report:fresh"].trigger.timezone) == "America/New_York"
    # The jobs are persisted: a new process sees them in the database job store.
    other = make_scheduler()
    other.scheduler.start(paused=True)
    assert {j.id for j in other.scheduler.get_jobs(jobstore="default")} == {"report:home", "report:fresh"}


def test_the_lease_admits_one_scheduler_and_expires(empty_db, make_scheduler):
    a = make_scheduler(owner="a", lease_s=3.0)
    b = make_scheduler(owner="b", lease_s=3.0)
    assert a.try_lead() is True
    assert b.try_lead() is False
    assert a.try_lead() is True  # renewal by the holder
    with a.engine.connect() as conn:
        assert store.lock_holder(conn, scheduler.LOCK_NAME)[0] == "a"
    time.sleep(3.2)  # a stops renewing: its lease expires and b takes over
    assert b.try_lead() is True
    assert a.try_lead() is False and not a.leading
    b.shutdown()  # releases the lease at once
    with a.engine.connect() as conn:
        assert store.lock_holder(conn, scheduler.LOCK_NAME) is None
    assert a.try_lead() is True


def test_a_second_scheduler_does_not_run_jobs(empty_db, make_scheduler):
    ran: list[str] = []
    schedulers = {
        name: make_scheduler(owner=name, lease_s=2.0, reconcile_s=3600) for name in ("first", "second")
    }
    for name, s in schedulers.items():
        s.scheduler.add_job(ran.append, "interval", seconds=0.1, args=[name], jobstore="local", id="tick")
    threads = {name: threading.Thread(target=s.run, daemon=True) for name, s in schedulers.items()}
    threads["first"].start()
    assert wait_for(lambda: schedulers["first"].leading and "first" in ran)
    threads["second"].start()
    time.sleep(4.5)  # several lease periods with both running
    assert schedulers["first"].leading and not schedulers["second"].leading
    assert "second" not in ran
    # When the leader goes away the other one takes over and starts running jobs.
    schedulers["first"].stop()
    threads["first"].join(5)
    assert wait_for(lambda: schedulers["second"].leading and "second" in ran)
    schedulers["second"].stop()
    threads["second"].join(5)


def test_a_run_missed_during_a_restart_still_happens(log, make_scheduler, db_url):
    """The job's 02:00 passed an hour ago while no scheduler ran: with hours of grace it runs on start."""
    s = make_scheduler(owner="restarted")
    s.scheduler.start(paused=True)
    s.reconcile()
    s.scheduler.modify_job(
        "report:home", jobstore="default", next_run_time=datetime.now(UTC) - timedelta(hours=1)
    )
    yesterday = report.default_day("Europe/Berlin")
    assert s.try_lead()
    with log.engine.connect() as conn:
        assert wait_for(lambda: store.get_report(conn, log.experiment_id, yesterday) is not None, timeout=60)
        conn.rollback()
    job = s.scheduler.get_job("report:home", jobstore="default")
    assert job.next_run_time > datetime.now(UTC)  # rescheduled for the next night, not run again


def test_nightly_job_logs_failures_instead_of_raising(log, db_url, caplog):
    assert scheduler.nightly_job(db_url, "no-such-experiment") is None
    assert "nightly report of no-such-experiment failed" in caplog.text


def test_scheduler_once(log, db_url, capsys):
    assert main(["scheduler", "--db", db_url, "--once"]) == 1  # "other" started today: nothing to report yet
    out = capsys.readouterr().out
    assert "home" in out and "other: FAILED" in out
    with log.engine.connect() as conn:
        day = store.get_report(conn, log.experiment_id)[0]
        assert day == report.default_day("Europe/Berlin")
        assert store.lock_holder(conn, scheduler.LOCK_NAME) is None  # released
    with log.engine.connect() as conn:
        assert store.acquire_lock(conn, scheduler.LOCK_NAME, "someone-else", timedelta(minutes=5))
    assert main(["scheduler", "--db", db_url, "--once"]) == 1
    assert "another scheduler holds the lease" in capsys.readouterr().err


def test_report_time_must_be_hh_mm():
    with pytest.raises(ValueError, match="HH:MM"):
        scheduler.report_trigger("2am", "UTC")
    assert scheduler.report_trigger("23:05", "Asia/Kolkata").fields[5].expressions[0].first == 23
