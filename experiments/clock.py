"""The API's clock: wall time plus an offset that only tests and admins may set (simulated days).

Every timestamp the API writes (impressions, exposures, clicks, the issue time inside a signed
impression id) and the attribution window all read this one clock, so a simulation can move the
whole serving side to another day. With several API processes the offset lives in a small file
that all of them read (`abrec serve` sets ABREC_CLOCK_FILE), so an admin's change reaches every
worker, not just the one that answered; a single process keeps it in memory.
"""

from __future__ import annotations

import math
import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
_LATEST = datetime(2200, 1, 1, tzinfo=UTC)


class Clock:
    """Thread-safe `now()` = UTC wall time + offset. `path`: share the offset between processes."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self._offset = 0.0
        self._seen_mtime: int | None = None
        self._lock = threading.Lock()

    def offset_s(self) -> float:
        if self.path is not None:
            self._reload()
        return self._offset

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.offset_s())

    def set_offset(self, seconds: float) -> None:
        """ValueError unless the simulated time stays within 2000..2200 (signed ids need a sane time)."""
        if not math.isfinite(seconds) or abs(seconds) > 1e10:
            raise ValueError(f"clock offset {seconds!r} s is out of range")
        if not _EARLIEST <= datetime.now(UTC) + timedelta(seconds=seconds) <= _LATEST:
            raise ValueError("the simulated time must lie between 2000 and 2200")
        with self._lock:
            self._offset = float(seconds)
            if self.path is not None:
                tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
                tmp.write_text(repr(self._offset))
                tmp.replace(self.path)  # atomic: readers see the old or the new offset, never half
                self._seen_mtime = None

    def set_now(self, when: datetime) -> None:
        """Make `now()` return `when` at this instant (and keep running from there)."""
        if when.tzinfo is None:
            raise ValueError("the simulated time needs a time zone")
        if not _EARLIEST <= when <= _LATEST:
            raise ValueError("the simulated time must lie between 2000 and 2200")
        self.set_offset((when - datetime.now(UTC)).total_seconds())

    def reset(self) -> None:
        self.set_offset(0.0)

    def _reload(self) -> None:
        # One stat per call; the file is read only when another process changed it.
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime != self._seen_mtime:
            with self._lock:
                try:
                    self._offset = float(self.path.read_text())
                    self._seen_mtime = mtime
                except (OSError, ValueError):
                    pass  # a writer is replacing it; keep the last offset and read it next time


_clock = Clock(os.environ.get("ABREC_CLOCK_FILE") or None)


def get_clock() -> Clock:
    """The process-wide clock."""
    return _clock


def now() -> datetime:
    return _clock.now()
