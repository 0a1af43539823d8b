"""Serving logic, independent of Ray and of any web framework.

`ModelEndpoint` is the per-service object: given the service's `ModelSpec` and the replica's base URL it
picks the adapter (`format: tgi` → `TGIAdapter`, `format: openai` → `OpenAIPassthrough`) and answers
`handle(path, body, headers)` with a `GatewayResponse` — the one result type the HTTP layer maps to a
Starlette `Response`/`StreamingResponse` (see `router.to_starlette`). It never raises for request-level
failures: every error comes back as an OpenAI-shaped `GatewayResponse`.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import pydantic

from ray_dstack.openai import errors
from ray_dstack.openai.errors import OpenAIError, to_openai_error
from ray_dstack.openai.passthrough import OpenAIPassthrough
from ray_dstack.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Model,
    ModelList,
    dump,
    now,
)
from ray_dstack.openai.tgi import TGIAdapter

log = logging.getLogger(__name__)

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
SSE_MEDIA_TYPE = "text/event-stream"
JSON_MEDIA_TYPE = "application/json"

ROUTE_CHAT = "chat/completions"
ROUTE_COMPLETIONS = "completions"
ROUTE_MODELS = "models"
ADAPTED_ROUTES = (ROUTE_CHAT, ROUTE_COMPLETIONS, ROUTE_MODELS)
ROUTE_OPENAPI = "openapi.json"  # the gateway's own document (GET), never a backend's route
# Any other `/v1/<route>` a `format: openai` backend serves (embeddings, responses, rerank, tokenize, ...):
# path segments of safe characters only, so a route can never climb out of the backend's prefix.
_PASSTHROUGH_ROUTE = re.compile(r"[A-Za-z0-9_\-]+(?:[./][A-Za-z0-9_\-]+)*")


def is_passthrough_route(route: str) -> bool:
    """A route other than the adapted ones that may be forwarded by model (`embeddings`, `audio/speech`)."""
    return (route not in ADAPTED_ROUTES and route != ROUTE_OPENAPI and bool(_PASSTHROUGH_ROUTE.fullmatch(route))
            and ".." not in route)


class ModelConfig(Protocol):
    """What `ModelEndpoint` reads from `ray_dstack.spec.ModelSpec`."""

    name: str
    format: str
    prefix: str
    chat_template: str | None
    eos_token: str | None
    bos_token: str | None


@dataclass
class GatewayResponse:
    """An HTTP answer: `body` is bytes, or an async byte iterator for SSE (`aclose()` it if not exhausted).

    `headers` always include `content-type`; streams also `x-accel-buffering: no` and `cache-control`.
    """

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | AsyncIterator[bytes] = b""

    @property
    def is_stream(self) -> bool:
        return not isinstance(self.body, (bytes, bytearray))

    @property
    def media_type(self) -> str:
        return self.headers.get("content-type", JSON_MEDIA_TYPE).split(";")[0].strip()

    def json(self) -> Any:
        """The decoded JSON body (non-streaming responses only; for tests and logs)."""
        assert isinstance(self.body, (bytes, bytearray)), "streaming response"
        return json.loads(self.body)

    async def aclose(self) -> None:
        closer = getattr(self.body, "aclose", None)
        if closer is not None:
            await closer()

    @classmethod
    def of_json(cls, payload: bytes | pydantic.BaseModel | dict[str, Any], status: int = 200) -> "GatewayResponse":
        if isinstance(payload, pydantic.BaseModel):
            body = dump(payload)
        elif isinstance(payload, dict):
            body = json.dumps(payload).encode()
        else:
            body = payload
        return cls(status, {"content-type": JSON_MEDIA_TYPE}, body)

    @classmethod
    def of_error(cls, exc: BaseException) -> "GatewayResponse":
        err = to_openai_error(exc)
        return cls(err.status_code, {"content-type": JSON_MEDIA_TYPE}, err.to_json_bytes())

    @classmethod
    def of_stream(cls, body: AsyncIterator[bytes], status: int = 200, headers: Mapping[str, str] | None = None) -> "GatewayResponse":
        h = {"content-type": SSE_MEDIA_TYPE, **SSE_HEADERS}
        for k, v in (headers or {}).items():
            if k.lower() not in h:
                h[k.lower()] = v
        return cls(status, h, body)


def route_of(path: str) -> str:
    """`/v1/chat/completions`, `/chat/completions`, `v1/chat/completions/` → `chat/completions`."""
    p = path.split("?", 1)[0].strip("/")
    if p.startswith("v1/"):
        p = p[3:]
    elif p == "v1":
        p = ""
    return p


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 `OpenAIError`."""
    try:
        payload = json.loads(body or b"")
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.invalid_request(f"We could not parse the JSON body of your request: {exc}", code="invalid_json") from exc
    if not isinstance(payload, dict):
        raise errors.invalid_request("The request body must be a JSON object", code="invalid_json")
    return payload


def requested_model(body: bytes) -> str | None:
    """The `model` field of a request body (for routing), or None when absent/unparseable."""
    try:
        payload = json.loads(body or b"")
    except (ValueError, UnicodeDecodeError):
        return None
    model = payload.get("model") if isinstance(payload, dict) else None
    return model if isinstance(model, str) else None


class ModelEndpoint:
    """One service's model behind the OpenAI API (`/v1/models`, `/v1/chat/completions`, `/v1/completions`)."""

    def __init__(
        self,
        model: ModelConfig,
        base_url: str,
        *,
        timeout: float | None = 600.0,
        chat_template: str | None = None,
        owned_by: str = "ray-dstack",
        created: int | None = None,
        client: httpx.AsyncClient,
    ) -> None:
        """`client`: the caller's connection pool to the model server, shared with its adapter (the caller
        closes it)."""
        self.client = client
        self.model = model
        self.name = model.name
        self.base_url = base_url
        self.owned_by = owned_by
        self.created = created if created is not None else now()
        self.template_error: OpenAIError | None = None
        self.adapter: TGIAdapter | OpenAIPassthrough
        if model.format == "tgi":
            template = None
            source = chat_template if chat_template is not None else model.chat_template
            if source is not None:
                # Compile once; a broken template answers 400 on chat requests, it does not break the service.
                try:
                    from ray_dstack.openai.templates import ChatTemplate

                    template = ChatTemplate(source, bos_token=model.bos_token, eos_token=model.eos_token)
                except Exception as exc:  # TemplateError
                    log.warning("chat template of model %s does not compile: %s", model.name, exc)
                    self.template_error = errors.invalid_request(
                        f"Chat template error: {exc}", param="messages", code="template_error")
            self.adapter = TGIAdapter(base_url, model, template, timeout, client=client)
        elif model.format == "openai":
            self.adapter = OpenAIPassthrough(base_url, prefix=model.prefix, timeout=timeout, client=client)
        else:
            raise ValueError(f"unknown model format {model.format!r}")

    def model_card(self) -> Model:
        return Model(id=self.name, created=self.created, owned_by=self.owned_by)

    def models(self) -> ModelList:
        return ModelList(data=[self.model_card()])

    async def handle(self, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None,
                     *, method: str | None = None) -> GatewayResponse:
        """Answer one OpenAI request; never raises for request or upstream failures."""
        resp = await self._handle(path, body, headers, method=method)
        # OpenAI answers every request with an `x-request-id` (the SDK shows it as `_request_id` / `request_id`,
        # users log it); a passthrough backend's own id is kept.
        resp.headers.setdefault("x-request-id", f"req_{uuid.uuid4().hex}")
        return resp

    async def _handle(self, path: str, body: bytes, headers: Mapping[str, str] | None,
                      *, method: str | None) -> GatewayResponse:
        route = route_of(path)
        try:
            if route == ROUTE_MODELS:
                if method not in (None, "GET"):
                    raise errors.method_not_allowed(method, path)
                return GatewayResponse.of_json(self.models())
            if route in (ROUTE_CHAT, ROUTE_COMPLETIONS):
                if method not in (None, "POST"):
                    raise errors.method_not_allowed(method, path)
                if route == ROUTE_CHAT:
                    return await self.chat_completions(body, headers)
                return await self.completions(body, headers)
            if is_passthrough_route(route):
                return await self.other_route(route, path, body, headers, method)
            raise errors.not_found(f"Unknown route {path}")
        except Exception as exc:  # noqa: BLE001 - every failure is an OpenAI-shaped answer
            err = to_openai_error(exc)
            if err.status_code >= 500:
                log.warning("model %s: %s %s failed: %r", self.name, method or "", path, err)
            return GatewayResponse.of_error(err)

    async def other_route(self, route: str, path: str, body: bytes, headers: Mapping[str, str] | None,
                          method: str | None) -> GatewayResponse:
        """`/v1/<route>` beyond chat and completions: passed through, bytes untouched, for `format: openai`;
        a `format: tgi` backend has no such API, so the answer says the route is not supported."""
        if not isinstance(self.adapter, OpenAIPassthrough):
            raise errors.not_found(
                f"Route /v1/{route} is not supported for `format: tgi` models (model `{self.name}`): "
                "only /v1/chat/completions, /v1/completions and /v1/models are. Deploy the model with "
                "`format: openai` (a backend that speaks OpenAI's API) to use /v1/" + route + ".")
        if method not in (None, "POST"):
            raise errors.method_not_allowed(method, path)
        self._check_model(parse_json_object(body))
        return _from_upstream(await self.adapter.forward("POST", route, body, headers))

    def _check_model(self, payload: dict[str, Any]) -> None:
        model = payload.get("model")
        if model != self.name:
            if model is None:
                raise errors.invalid_request("`model` is required", param="model")
            raise errors.model_not_found(model)

    async def chat_completions(self, body: bytes, headers: Mapping[str, str] | None = None) -> GatewayResponse:
        payload = parse_json_object(body)
        self._check_model(payload)
        if isinstance(self.adapter, OpenAIPassthrough):
            return _from_upstream(await self.adapter.chat_completions(body, headers))
        if self.template_error is not None:
            raise self.template_error
        req = ChatCompletionRequest.model_validate(payload)
        if req.stream:
            return GatewayResponse.of_stream(await self.adapter.open_chat_stream(req))
        return GatewayResponse.of_json(await self.adapter.chat(req))

    async def completions(self, body: bytes, headers: Mapping[str, str] | None = None) -> GatewayResponse:
        payload = parse_json_object(body)
        self._check_model(payload)
        if isinstance(self.adapter, OpenAIPassthrough):
            return _from_upstream(await self.adapter.completions(body, headers))
        req = CompletionRequest.model_validate(payload)
        if req.stream:
            return GatewayResponse.of_stream(await self.adapter.open_completions_stream(req))
        return GatewayResponse.of_json(await self.adapter.completions(req))


def _from_upstream(up) -> GatewayResponse:
    if up.is_stream:
        return GatewayResponse.of_stream(up.body, up.status, up.headers)
    headers = {k.lower(): v for k, v in up.headers.items()}
    headers.setdefault("content-type", JSON_MEDIA_TYPE)
    return GatewayResponse(up.status, headers, up.body)
