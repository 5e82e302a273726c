"""Helpers of the API tests: a seeded database, a real model server on loopback, `abrec serve` processes.

Seeded world: users viewer/editor/admin with API tokens; two registered model versions (`tron:1`
behind tron@champion, `sasrec:1` behind sasrec@champion, small random checkpoints with item ids
i0..i59); experiment "exp" with arms control (sasrec@champion) and treatment (tron@champion),
running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests
from abrec.experiments import identity, service
from abrec.models import registry
from abrec.models.store import DirectoryStore

from abrec.db import init_db, make_engine, session_factory

ROOT = Path(__file__).resolve().parents[1]
ABREC = [str(Path(sys.executable).parent / "abrec")]  # the console script, as users run it


@dataclass
class World:
    url: str
    store: Path
    tokens: dict[str, str]  # role -> token

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


def seed(url: str, store_dir: Path, make_checkpoint, *, key: str = "exp", start: bool = True) -> World:
    engine = make_engine(url)
    init_db(engine)
    sessions = session_factory(engine)
    store = DirectoryStore(store_dir)
    tokens = {}
    with sessions() as s:
        for role in ("viewer", "editor", "admin"):
            identity.create_user(s, role, "password-" + role, role, actor="test")
            tokens[role] = identity.create_token(s, role, name="t", actor="test")
        s.commit()
        registry.register_model(s, store, make_checkpoint(seed=1), "tron", actor="test")
        registry.register_model(s, store, make_checkpoint(seed=2), "sasrec", actor="test")
        registry.set_alias(s, "tron@champion", "tron:1", actor="test")
        registry.set_alias(s, "sasrec@champion", "sasrec:1", actor="test")
        service.create_experiment(
            s,
            key=key,
            arms=[
                service.ArmSpec("control", 1, "sasrec@champion"),
                service.ArmSpec("treatment", 1, "tron@champion"),
            ],
            actor="test",
        )
        if start:
            service.start(s, key, "test")
        s.commit()
    engine.dispose()
    return World(url, store_dir, tokens)


class ModelServerThread:
    """The real model server (dynamic batcher + its HTTP listener) on a loopback port, in this process."""

    def __init__(self, url: str, store_dir: Path) -> None:
        from abrec.models.server import ModelServer
        from abrec.models.server_http import HttpServer

        self.engine = make_engine(url)
        self.server = ModelServer(session_factory(self.engine), DirectoryStore(store_dir), poll_s=0.2).start()
        self.http = HttpServer(self.server, "127.0.0.1", 0).start()
        self.url = self.http.url
        deadline = time.monotonic() + 60
        while not self.server.is_ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"model server not ready: {self.server.readiness()}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.http.stop()
        self.server.close()
        self.engine.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`abrec serve` in a child process (its own process group, so SIGKILL takes it whole)."""

    def __init__(
        self,
        db_url: str,
        model_server: str,
        *,
        workers: int = 1,
        threads: int = 8,
        server: str = "auto",
        env: dict[str, str] | None = None,
        log: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [
            *ABREC,
            "serve",
            "--db",
            db_url,
            "--port",
            str(self.port),
            "--workers",
            str(workers),
            "--threads",
            str(threads),
            "--model-server",
            model_server,
            "--server",
            server,
        ]
        inherited = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        full_env = {**inherited, "ABREC_SECRET_KEY": "test-secret", **(env or {})}
        self._log = open(log, "ab") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=full_env, stdout=self._log, stderr=self._log, start_new_session=True
        )

    def wait_ready(self, timeout_s: float = 60) -> ServeProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.kill()
                raise RuntimeError(f"abrec serve exited with {self.proc.returncode}")
            try:
                if requests.get(self.base + "/healthz", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError("abrec serve did not come up")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        self.proc.wait(timeout=30)
        if self._log is not subprocess.DEVNULL:
            self._log.close()


def recommend_body(user: str, items=("i1", "i2"), k: int = 5, experiment: str = "exp") -> dict:
    return {
        "experiment": experiment,
        "user_id": user,
        "session_id": f"s-{user}",
        "items": list(items),
        "k": k,
    }


class TcpProxy:
    """A loopback TCP proxy we can cut and restore: a database outage without touching the database."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        """Drop every open connection and refuse new ones."""
        self.up = False
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self.listener.close()


def checkpoint_factory(directory: Path):
    """The conftest `make_checkpoint` factory for a directory of one's choice (module-scoped fixtures)."""

    def make(seed: int = 0, n_items: int = 60, name: str | None = None) -> Path:
        import torch
        from abrec.models.checkpoint import save_checkpoint
        from abrec.models.data import ItemMap
        from abrec.models.presets import build_model, resolve_config

        torch.manual_seed(seed)
        config = resolve_config("tron", {"hidden": 16, "layers": 1, "max_len": 10, "dropout": 0.0})
        model = build_model("tron", config, n_items)
        path = directory / "checkpoints" / f"{name or f'c{seed}'}.safetensors"
        save_checkpoint(
            path,
            model,
            kind="tron",
            config=config,
            item_map=ItemMap([f"i{j}" for j in range(n_items)]),
            metrics={},
            popular=list(range(1, min(n_items, 30) + 1)),
            data_fingerprint=f"synthetic-{seed}",
        )
        return path

    return make
