"""The abrec HTTP API: a Flask application factory with blueprints (serving, admin, ops, OpenAPI,
and the registry's admin blueprint). Torch-free: models are reached through `abrec.models.client`.

    app = create_app(settings, engine=engine, model_client=client)

Everything one process keeps between requests lives in `app.extensions["abrec_api"]` (an
`ApiState`); `shutdown(app)` stops its event-log writer after committing what is queued.
"""

from __future__ import annotations

import time
from pathlib import Path

from abrec.experiments import metrics
from abrec.experiments.api import admin, health, openapi, serving
from abrec.experiments.api.errors import install_error_handlers
from abrec.experiments.api.state import ApiState, PopularCache, RecentImpressions, SnapshotCache
from abrec.experiments.clock import get_clock
from abrec.experiments.eventlog import EventLog
from abrec.experiments.signing import Signer
from flask import Flask, Response, g, request
from sqlalchemy import Engine

from abrec.config import Settings, get_settings
from abrec.db import is_sqlite, make_engine, session_factory

MAX_BODY_BYTES = 64 * 1024

__all__ = ["create_app", "shutdown"]


def create_app(settings: Settings | None = None, *, engine: Engine | None = None, model_client=None) -> Flask:
    """A ready API application. The schema must exist already (`abrec db upgrade` or `init_db`)."""
    settings = settings or get_settings()
    if engine is None:
        # A database that stops answering must fail a batch in seconds, not after the OS's TCP timeout.
        timeout = {} if is_sqlite(settings.database_url) else {"connect_args": {"connect_timeout": 3}}
        engine = make_engine(settings.database_url, **timeout)
    if model_client is None:
        from abrec.models.client import HttpModelClient

        model_client = HttpModelClient(settings.model_server_url)
    sessions = session_factory(engine)
    popular = PopularCache()
    eventlog = EventLog(
        engine, max_rows=settings.eventlog_max_rows, max_wait_s=settings.eventlog_max_wait_ms / 1000
    ).start()
    state = ApiState(
        settings=settings,
        engine=engine,
        sessions=sessions,
        model_client=model_client,
        eventlog=eventlog,
        snapshots=SnapshotCache(sessions, popular, settings.snapshot_ttl_s),
        popular=popular,
        recent=RecentImpressions(engine),
        signer=Signer(settings.secret_key),
        clock=get_clock(),
    )

    # An explicit instance path: Flask's guess fails for packages mapped by an editable install.
    app = Flask(__name__, instance_path=str(Path(__file__).resolve().parent / "instance"))
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False
    app.extensions["abrec_api"] = state
    app.extensions["abrec_sessions"] = sessions  # shared with the registry's admin blueprint
    for blueprint in (serving.bp, admin.bp, health.bp, openapi.bp):
        app.register_blueprint(blueprint)
    from abrec.experiments.models_admin import models_admin_bp

    app.register_blueprint(models_admin_bp)
    install_error_handlers(app)
    app.wsgi_app = serving.HotPath(app.wsgi_app, state, MAX_BODY_BYTES)  # type: ignore[method-assign]

    @app.before_request
    def _start_timer() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        seconds = time.perf_counter() - g.started if "started" in g else None
        metrics.observe_request(rule, response.status_code, seconds)
        return response

    return app


def shutdown(app: Flask) -> None:
    app.extensions["abrec_api"].close()
