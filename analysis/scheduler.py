"""The nightly report scheduler: APScheduler in its own process (`abrec scheduler`), one at a time.

- Jobs live in an SQLAlchemy job store in the application database (table `apscheduler_jobs`,
  created by APScheduler), one per running experiment: `report:<key>` at the experiment's
  `report_time` (default 02:00) in the experiment's own timezone.
- `coalesce=True` and a misfire grace time of hours: a run missed while the process was down
  (a deploy at 02:00) still happens, once, when it comes back; APScheduler's default grace of
  one second would silently drop it.
- Schedules are reconciled from the experiments table every few minutes: new running experiments
  get a job, changed report times move it, stopped ones lose it.
- One scheduler at a time: a lease row (`analysis_scheduler_lock`) that the leader renews every
  third of the lease. Others wait paused (their APScheduler runs no jobs) and take over once
  the lease expires, so a crashed leader is replaced within one lease. A lease row works on
  SQLite and PostgreSQL alike, unlike pg_advisory_lock.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

from abrec.analysis import delivery, store
from abrec.analysis.report import load_experiment, render_html, run_report
from abrec.experiments.schema import Experiment
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import select
from sqlalchemy.orm import Session

from abrec.db import make_engine, normalise_url

log = logging.getLogger(__name__)

LOCK_NAME = "abrec-scheduler"
JOB_PREFIX = "report:"
JOB_DEFAULTS = {
    "coalesce": True,  # several missed runs of one job run once
    "misfire_grace_time": 6 * 3600,  # a run up to 6 hours late still happens
    "max_instances": 1,
}
SCHEDULER_TIMEZONE = "UTC"  # explicit; each job's trigger carries its experiment's timezone


def report_trigger(report_time: str, timezone: str) -> CronTrigger:
    """Every day at `report_time` ("HH:MM") local time in `timezone`."""
    try:
        hour, minute = (int(part) for part in report_time.split(":"))
    except ValueError:
        raise ValueError(f"report_time must be HH:MM, got {report_time!r}") from None
    return CronTrigger(hour=hour, minute=minute, timezone=timezone)


def nightly_job(db_url: str, key: str) -> dict[str, Any] | None:
    """One experiment's nightly run: the report for yesterday (local), stored, then delivered.

    Errors are logged, not raised: the next night runs anyway, and other jobs are not affected.
    """
    engine = make_engine(db_url)
    try:
        report = run_report(engine, key)
        with Session(engine) as session:
            exp = load_experiment(session, key)
            webhook_url, email_to = exp.webhook_url, exp.email_to
        if webhook_url or email_to:
            html = render_html(report) if email_to else None
            report["delivery"] = delivery.deliver(report, webhook_url, email_to, html=html)
        return report
    except Exception:
        log.exception("nightly report of %s failed", key)
        return None
    finally:
        engine.dispose()


def running_experiments(session: Session) -> list[Experiment]:
    return list(
        session.scalars(select(Experiment).where(Experiment.status == "running").order_by(Experiment.key))
    )


class ReportScheduler:
    """APScheduler plus the lease: `run()` blocks, leading when it holds the lease, waiting otherwise."""

    def __init__(
        self,
        db_url: str,
        owner: str | None = None,
        lease_s: float = 60.0,
        reconcile_s: float = 300.0,
        timezone: str = SCHEDULER_TIMEZONE,
    ) -> None:
        self.db_url = normalise_url(db_url)
        self.engine = make_engine(self.db_url)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease = timedelta(seconds=lease_s)
        self.reconcile_s = reconcile_s
        self.scheduler = BackgroundScheduler(
            jobstores={
                "default": SQLAlchemyJobStore(engine=self.engine, tablename="apscheduler_jobs"),
                "local": MemoryJobStore(),  # in-process jobs that are never shared or persisted
            },
            job_defaults=JOB_DEFAULTS,
            timezone=timezone,
        )
        self.leading = False
        self._reconciled_at: float | None = None
        self._stop = threading.Event()

    # -- leadership ---------------------------------------------------------------------------

    def try_lead(self) -> bool:
        """Take or renew the lease; start or resume the scheduler when held, pause it when lost."""
        try:
            with self.engine.connect() as conn:
                held = store.acquire_lock(conn, LOCK_NAME, self.owner, self.lease)
        except Exception:
            log.exception("scheduler lease check failed; pausing to be safe")
            held = False
        if held and not self.leading:
            log.info("scheduler %s leads", self.owner)
            if not self.scheduler.running:
                self.scheduler.start(paused=True)
            self._reconciled_at = None
            self.scheduler.resume()
        elif not held and self.leading:
            log.warning("scheduler %s lost the lease; pausing", self.owner)
            self.scheduler.pause()
        self.leading = held
        return held

    def run(self) -> None:
        """Block until `stop()`: renew or wait for the lease every third of it; reconcile when leading.

        Reconciling runs here rather than as an APScheduler job: a job that edits the job store
        would deadlock with `shutdown()`, which holds the store's lock while it waits for jobs.
        """
        try:
            while not self._stop.is_set():
                if self.try_lead() and self._reconcile_due():
                    try:
                        self.reconcile()
                    except Exception:
                        log.exception("reconciling the schedules failed; retrying next time")
                    self._reconciled_at = time.monotonic()
                self._stop.wait(self.lease.total_seconds() / 3)
        finally:
            self.shutdown()

    def _reconcile_due(self) -> bool:
        return self._reconciled_at is None or time.monotonic() - self._reconciled_at >= self.reconcile_s

    def stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        if self.leading:
            with self.engine.connect() as conn:
                store.release_lock(conn, LOCK_NAME, self.owner)
            self.leading = False
        self.engine.dispose()

    # -- schedules ----------------------------------------------------------------------------

    def reconcile(self) -> dict[str, str]:
        """Make the job store match the running experiments; returns {job id: what changed}."""
        with Session(self.engine) as session:
            wanted = {
                JOB_PREFIX + e.key: report_trigger(e.report_time or "02:00", e.timezone)
                for e in running_experiments(session)
            }
        changes: dict[str, str] = {}
        existing = {
            j.id: j for j in self.scheduler.get_jobs(jobstore="default") if j.id.startswith(JOB_PREFIX)
        }
        for job_id, trigger in wanted.items():
            job = existing.get(job_id)
            if (
                job is not None
                and str(job.trigger) == str(trigger)
                and str(job.trigger.timezone) == str(trigger.timezone)
            ):
                continue
            self.scheduler.add_job(
                "abrec.analysis.scheduler:nightly_job",
                trigger,
                args=[self.db_url, job_id.removeprefix(JOB_PREFIX)],
                id=job_id,
                name=f"nightly report {job_id.removeprefix(JOB_PREFIX)}",
                jobstore="default",
                replace_existing=True,
            )
            changes[job_id] = "added" if job is None else "rescheduled"
        for job_id in existing.keys() - wanted.keys():
            self.scheduler.remove_job(job_id, jobstore="default")
            changes[job_id] = "removed"
        if changes:
            log.info("schedules reconciled: %s", changes)
        return changes


def run_once(db_url: str, owner: str | None = None) -> dict[str, dict[str, Any] | None] | None:
    """Run every running experiment's report now (for yesterday), under the lease.

    Returns {key: report or None if it failed}, or None when another scheduler holds the lease.
    """
    engine = make_engine(db_url)
    owner = owner or f"{socket.gethostname()}:{os.getpid()}:once"
    try:
        with engine.connect() as conn:
            if not store.acquire_lock(conn, LOCK_NAME, owner, timedelta(hours=1)):
                return None
        try:
            with Session(engine) as session:
                keys = [e.key for e in running_experiments(session)]
            return {key: nightly_job(db_url, key) for key in keys}
        finally:
            with engine.connect() as conn:
                store.release_lock(conn, LOCK_NAME, owner)
    finally:
        engine.dispose()
