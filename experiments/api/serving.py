"""The public hot path: `POST /v1/recommendations` and `POST /v1/clicks`.

A recommendation decides the arm from the cached snapshot (no database read), asks the model server
with a deadline (falling back to the arm model's popular items), and returns only after the
impression (and the user's first exposure in the phase) is committed by the event log. If the
database is unreachable the slate is still served, marked `logged: false`, without an impression id.

Each endpoint is a transport-free function of (state, raw body) -> answer, raising `ApiError`.
Flask's blueprint routes them (URL map, OpenAPI, every unusual request), and `HotPath`, a WSGI
layer in front of Flask, answers the plain case itself: a POST with a Content-Length within the
limit. Flask's request and response objects, context push and hooks cost more CPU than the
handler itself; the answers, errors and metrics are the same either way.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from abrec.experiments import metrics
from abrec.experiments.api.errors import ApiError, json_response
from abrec.experiments.api.state import ApiState, ImpressionInfo, positions_of
from abrec.experiments.api.validation import parse_body
from abrec.experiments.eventlog import LogUnavailable, RowsRejected
from abrec.experiments.service import decide
from abrec.experiments.signing import BadToken
from abrec.models.client import ModelUnavailable
from flask import Blueprint, current_app, request
from werkzeug.http import HTTP_STATUS_CODES

bp = Blueprint("serving", __name__)
log = logging.getLogger("abrec.api")

FALLBACK_VERSION = "popular"
EVENTLOG_TIMEOUT_S = 2.0


def _state() -> ApiState:
    return current_app.extensions["abrec_api"]


@bp.post("/v1/recommendations")
def recommend_view():
    return json_response(recommend(_state(), request.get_data()))


@bp.post("/v1/clicks")
def click_view():
    return json_response(click(_state(), request.get_data()))


def recommend(state: ApiState, raw: bytes) -> dict[str, Any]:
    t0 = time.perf_counter()
    body = parse_body(raw, "RecommendationRequest")
    snapshot = state.snapshots.get(body["experiment"])
    if snapshot.status == "draft":
        raise ApiError(
            409, "experiment not started", f"experiment {snapshot.key!r} is a draft; start it first"
        )
    user_id, k = body["user_id"], body["k"]
    decision = decide(snapshot, user_id)
    try:
        answer = state.model_client.recommend(
            decision.model_alias,
            [str(i) for i in body["items"]],
            k,
            deadline_s=state.settings.model_deadline_s,
        )
        items, version, fallback = answer.items[:k], answer.version, False
    except ModelUnavailable:
        items, version, fallback = state.popular.get(decision.model_alias)[:k], FALLBACK_VERSION, True
        metrics.child(metrics.FALLBACKS, snapshot.key, decision.arm_name).inc()
    latency_ms = (time.perf_counter() - t0) * 1000

    now = state.clock.now()
    row_id = os.urandom(16).hex()  # 128 random bits, the 32 hex digits a signed id carries
    impression = {
        "id": row_id,
        "experiment_id": snapshot.id,
        "phase_id": decision.phase_id,
        "user_id": user_id,
        "session_id": body["session_id"],
        "arm_name": decision.arm_name,
        "model_version": version[:200],
        "items": items,
        "fallback": fallback,
        "latency_ms": latency_ms,
        "in_analysis": decision.in_analysis,
        "created_at": now,
    }
    exposure_key = (decision.phase_id, user_id)
    exposures = []
    if decision.log_exposure and decision.phase_id is not None and exposure_key not in state.exposed:
        exposures.append(
            {
                "experiment_id": snapshot.id,
                "phase_id": decision.phase_id,
                "user_id": user_id,
                "arm_name": decision.arm_name,
                "first_seen_at": now,
            }
        )
    impression_id = None
    try:
        state.eventlog.write(impressions=[impression], exposures=exposures, timeout_s=EVENTLOG_TIMEOUT_S)
        impression_id = state.signer.sign(row_id, int(now.timestamp()))
        state.recent.put(
            row_id,
            ImpressionInfo(
                snapshot.id,
                decision.phase_id,
                user_id,
                decision.arm_name,
                decision.in_analysis,
                positions_of(items),
            ),
        )
        if exposures:
            if len(state.exposed) > 200_000:
                state.exposed.clear()
            state.exposed.add(exposure_key)
    except (LogUnavailable, RowsRejected):
        pass  # degraded: the slate is served, unlogged
    logged = impression_id is not None
    metrics.child(
        metrics.RECOMMENDATIONS, snapshot.key, decision.arm_name, "true" if logged else "false"
    ).inc()
    metrics.child(metrics.RECOMMENDATION_LATENCY, snapshot.key, decision.arm_name).observe(
        time.perf_counter() - t0
    )
    return {
        "arm": decision.arm_name,
        "model_version": version,
        "impression_id": impression_id,
        "items": items,
        "fallback": fallback,
        "logged": logged,
    }


def click(state: ApiState, raw: bytes) -> dict[str, Any]:
    body = parse_body(raw, "ClickRequest")
    try:
        row_id, issued_at = state.signer.verify(body["impression_id"])
    except BadToken as exc:
        raise ApiError(400, "invalid impression_id", str(exc)) from None
    now = state.clock.now()
    age_s = now.timestamp() - issued_at
    if age_s > state.settings.attribution_window_s:
        raise ApiError(
            410,
            "expired",
            f"the click came {age_s:.0f} s after the impression; the attribution window is "
            f"{state.settings.attribution_window_s} s",
        )
    info = state.recent.get(row_id)
    if info is None:
        raise ApiError(404, "unknown impression", "no impression with this id is logged")
    item = str(body["item_id"])
    position = info.positions.get(item)
    if position is None:
        raise ApiError(422, "item not in the slate", f"item {item!r} was not shown in this impression")
    row = {
        "impression_id": row_id,
        "experiment_id": info.experiment_id,
        "phase_id": info.phase_id,
        "user_id": info.user_id,
        "arm_name": info.arm_name,
        "item_id": item,
        "position": position,
        "in_analysis": info.in_analysis,
        "created_at": now,
    }
    try:
        outcome = state.eventlog.write(clicks=[row], timeout_s=EVENTLOG_TIMEOUT_S)
    except LogUnavailable as exc:
        raise ApiError(503, "event log unavailable", f"{exc}; retry the click later") from None
    except RowsRejected as exc:
        raise ApiError(409, "click refused by the database", str(exc)[:200]) from None
    duplicate = outcome.duplicate_clicks[0]
    metrics.child(
        metrics.CLICKS, str(info.experiment_id), info.arm_name, "true" if duplicate else "false"
    ).inc()
    return {"recorded": True, "duplicate": duplicate, "arm": info.arm_name, "position": position}


_STATUS_LINES = {
    code: f"{code} {phrase}" for code, phrase in HTTP_STATUS_CODES.items()
}  # as Werkzeug says them
_HANDLERS: dict[str, Callable[[ApiState, bytes], dict[str, Any]]] = {
    "/v1/recommendations": recommend,
    "/v1/clicks": click,
}


class HotPath:
    """WSGI middleware: the plain POSTs of the two public endpoints without Flask, the rest to Flask.

    Anything unusual (another method, no or a too large Content-Length, chunked bodies) goes on to
    Flask, whose answers (405, 411/413, ...) stay the reference."""

    def __init__(self, flask_wsgi: Callable, state: ApiState, max_body: int) -> None:
        self.flask_wsgi = flask_wsgi
        self.state = state
        self.max_body = max_body

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        handler = _HANDLERS.get(path)
        if handler is None or environ.get("REQUEST_METHOD") != "POST" or "HTTP_TRANSFER_ENCODING" in environ:
            return self.flask_wsgi(environ, start_response)
        try:
            length = int(environ.get("CONTENT_LENGTH") or "")
        except ValueError:
            return self.flask_wsgi(environ, start_response)
        if not 0 <= length <= self.max_body:
            return self.flask_wsgi(environ, start_response)
        t0 = time.perf_counter()
        status = 200
        try:
            payload = handler(self.state, environ["wsgi.input"].read(length))
        except ApiError as exc:
            status, payload = exc.status, exc.to_dict()
        except Exception as exc:  # as Flask's handler of last resort answers it
            log.exception("unhandled error")
            status, payload = 500, {"error": "internal error", "detail": type(exc).__name__}
        body = orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS)
        start_response(
            _STATUS_LINES.get(status, f"{status} UNKNOWN"),
            [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        )
        metrics.observe_request(path, status, time.perf_counter() - t0)
        return [body]
