"""Admin endpoints under /v1/admin: experiment lifecycle (editor), reads (viewer), simulated clock (admin).

Authentication is a Bearer API token (`abrec users token`): none or an unknown one is 401, a role
too weak is 403. Each change runs in one transaction with its audit row (the service layer writes
it), and drops this process's cached snapshot so the change is served at once here (other
processes within their snapshot TTL).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from functools import wraps
from typing import Any

from abrec.experiments import service
from abrec.experiments.api.errors import ApiError
from abrec.experiments.api.state import ApiState
from abrec.experiments.api.validation import parse_body
from abrec.experiments.identity import authenticate_token, role_at_least
from abrec.experiments.schema import STATUSES
from flask import Blueprint, current_app, g, jsonify, request
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from abrec.db import session_scope

bp = Blueprint("admin", __name__, url_prefix="/v1/admin")


def _state() -> ApiState:
    return current_app.extensions["abrec_api"]


def _user(role: str) -> str:
    """The username behind the request's token, if it holds `role`; ApiError 401/403 otherwise."""
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header.startswith("Bearer ") else ""
    if not token:
        raise ApiError(401, "authentication required", "send Authorization: Bearer <API token>")
    try:
        with _state().sessions() as session:
            user = authenticate_token(session, token)
            if user is None:
                raise ApiError(401, "invalid token", "unknown, expired or revoked API token")
            if not role_at_least(user, role):
                raise ApiError(
                    403, "forbidden", f"this needs the {role} role; {user.username} is {user.role}"
                )
            return user.username
    except SQLAlchemyError as exc:
        raise ApiError(503, "database unavailable", "cannot check the token; retry later") from exc


def requires(role: str) -> Callable:
    def decorate(view: Callable) -> Callable:
        @wraps(view)
        def wrapped(*args: Any, **kwargs: Any):
            g.actor = _user(role)
            try:
                return view(*args, **kwargs)
            except service.ExperimentNotFound as exc:
                raise ApiError(404, "unknown experiment", str(exc)) from None
            except service.ExperimentError as exc:
                raise ApiError(409, "refused", str(exc)) from None
            except SQLAlchemyError as exc:
                raise ApiError(503, "database unavailable", type(exc).__name__) from exc

        return wrapped

    return decorate


def _change(key: str, action: Callable[[Session], Any]):
    """Run one change in a transaction, drop the cached snapshot, answer with the experiment."""
    state = _state()
    with session_scope(state.sessions) as session:
        action(session)
    state.snapshots.invalidate(key)
    with state.sessions() as session:
        return jsonify(service.describe(session, key))


@bp.get("/experiments")
@requires("viewer")
def list_experiments():
    status = request.args.get("status")
    if status is not None and status not in STATUSES:
        raise ApiError(400, "invalid status", f"use one of {', '.join(STATUSES)}")
    with _state().sessions() as session:
        keys = [e.key for e in service.list_experiments(session, status)]
        return jsonify({"experiments": [service.describe(session, key) for key in keys]})


@bp.get("/experiments/<key>")
@requires("viewer")
def show_experiment(key: str):
    with _state().sessions() as session:
        return jsonify(service.describe(session, key))


@bp.post("/experiments")
@requires("editor")
def create_experiment():
    body = parse_body(request.get_data(), "CreateExperiment")
    arms = [service.ArmSpec(a["name"], a["weight"], a["model"]) for a in body.pop("arms")]
    key = body.pop("key")
    if "namespace_range" in body:
        body["namespace_range"] = tuple(body["namespace_range"])
    with session_scope(_state().sessions) as session:
        service.create_experiment(session, key=key, arms=arms, actor=g.actor, **body)
    _state().snapshots.invalidate(key)
    with _state().sessions() as session:
        return jsonify(service.describe(session, key)), 201


def _lifecycle(name: str, action: Callable[[Session, str, str], Any]) -> None:
    def view(key: str):
        parse_body(request.get_data(), "Empty", empty_ok=True)
        return _change(key, lambda s: action(s, key, g.actor))

    view.__name__ = name
    bp.post(f"/experiments/<key>/{name}")(requires("editor")(view))


for _name, _action in (
    ("start", service.start),
    ("pause", service.pause),
    ("resume", service.resume),
    ("stop", service.stop),
):
    _lifecycle(_name, _action)


@bp.post("/experiments/<key>/ship")
@requires("editor")
def ship(key: str):
    body = parse_body(request.get_data(), "Ship")
    return _change(key, lambda s: service.ship(s, key, body["arm"], g.actor))


@bp.post("/experiments/<key>/weights")
@requires("editor")
def change_weights(key: str):
    body = parse_body(request.get_data(), "ChangeWeights")
    return _change(
        key,
        lambda s: service.change_weights(s, key, body["weights"], g.actor, reseed=body.get("reseed", True)),
    )


@bp.post("/experiments/<key>/coverage")
@requires("editor")
def change_coverage(key: str):
    body = parse_body(request.get_data(), "ChangeCoverage")
    return _change(key, lambda s: service.change_coverage(s, key, body["coverage"], g.actor))


@bp.post("/experiments/<key>/pins")
@requires("editor")
def pin(key: str):
    body = parse_body(request.get_data(), "Pin")
    return _change(key, lambda s: service.pin(s, key, body["user_id"], body["arm"], g.actor))


@bp.delete("/experiments/<key>/pins/<user_id>")
@requires("editor")
def unpin(key: str, user_id: str):
    return _change(key, lambda s: service.unpin(s, key, user_id, g.actor))


@bp.get("/clock")
@requires("viewer")
def get_clock():
    clock = _state().clock
    return jsonify({"now": clock.now().isoformat(), "offset_s": clock.offset_s()})


@bp.post("/clock")
@requires("admin")
def set_clock():
    """Move the simulated clock (admins only; a client can never set it)."""
    body = parse_body(request.get_data(), "SetClock")
    clock = _state().clock
    if "now" in body:
        try:
            when = datetime.fromisoformat(body["now"].replace("Z", "+00:00"))
        except ValueError:
            raise ApiError(
                400, "invalid field 'now'", f"{body['now']!r} is not an ISO 8601 date/time"
            ) from None
        if when.tzinfo is None:
            raise ApiError(400, "invalid field 'now'", "give a time zone, e.g. 2026-11-01T00:00:00Z")
    try:
        clock.set_now(when) if "now" in body else clock.set_offset(body["offset_s"])
    except (ValueError, OverflowError) as exc:
        raise ApiError(400, "invalid clock", str(exc)) from None
    return jsonify({"now": clock.now().isoformat(), "offset_s": clock.offset_s()})
