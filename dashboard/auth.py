"""Login, logout and the role gate: viewers read, editors act on experiments, admins manage users.

The gate sits in front of every view (a `before_app_request` hook), so a route added later is
protected without remembering a decorator: any request that is not GET/HEAD/OPTIONS needs at
least an editor, except logging in and out. Views that need more (admin) say so with `requires`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any
from urllib.parse import urlsplit

from abrec.dashboard.app import db
from abrec.experiments import identity
from abrec.experiments.schema import User
from flask import Blueprint, abort, flash, g, redirect, render_template, request, session, url_for
from flask_wtf import FlaskForm
from wtforms import PasswordField, StringField
from wtforms.validators import DataRequired, Length

bp = Blueprint("auth", __name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Reachable without a login.
PUBLIC_ENDPOINTS = frozenset({"auth.login", "plotly_js", "static"})
# Non-GET endpoints that change nothing in the platform, so a viewer may use them.
VIEWER_POST_ENDPOINTS = frozenset({"auth.login", "auth.logout"})


class LoginForm(FlaskForm):
    username = StringField("Username", validators=[DataRequired(), Length(max=64)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=256)])


@bp.before_app_request
def gate() -> Any:
    user_id = session.get("user_id")
    g.user = db().get(User, user_id) if user_id is not None else None
    if g.user is None and user_id is not None:
        session.clear()  # the account was deleted since login
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    if g.user is None:
        if request.method in SAFE_METHODS:
            return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
        abort(401)
    if request.method not in SAFE_METHODS and request.endpoint not in VIEWER_POST_ENDPOINTS:
        if not identity.role_at_least(g.user, "editor"):
            abort(403)
    return None


def can(role: str) -> bool:
    """For templates and views: may the logged-in user act at `role` level?"""
    return g.get("user") is not None and identity.role_at_least(g.user, role)


def requires(role: str) -> Callable:
    """Refuse the view with 403 unless the user has at least `role` (the gate already needs a login)."""

    def decorator(view: Callable) -> Callable:
        @wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if not can(role):
                abort(403)
            return view(*args, **kwargs)

        return wrapped

    return decorator


def _safe_next(target: str | None) -> str:
    """Only same-site paths: a crafted ?next= must not send a user elsewhere after login."""
    if not target:
        return url_for("pages.overview")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return url_for("pages.overview")
    return target


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    form = LoginForm()
    if form.validate_on_submit():
        user = identity.authenticate_password(db(), form.username.data, form.password.data)
        if user is not None:
            session.clear()
            session["user_id"] = user.id
            session.permanent = True
            return redirect(_safe_next(request.args.get("next")))
        flash("Wrong username or password.", "error")
    status = 401 if request.method == "POST" else 200
    return render_template("login.html", form=form), status


@bp.route("/logout", methods=["POST"])
def logout() -> Any:
    # POST with the CSRF token (checked by CSRFProtect), so that no other site can log a user out.
    session.clear()
    return redirect(url_for("auth.login"))


@bp.app_context_processor
def _template_helpers() -> dict[str, Any]:
    return {"can": can}
