"""`OpenAIGateway`: the Serve deployment behind `/v1` that routes OpenAI requests by `model`.

The routing table (model name → service application, format, auth) arrives as the deployment's
`user_config`, rewritten by every `ray-dstack deploy`/`delete`, so routes change in place without restarting
the gateway. A request is authorised here with the target service's token, then handed to one of that
service's replicas through a Serve deployment handle: Serve picks the replica, and the replica talks to
its own model server on loopback.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ray_dstack.openai import errors
from ray_dstack.openai.endpoint import (
    ROUTE_CHAT,
    ROUTE_COMPLETIONS,
    ROUTE_MODELS,
    GatewayResponse,
    requested_model,
    route_of,
)
from ray_dstack.openai.protocol import Model, ModelList
from ray_dstack.serve.http import to_starlette
from ray_dstack.serve.metrics import GATEWAY_MODEL_KEY, observed_gateway_call
from ray_dstack.spec import GATEWAY_ROUTE_PREFIX, REPLICA_DEPLOYMENT_NAME, AuthSpec

logger = logging.getLogger("ray.serve")
ROUTE_OPENAPI = "openapi.json"


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the `/v1` routes (`GET /v1/openapi.json`), from the protocol models."""
    from pydantic.json_schema import models_json_schema

    from ray_dstack.openai.protocol import (
        ChatCompletion,
        ChatCompletionRequest,
        Completion,
        CompletionRequest,
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

    def ref(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}"}

    error = {"description": "OpenAI-shaped error", "content": {"application/json": {"schema": ref("Error")}}}
    errors_ = {str(code): error for code in (400, 401, 404, 405, 429, 502, 503, 504)}

    def generation(request: str, answer: str, summary: str) -> dict[str, Any]:
        return {"post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref(request)}}},
            "responses": {"200": {"description": "The answer (`stream: true`: server-sent events)", "content": {
                "application/json": {"schema": ref(answer)}, "text/event-stream": {"schema": {"type": "string"}}}},
                **errors_},
        }}

    return {
        "openapi": "3.1.0",
        "info": {"title": "ray-dstack OpenAI-compatible gateway", "version": "1"},
        "paths": {
            f"{GATEWAY_ROUTE_PREFIX}/models": {"get": {
                "summary": "Models the bearer token may use",
                "responses": {"200": {"description": "Model list", "content": {
                    "application/json": {"schema": ref("ModelList")}}}, "401": error},
            }},
            f"{GATEWAY_ROUTE_PREFIX}/chat/completions": generation(
                "ChatCompletionRequest", "ChatCompletion", "Chat completion"),
            f"{GATEWAY_ROUTE_PREFIX}/completions": generation("CompletionRequest", "Completion", "Text completion"),
        },
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }


class OpenAIGateway:
    def __init__(self, routes: dict[str, Any] | None = None) -> None:
        self._routes: dict[str, dict[str, Any]] = {}
        self._auth: dict[str, AuthSpec] = {}
        self._handles: dict[str, Any] = {}
        self.reconfigure({"routes": routes or {}})

    def reconfigure(self, config: dict[str, Any]) -> None:
        routes = dict(config.get("routes") or {})
        self._routes = routes
        self._auth = {name: AuthSpec.model_validate(r.get("auth") or {}) for name, r in routes.items()}
        apps = {r["app"] for r in routes.values()}
        self._handles = {app: h for app, h in self._handles.items() if app in apps}

    def _handle(self, app: str):
        handle = self._handles.get(app)
        if handle is None:
            from ray import serve

            # One streaming handle per service, made once: `.options()` builds a new handle object.
            handle = serve.get_deployment_handle(REPLICA_DEPLOYMENT_NAME, app_name=app).options(stream=True)
            self._handles[app] = handle
        return handle

    @observed_gateway_call  # ray_dstack.serve.metrics: requests, latency, TTFT, tokens of /v1, by target service
    async def __call__(self, request: Request) -> Response:
        route = route_of(request.url.path)
        try:
            if route == ROUTE_OPENAPI and request.method == "GET":
                return to_starlette(GatewayResponse.of_json(openapi_document()))
            if route == ROUTE_MODELS:
                if request.method != "GET":
                    raise errors.method_not_allowed(request.method, request.url.path)
                return self._models(request.headers.get("authorization"))
            if route not in (ROUTE_CHAT, ROUTE_COMPLETIONS):
                raise errors.not_found(f"Unknown route {request.url.path}")
            if request.method != "POST":
                raise errors.method_not_allowed(request.method, request.url.path)
            body = await request.body()
            model = requested_model(body)
            if model is None:
                raise errors.invalid_request("`model` is required", param="model")
            target = self._routes.get(model)
            if target is None:
                raise errors.model_not_found(model)
            request.scope[GATEWAY_MODEL_KEY] = model  # for the metrics' service/model tags
            if not self._auth[model].accepts(request.headers.get("authorization")):
                raise errors.unauthorized()
            return await self._forward(target["app"], route, body)
        except errors.OpenAIError as exc:
            return to_starlette(GatewayResponse.of_error(exc))

    def _models(self, authorization: str | None) -> Response:
        visible = [name for name, auth in self._auth.items() if auth.accepts(authorization)]
        if self._routes and not visible:
            raise errors.unauthorized()
        cards = [
            Model(id=name, created=int(self._routes[name].get("created") or 0), owned_by="ray-dstack")
            for name in sorted(visible)
        ]
        return to_starlette(GatewayResponse.of_json(ModelList(data=cards)))

    async def _forward(self, app: str, route: str, body: bytes) -> Response:
        try:
            stream = self._handle(app).openai.remote(f"/v1/{route}", body)
            head = await stream.__anext__()
        except Exception as exc:  # noqa: BLE001 - the service is gone, or has no replica yet
            logger.warning("gateway: forwarding to %s failed: %r", app, exc)
            raise errors.upstream_unavailable(f"service {app!r} is not available right now") from None
        status, headers = head["status"], head["headers"]
        media_type = headers.get("content-type")
        rest = {k: v for k, v in headers.items() if k != "content-type"}
        if not head.get("stream"):
            body_bytes = b"".join([chunk async for chunk in stream])
            return Response(body_bytes, status_code=status, headers=rest, media_type=media_type)
        return StreamingResponse(stream, status_code=status, headers=rest, media_type=media_type)
