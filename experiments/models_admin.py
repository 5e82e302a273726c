"""Registry administration: `abrec models register|list|show|alias` and the REST admin blueprint.

It lives in experiments/ because moving an alias changes the treatment of every live experiment
whose arm is bound to it: the move is refused unless the caller confirms, and then each of those
experiments starts a new phase (same seed) in the same transaction as the move, so no phase mixes
two model versions. models/ cannot do this itself (it never imports experiments/).

Light to import (it is a CLI module): SQLAlchemy, Flask and the registry are imported inside the
functions. `models_admin_bp` is built on first access (PEP 562 `__getattr__`). The API process
stays torch-free: its registrations validate the checkpoint in a child process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from abrec.models.registry import AliasMove
    from sqlalchemy.orm import Session


class ConfirmationRequired(ValueError):
    """The alias is bound to arms of live experiments; moving it needs confirm=True."""

    def __init__(self, alias: str, experiments: list[str]) -> None:
        self.alias = alias
        self.experiments = experiments
        super().__init__(
            f"{alias} is used by live experiment(s) {', '.join(experiments)}: moving it changes their "
            "treatment and starts a new phase of each; confirm to proceed"
        )


@dataclass
class AliasMoveOutcome:
    move: AliasMove
    new_phases: dict[str, int] = field(default_factory=dict)  # experiment key -> new phase number

    def to_dict(self) -> dict[str, Any]:
        return {
            "alias": self.move.alias,
            "from": self.move.from_version,
            "to": self.move.to_version,
            "changed": self.move.changed,
            "new_phases": self.new_phases,
        }


def experiments_using(session: Session, alias: str) -> list[str]:
    """Keys of the live (running or paused) experiments with an arm bound to `alias`."""
    from abrec.experiments.schema import Arm, Experiment
    from abrec.experiments.service import LIVE
    from sqlalchemy import select

    query = (
        select(Experiment.key)
        .join(Arm)
        .where(Arm.model_alias == alias, Experiment.status.in_(LIVE))
        .distinct()
        .order_by(Experiment.key)
    )
    return list(session.scalars(query))


def move_alias(
    session: Session, alias: str, version: str, *, actor: str, confirm: bool = False, reason: str = ""
) -> AliasMoveOutcome:
    """Point `alias` at `version`, checking live experiments first (flushes; the caller commits)."""
    from abrec.experiments import audit, service
    from abrec.models import registry

    registry.parse_alias(alias)
    target = registry.get_version(session, version)
    try:
        current = registry.resolve(session, alias)
    except registry.NotFound:
        current = None
    if current is not None and current.id == target.id:
        return AliasMoveOutcome(registry.AliasMove(alias, target.label, target.label, changed=False))
    live = experiments_using(session, alias)
    if live and not confirm:
        raise ConfirmationRequired(alias, live)
    move = registry.set_alias(session, alias, version, actor=actor, reason=reason)
    audit.record(
        session,
        actor,
        "alias_move",
        "model_alias",
        alias,
        {"from": move.from_version, "to": move.to_version, "reason": reason, "experiments": live},
    )
    phases = service.on_alias_moved(session, alias, actor) if live else []
    return AliasMoveOutcome(move, {p.experiment.key: p.number for p in phases})


# ------------------------------------------------------------------------------------------- CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    db_parent = argparse.ArgumentParser(add_help=False)
    db_parent.add_argument("--db", default=None, help="database URL (default: $ABREC_DATABASE_URL or sqlite)")
    db_parent.add_argument("--json", action="store_true", help="print JSON")
    actor_parent = argparse.ArgumentParser(add_help=False, parents=[db_parent])
    actor_parent.add_argument("--actor", default=None, help="who changes it, for the history ($USER)")

    models = subparsers.add_parser("models", help="model registry: versions and aliases").add_subparsers(
        dest="models_command", required=True
    )
    p = models.add_parser("register", parents=[actor_parent], help="validate a checkpoint and add a version")
    p.add_argument("checkpoint", help="a .safetensors file written by `abrec train`")
    p.add_argument("--name", required=True, help="model name, e.g. tron")
    p.add_argument("--description", default="")
    p.add_argument("--alias", default=None, help="also point NAME@ALIAS at the new version")
    p.add_argument("--confirm", action="store_true", help="let --alias move an alias live experiments use")
    p.add_argument("--store", default=None, help="artifact store (default: $ABREC_REGISTRY_STORE)")
    p.set_defaults(func=cmd_register)

    p = models.add_parser("list", parents=[db_parent], help="list versions and aliases")
    p.add_argument("--name", default=None, help="only this model")
    p.set_defaults(func=cmd_list)

    p = models.add_parser("show", parents=[db_parent], help="a version (tron:3) or an alias with its history")
    p.add_argument("ref", help="tron:3 or tron@champion")
    p.add_argument("--at", default=None, help="for an alias: the version it served at this ISO time (UTC)")
    p.set_defaults(func=cmd_show)

    p = models.add_parser("alias", parents=[actor_parent], help="point an alias at a version")
    p.add_argument("alias", help="e.g. tron@champion")
    p.add_argument("version", help="e.g. tron:3")
    p.add_argument("--confirm", action="store_true", help="move it even though live experiments use it")
    p.add_argument("--reason", default="", help="why, for the history")
    p.set_defaults(func=cmd_alias)


def _actor(args: argparse.Namespace) -> str:
    return args.actor or os.environ.get("USER") or os.environ.get("USERNAME") or "cli"


def _sessions(args: argparse.Namespace):
    from sqlalchemy.exc import OperationalError

    from abrec.cli import UsageError
    from abrec.config import get_settings
    from abrec.db import init_db, make_engine, session_factory

    url = args.db or get_settings().database_url
    engine = make_engine(url)
    try:
        init_db(engine)
    except OperationalError as exc:
        raise UsageError(f"cannot open database {url}: {exc.orig}") from None
    return session_factory(engine)


def _print(args: argparse.Namespace, data: Any, lines: list[str]) -> None:
    print(json.dumps(data, indent=2) if args.json else "\n".join(lines))


def _user_errors():
    from abrec.experiments.service import ExperimentError
    from abrec.models.registry import RegistryError
    from abrec.models.store import StoreError

    return (RegistryError, StoreError, ExperimentError, ConfirmationRequired)


def cmd_register(args: argparse.Namespace) -> int:
    from abrec.models.registry import register_model
    from abrec.models.store import open_store

    from abrec.cli import UsageError
    from abrec.config import get_settings

    sessions = _sessions(args)
    store = open_store(args.store or get_settings().registry_store)
    with sessions() as session:
        try:
            row = register_model(session, store, args.checkpoint, args.name, actor=_actor(args),
                                 description=args.description)
        except _user_errors() as exc:
            raise UsageError(str(exc)) from None
        data = row.to_dict()
        lines = [f"registered {row.label} ({row.kind}, {row.n_items} items, sha256 {row.sha256[:12]})"]
        if args.alias:
            try:
                outcome = move_alias(session, f"{args.name}@{args.alias}", row.label, actor=_actor(args),
                                     confirm=args.confirm, reason="registered")
                session.commit()
            except _user_errors() as exc:
                raise UsageError(f"{row.label} is registered, but the alias was not moved: {exc}") from None
            data["alias"] = outcome.to_dict()
    if "alias" in data:
        lines.append(_describe_move(data["alias"]))
    _print(args, data, lines)
    return 0


def _describe_move(move: dict[str, Any]) -> str:
    if not move["changed"]:
        return f"{move['alias']} already points to {move['to']}"
    text = f"{move['alias']}: {move['from'] or '(new)'} -> {move['to']}"
    for key, number in move["new_phases"].items():
        text += f"\n  experiment {key}: new phase {number}"
    return text


def cmd_list(args: argparse.Namespace) -> int:
    from abrec.models import registry

    with _sessions(args)() as session:
        versions = registry.list_versions(session, args.name)
        aliases = registry.list_aliases(session, args.name)
        data = {
            "versions": [v.to_dict() for v in versions],
            "aliases": {a.ref: a.version.label for a in aliases},
        }
    lines = [f"{'VERSION':<20} {'KIND':<12} {'ITEMS':>8}  {'CREATED':<20} BY"]
    for v in versions:
        created = f"{v.created_at:%Y-%m-%d %H:%M:%S}"
        lines.append(f"{v.label:<20} {v.kind:<12} {v.n_items:>8}  {created:<20} {v.created_by}")
    if aliases:
        lines += ["", "ALIASES"] + [f"{a.ref:<28} -> {a.version.label}" for a in aliases]
    _print(args, data, lines)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from abrec.models import registry

    from abrec.cli import UsageError

    with _sessions(args)() as session:
        try:
            if "@" not in args.ref:
                if args.at:
                    raise UsageError("--at applies to aliases (name@alias)")
                data = registry.get_version(session, args.ref).to_dict()
                _print(args, data, [json.dumps(data, indent=2)])
                return 0
            history = [h.to_dict() for h in registry.alias_history(session, args.ref)]
            if not history:
                raise registry.RegistryError(f"no alias {args.ref}")
            data: dict[str, Any] = {
                "alias": args.ref,
                "version": registry.resolve(session, args.ref).label,
                "history": history,
                "live_experiments": experiments_using(session, args.ref),
            }
            if args.at:
                when = _parse_time(args.at)
                then = registry.alias_at(session, args.ref, when)
                data["at"] = {"time": when.isoformat(), "version": then.label if then else None}
        except registry.RegistryError as exc:
            raise UsageError(str(exc)) from None
    lines = [f"{args.ref} -> {data['version']}"]
    if "at" in data:
        lines.append(f"at {data['at']['time']}: {data['at']['version'] or '(alias did not exist)'}")
    for h in history:
        lines.append(f"  {h['at']}  {h['from'] or '(new)'} -> {h['to']}  by {h['actor']}  {h['reason']}")
    if data["live_experiments"]:
        lines.append(f"live experiments: {', '.join(data['live_experiments'])}")
    _print(args, data, lines)
    return 0


def _parse_time(text: str) -> datetime:
    from datetime import UTC

    from abrec.cli import UsageError

    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--at {text!r} is not an ISO date/time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def cmd_alias(args: argparse.Namespace) -> int:
    from abrec.cli import UsageError

    with _sessions(args)() as session:
        try:
            outcome = move_alias(session, args.alias, args.version, actor=_actor(args), confirm=args.confirm,
                                 reason=args.reason)
            session.commit()
        except _user_errors() as exc:
            raise UsageError(str(exc)) from None
    data = outcome.to_dict()
    _print(args, data, [_describe_move(data)])
    return 0


# ------------------------------------------------------------------------------------------- REST


def _build_blueprint():
    """GET /v1/admin/models[/<ref>] (viewer), POST /v1/admin/models (editor, multipart upload),
    GET /v1/admin/aliases[/<alias>][?at=ISO] (viewer), PUT /v1/admin/aliases/<alias> (editor)."""
    import tempfile
    from functools import wraps
    from pathlib import Path

    from abrec.experiments.identity import authenticate_token, role_at_least
    from abrec.models import registry
    from abrec.models.store import StoreError
    from flask import Blueprint, current_app, g, jsonify, request

    bp = Blueprint("models_admin", __name__, url_prefix="/v1/admin")

    def sessions():
        ext = current_app.extensions
        if "abrec_sessions" not in ext:
            from abrec.config import get_settings
            from abrec.db import make_engine, session_factory

            ext["abrec_sessions"] = session_factory(make_engine(get_settings().database_url))
        return ext["abrec_sessions"]

    def store():
        ext = current_app.extensions
        if "abrec_registry_store" not in ext:
            from abrec.models.store import open_store

            from abrec.config import get_settings

            ext["abrec_registry_store"] = open_store(get_settings().registry_store)
        return ext["abrec_registry_store"]

    def error(status: int, message: str, **extra: Any):
        return jsonify({"error": message, **extra}), status

    def requires(role: str):
        def decorate(view):
            @wraps(view)
            def wrapped(*args, **kwargs):
                header = request.headers.get("Authorization", "")
                token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
                if not token:
                    return error(401, "an API token is required (Authorization: Bearer <token>)")
                with sessions()() as session:
                    user = authenticate_token(session, token)
                    if user is None:
                        return error(401, "unknown, expired or revoked API token")
                    if not role_at_least(user, role):
                        return error(403, f"this needs the {role} role; {user.username} is {user.role}")
                    g.actor = user.username
                    g.db = session
                    try:
                        return view(*args, **kwargs)
                    except registry.RegistryError as exc:
                        session.rollback()
                        return error(404 if isinstance(exc, registry.NotFound) else 400, str(exc))
                    except StoreError as exc:
                        session.rollback()
                        return error(503, str(exc))

            return wrapped

        return decorate

    @bp.get("/models")
    @requires("viewer")
    def list_models():
        name = request.args.get("name")
        return jsonify({
            "versions": [v.to_dict() for v in registry.list_versions(g.db, name)],
            "aliases": {a.ref: a.version.label for a in registry.list_aliases(g.db, name)},
        })

    @bp.get("/models/<ref>")
    @requires("viewer")
    def show_version(ref: str):
        return jsonify(registry.get_version(g.db, ref).to_dict())

    @bp.post("/models")
    @requires("editor")
    def register_version():
        upload = request.files.get("checkpoint")
        name = request.form.get("name", "")
        if upload is None:
            return error(400, "upload the checkpoint as multipart field 'checkpoint'")
        if not name:
            return error(400, "form field 'name' (the model name, e.g. tron) is required")
        with tempfile.TemporaryDirectory(prefix="abrec-upload-") as tmp:
            path = Path(tmp) / "upload.safetensors"
            upload.save(path)
            # An API process stays torch-free by validating in a child; one that already has torch
            # (the single-process demo) validates in place.
            in_place = "torch" in sys.modules
            validate = registry.validate_checkpoint if in_place else registry.validate_in_subprocess
            row = registry.register_model(g.db, store(), path, name, actor=g.actor,
                                          description=request.form.get("description", ""), validate=validate)
        return jsonify(row.to_dict()), 201

    @bp.get("/aliases")
    @requires("viewer")
    def list_aliases():
        aliases = registry.list_aliases(g.db, request.args.get("name"))
        return jsonify({a.ref: a.version.label for a in aliases})

    @bp.get("/aliases/<alias>")
    @requires("viewer")
    def show_alias(alias: str):
        history = registry.alias_history(g.db, alias)
        if not history:
            return error(404, f"no alias {alias}")
        data: dict[str, Any] = {
            "alias": alias,
            "version": registry.resolve(g.db, alias).label,
            "history": [h.to_dict() for h in history],
            "live_experiments": experiments_using(g.db, alias),
        }
        if "at" in request.args:
            try:
                when = datetime.fromisoformat(request.args["at"].replace("Z", "+00:00"))
            except ValueError:
                return error(400, f"'at' {request.args['at']!r} is not an ISO date/time")
            if when.tzinfo is None:
                return error(400, "'at' needs a time zone (e.g. 2026-11-01T12:00:00Z)")
            then = registry.alias_at(g.db, alias, when)
            data["at"] = {"time": when.isoformat(), "version": then.label if then else None}
        return jsonify(data)

    @bp.put("/aliases/<alias>")
    @requires("editor")
    def put_alias(alias: str):
        from abrec.experiments.service import ExperimentError

        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return error(400, "body must be a JSON object {\"version\": \"tron:3\", \"confirm\": false}")
        extra = set(body) - {"version", "confirm", "reason"}
        if extra:
            return error(400, f"unknown field(s): {', '.join(sorted(extra))}")
        version, confirm, reason = body.get("version"), body.get("confirm", False), body.get("reason", "")
        if not isinstance(version, str) or not isinstance(confirm, bool) or not isinstance(reason, str):
            return error(400, "'version' must be a string, 'confirm' a boolean and 'reason' a string")
        try:
            outcome = move_alias(g.db, alias, version, actor=g.actor, confirm=confirm, reason=reason)
        except ConfirmationRequired as exc:
            return error(409, str(exc), experiments=exc.experiments)
        except ExperimentError as exc:
            g.db.rollback()
            return error(409, str(exc))
        g.db.commit()
        return jsonify(outcome.to_dict())

    return bp


def __getattr__(name: str):
    if name == "models_admin_bp":
        bp = _build_blueprint()
        globals()[name] = bp
        return bp
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
