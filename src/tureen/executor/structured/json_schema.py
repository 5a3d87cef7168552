"""Checks a JSON schema before it is compiled: valid per the meta-schema, and only keywords the
grammar backend enforces.

A keyword the backend silently ignored would let outputs through that fail the user's schema, so
an unsupported keyword is a 400 that names it, never a quiet approximation.
"""

from __future__ import annotations

import json
from typing import Any

from tureen.errors import InvalidRequestError

# Keywords xgrammar turns into grammar rules, plus annotations that constrain nothing.
SUPPORTED_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern", "format",
    "minProperties", "maxProperties",
    # annotations
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly",
    "writeOnly", "nullable",
})
# Subschema positions: keyword -> how its value holds schemas.
_MAPS = ("properties", "$defs", "definitions")
_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")
_SINGLE = ("items", "additionalProperties")
_FORMATS = frozenset({"email", "date", "time", "date-time", "duration", "uuid", "ipv4", "ipv6", "hostname",
                      "uri", "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"})


def load_schema(value: str | dict[str, Any], param: str) -> dict[str, Any] | bool:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"{param} is not valid JSON: {exc}", param=param) from None
    if not isinstance(value, (dict, bool)):
        raise InvalidRequestError(f"{param} must be a JSON schema object, got {type(value).__name__}", param=param)
    return value


def check_schema(schema: dict[str, Any] | bool, param: str) -> None:
    """Raise InvalidRequestError naming the first problem: meta-schema violations, then unsupported keywords."""
    from jsonschema import Draft202012Validator, SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise InvalidRequestError(f"{param} is not a valid JSON schema: at {where}: {exc.message}",
                                  param=param) from None
    problem = _first_unsupported(schema, "#")
    if problem is not None:
        raise InvalidRequestError(f"{param} uses {problem}, which structured outputs cannot enforce", param=param)


def _first_unsupported(schema: Any, path: str) -> str | None:
    if not isinstance(schema, dict):
        return None
    for key, value in schema.items():
        if key not in SUPPORTED_KEYWORDS:
            return f"the JSON-schema keyword {key!r} at {path}"
        if key == "format" and value not in _FORMATS:
            return f"the string format {value!r} at {path}"
    for key in _MAPS:
        for name, sub in (schema.get(key) or {}).items():
            if (found := _first_unsupported(sub, f"{path}/{key}/{name}")) is not None:
                return found
    for key in _LISTS:
        for i, sub in enumerate(schema.get(key) or []):
            if (found := _first_unsupported(sub, f"{path}/{key}/{i}")) is not None:
                return found
    for key in _SINGLE:
        if (found := _first_unsupported(schema.get(key), f"{path}/{key}")) is not None:
            return found
    return None
