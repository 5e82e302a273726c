"""Fault drills of the whole platform: real API processes, real model server, real databases.

- The API process is SIGKILLed in the middle of a replay and restarted: every impression and click
  the API acknowledged is in the database exactly once.
- A model arm that raises: the API serves the fallback, marks it, and the nightly report flags it.
- The database is cut off for a few seconds by a TCP proxy the test controls: recommendations keep
  flowing (unlogged), no partial rows appear, and logging resumes without a restart.
"""

from __future__ import annotations

import socket
import struct
import threading

import pytest


class TcpProxy:
    """A loopback TCP proxy that a test can cut (every connection dropped, new ones refused at
    once) and restore, to take a database away from a running server without touching either."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._up = threading.Event()
        self._up.set()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._up.is_set():
                _hard_close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _hard_close(client)
                continue
            with self._lock:
                self._open.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            _hard_close(s)
            with self._lock:
                self._open.discard(s)

    def cut(self) -> None:
        """Drop every open connection (RST) and refuse new ones until `restore`."""
        self._up.clear()
        with self._lock:
            victims = list(self._open)
            self._open.clear()
        for s in victims:
            _hard_close(s)

    def restore(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()


def _hard_close(s: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a dead network path or a crashed peer looks."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    s.close()


@pytest.mark.postgres
def test_the_proxy_cuts_and_restores_a_postgres_connection(pg_url: str) -> None:
    import psycopg

    from abrec.db import normalise_url

    url = normalise_url(pg_url).replace("+psycopg", "")
    proxy = TcpProxy("127.0.0.1", 5432)
    via_proxy = url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    try:
        with psycopg.connect(via_proxy, connect_timeout=3) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            proxy.cut()
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(via_proxy, connect_timeout=3)
        proxy.restore()
        with psycopg.connect(via_proxy, connect_timeout=3) as conn:
            assert conn.execute("SELECT 2").fetchone() == (2,)
    finally:
        proxy.close()
