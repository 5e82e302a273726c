"""The durable event log: one writer thread per process, group commit of impressions, exposures, clicks.

Request threads hand their rows to `EventLog.write` and block. The writer takes everything queued
(waiting up to `max_wait_s` for more, at most `max_rows` rows), writes it in ONE transaction with
one executemany INSERT per table, commits, and then releases every waiting request together. So a
request returns only after its rows are durable (SQLite: WAL + synchronous=FULL), and the cost of
a commit (an fsync) is shared by all the requests of a batch instead of paid by each.

A request's rows go into one transaction, so it is logged whole or not at all: never a partial row.
Exposures are insert-if-absent (`ON CONFLICT (phase_id, user_id) DO NOTHING`) and so are clicks
(`ON CONFLICT (impression_id, item_id) DO NOTHING ... RETURNING`, which tells a duplicate apart);
both are safe under any number of processes on SQLite and PostgreSQL.

The writer is the one serial step of every request, so its transaction is lean: SQLAlchemy opens
and commits it (its events and pool still apply), but the INSERTs go straight to the driver's
cursor as fixed SQL over rows that the request threads already turned into the driver's values
(on SQLite about half the writer CPU of compiled Core statements for a batch of 1-4 requests).
The values are those SQLAlchemy's column types would bind: UTC datetimes (on SQLite the naive
text SQLAlchemy stores), JSON text, booleans.

Failure handling: if the database is unreachable the batch fails, its requests get `LogUnavailable`
at once, and for `retry_after_s` further batches fail without touching the database; then the next
batch tries again, so the log recovers by itself when the database returns. If one request's rows
are refused (a constraint), the batch is retried request by request so only that one fails.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from abrec.experiments import metrics
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

log = logging.getLogger("abrec.eventlog")

EXPOSURE_COLUMNS = ("experiment_id", "phase_id", "user_id", "arm_name", "first_seen_at")
IMPRESSION_COLUMNS = (
    "id",
    "experiment_id",
    "phase_id",
    "user_id",
    "session_id",
    "arm_name",
    "model_version",
    "items",
    "fallback",
    "latency_ms",
    "in_analysis",
    "created_at",
)
CLICK_COLUMNS = (
    "impression_id",
    "experiment_id",
    "phase_id",
    "user_id",
    "arm_name",
    "item_id",
    "position",
    "in_analysis",
    "created_at",
)
_CLICK_CHUNK = 100  # rows per multi-row click INSERT (9 parameters each: far below SQLite's limit)


class LogUnavailable(RuntimeError):
    """The rows could not be committed (database unreachable, writer stopped, or too slow)."""


class RowsRejected(RuntimeError):
    """The database refused this request's rows (a constraint): nothing of them was written."""


@dataclass
class Outcome:
    """What happened to one request's rows: `duplicate_clicks[i]` for its i-th click."""

    duplicate_clicks: list[bool] = field(default_factory=list)


_QUEUED, _RUNNING, _CANCELLED = 0, 1, 2


class _Pending:
    """One request's rows (as driver values) and the lock its thread sleeps on until the writer is done.

    A bare lock is the cheapest wake-up CPython has (a Future builds a Condition and an RLock)."""

    __slots__ = ("impressions", "exposures", "clicks", "rows", "state", "done", "outcome", "error")

    def __init__(self, impressions: list[tuple], exposures: list[tuple], clicks: list[tuple]) -> None:
        self.impressions, self.exposures, self.clicks = impressions, exposures, clicks
        self.rows = len(impressions) + len(exposures) + len(clicks)
        self.state = _QUEUED
        self.done = threading.Lock()
        self.done.acquire()
        self.outcome: Outcome | None = None
        self.error: Exception | None = None

    def finish(self, outcome: Outcome | None = None, error: Exception | None = None) -> None:
        self.outcome, self.error = outcome, error
        self.done.release()


class _Sql:
    """The event log's statements and value conversions for one dialect (SQLite or PostgreSQL)."""

    def __init__(self, dialect: str) -> None:
        if dialect not in ("sqlite", "postgresql"):  # pragma: no cover - the platform supports these two
            raise ValueError(f"the event log supports SQLite and PostgreSQL, not {dialect}")
        self.sqlite = dialect == "sqlite"
        mark = "?" if self.sqlite else "%s"
        json_mark = mark if self.sqlite else "%s::json"

        def values(columns: Sequence[str]) -> str:
            return "(" + ", ".join(json_mark if c == "items" else mark for c in columns) + ")"

        self.exposure = (
            f"INSERT INTO exposures ({', '.join(EXPOSURE_COLUMNS)}) VALUES {values(EXPOSURE_COLUMNS)} "
            "ON CONFLICT (phase_id, user_id) DO NOTHING"
        )
        self.impression = (
            f"INSERT INTO impressions ({', '.join(IMPRESSION_COLUMNS)}) VALUES {values(IMPRESSION_COLUMNS)}"
        )
        self._click_head = f"INSERT INTO clicks ({', '.join(CLICK_COLUMNS)}) VALUES "
        self._click_values = values(CLICK_COLUMNS)
        self._click_tail = " ON CONFLICT (impression_id, item_id) DO NOTHING RETURNING impression_id, item_id"
        self._click_sql: dict[int, str] = {}

    def clicks(self, n: int) -> str:
        sql = self._click_sql.get(n)
        if sql is None:
            sql = self._click_head + ", ".join([self._click_values] * n) + self._click_tail
            self._click_sql[n] = sql
        return sql

    def when(self, value: datetime) -> Any:
        # What UTCDateTime binds: aware UTC for PostgreSQL; for SQLite the naive UTC text SQLAlchemy writes.
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None).isoformat(" ", "microseconds") if self.sqlite else value

    def exposure_row(self, r: dict[str, Any]) -> tuple:
        return (r["experiment_id"], r["phase_id"], r["user_id"], r["arm_name"], self.when(r["first_seen_at"]))

    def impression_row(self, r: dict[str, Any]) -> tuple:
        return (
            r["id"],
            r["experiment_id"],
            r["phase_id"],
            r["user_id"],
            r["session_id"],
            r["arm_name"],
            r["model_version"],
            orjson.dumps(r["items"]).decode(),
            bool(r["fallback"]),
            float(r["latency_ms"]),
            bool(r["in_analysis"]),
            self.when(r["created_at"]),
        )

    def click_row(self, r: dict[str, Any]) -> tuple:
        return (
            r["impression_id"],
            r["experiment_id"],
            r["phase_id"],
            r["user_id"],
            r["arm_name"],
            r["item_id"],
            r["position"],
            bool(r["in_analysis"]),
            self.when(r["created_at"]),
        )


class EventLog:
    def __init__(
        self, engine: Engine, *, max_rows: int = 500, max_wait_s: float = 0.002, retry_after_s: float = 0.5
    ) -> None:
        if max_rows < 1 or max_wait_s < 0:
            raise ValueError("max_rows must be >= 1 and max_wait_s >= 0")
        self.engine = engine
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self.retry_after_s = retry_after_s
        self._sql = _Sql(engine.dialect.name)
        self._dbapi = engine.dialect.dbapi
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._down_until = 0.0  # monotonic time before which batches fail without trying
        self._stopped = threading.Event()
        self._state_lock = threading.Lock()  # a request giving up races the writer taking it
        self._thread: threading.Thread | None = None
        self.batches = 0  # committed transactions, for tests and /readyz
        # The writer's own connection, kept between batches: checking one out of the pool and back
        # for every batch cost more CPU than the inserts of a small batch. Dropped after any error.
        self._conn: Connection | None = None

    # ------------------------------------------------------------------ requests' side

    def start(self) -> EventLog:
        self._thread = threading.Thread(target=self._run, name="eventlog-writer", daemon=True)
        self._thread.start()
        return self

    def write(
        self,
        *,
        impressions: Sequence[dict] = (),
        exposures: Sequence[dict] = (),
        clicks: Sequence[dict] = (),
        timeout_s: float = 5.0,
    ) -> Outcome:
        """Commit the rows and return once they are durable; LogUnavailable or RowsRejected if not."""
        sql = self._sql
        p = _Pending(
            [sql.impression_row(r) for r in impressions],
            [sql.exposure_row(r) for r in exposures],
            [sql.click_row(r) for r in clicks],
        )
        if self._stopped.is_set():
            raise LogUnavailable("the event log is stopped")
        self._queue.put(p)
        metrics.QUEUE_DEPTH.inc()
        if not p.done.acquire(timeout=timeout_s):
            with self._state_lock:
                cancelled = p.state == _QUEUED
                if cancelled:
                    p.state = _CANCELLED  # the writer will drop it: it is never written
            if cancelled:
                raise LogUnavailable(f"the event log did not commit within {timeout_s:g} s")
            # Already inside a transaction: its outcome decides, so wait for it (bounded once more).
            if not p.done.acquire(timeout=timeout_s):
                raise LogUnavailable(f"the event log did not commit within {2 * timeout_s:g} s")
        if p.error is not None:
            raise p.error
        assert p.outcome is not None
        return p.outcome

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def close(self, timeout_s: float = 5.0) -> None:
        """Commit what is queued, then stop the writer."""
        self._stopped.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)

    # ------------------------------------------------------------------ the writer

    def _take_batch(self) -> tuple[list[_Pending], bool]:
        """Block for the first request, let more arrive for max_wait_s, take what came. (batch, stop?)

        The writer sleeps through the window instead of waiting on the queue, so a request that
        arrives meanwhile wakes nobody: one wake-up per batch, not one per request."""
        first = self._queue.get()
        if first is None:
            return self._drain(), True
        if self.max_wait_s > 0:
            time.sleep(self.max_wait_s)
        batch, rows = [first], first.rows
        while rows < self.max_rows:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                batch.extend(self._drain())
                return batch, True
            batch.append(item)
            rows += item.rows
        return batch, False

    def _drain(self) -> list[_Pending]:
        out = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return out
            if item is not None:
                out.append(item)

    def _run(self) -> None:
        while True:
            batch, stop = self._take_batch()
            metrics.QUEUE_DEPTH.dec(len(batch))
            # A request that gave up waiting (cancelled) is dropped, never written.
            with self._state_lock:
                live = [p for p in batch if p.state == _QUEUED]
                for p in live:
                    p.state = _RUNNING
            if live:
                try:
                    self._commit_batch(live)
                except Exception as exc:  # the writer must survive anything; requests get the error
                    log.exception("event log writer failed")
                    for p in live:
                        if p.outcome is None and p.error is None:
                            p.finish(error=LogUnavailable(f"event log writer failed: {exc}"))
            if stop:
                if self._conn is not None:
                    self._conn.close()
                return

    def _commit_batch(self, batch: list[_Pending]) -> None:
        if time.monotonic() < self._down_until:
            self._fail(batch, LogUnavailable("the database is unreachable (retrying shortly)"))
            return
        try:
            outcomes = self._write(batch)
        except Exception as exc:
            kind = self._classify(exc)
            if kind == "down":
                self._database_down(batch, exc)
                return
            # Some request's rows break a constraint: isolate it, commit the others.
            metrics.COMMITS.labels("rejected").inc()
            for p in batch:
                self._commit_one(p)
            return
        self._release(batch, outcomes)

    def _commit_one(self, p: _Pending) -> None:
        try:
            outcomes = self._write([p])
        except Exception as exc:
            if self._classify(exc) == "down":
                self._database_down([p], exc)
            else:
                orig = getattr(exc, "orig", None) or exc
                log.warning("event log refused a request's rows: %s", orig)
                p.finish(error=RowsRejected(str(orig)))
            return
        self._release([p], outcomes)

    def _classify(self, exc: Exception) -> str:
        """ "rejected" (the rows: a constraint, bad data) or "down" (the database); re-raise anything else.

        Errors of the INSERTs come from the driver itself; those of connecting, BEGIN and COMMIT
        come wrapped by SQLAlchemy."""
        dbapi = self._dbapi
        if isinstance(exc, DBAPIError):
            if isinstance(exc.orig, dbapi.IntegrityError):
                return "rejected"
            return "down" if _is_disconnect(exc) else "rejected"
        if isinstance(exc, SQLAlchemyError):
            return "down"
        if isinstance(exc, dbapi.IntegrityError):
            return "rejected"
        if isinstance(exc, dbapi.OperationalError | dbapi.InterfaceError):
            return "down"
        if isinstance(exc, dbapi.Error):
            return "rejected"
        raise exc

    def _database_down(self, batch: list[_Pending], exc: Exception) -> None:
        metrics.COMMITS.labels("failed").inc()
        self._down_until = time.monotonic() + self.retry_after_s
        log.warning("event log: database unavailable (%s); %d request(s) unlogged", _short(exc), len(batch))
        self._fail(batch, LogUnavailable(f"database unavailable: {_short(exc)}"))

    @staticmethod
    def _fail(batch: list[_Pending], exc: Exception) -> None:
        for p in batch:
            p.finish(error=exc)

    def _release(self, batch: list[_Pending], outcomes: list[Outcome]) -> None:
        self.batches += 1
        metrics.COMMITS.labels("ok").inc()
        metrics.BATCH_ROWS.observe(sum(p.rows for p in batch))
        for p, outcome in zip(batch, outcomes, strict=True):
            p.finish(outcome)

    def _write(self, batch: list[_Pending]) -> list[Outcome]:
        """One transaction for the whole batch; per request, which of its clicks were duplicates."""
        # Key columns: exposures (phase_id, user_id) = 1, 2; clicks (impression_id, item_id) = 0, 5.
        exposures = _unique([row for p in batch for row in p.exposures], 1, 2)
        impressions = [row for p in batch for row in p.impressions]
        # The first of several identical clicks in one batch is the one that may be new.
        first_clicks = _unique([row for p in batch for row in p.clicks], 0, 5)
        inserted: set[tuple[str, str]] = set()
        if self._conn is None:
            self._conn = self.engine.connect()
        conn = self._conn
        try:
            with conn.begin():
                cursor = conn.connection.cursor()
                try:
                    if exposures:
                        cursor.executemany(self._sql.exposure, exposures)
                    if impressions:
                        cursor.executemany(self._sql.impression, impressions)
                    for i in range(0, len(first_clicks), _CLICK_CHUNK):
                        chunk = first_clicks[i : i + _CLICK_CHUNK]
                        cursor.execute(self._sql.clicks(len(chunk)), [v for row in chunk for v in row])
                        inserted.update((r[0], r[1]) for r in cursor.fetchall())
                finally:
                    cursor.close()
        except BaseException:
            self._conn = None  # rolled back; a fresh connection next time (the old one may be dead)
            try:
                conn.invalidate()  # never hand a connection that failed mid-transaction back to the pool
            except Exception:  # noqa: BLE001 - it is being thrown away either way
                pass
            raise
        outcomes = []
        for p in batch:
            dups = []
            for row in p.clicks:
                key = (row[0], row[5])
                dups.append(key not in inserted)
                inserted.discard(key)  # a second identical click in the batch is a duplicate
            outcomes.append(Outcome(dups))
        return outcomes


def _unique(rows: list[tuple], a: int, b: int) -> list[tuple]:
    seen: set[tuple] = set()
    out = []
    for row in rows:
        k = (row[a], row[b])
        if k not in seen:
            seen.add(k)
            out.append(row)
    return out


def _is_disconnect(exc: DBAPIError) -> bool:
    from sqlalchemy.exc import InterfaceError, OperationalError

    return exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)


def _short(exc: Exception) -> str:
    orig = getattr(exc, "orig", None) or exc
    return str(orig).strip().splitlines()[0][:200] if str(orig).strip() else type(orig).__name__
