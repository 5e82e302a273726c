"""Request bodies: their JSON Schemas (also published in /openapi.json) and the parser that applies them.

One schema per body, with `additionalProperties: false` and bounds on every string, list and number,
so anything the handlers see is well-formed and small. A violation becomes a 400 naming the field.
"""

from __future__ import annotations

from typing import Any

import jsonschema_rs
import orjson
from abrec.experiments.api.errors import ApiError

MAX_ITEMS = 200  # recent items per recommendation request
MAX_K = 100

_ID = {"type": "string", "minLength": 1, "maxLength": 128}
_ITEM_ID = {
    "oneOf": [
        {"type": "string", "minLength": 1, "maxLength": 128},
        {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
    ]
}
_KEY = {"type": "string", "minLength": 1, "maxLength": 100}
_ARM = {"type": "string", "minLength": 1, "maxLength": 64}
_WEIGHT = {"type": "number", "exclusiveMinimum": 0, "maximum": 1e6}


def _obj(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


SCHEMAS: dict[str, dict[str, Any]] = {
    "RecommendationRequest": _obj(
        {
            "experiment": _KEY,
            "user_id": _ID,
            "session_id": _ID,
            "items": {"type": "array", "items": _ITEM_ID, "maxItems": MAX_ITEMS},
            "k": {"type": "integer", "minimum": 1, "maximum": MAX_K},
        },
        ["experiment", "user_id", "session_id", "items", "k"],
    ),
    "ClickRequest": _obj(
        {"impression_id": {"type": "string", "minLength": 1, "maxLength": 100}, "item_id": _ITEM_ID},
        ["impression_id", "item_id"],
    ),
    "ArmSpec": _obj(
        {"name": _ARM, "weight": _WEIGHT, "model": {"type": "string", "minLength": 3, "maxLength": 200}},
        ["name", "weight", "model"],
    ),
    "CreateExperiment": _obj(
        {
            "key": _KEY,
            "arms": {"type": "array", "minItems": 2, "maxItems": 20, "items": {"$ref": "#/$defs/ArmSpec"}},
            "name": {"type": "string", "maxLength": 200},
            "hypothesis": {"type": "string", "maxLength": 10000},
            "primary_metric": {"type": "string", "minLength": 1, "maxLength": 32},
            "hash_version": {"type": "integer", "enum": [1, 2]},
            "seed": {"type": "string", "minLength": 1, "maxLength": 100},
            "timezone": {"type": "string", "minLength": 1, "maxLength": 64},
            "coverage": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "namespace": {"type": "string", "minLength": 1, "maxLength": 100},
            "namespace_range": {
                "type": "array",
                "items": {"type": "number", "minimum": 0, "maximum": 1},
                "minItems": 2,
                "maxItems": 2,
            },
            "planned_users": {"type": "integer", "minimum": 1, "maximum": 10**12},
            "target_effect": {"type": "number", "exclusiveMinimum": 0, "maximum": 1e6},
            "min_runtime_days": {"type": "integer", "minimum": 0, "maximum": 3650},
            "report_time": {"type": "string", "minLength": 5, "maxLength": 5},
            "webhook_url": {"type": "string", "minLength": 1, "maxLength": 500},
            "email_to": {"type": "string", "minLength": 1, "maxLength": 500},
        },
        ["key", "arms"],
    ),
    "Empty": _obj({}, []),
    "Ship": _obj({"arm": _ARM}, ["arm"]),
    "ChangeWeights": _obj(
        {
            "weights": {
                "type": "object",
                "additionalProperties": _WEIGHT,
                "minProperties": 2,
                "maxProperties": 20,
                "propertyNames": {"minLength": 1, "maxLength": 64},
            },
            "reseed": {"type": "boolean"},
        },
        ["weights"],
    ),
    "ChangeCoverage": _obj(
        {"coverage": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}}, ["coverage"]
    ),
    "Pin": _obj({"user_id": _ID, "arm": _ARM}, ["user_id", "arm"]),
    "SetClock": {
        "type": "object",
        "properties": {
            "now": {"type": "string", "minLength": 1, "maxLength": 64, "description": "ISO 8601 with zone"},
            "offset_s": {"type": "number", "minimum": -1e10, "maximum": 1e10},
        },
        "additionalProperties": False,
        "minProperties": 1,
        "maxProperties": 1,
    },
}

_DEFS = {"ArmSpec": SCHEMAS["ArmSpec"]}
_VALIDATORS = {
    name: jsonschema_rs.Draft202012Validator({**schema, "$defs": _DEFS}) for name, schema in SCHEMAS.items()
}


def parse_json(raw: bytes) -> Any:
    """Strict JSON (RFC 8259, which orjson keeps to): NaN, Infinity, invalid UTF-8 and lone
    surrogates are refused, as is nesting deeper than 1024 levels."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "malformed JSON body", str(exc)[:200]) from None


def parse_body(raw: bytes, schema: str, *, empty_ok: bool = False) -> dict[str, Any]:
    """The validated request body; ApiError(400) naming the first problem otherwise."""
    if not raw.strip():
        if empty_ok:
            return {}
        raise ApiError(400, "empty body", f"send a JSON object ({schema})")
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise ApiError(400, "body must be a JSON object", f"got {type(data).__name__} ({schema})")
    validator = _VALIDATORS[schema]
    if validator.is_valid(data):  # the common case: no error objects built
        return data
    for error in validator.iter_errors(data):
        where = "/".join(str(p) for p in error.instance_path) or "body"
        raise ApiError(400, f"invalid field '{where}'", error.message[:300])
    return data  # pragma: no cover - is_valid and iter_errors agree
