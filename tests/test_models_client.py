"""HttpModelClient against a scripted HTTP server: keep-alive reuse, the pool shared by threads, a
connection the server closed, and a late answer that must never be read as the next request's."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from abrec.models.client import HttpModelClient, ModelUnavailable


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless the handler closes

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        srv.connections.add(self.client_address)
        delay = srv.delays.pop(0) if srv.delays else 0.0
        time.sleep(delay)
        answer = json.dumps({"items": body["items"][::-1], "version": body["model"], "unknown": 0}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
        # Close without saying so, as a keep-alive timeout does between two requests.
        self.close_connection = srv.close_after_answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.connections, srv.delays, srv.close_after_answer = set(), [], False
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_connection_closed_by_the_server_is_reopened(server) -> None:
    server.close_after_answer = True
    client = HttpModelClient(f"http://127.0.0.1:{server.server_port}")
    for i in range(3):  # each reuse finds the socket closed: sent again once on a fresh one
        assert client.recommend("m@a", [str(i)], 1, deadline_s=2).items == [str(i)]
    assert len(server.connections) == 3


def test_threads_share_the_pooled_connections(server) -> None:
    client = HttpModelClient(f"http://127.0.0.1:{server.server_port}")
    for i in range(5):
        rec = client.recommend("tron@champion", [f"a{i}", "b"], 2, deadline_s=2)
        assert rec.items == ["b", f"a{i}"] and rec.version == "tron@champion"
    assert len(server.connections) == 1
    for i in range(10):  # short-lived request threads, one after another, as a WSGI server runs them
        t = threading.Thread(target=client.recommend, args=("m@a", [str(i)], 1), kwargs={"deadline_s": 2})
        t.start()
        t.join()
    assert len(server.connections) == 1
    server.delays = [0.2] * 4
    with ThreadPoolExecutor(4) as pool:  # calls in flight at once each need their own connection
        barrier = threading.Barrier(4)
        call = lambda i: (barrier.wait(), client.recommend("m@a", [str(i)], 1, deadline_s=2))  # noqa: E731
        list(pool.map(call, range(4)))
    assert len(server.connections) == 4  # the idle one and three new
    client.close()


def test_a_late_answer_is_never_read_as_the_next_one(server) -> None:
    server.delays = [0.3]
    client = HttpModelClient(f"http://127.0.0.1:{server.server_port}")
    with pytest.raises(ModelUnavailable, match="timed out"):
        client.recommend("m@a", ["first"], 1, deadline_s=0.05)
    assert client.recommend("m@a", ["second"], 1, deadline_s=2).items == ["second"]
