"""What one API process holds between requests: caches of experiment definitions, fallback items
and recent impressions, the event log, the model client and the signer.

The hot path never reads experiment definitions from the database: `SnapshotCache` keeps each
experiment's `ExperimentSnapshot` for `ttl_s` and lets one request refresh it while the others go on
with the old one. If the database is down, the last snapshot keeps serving (degraded, not broken).
The popular items of every arm's model, the fallback when the model server fails, are refreshed
alongside, so a fallback never waits for the database either.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from abrec.experiments.api.errors import ApiError
from abrec.experiments.clock import Clock
from abrec.experiments.eventlog import EventLog
from abrec.experiments.schema import Impression
from abrec.experiments.service import ExperimentSnapshot, load_snapshot
from abrec.experiments.signing import Signer
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from abrec.config import Settings

log = logging.getLogger("abrec.api")

POPULAR_TTL_S = 60.0


@dataclass
class _Entry:
    snapshot: ExperimentSnapshot | None  # None: no such experiment (cached too, briefly)
    loaded_at: float
    lock: threading.Lock = field(default_factory=threading.Lock)


class PopularCache:
    """Most popular items of the version each alias points to (the fallback slate)."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[list[str], float]] = {}

    def get(self, alias: str) -> list[str]:
        entry = self._items.get(alias)
        return entry[0] if entry is not None else []

    def refresh(self, session: Session, aliases: list[str]) -> None:
        from abrec.models.registry import RegistryError, popular_items

        now = time.monotonic()
        for alias in aliases:
            entry = self._items.get(alias)
            if entry is not None and now - entry[1] < POPULAR_TTL_S:
                continue
            try:
                self._items[alias] = (popular_items(session, alias), now)
            except RegistryError:  # alias not registered (yet): nothing to fall back on
                self._items[alias] = ([], now)


class SnapshotCache:
    def __init__(self, sessions: sessionmaker[Session], popular: PopularCache, ttl_s: float) -> None:
        self.sessions = sessions
        self.popular = popular
        self.ttl_s = ttl_s
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> ExperimentSnapshot:
        """The experiment's snapshot; ApiError 404 if there is none, 503 if it cannot be read."""
        entry = self._entries.get(key)
        now = time.monotonic()
        if entry is None:
            with self._lock:
                entry = self._entries.setdefault(key, _Entry(None, -1.0))
        if now - entry.loaded_at >= self.ttl_s:
            never_loaded = entry.loaded_at < 0
            # One request refreshes; the others keep serving the previous snapshot meanwhile.
            if entry.lock.acquire(blocking=never_loaded):
                try:
                    if time.monotonic() - entry.loaded_at >= self.ttl_s:
                        self._load(key, entry)
                finally:
                    entry.lock.release()
        if entry.loaded_at < 0:
            raise ApiError(503, "experiment definitions unavailable", "the database is unreachable")
        if entry.snapshot is None:
            raise ApiError(404, "unknown experiment", f"no experiment with key {key!r}")
        return entry.snapshot

    def _load(self, key: str, entry: _Entry) -> None:
        try:
            with self.sessions() as session:
                snapshot = load_snapshot(session, key)
                if snapshot is not None:
                    self.popular.refresh(session, sorted({a.model_alias for a in snapshot.arms}))
        except SQLAlchemyError as exc:
            log.warning("cannot refresh experiment %r: %s", key, str(exc).splitlines()[0])
            if entry.loaded_at >= 0:
                entry.loaded_at = time.monotonic()  # keep serving the old snapshot; retry after ttl_s
            return
        entry.snapshot = snapshot
        entry.loaded_at = time.monotonic()
        if len(self._entries) > 10_000:  # keys come from clients: keep unknown ones from piling up
            with self._lock:
                for k in [k for k, e in self._entries.items() if e.snapshot is None][:5000]:
                    self._entries.pop(k, None)

    def invalidate(self, key: str) -> None:
        self._entries.pop(key, None)


@dataclass(frozen=True)
class ImpressionInfo:
    """What a click copies from its impression."""

    experiment_id: int
    phase_id: int | None
    user_id: str
    arm_name: str
    in_analysis: bool
    positions: dict[str, int]  # item id -> position in the slate (first occurrence)


def positions_of(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i, item in enumerate(items):
        out.setdefault(item, i)
    return out


class RecentImpressions:
    """A bounded LRU of impressions this process committed, so most clicks skip a database read."""

    def __init__(self, engine: Engine, size: int = 50_000) -> None:
        self.engine = engine
        self.size = size
        self._items: OrderedDict[str, ImpressionInfo] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, row_id: str, info: ImpressionInfo) -> None:
        with self._lock:
            self._items[row_id] = info
            if len(self._items) > self.size:
                self._items.popitem(last=False)

    def get(self, row_id: str) -> ImpressionInfo | None:
        """The impression (None if it is not in the database); ApiError 503 if the database is down."""
        with self._lock:
            info = self._items.get(row_id)
        if info is not None:
            return info
        t = Impression.__table__
        query = select(
            t.c.experiment_id, t.c.phase_id, t.c.user_id, t.c.arm_name, t.c.in_analysis, t.c["items"]
        ).where(t.c.id == row_id)
        try:
            with self.engine.connect() as conn:
                row = conn.execute(query).first()
        except SQLAlchemyError as exc:
            raise ApiError(503, "database unavailable", "cannot read the impression; retry later") from exc
        if row is None:
            return None
        info = ImpressionInfo(
            row[0], row[1], row[2], row[3], bool(row[4]), positions_of([str(i) for i in row[5]])
        )
        self.put(row_id, info)
        return info


@dataclass
class ApiState:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    model_client: Any  # abrec.models.client.ModelClient
    eventlog: EventLog
    snapshots: SnapshotCache
    popular: PopularCache
    recent: RecentImpressions
    signer: Signer
    clock: Clock
    # (phase id, user id) pairs whose exposure this process has committed: skip re-sending them.
    exposed: set[tuple[int, str]] = field(default_factory=set)

    def close(self) -> None:
        self.eventlog.close()
        close = getattr(self.model_client, "close", None)
        if close is not None:
            close()
