"""`/v1/<route>` beyond chat and completions: passed through by model for `format: openai` (bytes untouched,
streams relayed), a clear 404 for `format: tgi`; and which error answers the gateway may retry."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ray_dstack.openai import errors
from ray_dstack.openai.endpoint import ModelEndpoint, is_passthrough_route
from ray_dstack.serve.transport.client import model_server_client
from ray_dstack.spec import ModelSpec
from tests.support.gateway_backends import ServerThread

OAI = ModelSpec(name="emb-model", format="openai")
TGI = ModelSpec(name="tgi-model", format="tgi", chat_template="{{ messages[0].content }}", eos_token="</s>")
# Odd but valid JSON formatting: a re-encoding gateway would normalise it.
EMBEDDING_BYTES = b'{"object":"list",  "data":[{"object":"embedding","index":0,"embedding":[0.25, -1.5e-3]}],\n"model":"emb-model"}'
RESPONSE_EVENTS = [b'event: response.created\ndata: {"type":"response.created"}\n\n',
                   b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"hi"}\n\n',
                   b'event: response.completed\ndata: {"type":"response.completed"}\n\n']


async def embeddings(request: Request) -> Response:
    body = await request.json()
    if body.get("input") == "fail":
        return JSONResponse({"error": {"message": "input too long", "type": "invalid_request_error",
                                       "param": "input", "code": None}}, status_code=400)
    return Response(EMBEDDING_BYTES, media_type="application/json")


async def responses(request: Request) -> Response:
    body = await request.json()

    async def events():
        for event in RESPONSE_EVENTS:
            yield event
            await asyncio.sleep(0.01)

    if body.get("stream"):
        return StreamingResponse(events(), media_type="text/event-stream")
    return JSONResponse({"object": "response", "seen": body})


async def tokenize(request: Request) -> Response:
    return JSONResponse({"tokens": [1, 2, 3], "path": request.url.path})


APP = Starlette(routes=[
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/v1/responses", responses, methods=["POST"]),
    Route("/v1/audio/tokenize", tokenize, methods=["POST"]),
])


@pytest.fixture(scope="module")
def backend():
    with ServerThread(APP) as server:
        yield server


def call(model: ModelSpec, url: str, path: str, body: dict | bytes, method: str = "POST"):
    async def go():
        client = model_server_client(url, 10)
        try:
            ep = ModelEndpoint(model, url, timeout=10, client=client)
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            resp = await ep.handle(path, raw, method=method)
            if resp.is_stream:
                chunks = [piece async for piece in resp.body]
                return resp, chunks
            return resp, resp.body
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_embeddings_pass_through_with_the_backends_bytes(backend):
    resp, body = call(OAI, backend.url, "/v1/embeddings", {"model": "emb-model", "input": "hello"})
    assert resp.status == 200 and not resp.is_stream
    assert body == EMBEDDING_BYTES
    assert resp.headers["content-type"].startswith("application/json")


def test_a_streaming_route_is_relayed_as_a_stream(backend):
    resp, chunks = call(OAI, backend.url, "/v1/responses", {"model": "emb-model", "stream": True, "input": "x"})
    assert resp.status == 200 and resp.is_stream
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert b"".join(chunks) == b"".join(RESPONSE_EVENTS)


def test_nested_route_and_non_streaming_body_reach_the_backend(backend):
    resp, body = call(OAI, backend.url, "/v1/responses", {"model": "emb-model", "input": "x"})
    assert resp.status == 200 and json.loads(body)["seen"] == {"model": "emb-model", "input": "x"}
    resp, body = call(OAI, backend.url, "/v1/audio/tokenize", {"model": "emb-model"})
    assert resp.status == 200 and json.loads(body)["path"] == "/v1/audio/tokenize"


def test_backend_errors_keep_their_status_and_message(backend):
    resp, body = call(OAI, backend.url, "/v1/embeddings", {"model": "emb-model", "input": "fail"})
    assert resp.status == 400 and json.loads(body)["error"]["message"] == "input too long"
    resp, body = call(OAI, backend.url, "/v1/rerank", {"model": "emb-model"})
    assert resp.status == 404  # the backend's own 404, OpenAI-shaped
    assert "error" in json.loads(body)


def test_wrong_or_missing_model_and_bad_json_are_rejected_before_the_backend(backend):
    resp, body = call(OAI, backend.url, "/v1/embeddings", {"model": "other", "input": "x"})
    assert resp.status == 404 and json.loads(body)["error"]["code"] == "model_not_found"
    resp, body = call(OAI, backend.url, "/v1/embeddings", {"input": "x"})
    assert resp.status == 400 and json.loads(body)["error"]["param"] == "model"
    resp, body = call(OAI, backend.url, "/v1/embeddings", b"{not json")
    assert resp.status == 400 and json.loads(body)["error"]["code"] == "invalid_json"
    resp, body = call(OAI, backend.url, "/v1/embeddings", {"model": "emb-model"}, method="GET")
    assert resp.status == 405


def test_tgi_models_answer_404_saying_the_route_is_not_supported(backend):
    for route in ("embeddings", "responses", "rerank"):
        resp, body = call(TGI, backend.url, f"/v1/{route}", {"model": "tgi-model", "input": "x"})
        err = json.loads(body)["error"]
        assert resp.status == 404, body
        assert f"/v1/{route} is not supported for `format: tgi`" in err["message"]
        assert set(err) == {"message", "type", "param", "code"}


def test_unsafe_routes_are_not_passed_through(backend):
    assert is_passthrough_route("embeddings") and is_passthrough_route("audio/speech")
    for route in ("", "../admin", "a/../../b", "x?y", "a//b", "models", "chat/completions", "%2e%2e/x"):
        assert not is_passthrough_route(route), route
    resp, body = call(OAI, backend.url, "/v1/../../admin", {"model": "emb-model"})
    assert resp.status == 404 and json.loads(body)["error"]["code"] == "not_found"


def test_retryable_answers():
    def body(exc: BaseException) -> tuple[int, bytes]:
        err = errors.to_openai_error(exc)
        return err.status_code, err.to_json_bytes()

    request = httpx.Request("POST", "http://x/")
    assert errors.retryable(*body(httpx.ConnectError("refused", request=request)))
    assert errors.retryable(*body(httpx.ReadError("reset", request=request)))
    assert errors.retryable(*body(httpx.RemoteProtocolError("Server disconnected", request=request)))
    assert errors.retryable(503, b'{"error": {"message": "overloaded"}}')  # the backend's own 503
    assert not errors.retryable(*body(httpx.ReadTimeout("slow", request=request)))  # 504: it was working
    assert not errors.retryable(*body(errors.upstream_bad_response("The TGI backend answered with invalid JSON")))
    assert not errors.retryable(*body(errors.invalid_request("bad")))
    assert not errors.retryable(502, b"<html>bad gateway</html>")
