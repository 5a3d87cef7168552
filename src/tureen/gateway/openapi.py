"""The gateway's OpenAPI document (``GET /openapi.json``): its generation routes and every error.

The two generation routes are raw ASGI endpoints (``HotPaths``), outside FastAPI's router, so the
document adds them by hand, with the server's request models (the gateway forwards those bodies;
``model`` is required here, since it picks the deployment). The FastAPI routes (``/health``,
``/v1/models``, ``/metrics``, the key-management and prompt routes mounted at start-up) come from
the router as usual. As on the server, FastAPI's phantom 422 is replaced by the 400 really sent.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from tureen.server.openapi import ERROR_DESCRIPTIONS, REF, add_request_bodies, drop_phantom_422
from tureen.server.protocol import ChatCompletionRequest, CompletionRequest

GENERATION_ERRORS = (400, 401, 403, 404, 405, 413, 429, 500, 502, 503, 504)
INFO_ERRORS = {"/v1/models": (401, 403, 503), "/health": (503,)}
ADMIN_PREFIXES = ("/key/", "/team/", "/v1/prompts")  # key management (policy.py) and the prompt registry
ADMIN_ERRORS = (400, 401, 403, 404, 503)
# The admin handlers read their own input (policy.py), so the router cannot see it: documented here, so generated
# tests (tureen bench fuzz) reach past the first case.
ADMIN_QUERIES = {
    "/key/info": {"key": "string"},
    "/key/list": {"page": "integer", "size": "integer", "team_id": "string", "key_alias": "string",
                  "return_full_object": "boolean"},
    "/team/info": {"team_id": "string"},
}
ROUTES = {"/v1/chat/completions": (ChatCompletionRequest, "Chat completion, forwarded to a deployment."),
          "/v1/completions": (CompletionRequest, "Text completion, forwarded to a deployment.")}


def gateway_document(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                      description="tureen gateway: one OpenAI-compatible endpoint in front of many deployments.")
    doc.setdefault("paths", {})
    for path, (_, summary) in ROUTES.items():
        doc["paths"][path] = {"post": {"summary": summary, "operationId": path.strip("/").replace("/", "_"),
                                       "responses": _generation_responses()}}
    add_request_bodies(doc, {path: model for path, (model, _) in ROUTES.items()})
    for path in ROUTES:  # the gateway routes on the model name: it is required here
        name = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        schema = doc["components"]["schemas"][name.rsplit("/", 1)[1]]
        schema["required"] = sorted({*schema.get("required", []), "model"})
        schema["properties"]["model"] = {"type": "string", "minLength": 1, "title": "Model"}
    _add_admin_inputs(doc)
    drop_phantom_422(doc)
    for operation in doc["paths"].get("/metrics", {}).values():
        operation["responses"]["200"] = {"description": "Prometheus text format.",
                                         "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}
    for path, item in doc["paths"].items():
        statuses = INFO_ERRORS.get(path, ADMIN_ERRORS if path.startswith(ADMIN_PREFIXES) else ())
        for operation in item.values():
            for status in statuses:
                operation["responses"].setdefault(str(status), _error(status))
    return doc


def _add_admin_inputs(doc: dict[str, Any]) -> None:
    from tureen.gateway.keys import DeleteKeyRequest, GenerateKeyRequest, UpdateKeyRequest

    bodies = {"/key/generate": GenerateKeyRequest, "/key/update": UpdateKeyRequest, "/key/delete": DeleteKeyRequest}
    add_request_bodies(doc, {path: model for path, model in bodies.items() if path in doc["paths"]})
    for path, params in ADMIN_QUERIES.items():
        for operation in doc["paths"].get(path, {}).values():
            operation["parameters"] = [{"name": name, "in": "query", "required": False, "schema": {"type": kind}}
                                       for name, kind in params.items()]


def _generation_responses() -> dict[str, Any]:
    ok = {"description": "Success: a completion object, or server-sent events when stream is true.",
          "content": {"application/json": {"schema": {"type": "object"}},
                      "text/event-stream": {"schema": {"type": "string"}}}}
    return {"200": ok, **{str(s): _error(s) for s in GENERATION_ERRORS}}


def _error(status: int) -> dict[str, Any]:
    return {"description": ERROR_DESCRIPTIONS[status],
            "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}}}


def install(app: FastAPI) -> None:
    """Serve ``GET /openapi.json`` (built on first use, once the start-up routes are mounted)."""
    cached: dict[str, Any] = {}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json() -> JSONResponse:
        if "doc" not in cached:
            cached["doc"] = gateway_document(app)
        return JSONResponse(cached["doc"])
