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
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from abrec.experiments import metrics
from abrec.experiments.schema import Click, Exposure, Impression
from sqlalchemy import Connection, Engine, insert
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

log = logging.getLogger("abrec.eventlog")


class LogUnavailable(RuntimeError):
    """The rows could not be committed (database unreachable, writer stopped, or too slow)."""


class RowsRejected(RuntimeError):
    """The database refused this request's rows (a constraint): nothing of them was written."""


@dataclass
class Outcome:
    """What happened to one request's rows: `duplicate_clicks[i]` for its i-th click."""

    duplicate_clicks: list[bool] = field(default_factory=list)


@dataclass
class _Pending:
    impressions: Sequence[dict[str, Any]]
    exposures: Sequence[dict[str, Any]]
    clicks: Sequence[dict[str, Any]]
    future: Future

    @property
    def rows(self) -> int:
        return len(self.impressions) + len(self.exposures) + len(self.clicks)


def _dialect_insert(engine: Engine, table):
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif engine.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:  # pragma: no cover - the platform supports these two
        raise ValueError(f"the event log supports SQLite and PostgreSQL, not {engine.dialect.name}")
    return dialect_insert(table)


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
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._down_until = 0.0  # monotonic time before which batches fail without trying
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.batches = 0  # committed transactions, for tests and /readyz
        # The writer's own connection, kept between batches: checking one out of the pool and back
        # for every batch cost more CPU than the inserts of a small batch. Dropped after any error.
        self._conn: Connection | None = None
        self._insert_exposure = _dialect_insert(engine, Exposure.__table__).on_conflict_do_nothing(
            index_elements=["phase_id", "user_id"]
        )
        self._insert_impression = insert(Impression.__table__)
        clicks = Click.__table__
        self._insert_click = (
            _dialect_insert(engine, clicks)
            .on_conflict_do_nothing(index_elements=["impression_id", "item_id"])
            .returning(clicks.c.impression_id, clicks.c.item_id)
        )

    # ------------------------------------------------------------------ requests' side

    def start(self) -> EventLog:
        self._thread = threading.Thread(target=self._run, name="eventlog-writer", daemon=True)
        self._thread.start()
        return self

    def submit(
        self, *, impressions: Sequence[dict] = (), exposures: Sequence[dict] = (), clicks: Sequence[dict] = ()
    ) -> Future:
        future: Future = Future()
        if self._stopped.is_set():
            future.set_exception(LogUnavailable("the event log is stopped"))
            return future
        self._queue.put(_Pending(impressions, exposures, clicks, future))
        metrics.QUEUE_DEPTH.inc()
        return future

    def write(
        self,
        *,
        impressions: Sequence[dict] = (),
        exposures: Sequence[dict] = (),
        clicks: Sequence[dict] = (),
        timeout_s: float = 5.0,
    ) -> Outcome:
        """Commit the rows and return once they are durable; LogUnavailable or RowsRejected if not."""
        future = self.submit(impressions=impressions, exposures=exposures, clicks=clicks)
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout:
            if future.cancel():  # not picked up yet: it will never be written
                raise LogUnavailable(f"the event log did not commit within {timeout_s:g} s") from None
        except CancelledError:
            raise LogUnavailable("the event log was stopped") from None
        # Already inside a transaction: its outcome decides, so wait for it (bounded once more).
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout:
            raise LogUnavailable(f"the event log did not commit within {2 * timeout_s:g} s") from None

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
        """Block for the first request, then gather more for up to max_wait_s. (batch, stop?)"""
        first = self._queue.get()
        if first is None:
            return self._drain(), True
        batch, rows = [first], first.rows
        deadline = time.monotonic() + self.max_wait_s
        while rows < self.max_rows:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
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
            # A request that gave up waiting (cancelled its future) is dropped, never written.
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if live:
                try:
                    self._commit_batch(live)
                except Exception as exc:  # the writer must survive anything; requests get the error
                    log.exception("event log writer failed")
                    for p in live:
                        if not p.future.done():
                            p.future.set_exception(LogUnavailable(f"event log writer failed: {exc}"))
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
        except IntegrityError:
            # Some request's rows break a constraint: isolate it, commit the others.
            metrics.COMMITS.labels("rejected").inc()
            for p in batch:
                self._commit_one(p)
            return
        except DBAPIError as exc:
            if not _is_disconnect(exc):
                metrics.COMMITS.labels("rejected").inc()
                for p in batch:
                    self._commit_one(p)
                return
            self._database_down(batch, exc)
            return
        except SQLAlchemyError as exc:
            self._database_down(batch, exc)
            return
        self._release(batch, outcomes)

    def _commit_one(self, p: _Pending) -> None:
        try:
            outcomes = self._write([p])
        except DBAPIError as exc:
            if _is_disconnect(exc):
                self._database_down([p], exc)
            else:
                log.warning("event log refused a request's rows: %s", exc.orig)
                p.future.set_exception(RowsRejected(str(exc.orig)))
            return
        self._release([p], outcomes)

    def _database_down(self, batch: list[_Pending], exc: Exception) -> None:
        metrics.COMMITS.labels("failed").inc()
        self._down_until = time.monotonic() + self.retry_after_s
        log.warning("event log: database unavailable (%s); %d request(s) unlogged", _short(exc), len(batch))
        self._fail(batch, LogUnavailable(f"database unavailable: {_short(exc)}"))

    @staticmethod
    def _fail(batch: list[_Pending], exc: Exception) -> None:
        for p in batch:
            p.future.set_exception(exc)

    def _release(self, batch: list[_Pending], outcomes: list[Outcome]) -> None:
        self.batches += 1
        metrics.COMMITS.labels("ok").inc()
        metrics.BATCH_ROWS.observe(sum(p.rows for p in batch))
        for p, outcome in zip(batch, outcomes, strict=True):
            p.future.set_result(outcome)

    def _write(self, batch: list[_Pending]) -> list[Outcome]:
        """One transaction for the whole batch; per request, which of its clicks were duplicates."""
        exposures = _unique([row for p in batch for row in p.exposures], ("phase_id", "user_id"))
        impressions = [row for p in batch for row in p.impressions]
        clicks = [row for p in batch for row in p.clicks]
        # The first of several identical clicks in one batch is the one that may be new.
        first_clicks = _unique(clicks, ("impression_id", "item_id"))
        inserted: set[tuple[str, str]] = set()
        if self._conn is None:
            self._conn = self.engine.connect()
        conn = self._conn
        try:
            with conn.begin():
                if exposures:
                    conn.execute(self._insert_exposure, exposures)
                if impressions:
                    conn.execute(self._insert_impression, impressions)
                if first_clicks:
                    inserted = {(r[0], r[1]) for r in conn.execute(self._insert_click, first_clicks)}
        except BaseException:
            self._conn = None  # rolled back; a fresh connection next time (the old one may be dead)
            conn.close()
            raise
        outcomes = []
        for p in batch:
            dups = []
            for row in p.clicks:
                key = (row["impression_id"], row["item_id"])
                dups.append(key not in inserted)
                inserted.discard(key)  # a second identical click in the batch is a duplicate
            outcomes.append(Outcome(dups))
        return outcomes


def _unique(rows: list[dict[str, Any]], key: tuple[str, ...]) -> list[dict[str, Any]]:
    seen: set[tuple] = set()
    out = []
    for row in rows:
        k = tuple(row[c] for c in key)
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
