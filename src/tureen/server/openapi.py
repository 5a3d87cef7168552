"""The served OpenAPI document: every request body, every success shape and every error response.

The routes read their bodies themselves (``parse_body``: any content type, our own 400s), so
FastAPI cannot see the request models. This module puts them back: ``document(app, ...)`` wraps
``app.openapi`` to add each POST route's request body (with its models under
``components/schemas``), to replace FastAPI's 422 (this server answers 400 for every validation
error) and to mark every optional request field as nullable, because the server treats ``null``
as "not set", as OpenAI does. Shared with the gateway (``tureen.gateway.openapi``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from tureen.server.protocol import ErrorResponse

REF = "#/components/schemas/{model}"
ERROR_DESCRIPTIONS = {
    400: "Invalid request: bad JSON, a bad field value, or a prompt that does not fit the context.",
    401: "Missing or incorrect API key (only when the server has one).",
    403: "The key may not use this model or route.",
    404: "No such model (or route).",
    405: "Method not allowed; the Allow header lists the allowed ones.",
    408: "The request's headers or body did not arrive within --http-read-timeout.",
    413: "The request body is larger than --max-request-body-bytes.",
    429: "Rate limit or budget exceeded; see Retry-After.",
    500: "The engine failed this request (a model step raised); the server goes on.",
    502: "The upstream answered with an error or broke off.",
    503: "Overloaded, draining, starting, or the engine is down; see Retry-After.",
    504: "The request ran past its timeout.",
}
GENERATION_ERRORS = (400, 401, 404, 408, 413, 500, 503, 504)


def error_responses(statuses: Iterable[int]) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` entries: the OpenAI error JSON for each status."""
    return {status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]} for status in statuses}


def document(app: FastAPI, bodies: Mapping[str, type[BaseModel]]) -> None:
    """Serve a document with ``bodies`` (path -> request model) as the POST routes' JSON bodies."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            add_request_bodies(doc, bodies)
            drop_phantom_422(doc)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def add_request_bodies(doc: dict[str, Any], bodies: Mapping[str, type[BaseModel]]) -> None:
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for path, model in bodies.items():
        schema = model.model_json_schema(ref_template=REF)
        for name, sub in schema.pop("$defs", {}).items():
            schemas.setdefault(name, _nullable_optionals(sub))
        schemas[model.__name__] = _nullable_optionals(schema)
        operation = doc["paths"][path]["post"]
        operation["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}}}


def _nullable_optionals(schema: dict[str, Any]) -> dict[str, Any]:
    """``null`` is accepted for every optional field of a request (it means "not set")."""
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        if name in required or _allows_null(prop):
            continue
        extras = {k: prop.pop(k) for k in ("default", "title", "description") if k in prop}
        schema["properties"][name] = {"anyOf": [prop, {"type": "null"}], **extras}
    return schema


def _allows_null(prop: dict[str, Any]) -> bool:
    return prop.get("type") == "null" or any(p.get("type") == "null" for p in prop.get("anyOf", ()))


def drop_phantom_422(doc: dict[str, Any]) -> None:
    """FastAPI documents a 422 for every route with parameters; validation errors here are 400s."""
    for item in doc.get("paths", {}).values():
        for operation in item.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None and "400" not in responses:
                responses["400"] = {"description": ERROR_DESCRIPTIONS[400], "content": {
                    "application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}}}
    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    if "ErrorResponse" not in schemas:
        schemas["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template=REF)
        schemas.update(schemas["ErrorResponse"].pop("$defs", {}))
