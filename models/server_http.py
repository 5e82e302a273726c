"""The model server's HTTP transport: asyncio + httptools (uvicorn's parser, without the ASGI
layer), keep-alive and pipelining, over a `ModelServer`.

POST /v1/recommend (see client.py), GET /healthz, /readyz, /status and /metrics (Prometheus). No
framework: this is the hot path of every recommendation, and each answer goes out in one write.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from http import HTTPStatus
from typing import Any

import httptools
import orjson
from abrec.models.server import DeadlineExceeded, ModelServer, NotServed, Result
from prometheus_client import generate_latest

MAX_ITEMS = 1000  # items per request; the model reads only its max_len newest anyway
MAX_K = 1000
MAX_BODY = 256 * 1024
MAX_TIMEOUT_MS = 600_000


class BadRequest(ValueError):
    """The request is malformed; the message names the problem."""


def parse_recommend(body: bytes) -> tuple[str, list[str], int, bool, float | None]:
    """Validate a /v1/recommend body -> (model, items, k, exclude_seen, timeout in seconds or None).

    BadRequest names the first problem found. `timeout_ms`, optional, is how long the caller will
    wait: a request still queued after that is dropped uncomputed (answered 504).
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    extra = set(data) - {"model", "items", "k", "exclude_seen", "timeout_ms"}
    if extra:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(extra))}")
    model, items, k, exclude = data.get("model"), data.get("items"), data.get("k", 20), data.get(
        "exclude_seen", False)
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must be a non-empty string such as 'tron@champion'")
    if not isinstance(items, list):
        raise BadRequest("'items' must be a list of item ids (strings or integers)")
    if len(items) > MAX_ITEMS:
        raise BadRequest(f"'items' holds {len(items)} ids; at most {MAX_ITEMS}")
    # Exact types (JSON gives no subclasses; a bool is not an id): one pass that also converts.
    ids = [i if type(i) is str else str(i) for i in items if type(i) is str or type(i) is int]
    if len(ids) != len(items):
        raise BadRequest("'items' must be a list of item ids (strings or integers)")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise BadRequest(f"'k' must be an integer in 1..{MAX_K}")
    if not isinstance(exclude, bool):
        raise BadRequest("'exclude_seen' must be true or false")
    timeout_ms = data.get("timeout_ms")
    if timeout_ms is not None and (not isinstance(timeout_ms, int | float) or isinstance(timeout_ms, bool)
                                   or not 0 < timeout_ms <= MAX_TIMEOUT_MS):
        raise BadRequest(f"'timeout_ms' must be a number in (0, {MAX_TIMEOUT_MS}]")
    return model, ids, k, exclude, None if timeout_ms is None else timeout_ms / 1000


class _LoopBridge:
    """Hands finished futures from batcher threads to the event loop with one wake-up per burst.

    A wake-up per answer (a write to the loop's self-pipe from the batcher thread, as
    asyncio.wrap_future does) costs more than the answer; a batch of 16 finishes 16 futures at
    once, so they are queued here and their callbacks run together in the loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._finished: list[tuple[Future, Callable[[Future], None]]] = []

    def watch(self, future: Future, callback: Callable[[Future], None]) -> None:
        """Run `callback(future)` in the loop once the future is done (or cancelled)."""
        future.add_done_callback(lambda f: self._finish(f, callback))

    def _finish(self, future: Future, callback: Callable[[Future], None]) -> None:
        with self._lock:
            self._finished.append((future, callback))
            if len(self._finished) > 1:  # a delivery is already scheduled and will take this one
                return
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            finished, self._finished = self._finished, []
        for future, callback in finished:
            callback(future)


_JSON_TYPE = b"application/json"
_PHRASES = {s.value: s.phrase.encode() for s in HTTPStatus}


def _response(status: int, body: bytes, content_type: bytes = _JSON_TYPE, close: bool = False) -> bytes:
    """A whole HTTP/1.1 response: head and body go out in one write (one send, one TCP segment)."""
    close_header = b"connection: close\r\n" if close else b""
    return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n%s" % (
        status, _PHRASES.get(status, b""), content_type, len(body), close_header, body)


def _json(status: int, payload: dict[str, Any]) -> tuple[int, bytes, bytes]:
    return status, orjson.dumps(payload), _JSON_TYPE


class HttpApp:
    """The endpoints over a ModelServer, as plain functions of (method, path, body): no framework,
    this is the hot path. /v1/recommend answers later, through the loop bridge."""

    def __init__(self, server: ModelServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.bridge = _LoopBridge(loop)

    def get(self, path: str) -> tuple[int, bytes, bytes]:
        if path == "/healthz":
            return _json(200, {"status": "ok"})
        if path == "/readyz":
            state = self.server.readiness()
            return _json(200 if state["ready"] else 503, state)
        if path == "/status":
            return _json(200, self.server.status())
        if path == "/metrics":
            return 200, generate_latest(self.server.metrics), b"text/plain; version=0.0.4"
        return _json(404, {"error": f"no endpoint {path}"})

    def recommend(self, body: bytes) -> tuple[int, bytes, bytes] | Future:
        """An answer now, or the request's future (then `answer` makes the response)."""
        try:
            model, items, k, exclude, timeout_s = parse_recommend(body)
            future = self.server.submit(model, items, k, exclude_seen=exclude, timeout_s=timeout_s)
        except BadRequest as exc:
            return _json(400, {"error": str(exc)})
        except NotServed as exc:
            return _json(404, {"error": str(exc)})
        return future

    def answer(self, future: Future, t0: float) -> tuple[int, bytes, bytes]:
        """The response to a finished /v1/recommend future (received at perf_counter `t0`)."""
        if future.cancelled():
            return _json(500, {"error": "cancelled"})
        exc = future.exception()
        if exc is None:
            result: Result = future.result()
            self.server.observe(result, time.perf_counter() - t0, result.version)
            return _json(200, {"items": result.items, "version": result.version, "unknown": result.unknown})
        if isinstance(exc, DeadlineExceeded):
            self.server.observe(None, 0.0, None, outcome="expired")
            return _json(504, {"error": str(exc)})
        if isinstance(exc, NotServed):
            return _json(404, {"error": str(exc)})
        self.server.observe(None, 0.0, None)  # the model raised: the client falls back
        return _json(500, {"error": f"model failed: {type(exc).__name__}: {exc}"})


class _HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, parsed by httptools (uvicorn's parser).

    Answers go out in request order (pipelining allowed), each as one write. A connection that
    goes away cancels its queued requests, so the batcher skips them.
    """

    def __init__(self, app: HttpApp, connections: set[_HttpConnection]) -> None:
        self.app = app
        self.connections = connections
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.size = 0
        # Answers in request order: bytes when ready, a Future while its request is in the batcher.
        self.pending: deque[bytes | Future] = deque()
        self.close_after: Future | bytes | None = None  # the answer after which to close
        self.last_active = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.transport = None
        for item in self.pending:
            if isinstance(item, Future):
                item.cancel()
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed HTTP request: {exc}")

    def _fail(self, status: int, why: str) -> None:
        # The stream can't be followed past a parse error: answer what came before, then this, and close.
        self.pending.append(_response(*_json(status, {"error": why})[:2], close=True))
        self.close_after = self.pending[-1]
        self._flush()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url, self.body, self.size = b"", [], 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"expect" and value.lower() == b"100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size <= MAX_BODY:  # past that, the body is read and dropped, and answered 413
            self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        path = self.url.partition(b"?")[0].decode("latin-1")
        answer: tuple[int, bytes, bytes] | Future
        if path == "/v1/recommend":
            if method != b"POST":
                answer = _json(405, {"error": "use POST"})
            elif self.size > MAX_BODY:
                answer = _json(413, {"error": f"body larger than {MAX_BODY} bytes"})
            else:
                t0 = time.perf_counter()
                answer = self.app.recommend(b"".join(self.body))
                if isinstance(answer, Future) and answer.done():  # answered without the model
                    answer = self.app.answer(answer, t0)
        elif method != b"GET":
            answer = _json(405, {"error": "use GET"})
        else:
            answer = self.app.get(path)
        close = not self.parser.should_keep_alive()
        if isinstance(answer, Future):
            self.pending.append(answer)
            if close:
                self.close_after = answer
            self.app.bridge.watch(answer, lambda f: self._answered(f, t0))
            return
        self.pending.append(_response(*answer, close=close))
        if close:
            self.close_after = self.pending[-1]
        self._flush()

    def _answered(self, future: Future, t0: float) -> None:
        if self.transport is None:  # the connection went away meanwhile
            return
        for i, item in enumerate(self.pending):
            if item is future:
                self.pending[i] = _response(*self.app.answer(future, t0), close=self.close_after is future)
                if self.close_after is future:
                    self.close_after = self.pending[i]
                break
        self._flush()

    def _flush(self) -> None:
        while self.pending and not isinstance(self.pending[0], Future) and self.transport is not None:
            data = self.pending.popleft()
            self.transport.write(data)
            if data is self.close_after:
                self.transport.close()
                self.transport = None
        self.last_active = time.monotonic()

    def idle(self) -> bool:
        return not self.pending


class HttpServer:
    """The HTTP listener on its own asyncio loop: on a thread (`start`; tests, the demo) or on the
    calling thread (`run`, the model-server command, until SIGINT/SIGTERM or `stop`)."""

    KEEP_ALIVE_S = 60.0  # idle connections are closed after this; API processes reopen theirs at 30 s

    def __init__(self, server: ModelServer, host: str = "127.0.0.1", port: int = 8601) -> None:
        self.server = server
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on such sockets, and without it
        # an answer could wait ~40 ms for a delayed ACK.
        self.sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop, self._stop = loop, asyncio.Event()
        app = HttpApp(self.server, loop)
        connections: set[_HttpConnection] = set()
        listener = await loop.create_server(lambda: _HttpConnection(app, connections), sock=self.sock,
                                            backlog=2048)
        self._started.set()
        try:
            while True:
                try:
                    await asyncio.wait_for(self._stop.wait(), timeout=self.KEEP_ALIVE_S / 4)
                    break
                except TimeoutError:  # sweep idle keep-alive connections
                    stale = time.monotonic() - self.KEEP_ALIVE_S
                    for conn in [c for c in connections if c.idle() and c.last_active < stale]:
                        if conn.transport is not None:
                            conn.transport.close()
        finally:
            listener.close()
            for conn in list(connections):
                if conn.transport is not None:
                    conn.transport.close()
            await listener.wait_closed()

    def start(self) -> HttpServer:
        self._thread = threading.Thread(target=self.run, name="model-http", daemon=True)
        self._thread.start()
        while not self._started.wait(0.01):
            if not self._thread.is_alive():
                raise RuntimeError("the model server's HTTP listener failed to start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # the loop closed meanwhile
                pass
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sock.close()
