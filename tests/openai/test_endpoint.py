"""ModelEndpoint / GatewayResponse, and the FastAPI router end to end over real HTTP (OpenAI SDK as client)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterable

import httpx
import openai
import pytest
from tests.support.gateway_backends import EOS, Control, ServerThread, generate, openai_app, tgi_app
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from ray_dstack.openai import errors
from ray_dstack.openai.endpoint import (
    GatewayResponse,
    ModelEndpoint,
    parse_json_object,
    requested_model,
    route_of,
)
from ray_dstack.openai.protocol import ModelList
from ray_dstack.serve.http import to_starlette
from ray_dstack.serve.transport.client import model_server_client
from ray_dstack.spec import ModelSpec

TEMPLATE = "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}"
TGI_MODEL = ModelSpec(name="tiny", format="tgi", chat_template=TEMPLATE, eos_token=EOS)
OAI_MODEL = ModelSpec(name="oai-model", format="openai")


@pytest.fixture(scope="module")
def backends():
    tc, oc = Control(), Control()
    with ServerThread(tgi_app(tc)) as tgi, ServerThread(openai_app(oc)) as oai:
        yield tgi, tc, oai, oc


@pytest.fixture
def env(backends):
    tgi, tc, oai, oc = backends
    tc.reset()
    oc.reset()
    return backends


def run(coro):
    return asyncio.run(coro)


def handle(model, url, path, body, **kw):
    async def go():
        ep = ModelEndpoint(model, url, timeout=10, **kw, client=model_server_client("", 10))
        try:
            resp = await ep.handle(path, json.dumps(body).encode() if isinstance(body, dict) else body)
            if resp.is_stream:
                data = b"".join([piece async for piece in resp.body])
                return resp, data
            return resp, resp.body
        finally:
            await ep.client.aclose()
    return run(go())


def test_route_of():
    assert route_of("/v1/chat/completions") == route_of("chat/completions/") == "chat/completions"
    assert route_of("/v1/models?x=1") == "models"


def test_models(env):
    tgi, *_ = env
    resp, body = handle(TGI_MODEL, tgi.url, "/v1/models", b"")
    assert resp.status == 200
    card = json.loads(body)["data"][0]
    assert json.loads(body)["object"] == "list"
    assert card["id"] == "tiny" and card["object"] == "model" and card["owned_by"] == "ray-dstack" and isinstance(card["created"], int)


def test_tgi_chat_through_endpoint(env):
    tgi, tc, *_ = env
    resp, body = handle(TGI_MODEL, tgi.url, "/v1/chat/completions",
                        {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "a b"}, {"type": "text", "text": "a"}]}],
                         "temperature": 0, "max_tokens": 3})
    assert resp.status == 200 and resp.headers["content-type"] == "application/json"
    assert tc.requests[-1]["inputs"] == "a b\na"  # text parts joined by newlines
    assert json.loads(body)["choices"][0]["message"]["content"] == generate("a b\na", max_new_tokens=3, stop=[EOS]).text


def test_stream_headers(env):
    tgi, *_ = env
    resp, body = handle(TGI_MODEL, tgi.url, "/v1/chat/completions",
                        {"model": "tiny", "messages": [{"role": "user", "content": "a b a"}], "stream": True})
    assert resp.status == 200 and resp.is_stream
    assert resp.headers["content-type"] == "text/event-stream" and resp.headers["x-accel-buffering"] == "no"
    assert body.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("body, status, param, fragment", [
    ({"model": "other", "messages": [{"role": "user", "content": "x"}]}, 404, "model", "The model `other` does not exist"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model", "`model` is required"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role", "messages.0.role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 5}, 400, "temperature", "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, "messages.0.content", "messages.0.content"),
    ({"model": "tiny", "messages": [{"role": "system", "content": "x"}]}, 400, "messages", "System role not supported"),
    (b"{not json", 400, None, "could not parse the JSON body"),
])
def test_errors_are_openai_shaped(env, body, status, param, fragment):
    tgi, *_ = env
    resp, raw = handle(TGI_MODEL, tgi.url, "/v1/chat/completions", body)
    err = json.loads(raw)["error"]
    assert resp.status == status, err
    assert err["param"] is not None and err["param"].startswith(param) if param else True
    assert fragment in err["message"]
    assert set(err) == {"message", "type", "param", "code"}


def test_broken_template_answers_400_not_500(env):
    tgi, *_ = env
    bad = ModelSpec(name="tiny", format="tgi", chat_template="{% for x in %}", eos_token=EOS)
    resp, raw = handle(bad, tgi.url, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}]})
    assert resp.status == 400 and json.loads(raw)["error"]["code"] == "template_error"
    # completions still work without a usable template
    resp, raw = handle(bad, tgi.url, "/v1/completions", {"model": "tiny", "prompt": "a b a", "temperature": 0})
    assert resp.status == 200


def test_unknown_route_and_method(env):
    tgi, *_ = env
    resp, raw = handle(TGI_MODEL, tgi.url, "/v1/embeddings", {"model": "tiny"})
    assert resp.status == 404

    async def go():
        ep = ModelEndpoint(TGI_MODEL, tgi.url, client=model_server_client("", 600.0))
        try:
            return await ep.handle("/v1/models", b"", method="POST")
        finally:
            await ep.client.aclose()
    assert run(go()).status == 405


def test_openai_format_endpoint_forwards_bytes(env):
    *_, oai, oc = env
    body = b'{"model":"oai-model","messages":[{"role":"user","content":"a b a b"}],"stream":true}'
    resp, data = handle(OAI_MODEL, oai.url, "/v1/chat/completions", body)
    assert oc.raw_bodies[-1] == body
    assert resp.headers["x-accel-buffering"] == "no"
    assert data == httpx.post(oai.url + "/v1/chat/completions", content=body).content


def test_every_answer_carries_a_request_id(env):
    """OpenAI sends `x-request-id` on every answer; the SDK exposes it (`_request_id`, `with_raw_response`)."""
    tgi, _, oai, _ = env
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "a b a"}], "max_tokens": 2}
    answers = [handle(TGI_MODEL, tgi.url, "/v1/chat/completions", chat)[0],
               handle(TGI_MODEL, tgi.url, "/v1/chat/completions", {**chat, "stream": True})[0],
               handle(TGI_MODEL, tgi.url, "/v1/chat/completions", {**chat, "model": "other"})[0],
               handle(TGI_MODEL, tgi.url, "/v1/models", b"")[0],
               handle(OAI_MODEL, oai.url, "/v1/chat/completions", {**chat, "model": "oai-model"})[0]]
    ids = [r.headers["x-request-id"] for r in answers]
    assert [r.status for r in answers] == [200, 200, 404, 200, 200]
    assert len(set(ids)) == len(ids) and all(i.startswith("req_") and len(i) > 20 for i in ids)


def test_gateway_response_helpers():
    r = GatewayResponse.of_json({"a": 1}, 201)
    assert r.status == 201 and r.json() == {"a": 1} and not r.is_stream and r.media_type == "application/json"


# --- end to end over HTTP through the FastAPI router -----------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(backends):
    tgi, tc, oai, oc = backends
    endpoints = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):  # endpoints are created on the server's loop (their clients belong to it)
        endpoints["tiny"] = ModelEndpoint(TGI_MODEL, tgi.url, client=model_server_client("", 600.0))
        endpoints["oai-model"] = ModelEndpoint(OAI_MODEL, oai.url, client=model_server_client("", 600.0))
        yield
        for ep in endpoints.values():
            await ep.client.aclose()

    app = FastAPI(lifespan=lifespan)

    app.include_router(make_openai_router(endpoints.get, lambda: endpoints.values()))
    server = ServerThread(app)
    server.server.config.lifespan = "on"
    with server:
        yield server


def test_openai_sdk_against_router(env, gateway):
    tgi, tc, oai, oc = env
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    assert sorted(m.id for m in client.models.list()) == ["oai-model", "tiny"]
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a b a b"}], temperature=0, max_tokens=3)
    assert out.choices[0].message.content == generate("a b a b", max_new_tokens=3, stop=[EOS]).text
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a b a b"}], temperature=0,
                                            max_tokens=3, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 3
    # the SGLang-style finish_reason "" from the openai-format backend does not break the SDK either
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="oai-model", messages=[{"role": "user", "content": "a b a b"}], stream=True) if c.choices)
    assert text == generate("a b a b", max_new_tokens=16).text
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert ei.value.body["code"] == "model_not_found"
    tc.fail_before = {"status": 429, "error": "Model is overloaded", "error_type": "overloaded"}
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a b"}], stream=True)


def test_http_client_disconnect_cancels_backend(env, gateway):
    tgi, tc, oai, oc = env
    tc.delay = oc.delay = 0.05
    for model, control in (("tiny", tc), ("oai-model", oc)):
        body = {"model": model, "messages": [{"role": "user", "content": "a b a b"}], "max_tokens": 400, "stream": True}
        with httpx.Client(timeout=10) as c:
            with c.stream("POST", gateway.url + "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200 and r.headers["x-accel-buffering"] == "no"
                it = r.iter_raw()
                next(it)
        deadline = time.monotonic() + 5
        while control.disconnects == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert control.disconnects == 1 and control.completed == 0, model


# --- test glue: OpenAI routes over ModelEndpoints, the way the /v1 gateway dispatches by `model` -------------


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
