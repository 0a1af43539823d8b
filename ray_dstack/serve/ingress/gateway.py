"""`OpenAIGateway`: the Serve deployment behind `/v1` for what HAProxy does not route by `model` itself.

A `/v1` request for a deployed model normally never gets here: ray-dstack's rules in Serve's HAProxy send it to
the model's service (ray_dstack/serve/ingress/haproxy_v1.py). The gateway answers `/v1/models`, unknown models, bodies
HAProxy could not read, requests rewritten to a service HAProxy does not know yet, and `GET /health`, and it
publishes the routing table HAProxy's map is made from (ray_dstack/serve/ingress/v1_routes.py).

The routing table (model name → service application, format, auth) arrives as the deployment's
`user_config`, rewritten by every `ray-dstack deploy`/`delete`, so routes change in place without restarting
the gateway. A request is authorised here with the target service's token, then handed to one of that
service's replicas through a Serve deployment handle: Serve picks the replica, and the replica talks to
its own model server on loopback.

The application is mounted at the ingress root ("/"): it answers `GET /health` (200, no token, nothing about
services) and `/v1/...`; Serve still routes `/<service>/...` to each service (longest prefix wins).
Routes beyond chat and completions (`/v1/embeddings`, `/v1/responses`, ...) go by `model` like the others.
Rate limits: a service's `rate_limits` hold for its model's `/v1` requests too, checked here once the model is
known and before the token or any forwarding (ray_dstack/serve/ingress/gateway_traffic.py).
Failover: until the first byte went to the client, a try that meets a dead replica, a backend refusing or
resetting the connection, or a 503 is repeated (at most twice, within the service's request timeout).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ray_dstack.openai import errors
from ray_dstack.openai.endpoint import (
    ROUTE_CHAT,
    ROUTE_COMPLETIONS,
    ROUTE_MODELS,
    GatewayResponse,
    is_passthrough_route,
    requested_model,
    route_of,
)
from ray_dstack.openai.openapi import HEALTH_PATH, ROUTE_OPENAPI, openapi_document
from ray_dstack.openai.protocol import Model, ModelList
from ray_dstack.openai.streams import SSE_DONE
from ray_dstack.serve.ingress import v1_routes
from ray_dstack.serve.ingress.gateway_traffic import GatewayLimits
from ray_dstack.serve.http import to_starlette
from ray_dstack.serve.scaling.metrics import (
    GATEWAY_MODEL_KEY,
    GATEWAY_PATH_KEY,
    observed_gateway_call,
    record_gateway_retry,
)
from ray_dstack.spec import (
    GATEWAY_ROUTE_PREFIX,
    REPLICA_DEPLOYMENT_NAME,
    V1_ROUTE_HEADER,
    AuthSpec,
)

logger = logging.getLogger("ray.serve")
HEALTH_BODY = b'{"status": "ok"}'
# Failover before the first byte: at most 2 retries, after these pauses. Serve stops routing to a replica
# only once it is dead or has failed 3 health checks (`health_check_period_s` apart, see plan/defaults.py),
# so the pauses give the second retry time to reach another replica or the replacement.
RETRY_BACKOFF_S = (1.0, 4.0)
# Why a try is retried (the `reason` tag of ray_dstack_gateway_retries_total).
RETRY_REPLICA = "replica_unavailable"  # the replica actor died, is stopping, or the call failed
RETRY_UPSTREAM = "backend_unavailable"  # the replica's backend refused/reset the connection or answered 503
DEFAULT_REQUEST_TIMEOUT_S = 600.0  # ServiceSpec.request_timeout_s's default, for routes written before it


class OpenAIGateway:
    def __init__(self, routes: dict[str, Any] | None = None) -> None:
        self._routes: dict[str, dict[str, Any]] = {}
        self._auth: dict[str, AuthSpec] = {}
        self._handles: dict[str, Any] = {}
        self._limits = GatewayLimits()
        self._configure({"routes": routes or {}})

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's user_config, on start and on every `deploy`/`delete`."""
        self._configure(config)
        v1_routes.publish(self._routes)  # every node's HAProxy routes `/v1` by this table (serve/v1_routes.py)

    def _configure(self, config: dict[str, Any]) -> None:
        routes = dict(config.get("routes") or {})
        self._routes = routes
        self._auth = {name: AuthSpec.model_validate(r.get("auth") or {}) for name, r in routes.items()}
        self._limits.configure(routes, int(config.get("replicas") or 1))
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

    async def __call__(self, request: Request) -> Response:
        # The application is mounted at "/" (Serve routes `/<service>/...` to the services by longest prefix),
        # so the ingress root answers `GET /health` for load balancers and benchmark tools: no token, no
        # service names, not counted as a model request.
        if request.url.path.rstrip("/") == HEALTH_PATH and request.method in ("GET", "HEAD"):
            return Response(HEALTH_BODY, media_type="application/json")
        return await self._v1(request)

    @observed_gateway_call  # ray_dstack.serve.scaling.metrics: requests, latency, TTFT, tokens of /v1, by target service
    async def _v1(self, request: Request) -> Response:
        path = request.scope[GATEWAY_PATH_KEY] = v1_path(request)
        route = route_of(path)
        try:
            if not (path == GATEWAY_ROUTE_PREFIX or path.startswith(GATEWAY_ROUTE_PREFIX + "/")):
                raise errors.not_found(f"Unknown route {path}")
            if route == ROUTE_OPENAPI and request.method == "GET":
                return to_starlette(GatewayResponse.of_json(openapi_document()))
            if route == ROUTE_MODELS:
                if request.method != "GET":
                    raise errors.method_not_allowed(request.method, path)
                return self._models(request.headers.get("authorization"))
            if route not in (ROUTE_CHAT, ROUTE_COMPLETIONS) and not is_passthrough_route(route):
                raise errors.not_found(f"Unknown route {path}")
            if request.method != "POST":
                raise errors.method_not_allowed(request.method, path)
            body = await request.body()
            model = requested_model(body)
            if model is None:
                raise errors.invalid_request("`model` is required", param="model")
            target = self._routes.get(model)
            if target is None:
                raise errors.model_not_found(model)
            request.scope[GATEWAY_MODEL_KEY] = model  # for the metrics' service/model tags
            refused = self._limits.refuse(target["app"], route, request)  # `rate_limits`: before the token
            if refused is not None:
                return refused
            if not self._auth[model].accepts(request.headers.get("authorization")):
                raise errors.unauthorized()
            return await self._forward(target, route, body)
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

    async def _forward(self, target: dict[str, Any], route: str, body: bytes) -> Response:
        """Hand the request to one of the service's replicas; until a byte went to the client, a replica that
        could not serve it (actor gone, backend refusing or resetting, 503) is replaced by another try."""
        app = target["app"]
        deadline = time.monotonic() + float(target.get("request_timeout_s") or DEFAULT_REQUEST_TIMEOUT_S)
        for attempt in range(len(RETRY_BACKOFF_S) + 1):
            answer, reason = await self._attempt(app, route, body)
            if reason is None:
                return answer
            delay = RETRY_BACKOFF_S[attempt] if attempt < len(RETRY_BACKOFF_S) else None
            if delay is None or time.monotonic() + delay >= deadline:
                break
            record_gateway_retry(app, reason)
            logger.info("gateway: %s on a replica of %s; retry %d in %.0fs", reason, app, attempt + 1, delay)
            await asyncio.sleep(delay)
        if isinstance(answer, Response):
            return answer  # the last replica's own 502/503, with its message
        raise errors.upstream_unavailable(f"service {app!r} is not available right now")

    async def _attempt(self, app: str, route: str, body: bytes) -> tuple[Response | None, str | None]:
        """One try: (the response, None), or (the failed answer or None, why another replica may do better)."""
        stream = None
        try:
            stream = self._handle(app).openai.remote(f"/v1/{route}", body)
            head = await stream.__anext__()
            status, headers = head["status"], head["headers"]
            media_type = headers.get("content-type")
            rest = {k: v for k, v in headers.items() if k != "content-type"}
            if not head.get("stream"):
                data = b"".join([chunk async for chunk in stream])
                response = Response(data, status_code=status, headers=rest, media_type=media_type)
                if errors.retryable(status, data):
                    return response, RETRY_UPSTREAM
                return response, None
            # The first chunk is read before answering: a replica dying now is still retried.
            first = await anext(stream, b"")
        except Exception as exc:  # noqa: BLE001 - the replica died or is gone, or the service has no replica yet
            logger.warning("gateway: forwarding to %s failed: %r", app, exc)
            _cancel(stream)
            return None, RETRY_REPLICA
        relay = _relay(app, first, stream, sse=(media_type or "").startswith("text/event-stream"))
        return StreamingResponse(relay, status_code=status, headers=rest, media_type=media_type), None


def v1_path(request: Request) -> str:
    """The request's `/v1` path. A request HAProxy rewrote to `/<service>/v1/...` and that still reached the
    gateway (the service's backend left HAProxy between two map updates) carries its original path in the
    header (serve/haproxy_v1.py); anywhere else the header means nothing."""
    path = request.url.path
    original = request.headers.get(V1_ROUTE_HEADER)
    if original and not path.startswith(GATEWAY_ROUTE_PREFIX + "/") and original.startswith(GATEWAY_ROUTE_PREFIX + "/"):
        return original
    return path


def _cancel(stream: Any) -> None:
    try:
        if stream is not None:
            stream.cancel()
    except Exception:  # noqa: BLE001 - best effort
        pass


async def _relay(app: str, first: bytes, stream: Any, *, sse: bool) -> AsyncIterator[bytes]:
    """The stream as the replica sends it; a replica lost after the first byte ends an SSE stream with an
    `error` event and `[DONE]` (bytes went out: it cannot be retried), as a backend failure does."""
    done = False
    try:
        if first:
            yield first
        async for chunk in stream:
            yield chunk
        done = True
    except Exception as exc:
        done = True
        logger.warning("gateway: the replica of %s failed mid-stream: %r", app, exc)
        if not sse:
            raise
        yield b"\n\n" + errors.sse_error_event(
            errors.upstream_bad_response(f"The replica serving this stream failed: {type(exc).__name__}"))
        yield SSE_DONE
    finally:
        if not done:
            _cancel(stream)  # the client went away: stop the replica's work
