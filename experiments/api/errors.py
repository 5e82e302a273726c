"""Every error the API returns is JSON `{"error": "...", "detail": ...}`: 4xx for the caller's
mistakes, and a logged 500 for anything unexpected (which the tests show never happens)."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger("abrec.api")


def json_response(payload: Any, status: int = 200) -> Response:
    """A JSON answer serialised by orjson: the hot endpoints' cheaper stand-in for `jsonify`."""
    body = orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS)
    return Response(body, status=status, mimetype="application/json")


class ApiError(Exception):
    """An answer other than success: HTTP status, a short message and an optional detail."""

    def __init__(self, status: int, error: str, detail: Any = None, **extra: Any) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.error}
        if self.detail is not None:
            body["detail"] = self.detail
        return body | self.extra


def install_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return json_response(exc.to_dict(), exc.status)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        # Werkzeug's own refusals (404 no route, 405 method, 413 too large) as JSON too.
        response = jsonify({"error": exc.name.lower(), "detail": exc.description})
        response.status_code = exc.code or 500
        if exc.code == 405 and exc.response is None:
            allow = getattr(exc, "valid_methods", None)
            if allow:
                response.headers["Allow"] = ", ".join(allow)
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error")
        return jsonify({"error": "internal error", "detail": type(exc).__name__}), 500
