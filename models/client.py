"""Clients of the model server, as API processes use them: torch-free, with a per-request deadline.

Two implementations share one interface (`ModelClient`): `HttpModelClient` talks to
`abrec model-server` over keep-alive HTTP (one connection per calling thread);
`InProcessModelClient` calls a `ModelServer` object that runs inside the same process (the
single-process demo). Any failure — refused connection, the deadline passing, an error answer, a
malformed answer — raises `ModelUnavailable`, so the caller has exactly one exception to turn into
its fallback.

Wire protocol (compact JSON, one request per recommendation):
    POST /v1/recommend {"model": "tron@champion", "items": ["i1", "i2"], "k": 20, "exclude_seen": false}
    200 -> {"items": ["i9", ...], "version": "tron:3", "unknown": 0}
    4xx/5xx -> {"error": "what went wrong"}
    GET /readyz -> 200 when every model is loaded and warmed up, else 503.
"""

from __future__ import annotations

import http.client
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import httptools
import orjson

if TYPE_CHECKING:  # the server (and torch) are only needed by the in-process client's caller
    from abrec.models.server import ModelServer


class _Connection:
    """One keep-alive HTTP/1.1 connection: the request written in one send, the answer parsed by
    httptools (the model server's parser). ~3x less CPU per call than http.client, whose header
    objects and buffered file reader cost more than the call itself."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._head = b"POST /v1/recommend HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n" % (
            host.encode("idna"), port)
        self._parser = httptools.HttpResponseParser(self)
        self._body: list[bytes] = []
        self._done = self._keep_alive = False

    def on_body(self, body: bytes) -> None:  # httptools callbacks
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._done = True
        self._keep_alive = self._parser.should_keep_alive()  # read before the parser resets

    def post(self, body: bytes, timeout: float) -> tuple[int, bytes, bool]:
        """-> (status, body, keep-alive?). Raises ConnectionResetError when the server had closed."""
        self.sock.settimeout(timeout)
        self.sock.sendall(b"%sContent-Length: %d\r\n\r\n%s" % (self._head, len(body), body))
        self._body, self._done = [], False
        while not self._done:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionResetError("the model server closed the connection")
            self._parser.feed_data(data)
        return self._parser.get_status_code(), b"".join(self._body), self._keep_alive

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class Recommendation:
    items: list[str]  # the shop's item ids, best first
    version: str  # the model version that computed them, e.g. "tron:3"
    unknown_items: int  # request items the model's id map does not know (ignored)


class ModelUnavailable(Exception):
    """The model server could not answer in time: the caller should serve its fallback."""


class ModelClient(Protocol):
    def recommend(
        self, alias: str, items: list[str], k: int, *, exclude_seen: bool = False, deadline_s: float = 0.05
    ) -> Recommendation: ...

    def ready(self) -> bool: ...


def _parse_answer(data: Any) -> Recommendation:
    try:
        items, version, unknown = data["items"], data["version"], data["unknown"]
    except (TypeError, KeyError) as exc:
        raise ModelUnavailable(f"malformed answer from the model server: {data!r:.200}") from exc
    if not isinstance(items, list) or not isinstance(version, str) or not isinstance(unknown, int):
        raise ModelUnavailable(f"malformed answer from the model server: {data!r:.200}")
    return Recommendation(items=[str(i) for i in items], version=version, unknown_items=unknown)


class HttpModelClient:
    """Thread-safe client over a pool of keep-alive connections to the model server.

    The pool is a LIFO stack of idle connections shared by every calling thread: a call takes the
    most recently used one (or opens one when none is idle) and puts it back after the answer, so
    the pool grows to the most calls ever in flight at once and no further. (A connection per
    thread would reconnect whenever the WSGI server retires and starts request threads, as granian
    does under varying load.) `deque.append` and `pop` are atomic: no lock on the hot path. Each
    call is one send and (usually) one recv on a `_Connection`: a full HTTP client would cost more
    CPU than the API's own work for the request (benchmarks/model_client.py).

    The deadline bounds connecting, sending and each read of the answer (the model server sends its
    small answer in one write); there is no retry after the deadline, since a retry could only land
    after it anyway. A connection that failed or timed out is closed, so a late answer can never be
    read as the next request's. One exception: a reused connection that the server had already
    closed (keep-alive expiry) fails before anything was computed, so that request is sent again
    once on a fresh connection while time is left.
    """

    IDLE_REOPEN_S = 30.0  # well under the model server's keep-alive timeout (60 s)

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"model server URL must be http://host:port, got {base_url!r}")
        self._host, self._port = parts.hostname, parts.port or 80
        self._idle: deque[tuple[_Connection, float]] = deque()  # (connection, last used)
        self._closed = False

    def _connection(self, timeout: float, fresh: bool) -> tuple[_Connection, bool]:
        """An idle connection unless `fresh` (reused?), or a new one, with `timeout` on its socket."""
        now = time.monotonic()
        while not fresh:
            try:
                conn, used_at = self._idle.pop()
            except IndexError:
                break
            if now - used_at <= self.IDLE_REOPEN_S:
                return conn, True
            conn.close()  # idle too long: the server may be about to close it
        return _Connection(self._host, self._port, timeout), False

    def _release(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
        else:
            self._idle.append((conn, time.monotonic()))

    def _post(self, body: bytes, deadline_s: float) -> tuple[int, bytes]:
        end = time.monotonic() + deadline_s
        for attempt in (1, 2):
            conn = None
            try:
                conn, reused = self._connection(max(end - time.monotonic(), 1e-3), fresh=attempt == 2)
                status, data, keep_alive = conn.post(body, max(end - time.monotonic(), 1e-3))
                if keep_alive:
                    self._release(conn)
                else:
                    conn.close()
                return status, data
            except (ConnectionResetError, BrokenPipeError) as exc:
                if conn is not None:
                    conn.close()
                if attempt == 2 or not reused or time.monotonic() >= end:
                    raise _unavailable(self.base_url, exc) from exc
            except (OSError, httptools.HttpParserError) as exc:
                if conn is not None:
                    conn.close()
                raise _unavailable(self.base_url, exc) from exc
        raise AssertionError("unreachable")

    def recommend(
        self, alias: str, items: list[str], k: int, *, exclude_seen: bool = False, deadline_s: float = 0.05
    ) -> Recommendation:
        # The server drops the request uncomputed once the deadline has passed: nobody waits for it.
        body = orjson.dumps({"model": alias, "items": items, "k": k, "exclude_seen": exclude_seen,
                             "timeout_ms": deadline_s * 1000})
        status, raw = self._post(body, deadline_s)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ModelUnavailable(f"model server at {self.base_url}: malformed JSON answer") from exc
        if status != 200:
            error = data.get("error") if isinstance(data, dict) else None
            raise ModelUnavailable(f"model server answered {status}: {error or data!r:.200}")
        return _parse_answer(data)

    def ready(self) -> bool:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=1.0)
        try:
            conn.request("GET", "/readyz")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def close(self) -> None:
        """Close the idle connections; those in use close when their call ends."""
        self._closed = True
        while self._idle:
            self._idle.pop()[0].close()


def _unavailable(url: str, exc: Exception) -> ModelUnavailable:
    if isinstance(exc, TimeoutError):
        return ModelUnavailable(f"model server at {url}: timed out")
    if isinstance(exc, ConnectionRefusedError):
        return ModelUnavailable(f"model server at {url}: connection refused")
    return ModelUnavailable(f"model server at {url}: {type(exc).__name__}: {exc}")


class InProcessModelClient:
    """The same interface over a `ModelServer` running in this process (no HTTP, no copies)."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server

    def recommend(
        self, alias: str, items: list[str], k: int, *, exclude_seen: bool = False, deadline_s: float = 0.05
    ) -> Recommendation:
        try:
            result = self.server.recommend(alias, items, k, exclude_seen=exclude_seen, timeout=deadline_s)
        except Exception as exc:  # the contract: every failure of the model side is ModelUnavailable
            raise ModelUnavailable(f"in-process model server: {exc}") from exc
        return Recommendation(items=result.items, version=result.version, unknown_items=result.unknown)

    def ready(self) -> bool:
        return self.server.is_ready()
