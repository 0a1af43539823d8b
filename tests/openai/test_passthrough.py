"""OpenAIPassthrough against a real OpenAI-wire HTTP server (tests/support/gateway_backends.py)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from tests.support.gateway_backends import Control, ServerThread, free_port, openai_app

from ray_dstack.openai.errors import OpenAIError
from ray_dstack.openai.passthrough import OpenAIPassthrough
from ray_dstack.serve.transport.client import model_server_client


@pytest.fixture(scope="module")
def backend():
    control = Control()
    with ServerThread(openai_app(control)) as server:
        yield server, control


@pytest.fixture
def oai(backend):
    server, control = backend
    control.reset()
    return server.url, control


def run(coro):
    return asyncio.run(coro)


def with_passthrough(url, fn, **kw):
    async def go():
        p = OpenAIPassthrough(url, **kw, client=model_server_client("", kw.get("timeout", 600.0)))
        try:
            return await fn(p)
        finally:
            await p.client.aclose()
    return run(go())


async def drain(body) -> bytes:
    out = b""
    async for piece in body:
        out += piece
    return out


def direct(url: str, path: str, body: bytes) -> httpx.Response:
    return httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=10)


# Unusual spacing and key order: must reach the backend byte for byte.
CHAT_BODY = b'{"messages":[{"role":"user","content":"a b a b"}],  "model":"oai-model","max_tokens":4, "x_custom": [1,2]}'


def test_non_streaming_bytes_forwarded_both_ways(oai):
    url, control = oai
    up = with_passthrough(url, lambda p: p.chat_completions(CHAT_BODY, {"Authorization": "Bearer secret", "X-Request-Id": "r1"}))
    assert control.raw_bodies[-1] == CHAT_BODY
    assert up.status == 200 and not up.is_stream
    assert up.body == direct(url, "/v1/chat/completions", CHAT_BODY).content  # as-is, indented JSON included
    assert b'"finish_reason": ""' in up.body
    assert up.headers["content-type"].startswith("application/json")


def test_streaming_bytes_are_identical(oai):
    url, control = oai
    body = CHAT_BODY.replace(b'"max_tokens":4', b'"max_tokens":4, "stream": true')

    async def go(p):
        up = await p.chat_completions(body)
        assert up.is_stream and up.headers["content-type"].startswith("text/event-stream")
        return await drain(up.body)

    relayed = with_passthrough(url, go)
    expected = direct(url, "/v1/chat/completions", body).content
    assert relayed == expected
    assert b"\r\n\r\n" in relayed and b'"finish_reason": ""' in relayed and relayed.endswith(b"data: [DONE]\n\n")
    assert control.raw_bodies[0] == body


def test_completions_and_models(oai):
    url, control = oai
    body = b'{"model": "oai-model", "prompt": "x y x y", "max_tokens": 2}'
    up = with_passthrough(url, lambda p: p.completions(body))
    assert up.status == 200 and up.body == direct(url, "/v1/completions", body).content
    up = with_passthrough(url, lambda p: p.models())
    assert up.status == 200 and b'"oai-model"' in up.body


def test_custom_prefix(oai):
    url, control = oai
    up = with_passthrough(url, lambda p: p.models(), prefix="v1/")
    assert up.status == 200
    with pytest.raises(OpenAIError) as ei:
        with_passthrough(url, lambda p: p.models(), prefix="/other")
    assert ei.value.status_code == 404


def test_upstream_4xx_is_passed_on_with_its_message(oai):
    url, control = oai
    control.fail_before = {"status": 400, "error": "max_tokens is too large: 99999", "param": "max_tokens"}
    with pytest.raises(OpenAIError) as ei:
        with_passthrough(url, lambda p: p.chat_completions(CHAT_BODY))
    e = ei.value
    assert (e.status_code, e.message, e.param, e.type) == (400, "max_tokens is too large: 99999", "max_tokens", "BadRequestError")
    # a non-OpenAI error body is wrapped into OpenAI's shape
    control.fail_before = {"status": 422, "error": "field required: messages", "detail": True}
    with pytest.raises(OpenAIError) as ei:
        with_passthrough(url, lambda p: p.chat_completions(CHAT_BODY))
    assert ei.value.status_code == 422 and ei.value.message == "field required: messages"
    assert set(ei.value.to_body()["error"]) == {"message", "type", "param", "code"}
    # upstream 5xx with a plain-text body → 502, text kept
    control.fail_before = {"status": 500, "error": "backend exploded", "plain": True}
    with pytest.raises(OpenAIError) as ei:
        with_passthrough(url, lambda p: p.chat_completions(CHAT_BODY.replace(b'"max_tokens":4', b'"stream":true')))
    assert ei.value.status_code == 502 and ei.value.message == "backend exploded"


def test_unreachable_is_503():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(OpenAIError) as ei:
        with_passthrough(url, lambda p: p.chat_completions(CHAT_BODY))
    assert ei.value.status_code == 503 and ei.value.to_body()["error"]["code"] == "upstream_unavailable"


def test_slow_backend_is_504(oai):
    url, control = oai
    control.delay = 2.0
    with pytest.raises(OpenAIError) as ei:
        with_passthrough(url, lambda p: p.chat_completions(CHAT_BODY.replace(b'"max_tokens":4', b'"stream":true')), timeout=0.3)
    assert ei.value.status_code == 504


def test_mid_stream_failure_ends_with_error_event(oai):
    url, control = oai
    control.fail_after = 2

    async def go(p):
        up = await p.chat_completions(CHAT_BODY.replace(b'"max_tokens":4', b'"max_tokens":10,"stream":true'))
        return await drain(up.body)

    relayed = with_passthrough(url, go)
    assert relayed.endswith(b"data: [DONE]\n\n")
    assert b'data: {"error": {"message": "Bad response from the model backend' in relayed


def test_disconnect_closes_upstream(oai):
    url, control = oai
    control.delay = 0.05

    async def go(p):
        up = await p.chat_completions(b'{"model":"oai-model","messages":[{"role":"user","content":"a b a b"}],"max_tokens":500,"stream":true}')
        await up.body.__anext__()
        await up.body.aclose()
        await asyncio.sleep(0.1)

    with_passthrough(url, go)
    deadline = time.monotonic() + 5
    while control.disconnects == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert control.disconnects == 1 and control.completed == 0


def test_many_concurrent_streams_share_one_client(oai):
    url, control = oai
    body = CHAT_BODY.replace(b'"max_tokens":4', b'"max_tokens":4, "stream": true')

    async def go(p):
        async def one():
            up = await p.chat_completions(body)
            return await drain(up.body)
        outs = await asyncio.gather(*(one() for _ in range(40)))
        return outs, p.client

    outs, client = with_passthrough(url, go)
    assert len(set(outs)) == 1 and control.completed == 40
