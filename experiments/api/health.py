"""Operations endpoints: `/healthz` (the process answers), `/readyz` (database and model server
reachable) and `/metrics` (Prometheus text format)."""

from __future__ import annotations

from abrec.experiments import metrics
from abrec.experiments.api.state import ApiState
from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    state: ApiState = current_app.extensions["abrec_api"]
    checks: dict[str, str] = {}
    try:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except SQLAlchemyError as exc:
        checks["database"] = f"unreachable: {str(exc).splitlines()[0][:200]}"
    checks["model_server"] = "ok" if state.model_client.ready() else "not ready"
    ready = all(v == "ok" for v in checks.values())
    body = {"ready": ready, "checks": checks, "eventlog_queue_depth": state.eventlog.queue_depth}
    return jsonify(body), 200 if ready else 503


@bp.get("/metrics")
def prometheus():
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)
