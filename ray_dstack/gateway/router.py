"""Thin FastAPI glue: OpenAI routes over `ModelEndpoint`s, and `GatewayResponse` → Starlette response."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from fastapi import APIRouter, Request
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from ray_dstack.gateway import errors
from ray_dstack.gateway.protocol import ModelList
from ray_dstack.gateway.service import GatewayResponse, ModelEndpoint, requested_model


def to_starlette(resp: GatewayResponse) -> Response:
    """The one place a `GatewayResponse` becomes a Starlette response."""
    headers = {k: v for k, v in resp.headers.items() if k.lower() != "content-type"}
    if resp.is_stream:
        closer = getattr(resp.body, "aclose", None)
        return StreamingResponse(
            resp.body, status_code=resp.status, headers=headers, media_type=resp.headers.get("content-type"),
            background=BackgroundTask(closer) if closer is not None else None,
        )
    return Response(resp.body, status_code=resp.status, headers=headers, media_type=resp.headers.get("content-type"))


def make_openai_router(
    get_endpoint: Callable[[str], ModelEndpoint | None],
    list_endpoints: Callable[[], Iterable[ModelEndpoint]] | None = None,
    *,
    prefix: str = "/v1",
    authorize: Callable[[Request, ModelEndpoint | None], None] | None = None,
) -> APIRouter:
    """`GET <prefix>/models`, `POST <prefix>/chat/completions`, `POST <prefix>/completions` routed by `model`.

    `authorize(request, endpoint)` may raise `OpenAIError` (401/403) before anything is forwarded.
    """
    router = APIRouter(prefix=prefix)

    @router.get("/models")
    async def models(request: Request) -> Response:
        try:
            if authorize is not None:
                authorize(request, None)
        except Exception as exc:  # noqa: BLE001
            return to_starlette(GatewayResponse.of_error(exc))
        cards = [ep.model_card() for ep in (list_endpoints() if list_endpoints else [])]
        return to_starlette(GatewayResponse.of_json(ModelList(data=cards)))

    async def dispatch(request: Request) -> Response:
        body = await request.body()
        try:
            name = requested_model(body)
            endpoint = get_endpoint(name) if name is not None else None
            if authorize is not None:
                authorize(request, endpoint)
            if endpoint is None:
                if name is None:
                    from ray_dstack.gateway.service import parse_json_object

                    parse_json_object(body)  # 400 for bad JSON
                    raise errors.invalid_request("`model` is required", param="model")
                raise errors.model_not_found(name)
        except Exception as exc:  # noqa: BLE001
            return to_starlette(GatewayResponse.of_error(exc))
        resp = await endpoint.handle(request.url.path, body, request.headers, method="POST")
        return to_starlette(resp)

    router.add_api_route("/chat/completions", dispatch, methods=["POST"])
    router.add_api_route("/completions", dispatch, methods=["POST"])
    return router
