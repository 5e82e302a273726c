"""Tables the nightly analysis writes and the dashboard reads, and the functions that read and write them.

- `analysis_snapshots`: each arm's cumulative sufficient statistics (`ArmStats`) of one phase as
  of the end of each calendar day in the experiment's timezone: the time views need each user's
  totals so far, which only these sums keep once the raw events are summarised.
- `analysis_novelty`: as of a day, the sums over an arm's users of their clicks and impressions
  on the k-th day since their first exposure (lift by days since exposure).
- `analysis_health`: per arm and day, how serving went: impressions, fallbacks, p50/p99 latency.
- `analysis_reports`: the report JSON, one per (experiment, date): a rerun replaces it.
- `analysis_scheduler_lock`: a lease row, so that only one `abrec scheduler` runs jobs.

Writes are upserts (INSERT ... ON CONFLICT DO UPDATE on SQLite and PostgreSQL alike), so running
the same night twice, or two runs racing, leaves one row per key. Every function takes a
`Session` or a `Connection` and never commits: the caller owns the transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from abrec.analysis.stats import ArmStats
from abrec.analysis.timeviews import Snapshot
from abrec.experiments.schema import UTCDateTime, utcnow
from sqlalchemy import (
    JSON,
    Connection,
    Date,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapped, Session, mapped_column

from abrec.db import Base

Executor = Session | Connection


class _ArmDay:
    """The key columns of one arm's row for one local day of a phase."""

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    phase_id: Mapped[int] = mapped_column(ForeignKey("phases.id", ondelete="CASCADE"))
    day: Mapped[date] = mapped_column(Date)
    arm_name: Mapped[str] = mapped_column(String(64))


class _Moments:
    """User-level sufficient statistics (stats.Moments): n and the sums of x, y, x^2, y^2 and x*y."""

    n: Mapped[float] = mapped_column(Float)
    sum_x: Mapped[float] = mapped_column(Float)
    sum_y: Mapped[float] = mapped_column(Float)
    sum_x2: Mapped[float] = mapped_column(Float)
    sum_y2: Mapped[float] = mapped_column(Float)
    sum_xy: Mapped[float] = mapped_column(Float)


class AnalysisSnapshot(_ArmDay, _Moments, Base):
    """One arm's cumulative sufficient statistics in one phase as of the end of `day` (local)."""

    __tablename__ = "analysis_snapshots"
    __table_args__ = (
        UniqueConstraint("phase_id", "day", "arm_name"),
        Index("ix_analysis_snapshots_experiment_id", "experiment_id"),
    )

    sum_px: Mapped[float] = mapped_column(Float)
    sum_py: Mapped[float] = mapped_column(Float)
    sum_px2: Mapped[float] = mapped_column(Float)
    sum_py2: Mapped[float] = mapped_column(Float)
    sum_pxpy: Mapped[float] = mapped_column(Float)
    sum_x_px: Mapped[float] = mapped_column(Float)
    sum_x_py: Mapped[float] = mapped_column(Float)
    sum_y_px: Mapped[float] = mapped_column(Float)
    sum_y_py: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AnalysisNovelty(_ArmDay, _Moments, Base):
    """As of `day`: an arm's sums over users of their counts on day k since first exposure."""

    __tablename__ = "analysis_novelty"
    __table_args__ = (UniqueConstraint("phase_id", "day", "arm_name", "days_since_exposure"),)

    days_since_exposure: Mapped[int] = mapped_column(Integer)


class AnalysisHealth(_ArmDay, Base):
    """How an arm was served on one local day of a phase (all served impressions, analysed or not)."""

    __tablename__ = "analysis_health"
    __table_args__ = (UniqueConstraint("phase_id", "day", "arm_name"),)

    impressions: Mapped[int] = mapped_column(Integer)
    fallbacks: Mapped[int] = mapped_column(Integer)
    latency_p50_ms: Mapped[float | None] = mapped_column(Float)
    latency_p99_ms: Mapped[float | None] = mapped_column(Float)
    # The event log records no serving errors yet (a failed request logs no impression).
    errors: Mapped[int | None] = mapped_column(Integer)


class AnalysisReport(Base):
    """The nightly report of an experiment for one local date; rerunning the date replaces it."""

    __tablename__ = "analysis_reports"
    __table_args__ = (UniqueConstraint("experiment_id", "day"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    phase_id: Mapped[int | None] = mapped_column(ForeignKey("phases.id", ondelete="CASCADE"))
    day: Mapped[date] = mapped_column(Date)
    report: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class SchedulerLock(Base):
    """A named lease: the holder renews `expires_at`; anyone may take it once it has expired."""

    __tablename__ = "analysis_scheduler_lock"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


STAT_FIELDS = tuple(ArmStats.__dataclass_fields__)
NOVELTY_FIELDS = ("n", "sum_x", "sum_y", "sum_x2", "sum_y2", "sum_xy")


def _upsert(db: Executor, model: type[Base], rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> None:
    """Insert rows, replacing those that already exist with the same unique `keys`."""
    if not rows:
        return
    table = model.__table__
    dialect = db.get_bind().dialect.name if isinstance(db, Session) else db.dialect.name
    insert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}.get(dialect)
    if insert is None:
        raise NotImplementedError(f"upserts are written for SQLite and PostgreSQL, not {dialect}")
    stmt = insert(table)
    changing = [c for c in rows[0] if c not in keys]
    stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_={c: stmt.excluded[c] for c in changing})
    db.execute(stmt, list(rows))


# ---------------------------------------------------------------------------------------------
# Snapshots, novelty, health


def save_snapshots(
    db: Executor, experiment_id: int, phase_id: int, snapshots: Mapping[date, Mapping[str, ArmStats]]
) -> None:
    """Store {day: {arm: cumulative ArmStats}}, replacing any stored for the same days."""
    rows = [
        {"experiment_id": experiment_id, "phase_id": phase_id, "day": day, "arm_name": arm}
        | stats.to_dict()
        | {"created_at": utcnow()}
        for day, arms in snapshots.items()
        for arm, stats in arms.items()
    ]
    _upsert(db, AnalysisSnapshot, rows, ("phase_id", "day", "arm_name"))


def load_snapshots(db: Executor, phase_id: int, until: date | None = None) -> list[Snapshot]:
    """Cumulative snapshots of a phase (key = the date), oldest first: input of the time views."""
    query = select(AnalysisSnapshot.__table__).where(AnalysisSnapshot.phase_id == phase_id)
    if until is not None:
        query = query.where(AnalysisSnapshot.day <= until)
    rows = db.execute(query.order_by(AnalysisSnapshot.day, AnalysisSnapshot.arm_name))
    return [Snapshot(r.day, r.arm_name, ArmStats(**{f: getattr(r, f) for f in STAT_FIELDS})) for r in rows]


def snapshot_days(db: Executor, phase_id: int) -> set[date]:
    """The days of a phase that already have snapshots."""
    query = select(AnalysisSnapshot.day).where(AnalysisSnapshot.phase_id == phase_id)
    return set(db.execute(query).scalars())


def save_novelty(
    db: Executor, experiment_id: int, phase_id: int, day: date, cohorts: Mapping[int, Mapping[str, ArmStats]]
) -> None:
    """Store the novelty view as of `day`: {days since exposure: {arm: ArmStats}}; replaces that day's."""
    stale = delete(AnalysisNovelty).where(AnalysisNovelty.phase_id == phase_id, AnalysisNovelty.day == day)
    db.execute(stale)
    rows = [
        {
            "experiment_id": experiment_id,
            "phase_id": phase_id,
            "day": day,
            "arm_name": arm,
            "days_since_exposure": k,
        }
        | {f: float(getattr(stats, f)) for f in NOVELTY_FIELDS}
        for k, arms in cohorts.items()
        for arm, stats in arms.items()
    ]
    _upsert(db, AnalysisNovelty, rows, ("phase_id", "day", "arm_name", "days_since_exposure"))


def load_novelty(db: Executor, phase_id: int, day: date) -> list[Snapshot]:
    """The novelty view stored as of `day` (key = days since first exposure), for `lift_by_exposure_day`."""
    rows = db.execute(
        select(AnalysisNovelty.__table__)
        .where(AnalysisNovelty.phase_id == phase_id, AnalysisNovelty.day == day)
        .order_by(AnalysisNovelty.days_since_exposure, AnalysisNovelty.arm_name)
    )
    return [
        Snapshot(r.days_since_exposure, r.arm_name, ArmStats(**{f: getattr(r, f) for f in NOVELTY_FIELDS}))
        for r in rows
    ]


@dataclass(frozen=True)
class Health:
    """Serving health of an arm over a span of time (a day, or the phase so far)."""

    impressions: int
    fallbacks: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    errors: int | None = None

    @property
    def fallback_rate(self) -> float | None:
        return self.fallbacks / self.impressions if self.impressions else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "impressions": self.impressions,
            "fallbacks": self.fallbacks,
            "fallback_rate": self.fallback_rate,
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p99_ms": self.latency_p99_ms,
            "errors": self.errors,
        }


def save_health(
    db: Executor, experiment_id: int, phase_id: int, day: date, health: Mapping[str, Health]
) -> None:
    rows = [
        {
            "experiment_id": experiment_id,
            "phase_id": phase_id,
            "day": day,
            "arm_name": arm,
            "impressions": h.impressions,
            "fallbacks": h.fallbacks,
            "latency_p50_ms": h.latency_p50_ms,
            "latency_p99_ms": h.latency_p99_ms,
            "errors": h.errors,
        }
        for arm, h in health.items()
    ]
    _upsert(db, AnalysisHealth, rows, ("phase_id", "day", "arm_name"))


def load_health(db: Executor, phase_id: int) -> dict[date, dict[str, Health]]:
    """Daily serving health of a phase: {day: {arm: Health}}, oldest first."""
    out: dict[date, dict[str, Health]] = {}
    rows = db.execute(
        select(AnalysisHealth.__table__)
        .where(AnalysisHealth.phase_id == phase_id)
        .order_by(AnalysisHealth.day, AnalysisHealth.arm_name)
    )
    for r in rows:
        out.setdefault(r.day, {})[r.arm_name] = Health(
            r.impressions, r.fallbacks, r.latency_p50_ms, r.latency_p99_ms, r.errors
        )
    return out


# ---------------------------------------------------------------------------------------------
# Reports


def save_report(
    db: Executor, experiment_id: int, day: date, report: Mapping[str, Any], phase_id: int | None = None
) -> None:
    """Store the report of (experiment, day), replacing an earlier one for the same key."""
    row = {
        "experiment_id": experiment_id,
        "day": day,
        "phase_id": phase_id,
        "report": dict(report),
        "created_at": utcnow(),
    }
    _upsert(db, AnalysisReport, [row], ("experiment_id", "day"))


def get_report(
    db: Executor, experiment_id: int, day: date | None = None
) -> tuple[date, dict[str, Any]] | None:
    """(date, report) for `day`, or the newest when day is None; None when there is none."""
    query = select(AnalysisReport.day, AnalysisReport.report)
    query = query.where(AnalysisReport.experiment_id == experiment_id)
    query = query.where(AnalysisReport.day == day) if day else query.order_by(AnalysisReport.day.desc())
    row = db.execute(query.limit(1)).first()
    return None if row is None else (row.day, row.report)


def list_reports(db: Executor, experiment_id: int) -> list[tuple[date, datetime]]:
    """(date, created_at) of every stored report of an experiment, newest first."""
    rows = db.execute(
        select(AnalysisReport.day, AnalysisReport.created_at)
        .where(AnalysisReport.experiment_id == experiment_id)
        .order_by(AnalysisReport.day.desc())
    )
    return [(r.day, r.created_at) for r in rows]


def latest_reports(db: Executor, experiment_ids: Iterable[int]) -> dict[int, tuple[str, dict[str, Any]]]:
    """The newest report of each experiment: {experiment id: (ISO date, report)}; two queries at most."""
    ids = list(experiment_ids)
    if not ids:
        return {}
    newest = (
        select(AnalysisReport.experiment_id, func.max(AnalysisReport.day).label("day"))
        .where(AnalysisReport.experiment_id.in_(ids))
        .group_by(AnalysisReport.experiment_id)
        .subquery()
    )
    rows = db.execute(
        select(AnalysisReport.experiment_id, AnalysisReport.day, AnalysisReport.report).join(
            newest,
            (AnalysisReport.experiment_id == newest.c.experiment_id) & (AnalysisReport.day == newest.c.day),
        )
    )
    return {r.experiment_id: (r.day.isoformat(), r.report) for r in rows}


# ---------------------------------------------------------------------------------------------
# Scheduler lock


def acquire_lock(db: Connection, name: str, owner: str, lease: timedelta) -> bool:
    """Take or renew the lease `name` for `owner`; False while another owner's lease is live.

    One atomic UPDATE (take it when expired or already ours) and, when no row exists yet, an
    INSERT that the primary key makes fail for all but one contender. Commits on its own, so
    that others see the lease at once: give it a connection outside any other transaction.
    """
    now = utcnow()
    with db.begin():
        taken = db.execute(
            update(SchedulerLock)
            .where(SchedulerLock.name == name)
            .where((SchedulerLock.owner == owner) | (SchedulerLock.expires_at < now))
            .values(owner=owner, expires_at=now + lease)
        ).rowcount
    if taken:
        return True
    with db.begin():
        stmt = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}[db.dialect.name](SchedulerLock)
        stmt = stmt.values(name=name, owner=owner, acquired_at=now, expires_at=now + lease)
        # RETURNING, not rowcount: psycopg reports -1 for an INSERT ... ON CONFLICT DO NOTHING.
        inserted = db.execute(stmt.on_conflict_do_nothing().returning(SchedulerLock.name)).first()
    return inserted is not None


def release_lock(db: Connection, name: str, owner: str) -> None:
    with db.begin():
        db.execute(delete(SchedulerLock).where(SchedulerLock.name == name, SchedulerLock.owner == owner))


def lock_holder(db: Executor, name: str) -> tuple[str, datetime] | None:
    """(owner, expires_at) of the lease, expired or not; None when nobody ever took it."""
    query = select(SchedulerLock.owner, SchedulerLock.expires_at).where(SchedulerLock.name == name)
    row = db.execute(query).first()
    return None if row is None else (row.owner, row.expires_at)
