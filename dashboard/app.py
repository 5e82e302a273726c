"""The dashboard's Flask application factory: configuration, database sessions and blueprints.

The dashboard runs in its own process (`abrec dashboard`), so heavy pages never compete with the
recommendation path. It reads through analysis/, experiments/ and the registry only, and renders
nightly snapshots and stored reports, never raw events (except the streamed per-user CSV).
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Any

from abrec.experiments.service import ExperimentNotFound
from flask import Flask, Response, current_app, g, jsonify, render_template, request
from flask_wtf.csrf import CSRFProtect
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException, NotFound

from abrec.config import get_settings
from abrec.db import init_db, make_engine, session_factory

csrf = CSRFProtect()


def create_app(database_url: str | None = None, *, secret_key: str | None = None,
               init_schema: bool = True, **config: Any) -> Flask:
    """Build the dashboard for one database. `config` overrides Flask settings (tests)."""
    import plotly.offline

    settings = get_settings()
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=secret_key or settings.secret_key,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=timedelta(hours=12),
        # Tokens live as long as the login session: a form left open for an hour still submits.
        WTF_CSRF_TIME_LIMIT=None,
        OVERVIEW_PAGE_SIZE=25,
    )
    app.config.update(config)
    engine = make_engine(database_url or settings.database_url)
    if init_schema:
        init_db(engine)
    app.extensions["abrec_engine"] = engine
    app.extensions["abrec_sessions"] = session_factory(engine)

    # Plotly's JavaScript ships inside the plotly package: serve it ourselves so the dashboard
    # works with no internet, and let browsers cache it by the plotly version.
    plotly_js = plotly.offline.get_plotlyjs().encode()
    app.extensions["abrec_plotly_js"] = (plotly_js, hashlib.sha256(plotly_js).hexdigest()[:16])

    csrf.init_app(app)
    from abrec.dashboard import actions, auth, filters, pages

    filters.register(app)
    app.register_blueprint(auth.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(actions.bp)
    app.add_url_rule("/assets/plotly.min.js", "plotly_js", _plotly_js)
    app.teardown_appcontext(_close_session)
    app.register_error_handler(HTTPException, _error_page)
    app.register_error_handler(ExperimentNotFound, lambda exc: _error_page(NotFound(str(exc))))
    return app


def db() -> Session:
    """The request's database session, opened on first use and closed at teardown."""
    if "db" not in g:
        g.db = current_app.extensions["abrec_sessions"]()
    return g.db


def _close_session(_exc: BaseException | None) -> None:
    session = g.pop("db", None)
    if session is not None:
        session.close()


def _error_page(exc: HTTPException) -> tuple[str, int]:
    """Errors as a page that names the problem (JSON for API-style clients)."""
    if request.accept_mimetypes.best == "application/json":
        return jsonify(error=exc.name, message=exc.description), exc.code
    return render_template("error.html", code=exc.code, name=exc.name, description=exc.description), exc.code


def _plotly_js() -> Response:
    body, etag = current_app.extensions["abrec_plotly_js"]
    response = Response(body, mimetype="text/javascript")
    response.set_etag(etag)
    response.cache_control.public = True
    response.cache_control.max_age = 7 * 24 * 3600
    return response.make_conditional(request)
