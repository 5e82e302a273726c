"""`abrec db`, `abrec users` and `abrec experiments`: the schema, identities and experiment lifecycle.

Light to import: the database and the domain modules are imported inside each command. Every
command migrates the database first (`init_db` is idempotent) and runs in one transaction.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    db_parent = argparse.ArgumentParser(add_help=False)
    db_parent.add_argument("--db", default=None, help="database URL (default: $ABREC_DATABASE_URL or sqlite)")
    actor_parent = argparse.ArgumentParser(add_help=False, parents=[db_parent])
    actor_parent.add_argument("--actor", default=None, help="who changes it, for the audit log ($USER)")

    db = subparsers.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    p = db.add_parser("upgrade", parents=[db_parent], help="create or upgrade every table (Alembic heads)")
    p.set_defaults(func=cmd_db_upgrade)

    users = subparsers.add_parser("users", help="people and API tokens").add_subparsers(
        dest="users_command", required=True
    )
    p = users.add_parser("create", parents=[actor_parent], help="create a user")
    p.add_argument("username")
    p.add_argument("--role", required=True, choices=["viewer", "editor", "admin"])
    group = p.add_mutually_exclusive_group()
    group.add_argument("--password", help="the password (visible to ps: prefer --password-stdin)")
    group.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.set_defaults(func=cmd_users_create)
    p = users.add_parser("token", parents=[actor_parent], help="create an API token; prints it once")
    p.add_argument("username")
    p.add_argument("--name", default="", help="a label for the token, e.g. 'ci'")
    p.add_argument("--ttl-days", type=float, default=None, help="days until it expires (default never)")
    p.set_defaults(func=cmd_users_token)
    p = users.add_parser("revoke", parents=[actor_parent], help="revoke a user's tokens with the given name")
    p.add_argument("username")
    p.add_argument("--name", default="", help="the token's label")
    p.set_defaults(func=cmd_users_revoke)
    p = users.add_parser("list", parents=[db_parent], help="list users and roles")
    p.set_defaults(func=cmd_users_list)

    exps = subparsers.add_parser("experiments", help="experiment definitions and lifecycle").add_subparsers(
        dest="experiments_command", required=True
    )
    p = exps.add_parser("create", parents=[actor_parent], help="define an experiment (draft)")
    p.add_argument("key")
    p.add_argument(
        "--arm",
        action="append",
        required=True,
        metavar="NAME=ALIAS[:WEIGHT]",
        help="an arm, e.g. control=tron@champion:0.5; repeat; the first is the control",
    )
    p.add_argument("--hypothesis", default="")
    p.add_argument("--primary-metric", default="ctr")
    p.add_argument("--timezone", default="UTC", help="IANA timezone of the experiment's calendar days")
    p.add_argument("--coverage", type=float, default=1.0, help="share of users in the experiment, in (0, 1]")
    p.add_argument("--hash-version", type=int, default=2, choices=[1, 2])
    p.add_argument("--seed", default=None, help="hash seed (default: the key)")
    p.add_argument("--namespace", default=None, help="namespace shared by mutually exclusive experiments")
    p.add_argument("--namespace-range", default=None, metavar="START,END", help="e.g. 0,0.5")
    p.add_argument("--planned-users", type=int, default=None)
    p.add_argument("--target-effect", type=float, default=None, help="relative lift to detect, e.g. 0.02")
    p.add_argument("--min-runtime-days", type=int, default=7)
    p.add_argument("--report-time", default="02:00", help="nightly report HH:MM, local time")
    p.add_argument("--webhook-url", default=None)
    p.add_argument("--email-to", default=None)
    p.set_defaults(func=cmd_experiments_create)

    p = exps.add_parser("list", parents=[db_parent], help="list experiments")
    p.add_argument("--status", default=None)
    p.set_defaults(func=cmd_experiments_list)
    p = exps.add_parser("show", parents=[db_parent], help="print an experiment as JSON (arms, phases, pins)")
    p.add_argument("key")
    p.set_defaults(func=cmd_experiments_show)
    for action, text in [
        ("start", "draft -> running (opens phase 1)"),
        ("pause", "running -> paused (serves the control, logs no exposure)"),
        ("resume", "paused -> running"),
        ("stop", "running or paused -> stopped (serves the control)"),
    ]:
        p = exps.add_parser(action, parents=[actor_parent], help=text)
        p.add_argument("key")
        p.set_defaults(func=cmd_experiments_transition, action=action)
    p = exps.add_parser("ship", parents=[actor_parent], help="serve one arm to everyone; closes it")
    p.add_argument("key")
    p.add_argument("--arm", required=True)
    p.set_defaults(func=cmd_experiments_ship)
    p = exps.add_parser("weights", parents=[actor_parent], help="new weights (new phase, re-randomised)")
    p.add_argument("key")
    p.add_argument("weights", nargs="+", metavar="NAME=WEIGHT")
    p.add_argument("--keep-seed", action="store_true", help="keep the seed: users are not re-randomised")
    p.set_defaults(func=cmd_experiments_weights)
    p = exps.add_parser("coverage", parents=[actor_parent], help="new coverage (same seed: no arm changes)")
    p.add_argument("key")
    p.add_argument("coverage", type=float)
    p.set_defaults(func=cmd_experiments_coverage)
    p = exps.add_parser("pin", parents=[actor_parent], help="always serve ARM to USER (QA; not analysed)")
    p.add_argument("key")
    p.add_argument("user")
    p.add_argument("arm")
    p.set_defaults(func=cmd_experiments_pin)
    p = exps.add_parser("unpin", parents=[actor_parent], help="remove a user's pin")
    p.add_argument("key")
    p.add_argument("user")
    p.set_defaults(func=cmd_experiments_unpin)


# ---------------------------------------------------------------------------------------------


@contextmanager
def _session(args: argparse.Namespace) -> Iterator[Any]:
    """A migrated database and one transaction; domain errors become usage errors (exit 2)."""
    from abrec.experiments.identity import IdentityError
    from abrec.experiments.service import ExperimentError
    from sqlalchemy.exc import OperationalError

    from abrec.cli import UsageError
    from abrec.config import get_settings
    from abrec.db import init_db, make_engine, session_factory, session_scope

    url = args.db or get_settings().database_url
    engine = make_engine(url)
    try:
        try:
            init_db(engine)
        except OperationalError as exc:
            raise UsageError(f"cannot open database {url}: {exc.orig}") from None
        with session_scope(session_factory(engine)) as session:
            yield session
    except (ExperimentError, IdentityError) as exc:
        raise UsageError(str(exc)) from None
    finally:
        engine.dispose()


def _actor(args: argparse.Namespace) -> str:
    return args.actor or os.environ.get("USER") or os.environ.get("USERNAME") or "cli"


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    with _session(args):
        pass
    print("database is at the newest revision")
    return 0


def _read_password(args: argparse.Namespace) -> str:
    from abrec.cli import UsageError

    if args.password is not None:
        return args.password
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if sys.stdin.isatty():
        import getpass

        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise UsageError("the passwords differ")
        return first
    raise UsageError("give --password or --password-stdin")


def cmd_users_create(args: argparse.Namespace) -> int:
    from abrec.experiments import identity

    password = _read_password(args)
    with _session(args) as session:
        user = identity.create_user(session, args.username, password, args.role, _actor(args))
        print(f"created user {user.username} ({user.role})")
    return 0


def cmd_users_token(args: argparse.Namespace) -> int:
    from abrec.experiments import identity

    with _session(args) as session:
        token = identity.create_token(session, args.username, args.name, args.ttl_days, actor=_actor(args))
    print(token)
    return 0


def cmd_users_revoke(args: argparse.Namespace) -> int:
    from abrec.experiments import identity

    with _session(args) as session:
        count = identity.revoke_token(session, args.username, args.name, _actor(args))
    print(f"revoked {count} token(s)")
    return 0


def cmd_users_list(args: argparse.Namespace) -> int:
    from abrec.experiments import identity

    with _session(args) as session:
        rows = [
            (u.username, u.role, u.created_at.isoformat(timespec="seconds"))
            for u in identity.list_users(session)
        ]
    _print_table(("USERNAME", "ROLE", "CREATED"), rows)
    return 0


def _parse_arm(text: str) -> tuple[str, str, float]:
    """NAME=ALIAS[:WEIGHT] -> (name, alias, weight)."""
    from abrec.cli import UsageError

    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise UsageError(f"--arm must look like NAME=MODEL@ALIAS[:WEIGHT], got {text!r}")
    alias, colon, weight_text = rest.rpartition(":")
    if not colon:
        return name, rest, 1.0
    try:
        return name, alias, float(weight_text)
    except ValueError:
        raise UsageError(f"weight of arm {name!r} must be a number, got {weight_text!r}") from None


def _parse_range(text: str | None) -> tuple[float, float]:
    from abrec.cli import UsageError

    if text is None:
        return (0.0, 1.0)
    try:
        start, end = (float(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--namespace-range must be START,END, got {text!r}") from None
    return (start, end)


def cmd_experiments_create(args: argparse.Namespace) -> int:
    from abrec.experiments import service

    arms = [service.ArmSpec(name, weight, alias) for name, alias, weight in map(_parse_arm, args.arm)]
    with _session(args) as session:
        exp = service.create_experiment(
            session,
            key=args.key,
            arms=arms,
            actor=_actor(args),
            hypothesis=args.hypothesis,
            primary_metric=args.primary_metric,
            hash_version=args.hash_version,
            seed=args.seed,
            timezone=args.timezone,
            coverage=args.coverage,
            namespace=args.namespace,
            namespace_range=_parse_range(args.namespace_range),
            planned_users=args.planned_users,
            target_effect=args.target_effect,
            min_runtime_days=args.min_runtime_days,
            report_time=args.report_time,
            webhook_url=args.webhook_url,
            email_to=args.email_to,
        )
        arms_text = ", ".join(f"{a.name}={a.model_alias}:{a.weight:g}" for a in exp.arms)
        print(f"created experiment {exp.key} (draft): {arms_text}")
    return 0


def cmd_experiments_list(args: argparse.Namespace) -> int:
    from abrec.experiments import service

    with _session(args) as session:
        rows = []
        for exp in service.list_experiments(session, args.status):
            phase = service.current_phase(session, exp)
            arms = ", ".join(f"{a.name}:{a.weight:g}" for a in exp.arms)
            rows.append((exp.key, exp.status, str(phase.number if phase else "-"), f"{exp.coverage:g}", arms))
    _print_table(("KEY", "STATUS", "PHASE", "COVERAGE", "ARMS"), rows)
    return 0


def cmd_experiments_show(args: argparse.Namespace) -> int:
    from abrec.experiments import service

    with _session(args) as session:
        print(json.dumps(service.describe(session, args.key), indent=2))
    return 0


def _run(args: argparse.Namespace, change: Callable[[Any], Any], message: Callable[[Any], str]) -> int:
    with _session(args) as session:
        result = change(session)
        print(message(result))
    return 0


def cmd_experiments_transition(args: argparse.Namespace) -> int:
    from abrec.experiments import service

    fn = getattr(service, args.action)
    return _run(args, lambda s: fn(s, args.key, _actor(args)), lambda e: f"experiment {e.key} is {e.status}")


def cmd_experiments_ship(args: argparse.Namespace) -> int:
    from abrec.experiments import service

    return _run(
        args,
        lambda s: service.ship(s, args.key, args.arm, _actor(args)),
        lambda e: f"experiment {e.key} is shipped: everyone gets {e.shipped_arm}",
    )


def _phase_message(phase: Any) -> str:
    if phase is None:
        return "updated the draft (phases begin when it starts)"
    return f"phase {phase.number} started (seed {phase.seed}): {phase.reason}"


def cmd_experiments_weights(args: argparse.Namespace) -> int:
    from abrec.experiments import service

    from abrec.cli import UsageError

    weights: dict[str, float] = {}
    for item in args.weights:
        name, sep, value = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError(item)
            weights[name] = float(value)
        except ValueError:
            raise UsageError(f"weights must look like NAME=WEIGHT, got {item!r}") from None
    return _run(
        args,
        lambda s: service.change_weights(s, args.key, weights, _actor(args), reseed=not args.keep_seed),
        _phase_message,
    )


def cmd_experiments_coverage(args: argparse.Namespace) -> int:
    from abrec.experiments import service

    return _run(
        args, lambda s: service.change_coverage(s, args.key, args.coverage, _actor(args)), _phase_message
    )


def cmd_experiments_pin(args: argparse.Namespace) -> int:
    from abrec.experiments import service

    return _run(
        args,
        lambda s: service.pin(s, args.key, args.user, args.arm, _actor(args)),
        lambda p: f"user {p.user_id} is pinned to {p.arm_name} (served, not analysed)",
    )


def cmd_experiments_unpin(args: argparse.Namespace) -> int:
    from abrec.experiments import service

    return _run(
        args,
        lambda s: service.unpin(s, args.key, args.user, _actor(args)),
        lambda _: f"user {args.user} unpinned",
    )


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
