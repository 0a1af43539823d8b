"""Wire models and the exception → OpenAIError mapping."""

from __future__ import annotations

import json

import httpx
import pydantic
import pytest
from text_generation import errors as tgi_errors

from ray_dstack.openai import errors
from ray_dstack.openai.errors import OpenAIError, from_upstream_status, sse_error_event, to_openai_error
from ray_dstack.openai.protocol import ChatCompletionRequest, CompletionRequest
from ray_dstack.openai.templates import ChatTemplate, TemplateError


def chat(**kw):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw})


def test_chat_request_fields_and_extras():
    req = chat(stop="x", stream=True, stream_options={"include_usage": True}, vendor_flag=3, n=2)
    assert req.stop_list() == ["x"] and req.include_usage and req.n == 2
    assert req.model_extra == {"vendor_flag": 3}
    assert chat(max_tokens=5, max_completion_tokens=7).max_new_tokens == 7
    assert chat(max_tokens=5).max_new_tokens == 5
    assert not chat(stream_options={"include_usage": True}).include_usage  # only meaningful with stream
    msg = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "42", "tool_call_id": "1"}]}).messages
    assert msg[0].for_template()["content"] == "" and msg[1].for_template()["tool_call_id"] == "1"


@pytest.mark.parametrize("payload, param", [
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, "top_p"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a", ""]}, "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 50}, "top_logprobs"),
    ({"model": "m", "messages": [{"role": "user"}]}, "messages.0"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
])
def test_validation_errors_name_the_field(payload, param):
    with pytest.raises(pydantic.ValidationError) as ei:
        ChatCompletionRequest.model_validate(payload)
    err = to_openai_error(ei.value)
    assert err.status_code == 400 and err.type == "invalid_request_error"
    assert err.param == param and param in err.message


def test_completion_request():
    req = CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"], "echo": True, "best_of": 3, "logprobs": 2})
    assert req.prompt == ["a", "b"] and req.max_new_tokens == 16
    with pytest.raises(pydantic.ValidationError) as ei:
        CompletionRequest.model_validate({"model": "m", "prompt": "a", "logprobs": 9})
    assert to_openai_error(ei.value).param == "logprobs"


def test_error_body_shape():
    e = errors.model_not_found("llama")
    assert e.status_code == 404 and e.to_body() == {"error": {"message": "The model `llama` does not exist.",
                                                              "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}
    assert errors.unauthorized().status_code == 401
    assert sse_error_event(e) == b"data: " + json.dumps(e.to_body()).encode() + b"\n\n"


@pytest.mark.parametrize("exc, status", [
    (tgi_errors.ValidationError("bad"), 400),
    (tgi_errors.BadRequestError("bad"), 400),
    (tgi_errors.NotFoundError("nf"), 404),
    (tgi_errors.OverloadedError("busy"), 429),
    (tgi_errors.RateLimitExceededError("slow down"), 429),
    (tgi_errors.GenerationError("oom"), 502),
    (tgi_errors.IncompleteGenerationError("cut"), 502),
    (tgi_errors.UnknownError("?"), 502),
    (tgi_errors.ShardNotReadyError("loading"), 503),
    (tgi_errors.ShardTimeoutError("slow"), 504),
    (httpx.ConnectError("refused"), 503),
    (httpx.ConnectTimeout("t"), 503),
    (httpx.ReadTimeout("t"), 504),
    (httpx.RemoteProtocolError("peer closed"), 502),
    (json.JSONDecodeError("x", "doc", 0), 400),
    (RuntimeError("bug"), 500),
])
def test_exception_mapping(exc, status):
    err = to_openai_error(exc)
    assert isinstance(err, OpenAIError) and err.status_code == status
    assert set(err.to_body()["error"]) == {"message", "type", "param", "code"}


def test_template_error_mapping():
    with pytest.raises(TemplateError) as ei:
        ChatTemplate("{{ raise_exception('nope: ' ~ messages[0].role) }}").render([{"role": "system", "content": "x"}])
    err = to_openai_error(ei.value)
    assert err.status_code == 400 and "nope: system" in err.message


def test_upstream_status_mapping():
    e = from_upstream_status(400, b'{"error": {"message": "m", "type": "t", "param": "p", "code": 7}}')
    assert (e.status_code, e.message, e.type, e.param, e.code) == (400, "m", "t", "p", "7")
    e = from_upstream_status(422, b'{"detail": [{"loc": ["body", "x"]}]}')
    assert e.status_code == 422 and "loc" in e.message
    e = from_upstream_status(503, b"")
    assert e.status_code == 503 and "503" in e.message
    assert from_upstream_status(500, b"<html>oops</html>").status_code == 502
