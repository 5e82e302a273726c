"""`abrec report`, `abrec scheduler` and `abrec export-users`: the nightly report on demand and on schedule.

Light to import: the database, statistics and APScheduler are imported inside each command.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date


def register(subparsers: argparse._SubParsersAction) -> None:
    db_parent = argparse.ArgumentParser(add_help=False)
    db_parent.add_argument("--db", default=None, help="database URL (default: $ABREC_DATABASE_URL or sqlite)")

    p = subparsers.add_parser(
        "report",
        parents=[db_parent],
        help="build (or rebuild) an experiment's report for one date and store it",
    )
    p.add_argument("experiment", metavar="EXPERIMENT", help="experiment key")
    p.add_argument(
        "--date",
        default=None,
        metavar="YYYY-MM-DD",
        help="local date in the experiment's timezone (default: yesterday there)",
    )
    p.add_argument(
        "--phase", type=int, default=None, help="phase number (default: the phase running that day)"
    )
    p.add_argument("--html", default=None, metavar="OUT.html", help="also write the standalone HTML report")
    p.add_argument("--deliver", action="store_true", help="send it to the experiment's webhook and e-mail")
    p.add_argument("--json", action="store_true", help="print the report JSON instead of a summary")
    p.add_argument(
        "--full", action="store_true", help="recompute every day of the phase (e.g. after late-logged events)"
    )
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser(
        "scheduler", parents=[db_parent], help="run the nightly reports (one scheduler per database)"
    )
    p.add_argument("--once", action="store_true", help="run every running experiment's report now and exit")
    p.add_argument(
        "--lease", type=float, default=60.0, metavar="S", help="leader lease in seconds (default 60)"
    )
    p.add_argument(
        "--reconcile",
        type=float,
        default=300.0,
        metavar="S",
        help="re-read the experiments' schedules every S seconds (default 300)",
    )
    p.set_defaults(func=cmd_scheduler)

    p = subparsers.add_parser(
        "export-users",
        parents=[db_parent],
        help="write the per-user table of a phase as CSV (for analyze-file)",
    )
    p.add_argument("experiment", metavar="EXPERIMENT", help="experiment key")
    p.add_argument("--out", required=True, metavar="FILE.csv", help="output file ('-' for standard output)")
    p.add_argument("--phase", type=int, default=None, help="phase number (default: the current phase)")
    p.set_defaults(func=cmd_export_users)


def _engine(args: argparse.Namespace):
    from sqlalchemy.exc import OperationalError

    from abrec.cli import UsageError
    from abrec.config import get_settings
    from abrec.db import init_db, make_engine

    url = args.db or get_settings().database_url
    engine = make_engine(url)
    try:
        init_db(engine)
    except OperationalError as exc:
        raise UsageError(f"cannot open database {url}: {exc.orig}") from None
    return engine, url


def _parse_date(text: str | None) -> date | None:
    from abrec.cli import UsageError

    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--date must be YYYY-MM-DD, got {text!r}") from None


def cmd_report(args: argparse.Namespace) -> int:
    from abrec.analysis import delivery
    from abrec.analysis.report import ReportError, load_experiment, render_html, run_report, summary_text
    from sqlalchemy.orm import Session

    from abrec.cli import UsageError

    day = _parse_date(args.date)
    engine, _ = _engine(args)
    try:
        report = run_report(engine, args.experiment, day, args.phase, full=args.full)
    except ReportError as exc:
        raise UsageError(str(exc)) from None
    html = render_html(report) if args.html or args.deliver else None
    if args.html:
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(html or "")
    status = 0
    if args.deliver:
        with Session(engine) as session:
            exp = load_experiment(session, args.experiment)
        if not (exp.webhook_url or exp.email_to):
            print(
                f"note: {args.experiment} has no webhook_url or email_to: nothing delivered", file=sys.stderr
            )
        outcome = delivery.deliver(report, exp.webhook_url, exp.email_to, html=html)
        for channel, result in outcome.items():
            print(f"{channel}: {result}", file=sys.stderr)
        status = 1 if any(r != "sent" for r in outcome.values()) else 0
    print(json.dumps(report, indent=2) if args.json else summary_text(report))
    engine.dispose()
    return status


def cmd_scheduler(args: argparse.Namespace) -> int:
    import logging
    import signal

    from abrec.analysis.report import summary_text
    from abrec.analysis.scheduler import ReportScheduler, run_once

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # the migration check on start is routine
    engine, url = _engine(args)
    engine.dispose()
    if args.once:
        results = run_once(url)
        if results is None:
            print("another scheduler holds the lease; nothing run", file=sys.stderr)
            return 1
        for key, report in results.items():
            print(summary_text(report) if report else f"{key}: FAILED (see the log)")
        return 0 if all(results.values()) else 1
    scheduler = ReportScheduler(url, lease_s=args.lease, reconcile_s=args.reconcile)
    signal.signal(signal.SIGTERM, lambda *_: scheduler.stop())
    try:
        scheduler.run()
    except KeyboardInterrupt:
        scheduler.stop()
    return 0


def cmd_export_users(args: argparse.Namespace) -> int:
    import csv

    from abrec.analysis.aggregate import iter_user_rows
    from abrec.analysis.report import ReportError, load_experiment
    from sqlalchemy.orm import Session

    from abrec.cli import UsageError

    engine, _ = _engine(args)
    with Session(engine) as session:
        try:
            exp = load_experiment(session, args.experiment)
        except ReportError as exc:
            raise UsageError(str(exc)) from None
        phases = {p.number: p.id for p in exp.phases}
        if not phases:
            raise UsageError(f"experiment {args.experiment!r} has not started: no phase to export")
        number = args.phase if args.phase is not None else max(phases)
        if number not in phases:
            raise UsageError(
                f"experiment {args.experiment!r} has no phase {number} (phases: {sorted(phases)})"
            )
        exp_id, phase_id = exp.id, phases[number]
    out = sys.stdout if args.out == "-" else open(args.out, "w", newline="", encoding="utf-8")
    try:
        writer = csv.writer(out)
        writer.writerow(["unit_id", "arm", "impressions", "clicks", "pre_impressions", "pre_clicks"])
        with engine.connect() as conn:
            rows = 0
            for row in iter_user_rows(conn, exp_id, phase_id):
                writer.writerow(row)
                rows += 1
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"{rows} users of {args.experiment} phase {number} written to {args.out}", file=sys.stderr)
    engine.dispose()
    return 0
