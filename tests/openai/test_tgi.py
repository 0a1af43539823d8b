"""TGIAdapter against a real TGI-wire HTTP server (tests/support/gateway_backends.py)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from text_generation.types import StreamResponse
from tests.support.gateway_backends import (
    EOS,
    Control,
    ServerThread,
    free_port,
    generate,
    tgi_app,
    tokenize,
)

from ray_dstack.openai.errors import OpenAIError
from ray_dstack.openai.protocol import ChatCompletionRequest, CompletionRequest
from ray_dstack.openai.templates import ChatTemplate
from ray_dstack.openai.tgi import TGIAdapter
from ray_dstack.openai.tgi_mapping import PlainTokenEvent, loads_event, parse_stream_event, plain_token_event, trim_stop
from ray_dstack.serve.transport.client import model_server_client
from ray_dstack.spec import ModelSpec

TEMPLATE = "{{ bos_token }}{% for m in messages %} {{ m.content }}{% endfor %}"
MODEL = ModelSpec(name="tiny", format="tgi", chat_template=TEMPLATE, bos_token="<s>", eos_token=EOS)


@pytest.fixture(scope="module")
def backend():
    control = Control()
    with ServerThread(tgi_app(control)) as server:
        yield server, control


@pytest.fixture
def tgi(backend):
    server, control = backend
    control.reset()
    return server.url, control


def run(coro):
    return asyncio.run(coro)


def adapter(url: str, timeout: float = 10.0) -> TGIAdapter:
    template = ChatTemplate(TEMPLATE, bos_token="<s>", eos_token=EOS)
    return TGIAdapter(url, MODEL, template, timeout, client=model_server_client("", timeout))


def chat_req(content: str, **kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "tiny", "messages": [{"role": "user", "content": content}], **kw})


def prompt_of(content: str) -> str:
    return f"<s> {content}"


async def collect(stream) -> list[bytes]:
    frames = []
    async for piece in stream:
        frames.append(piece)
    return frames


def events(frames: list[bytes]) -> list:
    text = b"".join(frames).decode()
    out = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def call(url, coro_fn):
    async def go():
        a = adapter(url)
        try:
            return await coro_fn(a)
        finally:
            await a.client.aclose()
    return run(go())


# --- parameter mapping ------------------------------------------------------------------------------------


def test_greedy_request_mapping_and_answer(tgi):
    url, control = tgi
    content = "one two three one"
    resp = call(url, lambda a: a.chat(chat_req(content, temperature=0, max_tokens=5, stop="three", seed=7, top_p=0.5)))
    sent = control.requests[-1]
    assert sent["inputs"] == prompt_of(content)
    assert sent["stream"] is False
    # greedy: no temperature/top_p; stop = client's + eos; details for usage
    assert sent["parameters"] == {"do_sample": False, "details": True, "max_new_tokens": 5, "stop": ["three", EOS],
                                  "seed": 7, "decoder_input_details": True}
    expected = generate(prompt_of(content), max_new_tokens=5, stop=["three", EOS])
    assert expected.finish_reason == "stop_sequence" and expected.text.endswith("three")
    assert resp.choices[0].message.content == expected.text[: -len("three")]
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.model == "tiny"
    assert resp.usage.prompt_tokens == len(tokenize(prompt_of(content)))
    assert resp.usage.completion_tokens == len(expected.tokens)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_sampling_mapping(tgi):
    url, control = tgi
    call(url, lambda a: a.chat(chat_req("a b a", temperature=0.7, top_p=0.9, frequency_penalty=-0.5, max_completion_tokens=4,
                                        max_tokens=9, stop=["x", "y"], presence_penalty=0)))
    p = control.requests[-1]["parameters"]
    assert p["do_sample"] is True and p["temperature"] == 0.7 and p["top_p"] == 0.9
    assert p["frequency_penalty"] == -0.5  # text_generation's own validator would reject this; TGI accepts it
    assert p["max_new_tokens"] == 4  # max_completion_tokens wins over max_tokens
    assert p["stop"] == ["x", "y", EOS]
    # defaults: OpenAI's temperature 1 → sampling; top_p 1 is not sent; no max_tokens → TGI's default
    call(url, lambda a: a.chat(chat_req("a b a", top_p=1.0)))
    p = control.requests[-1]["parameters"]
    assert p == {"do_sample": True, "details": True, "stop": [EOS], "decoder_input_details": True}


def test_response_format_maps_to_grammar(tgi):
    url, control = tgi
    call(url, lambda a: a.chat(chat_req("a b", response_format={"type": "json_object"})))
    assert control.requests[-1]["parameters"]["grammar"] == {"type": "json", "value": {"type": "object"}}
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    call(url, lambda a: a.chat(chat_req("a b", response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})))
    assert control.requests[-1]["parameters"]["grammar"] == {"type": "json", "value": schema}


@pytest.mark.parametrize("kw, param", [
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"n": 2, "stream": True}, "n"),
    ({"n": 2, "temperature": 0}, "n"),
    ({"n": 2, "seed": 3}, "seed"),
    ({"logit_bias": {"12": 1.0}}, "logit_bias"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"top_p": 0}, "top_p"),
])
def test_unsupported_parameters_are_400_naming_the_field(tgi, kw, param):
    url, control = tgi
    req = chat_req("a b", **kw)
    with pytest.raises(OpenAIError) as ei:
        if req.stream:
            call(url, lambda a: a.open_chat_stream(req))
        else:
            call(url, lambda a: a.chat(req))
    assert ei.value.status_code == 400 and ei.value.param == param
    assert control.requests == []  # rejected before reaching the backend


def test_finish_reasons_length_and_eos(tgi):
    url, _ = tgi
    resp = call(url, lambda a: a.chat(chat_req("a b a b", temperature=0, max_tokens=3)))
    expected = generate(prompt_of("a b a b"), max_new_tokens=3, stop=[EOS])
    assert resp.choices[0].finish_reason == "length" and resp.choices[0].message.content == expected.text
    assert len(expected.tokens) == 3
    resp = call(url, lambda a: a.chat(chat_req("x y z", temperature=0)))
    assert resp.choices[0].finish_reason == "stop" and resp.choices[0].message.content == ""
    assert resp.usage.completion_tokens == 1


def test_n_maps_to_best_of(tgi):
    url, control = tgi
    resp = call(url, lambda a: a.chat(chat_req("a b a c a d a", temperature=1.0, n=3, max_tokens=6)))
    assert control.requests[-1]["parameters"]["best_of"] == 3
    assert [c.index for c in resp.choices] == [0, 1, 2]
    gens = [generate(prompt_of("a b a c a d a"), max_new_tokens=6, stop=[EOS], do_sample=True, seed=1000 + k) for k in range(3)]
    assert [c.message.content for c in resp.choices] == [g.text for g in gens]
    assert resp.usage.completion_tokens == sum(len(g.tokens) for g in gens)


def test_chat_logprobs(tgi):
    url, control = tgi
    resp = call(url, lambda a: a.chat(chat_req("a b a b", temperature=0, max_tokens=2, logprobs=True, top_logprobs=2)))
    assert control.requests[-1]["parameters"]["top_n_tokens"] == 2
    content = resp.choices[0].logprobs.content
    assert [c.token for c in content] == generate(prompt_of("a b a b"), max_new_tokens=2).tokens
    assert content[0].logprob == pytest.approx(-0.1) and len(content[0].top_logprobs) == 2


def test_template_error_is_400_with_its_message(tgi):
    url, control = tgi
    bad = ChatTemplate("{{ raise_exception('only user messages please') }}")

    async def go():
        a = TGIAdapter(url, MODEL, bad, 5, client=model_server_client("", 5))
        try:
            await a.chat(chat_req("a"))
        finally:
            await a.client.aclose()

    with pytest.raises(OpenAIError) as ei:
        run(go())
    assert ei.value.status_code == 400 and "only user messages please" in ei.value.message
    assert control.requests == []


def test_trim_stop():
    assert trim_stop("hello</s>", ["</s>", "lo</s>"]) == "hel"
    assert trim_stop("hello", ["x"]) == "hello"


# --- streaming --------------------------------------------------------------------------------------------


def test_chat_stream_chunk_sequence(tgi):
    url, control = tgi
    content = "a b c a"

    async def go(a):
        stream = await a.open_chat_stream(chat_req(content, temperature=0, max_tokens=3, stream=True,
                                                   stream_options={"include_usage": True}))
        return await collect(stream)

    evs = events(call(url, go))
    sent = control.requests[-1]
    assert sent["stream"] is True and "decoder_input_details" not in sent["parameters"]
    expected = generate(prompt_of(content), max_new_tokens=3, stop=[EOS])
    assert evs[-1] == "[DONE]"
    chunks = evs[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "tiny" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:] if c["choices"])
    content_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content_chunks) == len(expected.tokens) == 3  # one chunk per token, the final event's token kept
    assert "".join(c["choices"][0]["delta"]["content"] for c in content_chunks) == expected.text
    finish = chunks[-2]
    assert finish["choices"][0]["finish_reason"] == "length" and finish["choices"][0]["delta"] == {}
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": len(tokenize(prompt_of(content))), "completion_tokens": 3,
        "total_tokens": len(tokenize(prompt_of(content))) + 3}


def test_stream_without_usage_and_eos_first(tgi):
    url, _ = tgi

    async def go(a):
        return await collect(await a.open_chat_stream(chat_req("x y z", temperature=0, stream=True)))

    evs = events(call(url, go))
    assert evs[-1] == "[DONE]"
    (only,) = evs[:-1]  # the eos token is special: no content chunk, just the finish chunk carrying the role
    assert only["choices"][0]["delta"] == {"role": "assistant"} and only["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in only


def test_stream_stop_string_spanning_tokens_is_trimmed(tgi):
    url, _ = tgi
    content = "a b c a b c"

    async def go(a):
        return await collect(await a.open_chat_stream(chat_req(content, temperature=0, stop=[" c a"], stream=True)))

    evs = events(call(url, go))
    expected = generate(prompt_of(content), stop=[" c a", EOS])
    assert expected.finish_reason == "stop_sequence"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in evs[:-1])
    assert text == expected.text[: -len(" c a")]
    assert evs[-2]["choices"][0]["finish_reason"] == "stop"
    non_stream = call(url, lambda a: a.chat(chat_req(content, temperature=0, stop=[" c a"])))
    assert non_stream.choices[0].message.content == text


def test_stream_logprobs(tgi):
    url, _ = tgi

    async def go(a):
        return await collect(await a.open_chat_stream(chat_req("a b a b", temperature=0, max_tokens=2, stream=True, logprobs=True)))

    evs = events(call(url, go))
    lps = [lp for c in evs[:-1] if c["choices"][0].get("logprobs") for lp in c["choices"][0]["logprobs"]["content"]]
    assert [lp["token"] for lp in lps] == generate(prompt_of("a b a b"), max_new_tokens=2).tokens


# --- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fail, status", [
    ({"status": 424, "error": "Request failed during generation: CUDA OOM", "error_type": "generation"}, 502),
    ({"status": 429, "error": "Model is overloaded", "error_type": "overloaded"}, 429),
    ({"status": 422, "error": "Input validation error: inputs too long", "error_type": "validation"}, 400),
    ({"status": 500, "error": "Incomplete generation", "error_type": "incomplete_generation"}, 502),
])
def test_upstream_error_before_first_token_raises(tgi, fail, status):
    url, control = tgi
    control.fail_before = fail
    with pytest.raises(OpenAIError) as ei:
        call(url, lambda a: a.open_chat_stream(chat_req("a b a", stream=True)))
    assert ei.value.status_code == status and fail["error"] in ei.value.message
    with pytest.raises(OpenAIError) as ei:
        call(url, lambda a: a.chat(chat_req("a b a")))
    assert ei.value.status_code == status and fail["error"] in ei.value.message


def test_error_mid_stream_is_a_final_error_event(tgi):
    url, control = tgi
    control.fail_after = 2

    async def go(a):
        return await collect(await a.open_chat_stream(chat_req("a b a b a b", temperature=0, max_tokens=10, stream=True)))

    evs = events(call(url, go))
    assert evs[-1] == "[DONE]"
    err = evs[-2]["error"]
    assert "boom" in err["message"] and set(err) == {"message", "type", "param", "code"}
    texts = [c["choices"][0]["delta"].get("content") for c in evs[:-2]]
    assert texts == generate(prompt_of("a b a b a b"), max_new_tokens=10).tokens[:2]


# --- SSE framing (httpx-sse) against exact bytes -------------------------------------------------------------


def raw_backend(status: int, content_type: str, pieces: list[bytes]) -> TGIAdapter:
    """An adapter whose backend answers every request with exactly these body pieces (one read each)."""

    async def body():
        for piece in pieces:
            yield piece

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers={"content-type": content_type}, content=body())

    template = ChatTemplate(TEMPLATE, bos_token="<s>", eos_token=EOS)
    return TGIAdapter("http://tgi", MODEL, template, client=httpx.AsyncClient(transport=httpx.MockTransport(handler)))


def call_raw(a: TGIAdapter, coro_fn):
    async def go():
        try:
            return await coro_fn(a)
        finally:
            await a.client.aclose()
    return run(go())


def token_event(i: int, text: str, last: bool = False) -> dict:
    ev = {"index": i, "token": {"id": i, "text": text, "logprob": -0.5, "special": False},
          "generated_text": None, "details": None}
    if last:
        ev["details"] = {"finish_reason": "length", "generated_tokens": i + 1, "seed": None, "input_length": 4}
        ev["generated_text"] = "hello world"
    return ev


def test_sse_framing_crlf_comments_multiline_data_and_split_reads():
    first = json.dumps(token_event(0, "hello")).encode()
    last = json.dumps(token_event(1, " world", last=True), indent=1).encode()  # spans lines: several `data:` lines
    pieces = [b": keep-alive\r\n\r\n", b"data:" + first[:20], first[20:] + b"\r\n\r",
              b"\nevent: token\n" + b"".join(b"data: " + line + b"\n" for line in last.split(b"\n")) + b"\n",
              b"data: [DONE]\n\n"]
    a = raw_backend(200, "text/event-stream; charset=utf-8", pieces)

    async def go(a):
        return await collect(await a.open_chat_stream(chat_req("x", stream=True, stream_options={"include_usage": True})))

    evs = events(call_raw(a, go))
    assert evs[-1] == "[DONE]"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in evs[:-1] if c["choices"]) == "hello world"
    assert evs[-3]["choices"][0]["finish_reason"] == "length"
    assert evs[-2]["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


def sse(ev: dict) -> bytes:
    return b"data: " + json.dumps(ev).encode() + b"\n\n"


def test_the_tokens_of_one_read_go_out_as_one_piece():
    """At engine speed a read of the backend holds many tokens: the adapter answers each read with one piece
    (one write downstream), in order, the final event's chunks and [DONE] with the read that brings them."""
    words = [f" w{i}" for i in range(8)]
    pieces = [b"".join(sse(token_event(i, w)) for i, w in enumerate(words)),
              sse(token_event(8, " end", last=True)) + b"data: [DONE]\n\n"]
    for opener, text_of in (
            (lambda a: a.open_chat_stream(chat_req("x", stream=True)), lambda c: c["choices"][0]["delta"].get("content")),
            (lambda a: a.open_completions_stream(comp_req("x", stream=True)), lambda c: c["choices"][0]["text"])):
        async def go(a, opener=opener):
            return await collect(await opener(a))

        frames = call_raw(raw_backend(200, "text/event-stream", pieces), go)
        assert len(frames) == 2
        first, second = events(frames[:1]), events(frames[1:])
        assert [text_of(c) for c in first] == words
        assert [text_of(c) for c in second[:-2]] == [" end"] and second[-2]["choices"][0]["finish_reason"] == "length"
        assert second[-1] == "[DONE]"


@pytest.mark.parametrize("pieces, message", [
    # a bad event inside a read: the tokens before it go out, then the error
    ([sse(token_event(0, "a")) + sse(token_event(1, "b")) + b"data: {not json\n\n" + sse(token_event(2, "c")),
      sse(token_event(3, "d", last=True))], "Invalid event from the TGI backend"),
    # a body that ends with no final event
    ([sse(token_event(0, "a")), sse(token_event(1, "b"))], "without its final event"),
])
def test_a_stream_cut_short_sends_its_tokens_then_an_error_event(pieces, message):
    async def go(a):
        return await collect(await a.open_chat_stream(chat_req("x", stream=True)))

    evs = events(call_raw(raw_backend(200, "text/event-stream", pieces), go))
    assert [c["choices"][0]["delta"].get("content") for c in evs[:-2]] == ["a", "b"]
    assert message in evs[-2]["error"]["message"] and evs[-1] == "[DONE]"


def test_error_answered_as_an_sse_event_keeps_its_status():
    body = b'data:{"error":"Request failed during generation: boom","error_type":"generation"}\n\n'
    with pytest.raises(OpenAIError) as ei:
        call_raw(raw_backend(424, "text/event-stream", [body]), lambda a: a.open_chat_stream(chat_req("x", stream=True)))
    assert ei.value.status_code == 502 and "boom" in ei.value.message
    body = b'data:{"error":"Input validation error: inputs too long","error_type":"validation"}\n\n'
    with pytest.raises(OpenAIError) as ei:
        call_raw(raw_backend(422, "text/event-stream", [body]), lambda a: a.open_chat_stream(chat_req("x", stream=True)))
    assert ei.value.status_code == 400 and "inputs too long" in ei.value.message


def test_stream_answer_that_is_not_server_sent_events_is_502():
    body = json.dumps({"generated_text": "hello", "details": None}).encode()
    with pytest.raises(OpenAIError) as ei:
        call_raw(raw_backend(200, "application/json", [body]), lambda a: a.open_chat_stream(chat_req("x", stream=True)))
    assert ei.value.status_code == 502 and "text/event-stream" in ei.value.message


def test_unreachable_backend_is_503():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(OpenAIError) as ei:
        call(url, lambda a: a.chat(chat_req("a b")))
    assert ei.value.status_code == 503
    with pytest.raises(OpenAIError) as ei:
        call(url, lambda a: a.open_chat_stream(chat_req("a b", stream=True)))
    assert ei.value.status_code == 503


def test_slow_first_token_is_504(tgi):
    url, control = tgi
    control.delay = 2.0

    async def go():
        a = adapter(url, timeout=0.3)
        try:
            await a.open_chat_stream(chat_req("a b a", stream=True))
        finally:
            await a.client.aclose()

    with pytest.raises(OpenAIError) as ei:
        run(go())
    assert ei.value.status_code == 504


# --- disconnects ------------------------------------------------------------------------------------------


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("how", ["aclose", "cancel", "never_iterated"])
def test_consumer_going_away_cancels_upstream(tgi, how):
    url, control = tgi
    control.delay = 0.05

    async def go():
        a = adapter(url)
        try:
            stream = await a.open_chat_stream(chat_req("a b a b", temperature=0, max_tokens=200, stream=True))
            if how == "aclose":
                await stream.__anext__()
                await stream.__anext__()
                await stream.aclose()
            elif how == "cancel":
                task = asyncio.create_task(collect(stream))
                await asyncio.sleep(0.2)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                await stream.aclose()
            await asyncio.sleep(0.1)
        finally:
            await a.client.aclose()

    run(go())
    assert wait_for(lambda: control.disconnects == 1), "backend did not see the disconnect"
    assert control.completed == 0


# --- completions ------------------------------------------------------------------------------------------


def comp_req(prompt, **kw) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "tiny", "prompt": prompt, **kw})


def test_completions(tgi):
    url, control = tgi
    resp = call(url, lambda a: a.completions(comp_req("a b a b", temperature=0, max_tokens=3, echo=True, logprobs=1)))
    assert control.requests[-1]["inputs"] == "a b a b"  # no template for completions
    expected = generate("a b a b", max_new_tokens=3, stop=[EOS])
    c = resp.choices[0]
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion"
    assert c.text == "a b a b" + expected.text and c.finish_reason == "length"
    assert c.logprobs.tokens == tokenize("a b a b") + expected.tokens
    assert resp.usage.prompt_tokens == 4 and resp.usage.completion_tokens == 3
    # OpenAI's default max_tokens for completions is 16
    call(url, lambda a: a.completions(comp_req("a b", temperature=0)))
    assert control.requests[-1]["parameters"]["max_new_tokens"] == 16


def test_completions_prompt_list_and_best_of(tgi):
    url, control = tgi
    resp = call(url, lambda a: a.completions(comp_req(["a b a", "c d c"], temperature=0, max_tokens=2)))
    assert [c.text for c in resp.choices] == [generate(p, max_new_tokens=2).text for p in ["a b a", "c d c"]]
    assert [c.index for c in resp.choices] == [0, 1]
    resp = call(url, lambda a: a.completions(comp_req("a b a c a", temperature=1, best_of=3, n=2, max_tokens=2)))
    assert control.requests[-1]["parameters"]["best_of"] == 3 and len(resp.choices) == 2
    with pytest.raises(OpenAIError) as ei:
        call(url, lambda a: a.completions(comp_req([1, 2, 3])))
    assert ei.value.param == "prompt"
    with pytest.raises(OpenAIError) as ei:
        call(url, lambda a: a.completions(comp_req("a", suffix="z")))
    assert ei.value.param == "suffix"


def test_completions_stream(tgi):
    url, _ = tgi

    async def go(a):
        return await collect(await a.open_completions_stream(comp_req("a b a b", temperature=0, max_tokens=3, stream=True,
                                                                      stream_options={"include_usage": True})))

    evs = events(call(url, go))
    assert evs[-1] == "[DONE]"
    chunks = evs[:-1]
    assert all(c["object"] == "text_completion" and c["id"].startswith("cmpl-") for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == generate("a b a b", max_new_tokens=3).text
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


# --- a token event read without pydantic ---------------------------------------------------------------------

json_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(-2, 0), st.text(max_size=3),
                        st.just([]), st.just({}))


@settings(max_examples=500, deadline=None)
@given(st.fixed_dictionaries({}, optional={"id": json_values, "text": json_values, "logprob": json_values,
                                            "special": json_values, "extra": json_values}),
       st.fixed_dictionaries({}, optional={"top_tokens": json_values, "generated_text": json_values,
                                            "details": json_values, "index": json_values}))
def test_a_plain_token_event_holds_what_pydantic_would(token, rest):
    raw = {"token": token, **rest}
    plain = plain_token_event(raw)
    try:
        parsed = StreamResponse(**raw)
    except ValidationError:
        assert plain is None  # pydantic refuses it: so does the fast path (and pydantic's error is raised)
        return
    if plain is None:
        return  # pydantic reads it (a coerced value, top tokens, details or a final text)
    assert parsed.top_tokens is None and parsed.generated_text is None and parsed.details is None
    for field in ("id", "text", "logprob", "special"):
        value, expected = getattr(plain.token, field), getattr(parsed.token, field)
        assert value == expected and type(value) is type(expected)
    assert plain.top_tokens is None and plain.generated_text is None and plain.details is None


def test_the_common_token_event_takes_the_fast_path():
    raw = json.loads(sse(token_event(3, " the"))[len(b"data: "):])
    assert isinstance(parse_stream_event(raw, 200), PlainTokenEvent)
    assert not isinstance(parse_stream_event(json.loads(json.dumps(token_event(3, "x", last=True))), 200),
                          PlainTokenEvent)


def test_an_event_orjson_refuses_is_read_by_json():
    assert loads_event(b'{"token": {"logprob": NaN}}')["token"]["logprob"] != 0  # NaN: json reads it
    with pytest.raises(OpenAIError, match="Invalid event"):
        loads_event(b"{not json")
    with pytest.raises(OpenAIError, match="Invalid event"):
        loads_event(b"[1, 2]")
