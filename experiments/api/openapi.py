"""The OpenAPI 3.1 document served at /openapi.json, built from the same JSON Schemas that validate
the request bodies (validation.SCHEMAS), so the document cannot drift from what the API accepts."""

from __future__ import annotations

import copy
import json
from typing import Any

from abrec.experiments.api.validation import SCHEMAS
from flask import Blueprint, jsonify

bp = Blueprint("openapi", __name__)

_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "detail": {}},
    "required": ["error"],
}
_EXPERIMENT = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "key": {"type": "string"},
        "status": {"type": "string", "enum": ["draft", "running", "paused", "stopped", "shipped"]},
        "arms": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "position": {"type": "integer"},
                    "weight": {"type": "number"},
                    "model_alias": {"type": "string"},
                },
            },
        },
        "phases": {"type": "array", "items": {"type": "object"}},
        "pins": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "required": ["id", "key", "status", "arms", "phases"],
}
RESPONSE_SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": _ERROR,
    "Recommendation": {
        "type": "object",
        "properties": {
            "arm": {"type": "string"},
            "model_version": {"type": "string", "description": "e.g. tron:3; 'popular' for a fallback"},
            "impression_id": {
                "type": ["string", "null"],
                "description": "signed id for clicks; null when the database was unreachable",
            },
            "items": {"type": "array", "items": {"type": "string"}},
            "fallback": {"type": "boolean"},
            "logged": {"type": "boolean"},
        },
        "required": ["arm", "model_version", "impression_id", "items", "fallback", "logged"],
    },
    "ClickResult": {
        "type": "object",
        "properties": {
            "recorded": {"type": "boolean"},
            "duplicate": {"type": "boolean"},
            "arm": {"type": "string"},
            "position": {"type": "integer", "minimum": 0},
        },
        "required": ["recorded", "duplicate", "arm", "position"],
    },
    "Experiment": _EXPERIMENT,
    "ExperimentList": {
        "type": "object",
        "properties": {
            "experiments": {"type": "array", "items": {"$ref": "#/components/schemas/Experiment"}}
        },
        "required": ["experiments"],
    },
    "Clock": {
        "type": "object",
        "properties": {"now": {"type": "string"}, "offset_s": {"type": "number"}},
        "required": ["now", "offset_s"],
    },
    "Health": {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]},
    "Ready": {
        "type": "object",
        "properties": {
            "ready": {"type": "boolean"},
            "checks": {"type": "object", "additionalProperties": {"type": "string"}},
            "eventlog_queue_depth": {"type": "integer"},
        },
        "required": ["ready", "checks"],
    },
    "AnyObject": {"type": "object"},
}


def _json(schema: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _errors(*codes: int) -> dict[str, Any]:
    reasons = {
        400: "Malformed JSON or a field that breaks the schema (the error names it)",
        401: "No, unknown, expired or revoked API token",
        403: "The token's role is too weak",
        404: "No such experiment, impression or resource",
        405: "Method not allowed",
        409: "Refused in the current state (e.g. a draft experiment, an invalid lifecycle change)",
        410: "The click arrived after the attribution window",
        413: "Body too large",
        422: "The clicked item is not in the impression's slate",
        503: "Database unavailable (degraded)",
    }
    return {str(c): {"description": reasons[c], **_json("Error")} for c in codes}


def _op(
    summary: str,
    ok: tuple[int, str],
    errors: tuple[int, ...],
    *,
    body: str | None = None,
    body_required: bool = True,
    role: str | None = None,
    tag: str = "serving",
    params: tuple[str, ...] = (),
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "tags": [tag],
        "responses": {str(ok[0]): {"description": "OK", **_json(ok[1])}, **_errors(*errors)},
    }
    if body is not None:
        op["requestBody"] = {"required": body_required, **_json(body)}
    if role is not None:
        op["security"] = [{"bearer": []}]
        op["description"] = f"Needs a Bearer API token of a user with the {role} role or higher."
    if params:
        op["parameters"] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
            for p in params
        ]
    return op


def _admin(
    summary: str,
    role: str,
    ok: tuple[int, str] = (200, "Experiment"),
    *,
    body: str | None = None,
    body_required: bool = True,
    params: tuple[str, ...] = ("key",),
    extra: tuple[int, ...] = (),
):
    errors = tuple(sorted({400, 401, 403, 503, *extra} | ({404} if params else set())))
    return _op(
        summary, ok, errors, body=body, body_required=body_required, role=role, tag="admin", params=params
    )


def build_document() -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/v1/recommendations": {
            "post": _op(
                "A slate for one user: arm decision, model (or popular-items fallback), logged impression",
                (200, "Recommendation"),
                (400, 404, 409, 413, 503),
                body="RecommendationRequest",
            )
        },
        "/v1/clicks": {
            "post": _op(
                "A click on an item of a logged impression (idempotent per impression and item)",
                (200, "ClickResult"),
                (400, 404, 409, 410, 413, 422, 503),
                body="ClickRequest",
            )
        },
        "/healthz": {"get": _op("The process answers", (200, "Health"), (), tag="ops")},
        "/readyz": {
            "get": _op("Database reachable and model server ready", (200, "Ready"), (503,), tag="ops")
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "tags": ["ops"],
                "responses": {
                    "200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}
                },
            }
        },
        "/openapi.json": {"get": _op("This document", (200, "AnyObject"), (), tag="ops")},
        "/v1/admin/experiments": {
            "get": _admin("List experiments", "viewer", (200, "ExperimentList"), params=()),
            "post": _admin(
                "Create an experiment (draft)",
                "editor",
                (201, "Experiment"),
                body="CreateExperiment",
                params=(),
                extra=(409,),
            ),
        },
        "/v1/admin/experiments/{key}": {"get": _admin("Describe an experiment", "viewer")},
        **{
            f"/v1/admin/experiments/{{key}}/{action}": {
                "post": _admin(
                    f"{action.capitalize()} the experiment",
                    "editor",
                    body="Empty",
                    body_required=False,
                    extra=(409,),
                )
            }
            for action in ("start", "pause", "resume", "stop")
        },
        "/v1/admin/experiments/{key}/ship": {
            "post": _admin(
                "Ship an arm to everyone (closes the experiment)", "editor", body="Ship", extra=(409,)
            )
        },
        "/v1/admin/experiments/{key}/weights": {
            "post": _admin(
                "New arm weights (a new phase; re-randomised unless reseed=false)",
                "editor",
                body="ChangeWeights",
                extra=(409,),
            )
        },
        "/v1/admin/experiments/{key}/coverage": {
            "post": _admin(
                "New coverage (a new phase, same seed)", "editor", body="ChangeCoverage", extra=(409,)
            )
        },
        "/v1/admin/experiments/{key}/pins": {
            "post": _admin(
                "Pin a user to an arm (QA; left out of the analysis)", "editor", body="Pin", extra=(409,)
            )
        },
        "/v1/admin/experiments/{key}/pins/{user_id}": {
            "delete": _admin("Unpin a user", "editor", params=("key", "user_id"), extra=(409,))
        },
        "/v1/admin/clock": {
            "get": _admin("The API's (possibly simulated) clock", "viewer", (200, "Clock"), params=()),
            "post": _admin(
                "Set the simulated clock: {now: ISO time} or {offset_s: seconds}",
                "admin",
                (200, "Clock"),
                body="SetClock",
                params=(),
            ),
        },
        # The registry's admin endpoints (abrec.experiments.models_admin), mounted on this app.
        "/v1/admin/models": {
            "get": _admin("Model versions and aliases", "viewer", (200, "AnyObject"), params=()),
            "post": {
                **_admin(
                    "Register a checkpoint (multipart: checkpoint file, name, description)",
                    "editor",
                    (201, "AnyObject"),
                    params=(),
                ),
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "checkpoint": {
                                        "type": "string",
                                        "contentMediaType": "application/octet-stream",
                                    },
                                    "name": {"type": "string"},
                                    "description": {"type": "string"},
                                },
                                "required": ["checkpoint", "name"],
                            }
                        }
                    },
                },
            },
        },
        "/v1/admin/models/{ref}": {
            "get": _admin("A model version (tron:3)", "viewer", (200, "AnyObject"), params=("ref",))
        },
        "/v1/admin/aliases": {
            "get": _admin("Aliases and their versions", "viewer", (200, "AnyObject"), params=())
        },
        "/v1/admin/aliases/{alias}": {
            "get": _admin("An alias with its history", "viewer", (200, "AnyObject"), params=("alias",)),
            "put": _admin(
                "Move an alias (confirm=true when live experiments use it)",
                "editor",
                (200, "AnyObject"),
                body="AliasMove",
                params=("alias",),
                extra=(409,),
            ),
        },
    }
    schemas = copy.deepcopy(SCHEMAS) | copy.deepcopy(RESPONSE_SCHEMAS)
    schemas["AliasMove"] = {
        "type": "object",
        "properties": {
            "version": {"type": "string"},
            "confirm": {"type": "boolean"},
            "reason": {"type": "string"},
        },
        "required": ["version"],
        "additionalProperties": False,
    }
    doc = {
        "openapi": "3.1.0",
        "info": {
            "title": "abrec API",
            "version": "1",
            "description": "Live A/B tests of session recommenders: slates, clicks, administration.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
    # The validators resolve the arm schema as #/$defs/ArmSpec; the document keeps it in components.
    return json.loads(json.dumps(doc).replace('"#/$defs/', '"#/components/schemas/'))


_DOCUMENT = build_document()


@bp.get("/openapi.json")
def openapi():
    return jsonify(_DOCUMENT)
