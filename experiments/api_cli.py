"""`abrec serve`: run the HTTP API under a threaded production WSGI server.

Granian by default: its HTTP layer is Rust and runs outside the GIL, so a request costs the API
process about 1.7 ms CPU where waitress (pure Python, a hand-off between its I/O thread and a
request thread per request) costs 2.6 (benchmarks/load.py, 300 recommendations/s with clicks, 2
cores). One process (the default, and the only choice on SQLite, whose single writer is the event
log's thread) with `--threads` request threads; several (`--workers N`, PostgreSQL only), each
building its own app, engine and event-log writer after the fork; Prometheus metrics go to a
shared multiprocess directory and the simulated clock's offset to a shared file, so both look the
same from every worker. waitress and gunicorn gthread remain as `--server` choices (waitress runs
`--in-process-models`, whose models live in the serving process).

Light to import: Flask, SQLAlchemy and the app are imported inside the command.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the recommendation/click/admin HTTP API",
        description="Run the abrec HTTP API under granian (or waitress, or gunicorn gthread).",
    )
    p.add_argument("--db", default=None, help="database URL (default: $ABREC_DATABASE_URL or sqlite)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="processes (more than one needs PostgreSQL)")
    p.add_argument("--threads", type=int, default=16, help="request threads per process")
    p.add_argument(
        "--server",
        choices=("auto", "granian", "waitress", "gunicorn"),
        default="auto",
        help="WSGI server (auto: granian; waitress with --in-process-models)",
    )
    models = p.add_mutually_exclusive_group()
    models.add_argument(
        "--model-server", default=None, help="model server URL (default: $ABREC_MODEL_SERVER_URL)"
    )
    models.add_argument(
        "--in-process-models",
        action="store_true",
        help="load the models inside this process (single-process demo; imports torch)",
    )
    p.add_argument(
        "--store", default=None, help="artifact store for --in-process-models ($ABREC_REGISTRY_STORE)"
    )
    p.set_defaults(func=cmd_serve)


def _check(args: argparse.Namespace, url: str) -> None:
    from abrec.cli import UsageError
    from abrec.db import is_sqlite

    if args.workers < 1 or args.threads < 1:
        raise UsageError("--workers and --threads must be at least 1")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a TCP port")
    if args.workers > 1 and is_sqlite(url):
        raise UsageError(
            f"--workers {args.workers} needs PostgreSQL: SQLite has one writer, so the API runs as one "
            "process there (use --threads to serve more requests at once, or --db postgresql://...)"
        )
    if args.workers > 1 and args.in_process_models:
        raise UsageError("--in-process-models loads the models into the API process: use it with --workers 1")
    if args.server == "waitress" and args.workers > 1:
        raise UsageError("waitress runs one process: use --server granian or gunicorn for --workers > 1")
    if args.server in ("gunicorn", "granian") and args.in_process_models:
        raise UsageError("--in-process-models runs under waitress (one process)")


def cmd_serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from abrec.config import get_settings
    from abrec.db import normalise_url

    settings = get_settings()
    url = normalise_url(args.db or settings.database_url)
    _check(args, url)
    settings = replace(
        settings, database_url=url, model_server_url=args.model_server or settings.model_server_url
    )
    _init_schema(url)
    server = args.server if args.server != "auto" else ("waitress" if args.in_process_models else "granian")
    if server == "waitress":
        return _serve_waitress(args, settings)
    if server == "granian":
        return _serve_granian(args, settings)
    return _serve_gunicorn(args, settings)


def _init_schema(url: str) -> None:
    from sqlalchemy.exc import OperationalError

    from abrec.cli import UsageError
    from abrec.db import init_db, make_engine

    engine = make_engine(url)
    try:
        init_db(engine)
    except OperationalError as exc:
        raise UsageError(f"cannot open database {url}: {exc.orig}") from None
    finally:
        engine.dispose()  # workers open their own connections after the fork


def _announce(args: argparse.Namespace, settings, server: str) -> None:
    processes = "1 process" if args.workers == 1 else f"{args.workers} processes"
    print(
        f"abrec serve: http://{args.host}:{args.port} ({processes} x {args.threads} threads, {server}, "
        f"db {settings.database_url.split('@')[-1]})",
        file=sys.stderr,
        flush=True,
    )


def _serve_waitress(args: argparse.Namespace, settings) -> int:
    import logging

    import waitress
    from abrec.experiments.api import create_app, shutdown

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # waitress warns "Task queue depth is N" from its I/O thread for every request that finds all
    # request threads busy: under load that is a log line per request, on the thread that reads all
    # sockets, just when it is busiest. Latency is in /metrics (abrec_api_request_seconds).
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    client = None
    if args.in_process_models:
        client = _in_process_client(args, settings)
    app = create_app(settings, model_client=client)
    _announce(args, settings, "waitress")
    try:
        waitress.serve(
            app,
            host=args.host,
            port=args.port,
            threads=args.threads,
            connection_limit=1000,
            backlog=2048,
            channel_timeout=120,
            asyncore_use_poll=True,  # select() stops at 1024 descriptors
            ident="abrec",
        )
    finally:
        shutdown(app)
    return 0


def _in_process_client(args: argparse.Namespace, settings):
    from abrec.models.client import InProcessModelClient
    from abrec.models.server import ModelServer
    from abrec.models.store import open_store

    from abrec.db import make_engine, session_factory

    server = ModelServer(
        session_factory(make_engine(settings.database_url)), open_store(args.store or settings.registry_store)
    ).start()
    return InProcessModelClient(server)


def _share_between_workers() -> None:
    """Metrics and the clock offset in files every worker reads (before either module is imported:
    both read these at import time)."""
    shared = tempfile.mkdtemp(prefix="abrec-serve-")
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", os.path.join(shared, "metrics"))
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    os.environ.setdefault("ABREC_CLOCK_FILE", os.path.join(shared, "clock"))
    if "prometheus_client" in sys.modules:
        from abrec.cli import UsageError

        raise UsageError("internal: prometheus_client was imported before multiprocess mode was set up")


def _forget_dead_workers() -> None:
    """Drop the live gauges of workers that are gone. Granian reports no worker's exit (gunicorn's
    child_exit does this), so each new worker, a respawned one included, clears its predecessors'."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return
    from prometheus_client import multiprocess

    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, directory)
        except PermissionError:  # alive, someone else's
            pass


def _granian_app(_target: str, settings):
    """The app, built in each granian worker (after the fork: its own engine and writer)."""
    from multiprocessing.util import Finalize

    from abrec.experiments.api import create_app, shutdown

    _forget_dead_workers()
    app = create_app(settings)
    # A granian worker is a multiprocessing child, which skips atexit: its finalizers run instead.
    Finalize(app, shutdown, args=(app,), exitpriority=10)
    return app


def _serve_granian(args: argparse.Namespace, settings) -> int:
    if args.workers > 1:
        _share_between_workers()
    from functools import partial

    from granian import Granian
    from granian.constants import Interfaces

    _announce(args, settings, "granian")
    Granian(
        "abrec.experiments.api:create_app",
        address=args.host,
        port=args.port,
        interface=Interfaces.WSGI,
        workers=args.workers,
        blocking_threads=args.threads,
        backlog=2048,
        respawn_failed_workers=args.workers > 1,
        log_access=False,
    ).serve(target_loader=partial(_granian_app, settings=settings))
    return 0


def _serve_gunicorn(args: argparse.Namespace, settings) -> int:
    _share_between_workers()

    from gunicorn.app.base import BaseApplication

    def child_exit(_server, worker) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)

    class Gunicorn(BaseApplication):
        def load_config(self) -> None:
            for key, value in {
                "bind": f"{args.host}:{args.port}",
                "workers": args.workers,
                "worker_class": "gthread",
                "threads": args.threads,
                "keepalive": 75,  # clients keep pooled connections open between requests
                "timeout": 60,
                "graceful_timeout": 10,
                "backlog": 2048,
                "child_exit": child_exit,
                "proc_name": "abrec-serve",
            }.items():
                self.cfg.set(key, value)

        def load(self):
            from abrec.experiments.api import create_app

            return create_app(settings)  # in each worker, after the fork: its own engine and writer

    _announce(args, settings, "gunicorn gthread")
    Gunicorn().run()
    return 0
