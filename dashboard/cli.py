"""`abrec dashboard`: serve the dashboard with waitress in its own process (light to import)."""

from __future__ import annotations

import argparse
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("dashboard", help="serve the experiments dashboard")
    p.add_argument("--db", metavar="URL", help="database URL (default: ABREC_DATABASE_URL or sqlite:///abrec.db)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8050, help="port (default 8050)")
    p.add_argument("--threads", type=int, default=8, help="waitress worker threads (default 8)")
    p.set_defaults(func=cmd_dashboard)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from abrec.cli import UsageError

    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be 1-65535, got {args.port}")
    if args.threads < 1:
        raise UsageError("--threads must be at least 1")
    import waitress
    from abrec.dashboard import charts
    from abrec.dashboard.app import create_app
    from sqlalchemy.exc import OperationalError

    from abrec.config import get_settings

    settings = get_settings()
    url = args.db or settings.database_url
    if "ABREC_SECRET_KEY" not in os.environ:
        print("abrec dashboard: warning: ABREC_SECRET_KEY is not set; sessions are signed with the "
              "development key", file=sys.stderr)
    try:
        app = create_app(url)
    except OperationalError as exc:
        raise UsageError(f"cannot open database {url}: {exc.orig}") from None
    charts.warm_up()
    print(f"abrec dashboard: http://{args.host}:{args.port}/ (database {url})", flush=True)
    waitress.serve(app, host=args.host, port=args.port, threads=args.threads, ident="abrec-dashboard")
    return 0
