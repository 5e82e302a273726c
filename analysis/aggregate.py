"""Aggregation of the event log inside the database: per user, then per arm, per calendar day.

Raw impressions and clicks never enter Python: every query here is SQLAlchemy Core `select()`
that runs unchanged on SQLite and PostgreSQL and returns at most one row per arm and day (or per
user, streamed, for the export).

Definitions, for one phase P of an experiment (phases are never pooled):
- A unit is a user exposed in P (a row in `exposures`), in the arm of that exposure.
- The user's metric events are the impressions and clicks of P with `in_analysis` true created
  at or after their first exposure: x = clicks, y = impressions. Exposed users without events
  count with zeros. Clicks in the log are already attributed (the API rejects late clicks and
  the unique (impression_id, item_id) key drops repeats), so a click row counts once.
- The pre-period (CUPED covariates px, py) is the user's events in this experiment before their
  first exposure in P, from P or an earlier phase, except events analysed under the same
  assignment (an earlier phase with P's seed, where users kept their arm): those carry the
  treatment effect, and CUPED would subtract part of the lift with them.
- Days are calendar days in the experiment's timezone. Their boundaries are computed here with
  zoneinfo (so a day around a DST switch lasts 23 or 25 hours) and events are bucketed in SQL
  by comparing `created_at` (UTC) with them.

Two entry points:
- `aggregate_phase` (first night, backfill, `--full`): one pass over the phase's events yields
  the per-(user, day) counts (a temporary table); from them one more query gives, per (arm,
  day, day of first exposure), the increments of the cumulative sufficient statistics (a user's
  square terms grow by X_d² - X_{d-1}² on the days they have events, so summing increments per
  day and accumulating over days gives Σ X², without a row per user and day) and the sums of
  the novelty view (counts on the k-th day since first exposure); plus the daily serving health.
  All of these are sums over users or impressions, so disjoint ranges of users (and of
  impressions, for the health) can be aggregated apart, on several connections at once, and
  added up: SQLite runs a statement on one core (see `aggregate_phase`).
- `aggregate_day` (every other night): the day's cumulative snapshot from the per-user totals
  (one pass, no per-day grouping), and the novelty view and health from the day's events only.
  Per-user counts take one of two plans with the same result (`_per_user`): the log joined and
  grouped by user on PostgreSQL, an index seek per exposed user on SQLite.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from itertools import accumulate
from typing import Any
from zoneinfo import ZoneInfo

from abrec.analysis.stats import ArmStats
from abrec.analysis.store import NOVELTY_FIELDS, STAT_FIELDS, Health
from abrec.experiments.schema import Arm, Click, Experiment, Exposure, Impression, Phase
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    and_,
    case,
    cast,
    func,
    literal,
    literal_column,
    not_,
    or_,
    select,
    union_all,
)
from sqlalchemy.sql.elements import ColumnElement

PRE_DAY = -1  # the day index of a user's pre-period row in the per-(user, day) table
LATENCY_RESOLUTION_MS = 0.1  # serving latencies are bucketed at this width for the percentiles
LATENCY_BUCKETS = 2**32  # bucket numbers per (arm, day) in the health's grouping key: 119 hours
PG_WORK_MEM = "256MB"  # per hash of the one pass over the log on PostgreSQL
MAX_WORKERS = 4  # connections `aggregate_phase` uses at once on SQLite, at most (one per core)


# ---------------------------------------------------------------------------------------------
# Calendar days in the experiment's timezone


def day_start(day: date, tz: str) -> datetime:
    """The UTC instant at which local `day` begins in timezone `tz`."""
    return datetime.combine(day, time(0), ZoneInfo(tz)).astimezone(UTC)


def local_date(instant: datetime, tz: str) -> date:
    """The calendar date of a UTC instant in timezone `tz`."""
    return instant.astimezone(ZoneInfo(tz)).date()


def day_bounds(first: date, last: date, tz: str) -> list[datetime]:
    """UTC starts of the local days first .. last, then the end of `last`: len = days + 1."""
    days = (last - first).days + 1
    return [day_start(first + timedelta(days=i), tz) for i in range(days + 1)]


def _day_index(column: ColumnElement, bounds: Sequence[datetime]) -> ColumnElement:
    """SQL: the index of the local day `column` falls in (0 = the first), NULL after the last.

    A balanced tree of CASEs: log2(days) comparisons per row instead of one per day. Callers
    only pass rows at or after bounds[0].
    """

    def tree(lo: int, hi: int) -> ColumnElement:  # the day lies in [lo, hi)
        if hi - lo == 1:
            return literal(lo)
        mid = (lo + hi) // 2
        return case((column < bounds[mid], tree(lo, mid)), else_=tree(mid, hi))

    days = len(bounds) - 1
    return case((column < bounds[-1], tree(0, days)), else_=None)


# ---------------------------------------------------------------------------------------------
# The phase being analysed


@dataclass(frozen=True)
class PhaseScope:
    """What the queries need to know about a phase: ids, timezone and the phases before it."""

    experiment_id: int
    phase_id: int
    timezone: str
    first_day: date  # local date the phase started
    earlier_or_same: tuple[int, ...]  # phase ids with number <= this phase's (may hold pre-period events)
    same_assignment: tuple[int, ...]  # of those, the ones with this phase's seed (arms carried over)

    @classmethod
    def load(cls, conn: Connection, experiment_id: int, phase_id: int) -> PhaseScope:
        query = select(Experiment.timezone).where(Experiment.id == experiment_id)
        tz = conn.execute(query).scalar_one_or_none()
        if tz is None:
            raise LookupError(f"no experiment with id {experiment_id}")
        query = select(Phase.id, Phase.number, Phase.seed, Phase.started_at)
        phases = conn.execute(query.where(Phase.experiment_id == experiment_id)).all()
        this = next((p for p in phases if p.id == phase_id), None)
        if this is None:
            raise LookupError(f"phase {phase_id} is not a phase of experiment {experiment_id}")
        earlier = [p for p in phases if p.number <= this.number]
        return cls(
            experiment_id=experiment_id,
            phase_id=phase_id,
            timezone=tz,
            first_day=local_date(this.started_at, tz),
            earlier_or_same=tuple(p.id for p in earlier),
            same_assignment=tuple(p.id for p in earlier if p.seed == this.seed),
        )


def _periods(scope: PhaseScope, table, until: datetime) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    """SQL conditions on an event (impression or click) of its user's exposure: (metric, pre)."""
    post = and_(
        table.phase_id == scope.phase_id,
        table.in_analysis,
        table.created_at >= Exposure.first_seen_at,
        table.created_at < until,
    )
    same_assignment = and_(table.in_analysis, table.phase_id.in_(scope.same_assignment))
    pre = and_(
        table.phase_id.in_(scope.earlier_or_same),
        table.created_at < Exposure.first_seen_at,
        not_(same_assignment),
    )
    return post, pre


def _joined(scope: PhaseScope, table, until: datetime):
    """FROM events JOIN exposures: each impression or click of an exposed user, for one table.

    Impressions and clicks are aggregated separately and only their small per-user results are
    combined: a join onto a UNION of both would make SQLite materialise and index the union.
    """
    return (
        select()
        .select_from(table)
        .join(Exposure, and_(Exposure.user_id == table.user_id, _exposed(scope, until)))
        .where(table.experiment_id == scope.experiment_id, table.phase_id.in_(scope.earlier_or_same))
    )


def _exposed(scope: PhaseScope, until: datetime) -> ColumnElement[bool]:
    return and_(Exposure.phase_id == scope.phase_id, Exposure.first_seen_at < until)


Counts = Mapping[str, tuple[Any, ColumnElement[bool]]]  # output column -> (Impression or Click, condition)


def plan_for(conn: Connection) -> str:
    """The per-user plan that suits the database of `conn` (see `_per_user`)."""
    return "lookup" if conn.dialect.name == "sqlite" else "grouped"


def _per_user(scope: PhaseScope, until: datetime, plan: str, counts: Counts):
    """SELECT user_id, arm_name, first_seen_at, and per name in `counts` how many of the user's
    events of that table meet its condition: one row per user exposed before `until`.

    Two plans for one result (tests run both on both databases), as each database does best:
    - "grouped", for PostgreSQL: each table joined with the exposures and grouped by user (hash join and hash
      aggregate), the small per-user results combined with the exposures. Measured 2x faster
      there than the lookups below.
    - "lookup", for SQLite: it only joins by nested loops and groups by sorting, and grouping 10M events by
      user sorted them through a temporary B-tree spilled to disk. Instead, per exposure, one
      correlated count per name, each a seek in the index (experiment_id, phase_id, user_id,
      created_at, in_analysis): the rows stream out of the exposures with no sort. Callers must
      not let SQLite flatten this into an outer query (see `_materialized`): it would run the
      subqueries once per reference to their columns.
    """
    keys = [Exposure.user_id.label("user_id"), Exposure.arm_name.label("arm_name"), Exposure.first_seen_at]
    if plan == "lookup":
        looked_up = [_user_count(scope, table, cond).label(name) for name, (table, cond) in counts.items()]
        return select(*keys, *looked_up).where(_exposed(scope, until))

    def grouped(table):
        sums = [
            func.sum(case((condition, 1), else_=0)) if of is table else literal(0)
            for of, condition in counts.values()
        ]
        return (
            _joined(scope, table, until)
            .add_columns(table.user_id, func.min(Exposure.arm_name), func.min(Exposure.first_seen_at), *sums)
            .where(or_(*[condition for of, condition in counts.values() if of is table]))
            .group_by(table.user_id)
        )

    # Exposed users without any event count too, with zeros.
    everyone = select(*keys, *[literal(0)] * len(counts)).where(_exposed(scope, until))
    tables = list(dict.fromkeys(table for table, _ in counts.values()))
    parts = union_all(*[grouped(t) for t in tables], everyone).subquery()
    user, arm, first_seen, *sums = parts.c
    return select(
        user.label("user_id"),
        func.min(arm).label("arm_name"),
        func.min(first_seen).label("first_seen_at"),
        *[func.sum(c).label(name) for c, name in zip(sums, counts, strict=True)],
    ).group_by(user)


def _user_count(scope: PhaseScope, table, condition: ColumnElement[bool]):
    """SQL: how many events of `table` the exposure's user has that meet `condition`; a scalar
    subquery correlated with the enclosing SELECT over `exposures`."""
    return (
        select(func.count())
        .select_from(table)
        .where(table.experiment_id == scope.experiment_id, table.user_id == Exposure.user_id, condition)
        .scalar_subquery()
    )


def _materialized(query, name: str):
    """`query` as a CTE that SQLite computes once into a temporary table (see `_per_user`)."""
    return query.cte(name).prefix_with("MATERIALIZED", dialect="sqlite")


# ---------------------------------------------------------------------------------------------
# Per-user table (export, dashboard CSV, checks)


def user_rows_query(scope: PhaseScope, plan: str, until: datetime | None = None):
    """SELECT unit_id, arm, impressions, clicks, pre_impressions, pre_clicks: one row per exposed
    user, by `plan` ("lookup" or "grouped", see `plan_for`)."""
    until = until or datetime.now(UTC)
    post_i, pre_i = _periods(scope, Impression, until)
    post_c, pre_c = _periods(scope, Click, until)
    counts = {
        "impressions": (Impression, post_i),
        "clicks": (Click, post_c),
        "pre_impressions": (Impression, pre_i),
        "pre_clicks": (Click, pre_c),
    }
    u = _per_user(scope, until, plan, counts).subquery()
    return select(u.c.user_id.label("unit_id"), u.c.arm_name.label("arm"), *[u.c[name] for name in counts])


def iter_user_rows(
    connection: Connection, experiment_id: int, phase_id: int, until: datetime | None = None
) -> Iterator[tuple[str, str, int, int, int, int]]:
    """Stream (unit_id, arm, impressions, clicks, pre_impressions, pre_clicks) per exposed user.

    A server-side cursor on PostgreSQL (SQLite's cursor streams anyway), fetched in batches, so
    memory stays flat however many users there are. `until` (UTC) cuts the log; default now.
    """
    scope = PhaseScope.load(connection, experiment_id, phase_id)
    result = connection.execution_options(stream_results=True, yield_per=10_000).execute(
        user_rows_query(scope, plan_for(connection), until)
    )
    for row in result:
        yield (
            row.unit_id,
            row.arm,
            int(row.impressions),
            int(row.clicks),
            int(row.pre_impressions),
            int(row.pre_clicks),
        )


# ---------------------------------------------------------------------------------------------
# Per arm and day


@dataclass(frozen=True)
class PhaseAggregate:
    """Everything the report needs from the event log of one phase up to the end of `last_day`."""

    days: list[date]
    snapshots: dict[date, dict[str, ArmStats]]  # cumulative, as of the end of each day
    novelty: dict[int, dict[str, ArmStats]]  # days since first exposure -> arm -> sums on that day
    health: dict[date, dict[str, Health]]  # daily serving health
    health_total: dict[str, Health]  # serving health of the phase so far (see `phase_health`)


def _user_days_table() -> Table:
    return Table(
        "analysis_user_days",
        MetaData(),
        Column("user_id", String(128)),
        Column("arm_name", String(64)),
        Column("first_day", Integer),
        Column("day", Integer),
        Column("x", Integer),
        Column("y", Integer),
        prefixes=["TEMPORARY"],
    )


def aggregate_phase(
    conn: Connection, experiment_id: int, phase_id: int, last_day: date, workers: int | None = None
) -> PhaseAggregate:
    """Cumulative snapshots of every day from the phase's start to `last_day`, novelty and health.

    With `workers` = 1 every statement runs on `conn` (use one transaction, so they see one
    state of the log), with a temporary table that is dropped before returning. SQLite runs a
    statement on one core, so there (default: one worker per core, see `default_workers`) the
    exposed users are split into `workers` ranges of user_id and the impressions into as many
    ranges of rowid, each aggregated on a connection of its own from the engine's pool, at
    once (sqlite3 releases the GIL while a statement runs), and the parts' sums added up: they
    are sums of integers, so the figures are those of the serial run exactly. Each of those
    connections reads the log as committed when its part starts; the days reported are over by
    then, so their events are too (an event still being written with an earlier timestamp
    could reach one part and not another, as it could reach one night and not the next).
    Falls back to `conn` alone when it has uncommitted writes the other connections could not
    see, and on PostgreSQL, which runs its own parallel plans.
    """
    scope = PhaseScope.load(conn, experiment_id, phase_id)
    if last_day < scope.first_day:
        raise ValueError(f"phase {phase_id} started on {scope.first_day}, after {last_day}")
    bounds = day_bounds(scope.first_day, last_day, scope.timezone)
    days = [scope.first_day + timedelta(days=i) for i in range(len(bounds) - 1)]
    arms = _arms(conn, experiment_id)
    workers = default_workers(conn) if workers is None else workers
    if workers > 1 and (conn.dialect.name != "sqlite" or _has_uncommitted_writes(conn)):
        workers = 1

    if workers == 1:
        parts = [_user_cells(conn, scope, bounds)]
        histograms = [_histograms(conn, scope, bounds, len(days), arms)]
    else:
        engine = conn.engine
        with ThreadPoolExecutor(workers, thread_name_prefix="aggregate") as pool:
            # The users' parts first: they are the longer, so the health's parts fill in after them.
            user_parts = [
                pool.submit(_on_own_connection, engine, _user_cells, scope, bounds, users)
                for users in _user_ranges(conn, scope, workers)
            ]
            health_parts = [
                pool.submit(_on_own_connection, engine, _histograms, scope, bounds, len(days), arms, 0, rows)
                for rows in _rowid_ranges(conn, Impression, workers)
            ]
            parts = [f.result() for f in user_parts]
            histograms = [f.result() for f in health_parts]
    entries = _added(p.entries for p in parts)
    cells = _added(p.cells for p in parts)
    snapshots = _cumulate(days, arms, entries, _by_day(cells))
    novelty = _novelty(cells, entries, len(days), arms)
    health = _health_from(_merged(histograms), days, arms)
    return PhaseAggregate(days, snapshots, novelty, health, phase_health(health))


def default_workers(conn: Connection) -> int:
    """How many connections `aggregate_phase` spreads the first night over: one per core on a
    SQLite file (at most MAX_WORKERS); 1 for an in-memory SQLite (each connection would be
    another database) and on PostgreSQL."""
    database = conn.engine.url.database or ""
    if conn.dialect.name != "sqlite" or database in ("", ":memory:") or "mode=memory" in database:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


def _has_uncommitted_writes(conn: Connection) -> bool:
    """Whether the SQLite connection under `conn` is inside a transaction it began to write
    (sqlite3 begins one before the first INSERT/UPDATE/DELETE, not for reads)."""
    return bool(getattr(conn.connection.dbapi_connection, "in_transaction", False))


def _on_own_connection(engine: Engine, work: Callable[..., Any], *args: Any) -> Any:
    with engine.connect() as conn:
        return work(conn, *args)


UserRange = tuple[str | None, str | None]  # lo <= user_id < hi; None: unbounded


def _user_ranges(conn: Connection, scope: PhaseScope, n: int) -> list[UserRange]:
    """`n` ranges of user_id with about as many of the phase's exposed users each (fewer ranges
    if there are fewer users). Cut at quantiles read off the (phase_id, user_id) index."""
    exposed = Exposure.phase_id == scope.phase_id
    users = conn.execute(select(func.count()).select_from(Exposure).where(exposed)).scalar_one()
    query = select(Exposure.user_id).where(exposed).order_by(Exposure.user_id).limit(1)
    cuts = {conn.execute(query.offset(users * i // n)).scalar_one() for i in range(1, n) if users >= n}
    edges: list[str | None] = [None, *sorted(cuts), None]
    return list(zip(edges, edges[1:], strict=False))


def _in_range(column: ColumnElement, users: UserRange | None) -> list[ColumnElement[bool]]:
    lo, hi = users or (None, None)
    return ([column >= lo] if lo is not None else []) + ([column < hi] if hi is not None else [])


RowidRange = tuple[int, int]  # first <= rowid <= last


def _rowid_ranges(conn: Connection, table, n: int) -> list[RowidRange]:
    """`n` ranges of SQLite rowids that together cover `table`."""
    name = table.__table__.name
    first, last = conn.exec_driver_sql(f"SELECT min(rowid), max(rowid) FROM {name}").one()
    if first is None:
        return [(0, 0)]
    step = -(-(last - first + 1) // n)
    return [(lo, min(lo + step - 1, last)) for lo in range(first, last + 1, step)]


Sums = dict[tuple[Any, ...], dict[str, float]]


def _added(parts: Iterable[Sums]) -> Sums:
    """Key by key, field by field, the sum of the parts' sums."""
    out: Sums = defaultdict(lambda: defaultdict(float))
    for part in parts:
        for key, sums in part.items():
            for name, value in sums.items():
                out[key][name] += value
    return {key: dict(sums) for key, sums in out.items()}


@dataclass(frozen=True)
class UserCells:
    """The sums over one range of exposed users (see `_user_cells`)."""

    entries: Sums  # (arm, day of first exposure) -> n and the pre-period sums of the users entering
    cells: Sums  # (arm, day, day of first exposure) -> increments and the day's novelty sums


def _user_cells(
    conn: Connection, scope: PhaseScope, bounds: list[datetime], users: UserRange | None = None
) -> UserCells:
    """One pass over the events of the users exposed by the end of the last day (those in
    `users`, or all) into a temporary table of their per-(user, day) counts, and from it
    their entries and cells; the table is dropped before returning."""
    user_days = _user_days_table()
    user_days.drop(conn, checkfirst=True)
    user_days.create(conn)
    try:
        _fill_user_days(conn, scope, user_days, bounds, users)
        return UserCells(_entries(conn, scope, user_days, bounds, users), _cells(conn, user_days))
    finally:
        user_days.drop(conn)


@dataclass(frozen=True)
class DayAggregate:
    """The nightly increment: one day's cumulative snapshot, novelty view and serving health."""

    snapshot: dict[str, ArmStats]
    novelty: dict[int, dict[str, ArmStats]]
    health: dict[str, Health]


def aggregate_day(
    conn: Connection,
    experiment_id: int,
    phase_id: int,
    day: date,
    novelty_before: Mapping[int, Mapping[str, ArmStats]],
) -> DayAggregate:
    """What `aggregate_phase` gives for `day` alone, given the novelty view as of the day before.

    One pass over the log for the per-user totals (the cumulative snapshot needs each user's
    totals so far), plus the day's own events for the rest: a user's counts on day k since
    exposure all fall on one calendar day, so the novelty view only grows by that day's cells.
    Events logged after a night's run with an earlier `created_at` reach the snapshot of later
    days but not the earlier days' stored views; `aggregate_phase` recomputes everything.
    """
    scope = PhaseScope.load(conn, experiment_id, phase_id)
    if day < scope.first_day:
        raise ValueError(f"phase {phase_id} started on {scope.first_day}, after {day}")
    bounds = day_bounds(scope.first_day, day, scope.timezone)
    days = [scope.first_day + timedelta(days=i) for i in range(len(bounds) - 1)]
    last = len(days) - 1
    arms = _arms(conn, experiment_id)
    snapshot = _snapshot(conn, scope, bounds[-1], arms)

    cells = _day_cells(conn, scope, bounds, last)
    novelty: dict[int, dict[str, ArmStats]] = {}
    for k in range(len(days)):
        for arm in arms:
            # Users first exposed k or more days before `day` have reached their k-th day.
            n = sum(cell["n"] for (a, j), cell in cells.items() if a == arm and j >= k)
            if n == 0:
                continue
            before = novelty_before.get(k, {}).get(arm)
            sums = {
                f: (float(getattr(before, f)) if before else 0.0) + cells.get((arm, k), {}).get(f, 0.0)
                for f in NOVELTY_FIELDS[1:]
            }
            novelty.setdefault(k, {})[arm] = ArmStats(n=n, **sums)
    health = _health(conn, scope, bounds, days, arms, first=last)[day]
    return DayAggregate(snapshot, novelty, health)


def _snapshot(conn: Connection, scope: PhaseScope, until: datetime, arms: list[str]) -> dict[str, ArmStats]:
    """Each arm's cumulative sufficient statistics as of `until`: per user, then per arm, in SQL."""
    u = _materialized(user_rows_query(scope, plan_for(conn), until), "users")
    x, y = cast(u.c.clicks, Float), cast(u.c.impressions, Float)
    px, py = cast(u.c.pre_clicks, Float), cast(u.c.pre_impressions, Float)
    terms = {
        "n": func.count(),
        "sum_x": func.sum(x),
        "sum_y": func.sum(y),
        "sum_x2": func.sum(x * x),
        "sum_y2": func.sum(y * y),
        "sum_xy": func.sum(x * y),
        "sum_px": func.sum(px),
        "sum_py": func.sum(py),
        "sum_px2": func.sum(px * px),
        "sum_py2": func.sum(py * py),
        "sum_pxpy": func.sum(px * py),
        "sum_x_px": func.sum(x * px),
        "sum_x_py": func.sum(x * py),
        "sum_y_px": func.sum(y * px),
        "sum_y_py": func.sum(y * py),
    }
    query = select(u.c.arm, *[v.label(k) for k, v in terms.items()]).group_by(u.c.arm)
    found = {r.arm: ArmStats.from_sums(r._mapping) for r in conn.execute(query)}
    return {arm: found.get(arm, ArmStats(**dict.fromkeys(STAT_FIELDS, 0.0))) for arm in arms}


def _day_cells(
    conn: Connection, scope: PhaseScope, bounds: list[datetime], index: int
) -> dict[tuple[str, int], dict[str, float]]:
    """Per (arm, k): users exposed k days before day `index` (n), and sums over them of their
    counts on day `index`, which is day k since their exposure."""
    until = bounds[index + 1]
    post_i, _ = _periods(scope, Impression, until)
    post_c, _ = _periods(scope, Click, until)
    counts = {
        "x": (Click, and_(post_c, Click.created_at >= bounds[index])),
        "y": (Impression, and_(post_i, Impression.created_at >= bounds[index])),
    }
    u = _materialized(_per_user(scope, until, plan_for(conn), counts), "users").c
    x, y = cast(u.x, Float), cast(u.y, Float)
    k = (literal(index) - _day_index(u.first_seen_at, bounds)).label("k")
    rows = conn.execute(
        select(
            u.arm_name,
            k,
            cast(func.count(), Float).label("n"),
            func.sum(x).label("sum_x"),
            func.sum(y).label("sum_y"),
            func.sum(x * x).label("sum_x2"),
            func.sum(y * y).label("sum_y2"),
            func.sum(x * y).label("sum_xy"),
        ).group_by(u.arm_name, k)
    )
    return {(r.arm_name, r.k): {f: float(getattr(r, f)) for f in NOVELTY_FIELDS} for r in rows}


def _exposure_counts(
    conn: Connection, scope: PhaseScope, bounds: list[datetime], users: UserRange | None = None
) -> dict[tuple[str, int], float]:
    """Users first exposed per (arm, day index) (those in `users`, or all)."""
    first_day = _day_index(Exposure.first_seen_at, bounds)
    rows = conn.execute(
        select(Exposure.arm_name, first_day.label("first_day"), func.count().label("n"))
        .where(_exposed(scope, bounds[-1]), *_in_range(Exposure.user_id, users))
        .group_by(Exposure.arm_name, first_day)
    )
    return {(r.arm_name, r.first_day): float(r.n) for r in rows}


def _arms(conn: Connection, experiment_id: int) -> list[str]:
    query = select(Arm.name).where(Arm.experiment_id == experiment_id).order_by(Arm.position)
    return list(conn.execute(query).scalars())


def _fill_user_days(
    conn: Connection,
    scope: PhaseScope,
    user_days: Table,
    bounds: list[datetime],
    users: UserRange | None = None,
) -> None:
    """The one pass over the log: counts per (exposed user, local day), plus one pre-period row
    (for the users in `users`, or all).

    Impressions and clicks are joined with the exposures each, and their rows grouped at once:
    on SQLite one sort of the events, where grouping each table first and then their union
    sorted the user-days a second time (measured -15 to -25 % CPU for this statement at 1M).
    """
    until = bounds[-1]

    def events(table, is_click: bool):
        post, pre = _periods(scope, table, until)
        day = case((pre, PRE_DAY), else_=_day_index(table.created_at, bounds))
        return (
            _joined(scope, table, until)
            .add_columns(
                table.user_id.label("user_id"),
                Exposure.arm_name.label("arm_name"),
                Exposure.first_seen_at.label("first_seen_at"),
                day.label("day"),
                literal(int(is_click)).label("is_click"),
            )
            .where(or_(post, pre), *_in_range(table.user_id, users), *_in_range(Exposure.user_id, users))
        )

    p = union_all(events(Impression, False), events(Click, True)).subquery().c
    first_day = _day_index(func.min(p.first_seen_at), bounds)
    clicks = func.sum(p.is_click)
    rows = select(p.user_id, func.min(p.arm_name), first_day, p.day, clicks, func.count() - clicks)
    rows = rows.group_by(p.user_id, p.day)
    postgres = conn.dialect.name == "postgresql"
    if postgres:
        # With the default 4 MB the hash aggregate over the whole log spills to disk in batches.
        # Only for this statement: the later window sort measured slower with more memory.
        conn.exec_driver_sql(f"SET LOCAL work_mem = '{PG_WORK_MEM}'")
    conn.execute(user_days.insert().from_select(["user_id", "arm_name", "first_day", "day", "x", "y"], rows))
    if postgres:
        conn.exec_driver_sql("SET LOCAL work_mem TO DEFAULT")


def _entries(
    conn: Connection,
    scope: PhaseScope,
    user_days: Table,
    bounds: list[datetime],
    users: UserRange | None = None,
) -> Sums:
    """Per (arm, day of first exposure): users entering and the sums of their pre-period terms."""
    out: Sums = defaultdict(lambda: defaultdict(float))
    for key, n in _exposure_counts(conn, scope, bounds, users).items():
        out[key]["n"] = n
    u = user_days.c
    pre = conn.execute(
        select(
            u.arm_name,
            u.first_day,
            func.sum(u.x).label("sum_px"),
            func.sum(u.y).label("sum_py"),
            func.sum(u.x * u.x).label("sum_px2"),
            func.sum(u.y * u.y).label("sum_py2"),
            func.sum(u.x * u.y).label("sum_pxpy"),
        )
        .where(u.day == PRE_DAY)
        .group_by(u.arm_name, u.first_day)
    )
    for r in pre:
        out[(r.arm_name, r.first_day)].update(
            {k: float(getattr(r, k)) for k in ("sum_px", "sum_py", "sum_px2", "sum_py2", "sum_pxpy")}
        )
    return {key: dict(sums) for key, sums in out.items()}


INCREMENT_FIELDS = (
    "sum_x",
    "sum_y",
    "sum_x2",
    "sum_y2",
    "sum_xy",
    "sum_x_px",
    "sum_x_py",
    "sum_y_px",
    "sum_y_py",
)
# The novelty view's sums of a user's counts on one day, besides sum_x and sum_y.
DAY_SQUARE_FIELDS = {"day_x2": "sum_x2", "day_y2": "sum_y2", "day_xy": "sum_xy"}


def _cells(conn: Connection, user_days: Table) -> Sums:
    """Per (arm, day, day of first exposure): how much each sum over users grows that day, and
    the sums of the users' counts of that day and their squares (the novelty view, whose k is
    day - first day). One scan and one sort of the user-days for both.

    With X, Y a user's totals after the day and x, y the day's counts, X² grows by 2Xx - x²,
    Y² by 2Yy - y², XY by Xy + xY - xy; the pre-period cross terms by x px, x py, y px, y py.
    """
    u = user_days.c
    in_period = u.day >= 0
    # One window for all four sums (one sort): the pre-period row (day -1) comes first, so the
    # running pre-period sums are the user's full pre-period on every later row.
    running = {"partition_by": u.user_id, "order_by": u.day, "rows": (None, 0)}
    per_row = (
        select(
            u.arm_name,
            u.day,
            u.first_day,
            u.x,
            u.y,
            func.sum(case((in_period, u.x), else_=0)).over(**running).label("cx"),
            func.sum(case((in_period, u.y), else_=0)).over(**running).label("cy"),
            func.sum(case((in_period, 0), else_=u.x)).over(**running).label("px"),
            func.sum(case((in_period, 0), else_=u.y)).over(**running).label("py"),
        )
    ).subquery()
    r = per_row.c
    x, y = cast(r.x, Float), cast(r.y, Float)
    cx, cy = cast(r.cx, Float), cast(r.cy, Float)
    px, py = cast(r.px, Float), cast(r.py, Float)
    query = (
        select(
            r.arm_name,
            r.day,
            r.first_day,
            func.sum(x).label("sum_x"),
            func.sum(y).label("sum_y"),
            func.sum(2 * cx * x - x * x).label("sum_x2"),
            func.sum(2 * cy * y - y * y).label("sum_y2"),
            func.sum(cx * y + x * cy - x * y).label("sum_xy"),
            func.sum(x * px).label("sum_x_px"),
            func.sum(x * py).label("sum_x_py"),
            func.sum(y * px).label("sum_y_px"),
            func.sum(y * py).label("sum_y_py"),
            func.sum(x * x).label("day_x2"),
            func.sum(y * y).label("day_y2"),
            func.sum(x * y).label("day_xy"),
        )
        .where(r.day >= 0)
        .group_by(r.arm_name, r.day, r.first_day)
    )
    return {
        (row.arm_name, row.day, row.first_day): {
            k: float(v) for k, v in row._mapping.items() if k not in ("arm_name", "day", "first_day")
        }
        for row in conn.execute(query)
    }


def _by_day(cells: Sums) -> Sums:
    """The cells' increments per (arm, day), over the days of first exposure."""
    return _added(
        {(arm, day): {f: sums[f] for f in INCREMENT_FIELDS}} for (arm, day, _), sums in cells.items()
    )


def _cumulate(
    days: list[date],
    arms: list[str],
    entries: Sums,
    increments: Sums,
) -> dict[date, dict[str, ArmStats]]:
    """Add up the daily increments into the cumulative statistics of every day and arm."""
    snapshots: dict[date, dict[str, ArmStats]] = {d: {} for d in days}
    for arm in arms:
        running = dict.fromkeys(STAT_FIELDS, 0.0)
        for i, day in enumerate(days):
            for sums in (entries.get((arm, i), {}), increments.get((arm, i), {})):
                for name, value in sums.items():
                    running[name] += value
            snapshots[day][arm] = ArmStats(**running)
    return snapshots


def _novelty(cells: Sums, entries: Sums, n_days: int, arms: list[str]) -> dict[int, dict[str, ArmStats]]:
    """Per k = days since first exposure: sums over the arm's users of their day-k counts.

    Every user whose k-th day has begun by the end of the last day counts (with zeros if idle).
    """
    renamed = {"sum_x": "sum_x", "sum_y": "sum_y", **DAY_SQUARE_FIELDS}
    sums = _added(
        {(arm, day - first): {to: values[of] for of, to in renamed.items()}}
        for (arm, day, first), values in cells.items()
    )
    out: dict[int, dict[str, ArmStats]] = {}
    for days_since in range(n_days):
        for arm in arms:
            # Users first exposed on day i have reached day k when i + k <= the last day.
            n = sum(entries.get((arm, i), {}).get("n", 0.0) for i in range(n_days - days_since))
            if n == 0:
                continue
            r = sums.get((arm, days_since), {})
            values = {f: r.get(f, 0.0) for f in NOVELTY_FIELDS[1:]}
            out.setdefault(days_since, {})[arm] = ArmStats(n=n, **values)
    return out


# (arm, day index) -> [(latency bucket, impressions, fallbacks)]
Histograms = dict[tuple[str, int], list[tuple[int, int, int]]]


def _health(
    conn: Connection,
    scope: PhaseScope,
    bounds: list[datetime],
    days: list[date],
    arms: list[str],
    first: int = 0,
) -> dict[date, dict[str, Health]]:
    """Daily serving health per arm from day index `first` on (see `_histograms`)."""
    return _health_from(_histograms(conn, scope, bounds, len(days), arms, first), days, arms, first)


def _histograms(
    conn: Connection,
    scope: PhaseScope,
    bounds: list[datetime],
    n_days: int,
    arms: list[str],
    first: int = 0,
    rows: RowidRange | None = None,
) -> Histograms:
    """Latency histograms per arm and day from day index `first` on, built in SQL (of the
    impressions with a rowid in `rows`, on SQLite, or all).

    All impressions served in the phase count (pinned users and paused serving included): this
    is about the serving path, not the analysis. Percentiles come from 0.1 ms buckets.
    """
    day = _day_index(Impression.created_at, bounds)
    # round() first: CAST truncates on SQLite but rounds on PostgreSQL.
    bucket = cast(func.round(Impression.latency_ms / LATENCY_RESOLUTION_MS), Integer)
    # Grouped by one integer (arm, day, bucket) rather than three columns: SQLite groups by
    # sorting every impression, and sorts an integer key faster (measured -20 % at 1M).
    # Impressions of arms no longer configured get a NULL key and are left out.
    arm_index = case({arm: i for i, arm in enumerate(arms)}, value=Impression.arm_name, else_=None)
    key = (cast(arm_index * n_days + day, BigInteger) * LATENCY_BUCKETS + bucket).label("key")
    fallback = func.sum(case((Impression.fallback, 1), else_=0)).label("fallbacks")
    rowid = literal_column("impressions.rowid")
    result = conn.execute(
        select(key, func.count().label("n"), fallback)
        .where(
            Impression.experiment_id == scope.experiment_id,
            Impression.phase_id == scope.phase_id,
            Impression.created_at >= bounds[first],
            Impression.created_at < bounds[-1],
            *([rowid.between(*rows)] if rows else []),
        )
        .group_by(key)
    )
    histograms: Histograms = defaultdict(list)
    for r in result:
        if r.key is not None:
            cell, bucket_no = divmod(r.key, LATENCY_BUCKETS)
            arm_no, day_no = divmod(cell, n_days)
            histograms[(arms[arm_no], day_no)].append((bucket_no, r.n, r.fallbacks))
    return dict(histograms)


def _merged(parts: Iterable[Histograms]) -> Histograms:
    """The histograms of disjoint sets of impressions, as one (`_health_of` adds up a bucket's rows)."""
    out: Histograms = defaultdict(list)
    for part in parts:
        for key, rows in part.items():
            out[key].extend(rows)
    return dict(out)


def _health_from(
    histograms: Histograms, days: list[date], arms: list[str], first: int = 0
) -> dict[date, dict[str, Health]]:
    return {
        d: {arm: _health_of(histograms.get((arm, i), [])) for arm in arms}
        for i, d in enumerate(days)
        if i >= first
    }


def phase_health(daily: Mapping[date, Mapping[str, Health]]) -> dict[str, Health]:
    """Serving health of a phase so far: summed counts, and the worst day's p50 and p99.

    The worst daily percentile, rather than one over the whole phase, so that the nightly run
    only reads the day's impressions, and a bad day is not averaged away by good ones.
    """
    out: dict[str, Health] = {}
    for health in daily.values():
        for arm, h in health.items():
            prev = out.get(arm, Health(0, 0, None, None))
            out[arm] = Health(
                prev.impressions + h.impressions,
                prev.fallbacks + h.fallbacks,
                _worst(prev.latency_p50_ms, h.latency_p50_ms),
                _worst(prev.latency_p99_ms, h.latency_p99_ms),
            )
    return out


def _worst(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def _health_of(histogram: list[tuple[int, int, int]]) -> Health:
    """Health from (latency bucket, impressions, fallbacks) rows; percentiles by nearest rank."""
    counts: dict[int, int] = defaultdict(int)
    fallbacks = 0
    for bucket, n, f in histogram:
        counts[bucket] += n
        fallbacks += f
    total = sum(counts.values())
    if total == 0:
        return Health(0, 0, None, None)
    ordered = sorted(counts.items())
    cumulative = list(accumulate(n for _, n in ordered))

    def percentile(q: float) -> float:
        rank = max(1, math.ceil(q * total - 1e-9))
        index = next(i for i, c in enumerate(cumulative) if c >= rank)
        return ordered[index][0] * LATENCY_RESOLUTION_MS

    return Health(total, fallbacks, percentile(0.5), percentile(0.99))
