"""The OpenAPI 3.1 document the gateway answers at `GET /v1/openapi.json`.

Built from the protocol models (ray_dstack/openai/protocol.py), so the document and the validation the
gateway applies cannot drift apart. It lists every route the gateway application answers: `GET /health` at
the ingress root, `GET /v1/models`, `POST /v1/chat/completions` and `/v1/completions`, the passthrough
routes `POST /v1/{route}` (embeddings, responses, rerank, tokenize, ...) and `GET /v1/openapi.json` itself.
Pure: no Ray and no web framework, so unit tests and schema fuzzers read it without a cluster.
"""

from __future__ import annotations

import functools
from typing import Any

from ray_dstack.openai.endpoint import (
    _PASSTHROUGH_ROUTE,
    ROUTE_CHAT,
    ROUTE_COMPLETIONS,
    ROUTE_MODELS,
    ROUTE_OPENAPI,
)
from ray_dstack.spec import GATEWAY_ROUTE_PREFIX

HEALTH_PATH = "/health"  # answered at the ingress root, outside GATEWAY_ROUTE_PREFIX
# The status codes an OpenAI-shaped error may come with on a model request.
GENERATION_ERRORS = (400, 401, 404, 405, 429, 502, 503, 504)
PASSTHROUGH_ERRORS = (400, 401, 404, 429, 502, 503, 504)


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _schemas() -> dict[str, Any]:
    """`components.schemas`: the protocol models (requests as validated, answers as serialised), plus the
    error envelope, the health answer and the passthrough request, which have no pydantic model."""
    from pydantic.json_schema import models_json_schema

    from ray_dstack.openai.protocol import (
        ChatCompletion,
        ChatCompletionRequest,
        Completion,
        CompletionRequest,
        ModelList,
    )

    models = [(m, "validation") for m in (ChatCompletionRequest, CompletionRequest)] + [
        (m, "serialization") for m in (ChatCompletion, Completion, ModelList)
    ]
    _, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
    schemas = dict(defs.get("$defs", {}))
    schemas["Error"] = {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
    }
    schemas["Health"] = {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "description": "Always `ok` while the gateway answers."}},
    }
    # Only `model` is read (to route); everything else is the backend's API and goes through untouched.
    schemas["PassthroughRequest"] = {
        "type": "object",
        "required": ["model"],
        "properties": {"model": {"type": "string", "description": "The model name; picks the service."}},
        "additionalProperties": True,
    }
    return schemas


def _errors(codes: tuple[int, ...]) -> dict[str, Any]:
    error = {"description": "OpenAI-shaped error", "content": {"application/json": {"schema": _ref("Error")}}}
    return {str(code): error for code in codes}


def _generation(request: str, answer: str, summary: str) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {"200": {"description": "The answer (`stream: true`: server-sent events)", "content": {
            "application/json": {"schema": _ref(answer)}, "text/event-stream": {"schema": {"type": "string"}}}},
            **_errors(GENERATION_ERRORS)},
    }}


def _passthrough() -> dict[str, Any]:
    """`POST /v1/{route}`: any route beyond the adapted ones, forwarded by `model` to a `format: openai`
    backend. The pattern is the one the gateway checks (ray_dstack.openai.endpoint.is_passthrough_route)."""
    return {"post": {
        "summary": "Any other OpenAI route (embeddings, responses, rerank, tokenize, ...), passed through",
        "description": (
            "Routed by the JSON body's `model`, like chat and completions. For `format: openai` models the "
            "request body and the backend's answer are passed through byte for byte (streaming where the "
            "backend streams, with the backend's status and content type). `format: tgi` models answer 404 "
            "saying the route is not supported (only /v1/chat/completions, /v1/completions and /v1/models "
            "are). A route may have several segments (`audio/speech`); /v1/chat/completions, "
            "/v1/completions, /v1/models and /v1/openapi.json are the routes above, never passed through."
        ),
        "parameters": [{
            "name": "route",
            "in": "path",
            "required": True,
            "description": "The backend route below /v1, e.g. `embeddings`, `responses`, `rerank`, `tokenize`.",
            "schema": {"type": "string", "pattern": f"^{_PASSTHROUGH_ROUTE.pattern}$"},
        }],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("PassthroughRequest")}}},
        "responses": {"200": {"description": "The backend's answer, as it sent it", "content": {
            "application/json": {"schema": {}}, "text/event-stream": {"schema": {"type": "string"}}}},
            **_errors(PASSTHROUGH_ERRORS)},
    }}


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the gateway (`GET /v1/openapi.json`). Cached: callers must not mutate it."""
    v1 = GATEWAY_ROUTE_PREFIX
    return {
        "openapi": "3.1.0",
        "info": {"title": "ray-dstack OpenAI-compatible gateway", "version": "1"},
        "paths": {
            HEALTH_PATH: {"get": {
                "summary": "Liveness of the gateway (no token; reveals nothing about services)",
                "security": [],
                "responses": {"200": {"description": "The gateway answers", "content": {
                    "application/json": {"schema": _ref("Health")}}}},
            }},
            f"{v1}/{ROUTE_MODELS}": {"get": {
                "summary": "Models the bearer token may use",
                "responses": {"200": {"description": "Model list", "content": {
                    "application/json": {"schema": _ref("ModelList")}}}, **_errors((401,))},
            }},
            f"{v1}/{ROUTE_CHAT}": _generation("ChatCompletionRequest", "ChatCompletion", "Chat completion"),
            f"{v1}/{ROUTE_COMPLETIONS}": _generation("CompletionRequest", "Completion", "Text completion"),
            f"{v1}/{ROUTE_OPENAPI}": {"get": {
                "summary": "This document",
                "security": [],  # the gateway answers it before looking at any token
                "responses": {"200": {"description": "The OpenAPI 3.1 document", "content": {
                    "application/json": {"schema": {"type": "object"}}}}},
            }},
            f"{v1}/{{route}}": _passthrough(),
        },
        "components": {"schemas": _schemas(), "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }
