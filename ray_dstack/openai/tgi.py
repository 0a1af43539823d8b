"""OpenAI chat/completions on top of a Text Generation Inference (TGI) backend: the HTTP side.

The field mapping (OpenAI request → TGI parameters, TGI answer → OpenAI answer) is in `tgi_mapping.py`;
this module sends the requests over the connection pool it is given and turns TGI's token events into
OpenAI's stream.

Streaming: one `chat.completion.chunk` per generated token (special tokens skipped; text that could be
the start of a stop string is held back until it is known not to be one, then sent with the next chunk),
the first chunk carries `delta.role = "assistant"`, the last TGI event's token is kept (minus the stop string
that ended generation), then a chunk with `finish_reason`, then (with `stream_options.include_usage`) a
chunk with `usage` and empty `choices`, then `data: [DONE]`. An upstream error before the first token is
raised as `OpenAIError` by `open_chat_stream` (so the HTTP layer answers a real status); an error later is
sent as a final `data: {"error": {...}}` event followed by `data: [DONE]`.

Why not `text_generation.AsyncClient` for the HTTP part (its types and error parser *are* used):
its `generate`/`generate_stream` open a new aiohttp `ClientSession` (a new connection pool, a new TCP
connection) for every call, apply the timeout as a *total* duration (a long stream is killed after it),
always send `max_new_tokens=20` when not given, and its `Parameters` validator rejects a negative or zero
`frequency_penalty` that TGI accepts. So the adapter sends the same request body over the
caller's long-lived pooled `httpx.AsyncClient`; `tgi_mapping` validates parameters with
`text_generation.types.Parameters`, parses answers with `text_generation.types.Response`/`StreamResponse` and
errors with `text_generation.errors.parse_error`.
"""

from __future__ import annotations

import asyncio
import json
from json.encoder import encode_basestring as _encode_string  # json.dumps(str, ensure_ascii=False)
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
from text_generation.types import Response, StreamResponse

from ray_dstack.openai import errors, tgi_mapping
from ray_dstack.openai.errors import invalid_request, to_openai_error
from ray_dstack.openai.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    TokenLogprob,
    UsageInfo,
    now,
    random_id,
)
from ray_dstack.openai.sse import SSEDataReader, sse_data
from ray_dstack.openai.streams import SSE_DONE, ByteStream, close_quietly
from ray_dstack.openai.tgi_mapping import ModelLike, final_text, map_finish_reason

if TYPE_CHECKING:
    from ray_dstack.openai.templates import ChatTemplate


class _Upstream:
    """An open TGI SSE stream whose first event has been read."""

    def __init__(self, response: httpx.Response, events: AsyncGenerator[dict[str, Any], None], first: StreamResponse, first_raw: dict[str, Any]):
        self.response = response
        self.events = events
        self.first = first
        self.first_raw = first_raw

    async def aclose(self) -> None:
        await close_quietly(self.events.aclose)
        await close_quietly(self.response.aclose)

    async def __aiter__(self) -> AsyncIterator[tuple[StreamResponse, dict[str, Any]]]:
        yield self.first, self.first_raw
        async for raw in self.events:
            yield tgi_mapping.parse_stream_event(raw, self.response.status_code), raw


class TGIAdapter:
    """Serves OpenAI `chat/completions` and `completions` from one TGI backend at `base_url`."""

    def __init__(
        self,
        base_url: str,
        model: ModelLike,
        template: "ChatTemplate | None",
        timeout: float | None = 600.0,
        *,
        client: httpx.AsyncClient,
    ) -> None:
        """`client`: the caller's connection pool to the model server (the caller closes it)."""
        self.base_url = base_url.rstrip("/") + "/"
        self.model = model
        self.template = template
        self.timeout = timeout
        self.client = client

    # --- public API ------------------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletion:
        if req.stream:
            raise invalid_request("Use open_chat_stream for `stream: true`", param="stream")
        prompt = tgi_mapping.chat_prompt(req, self.model, self.template)
        params = tgi_mapping.chat_parameters(req, self.model, stream=False)
        resp = await self._generate(prompt, params)
        return tgi_mapping.chat_completion(req, resp, params.get("stop", []))

    async def open_chat_stream(self, req: ChatCompletionRequest) -> ByteStream:
        """Start generating; returns once the first token arrived (upstream errors raise `OpenAIError`)."""
        prompt = tgi_mapping.chat_prompt(req, self.model, self.template)
        params = tgi_mapping.chat_parameters(req, self.model, stream=True)
        upstream = await self._open_stream(prompt, params)
        gen = self._chat_chunks(req, upstream, params.get("stop", []))
        return ByteStream(gen, upstream.aclose)

    chat_stream = open_chat_stream

    async def completions(self, req: CompletionRequest) -> Completion:
        if req.stream:
            raise invalid_request("Use open_completions_stream for `stream: true`", param="stream")
        prompts = tgi_mapping.prompts(req)
        params = tgi_mapping.completion_parameters(req, self.model, stream=False)
        results = await asyncio.gather(*(self._generate(p, params) for p in prompts))
        return tgi_mapping.completion(req, prompts, list(results), params.get("stop", []))

    async def open_completions_stream(self, req: CompletionRequest) -> ByteStream:
        prompts = tgi_mapping.prompts(req)
        if len(prompts) != 1:
            raise invalid_request("Streaming supports a single prompt", param="prompt")
        params = tgi_mapping.completion_parameters(req, self.model, stream=True)
        upstream = await self._open_stream(prompts[0], params)
        gen = self._completion_chunks(req, prompts[0], upstream, params.get("stop", []))
        return ByteStream(gen, upstream.aclose)

    completions_stream = open_completions_stream

    # --- upstream I/O ------------------------------------------------------------------------------------

    async def _generate(self, prompt: str, params: dict[str, Any]) -> Response:
        body = {"inputs": prompt, "parameters": params, "stream": False}
        try:
            resp = await self.client.post(self.base_url, json=body)
        except httpx.HTTPError as exc:
            raise to_openai_error(exc) from exc
        try:
            payload = resp.json()
        except ValueError:
            if resp.status_code != 200:
                raise errors.from_upstream_status(resp.status_code, resp.content) from None
            raise errors.upstream_bad_response("The TGI backend answered with invalid JSON") from None
        if resp.status_code != 200:
            raise tgi_mapping.tgi_error(resp.status_code, payload)
        return tgi_mapping.parse_response(payload)

    async def _open_stream(self, prompt: str, params: dict[str, Any]) -> _Upstream:
        body = {"inputs": prompt, "parameters": params, "stream": True}
        request = self.client.build_request("POST", self.base_url, json=body, headers={"accept": "text/event-stream"})
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise to_openai_error(exc) from exc
        events = None
        try:
            if response.status_code != 200:
                content = await response.aread()
                try:
                    payload = json.loads(content)
                except ValueError:
                    payload = await _error_event_payload(response)
                raise tgi_mapping.tgi_error(response.status_code, payload) if payload is not None else \
                    errors.from_upstream_status(response.status_code, content)
            events = _sse_events(response)
            raw = await anext(events, None)
            if raw is None:
                raise errors.upstream_bad_response("The TGI backend closed the stream before the first token")
            first = tgi_mapping.parse_stream_event(raw, response.status_code)
        except BaseException as exc:
            if events is not None:
                await close_quietly(events.aclose)
            await close_quietly(response.aclose)
            if isinstance(exc, httpx.HTTPError):
                raise to_openai_error(exc) from exc
            raise
        return _Upstream(response, events, first, raw)

    # --- SSE producers -------------------------------------------------------------------------------------

    async def _chat_chunks(self, req: ChatCompletionRequest, upstream: _Upstream, stops: list[str]) -> AsyncGenerator[bytes, None]:
        cid, created, model = random_id("chatcmpl-"), now(), req.model
        role_sent = False

        def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: list[TokenLogprob] | None = None) -> bytes:
            nonlocal role_sent
            if not role_sent:
                delta = {"role": "assistant", **delta}
                role_sent = True
            elif finish is None and logprobs is None and list(delta) == ["content"]:
                return token_chunk.render(delta["content"])  # a plain token: most chunks of a stream
            choice = {"index": 0, "delta": delta,
                      "logprobs": {"content": [lp.model_dump() for lp in logprobs]} if logprobs is not None else None,
                      "finish_reason": finish}
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
            if req.include_usage:
                obj["usage"] = None
            return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

        token_chunk = _ChunkTemplate({
            "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": {"content": _SLOT}, "logprobs": None, "finish_reason": None}],
            **({"usage": None} if req.include_usage else {})})

        try:
            async for text, lps, final in self._token_texts(upstream, stops, req.logprobs):
                if final is not None:
                    if text or lps:
                        yield chunk({"content": text}, logprobs=lps if req.logprobs else None)
                    finish, usage = final
                    yield chunk({}, finish)
                    if req.include_usage:
                        obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                               "choices": [], "usage": usage.model_dump()}
                        yield b"data: " + json.dumps(obj).encode() + b"\n\n"
                    yield SSE_DONE
                    return
                yield chunk({"content": text}, logprobs=lps if req.logprobs else None)
        except Exception as exc:  # mid-stream failure: a final error event, then a clean end
            yield errors.sse_error_event(exc)
            yield SSE_DONE
        finally:
            await upstream.aclose()

    async def _completion_chunks(self, req: CompletionRequest, prompt: str, upstream: _Upstream, stops: list[str]) -> AsyncGenerator[bytes, None]:
        cid, created, model = random_id("cmpl-"), now(), req.model

        def chunk(text: str, finish: str | None = None, lps: list[Any] | None = None) -> bytes:
            if finish is None and (req.logprobs is None or lps is None):
                return token_chunk.render(text)  # a plain token: most chunks of a stream
            logprobs = None
            if req.logprobs is not None and lps is not None:
                logprobs = {"tokens": [t for t, _, _ in lps], "token_logprobs": [lp for _, lp, _ in lps],
                            "top_logprobs": [top for _, _, top in lps], "text_offset": []}
            obj = {"id": cid, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
            if req.include_usage:
                obj["usage"] = None
            return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

        token_chunk = _ChunkTemplate({
            "id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": _SLOT, "logprobs": None, "finish_reason": None}],
            **({"usage": None} if req.include_usage else {})})

        try:
            if req.echo:
                yield chunk(prompt)
            async for text, lps, final in self._token_texts(upstream, stops, req.logprobs is not None, legacy=True):
                if final is not None:
                    if text:
                        yield chunk(text, lps=lps)
                    finish, usage = final
                    yield chunk("", finish)
                    if req.include_usage:
                        obj = {"id": cid, "object": "text_completion", "created": created, "model": model,
                               "choices": [], "usage": usage.model_dump()}
                        yield b"data: " + json.dumps(obj).encode() + b"\n\n"
                    yield SSE_DONE
                    return
                yield chunk(text, lps=lps)
        except Exception as exc:
            yield errors.sse_error_event(exc)
            yield SSE_DONE
        finally:
            await upstream.aclose()

    async def _token_texts(self, upstream: _Upstream, stops: list[str], want_logprobs: bool | None, legacy: bool = False):
        """Yield `(text, logprobs, final)` per token to send; `final` = (finish_reason, usage) on the last one.

        Text that may be the beginning of a stop string is held back and sent with a later token, so that a
        stop string spanning several tokens never reaches the client.
        """
        pending = ""
        pending_lps: list[Any] = []
        async for ev, raw in upstream:
            tok = ev.token
            if not tok.special:
                pending += tok.text
                if want_logprobs:
                    if legacy:
                        top = {t.text: t.logprob for t in (ev.top_tokens or [])} or None
                        pending_lps.append((tok.text, tok.logprob, top))
                    else:
                        pending_lps.append(tgi_mapping.chat_logprob(tok, ev.top_tokens))
            if ev.details is not None or ev.generated_text is not None:
                reason = ev.details.finish_reason if ev.details is not None else "length"
                text = final_text(pending, reason, stops)
                generated = ev.details.generated_tokens if ev.details is not None else 0
                input_length = (raw.get("details") or {}).get("input_length") or 0
                yield text, pending_lps, (map_finish_reason(reason), UsageInfo.of(int(input_length), generated))
                return
            hold = tgi_mapping.held_back_len(pending, stops)
            send = pending[: len(pending) - hold]
            if send or (pending_lps and not hold):
                yield send, pending_lps, None
                pending, pending_lps = pending[len(pending) - hold:], []
        raise errors.upstream_bad_response("The TGI backend ended the stream without its final event")


_SLOT = "\x00ray-dstack-slot\x00"  # the text slot in a template (the last one: a `model` may hold it too)


class _ChunkTemplate:
    """The SSE bytes of a stream chunk whose only varying value is one string (a token's text): built once per
    stream with `json.dumps`, then per token only the string is encoded (json's own string encoder), so the bytes
    equal `json.dumps(obj, ensure_ascii=False)`'s at a fraction of the cost (bench/RESULTS.md, "Relay tokens at
    engine speed")."""

    def __init__(self, obj: dict[str, Any]) -> None:
        text = json.dumps(obj, ensure_ascii=False)
        slot = json.dumps(_SLOT, ensure_ascii=False)
        before, _, after = text.rpartition(slot)  # the last one: a client's `model` comes before it
        self.prefix = b"data: " + before.encode()
        self.suffix = after.encode() + b"\n\n"

    def render(self, value: str) -> bytes:
        return self.prefix + _encode_string(value).encode() + self.suffix


def _media_type(response: httpx.Response) -> str:
    return response.headers.get("content-type", "").partition(";")[0]


async def _sse_events(response: httpx.Response) -> AsyncGenerator[dict[str, Any], None]:
    """The JSON objects of TGI's server-sent events, until `data: [DONE]` or the end of the body.

    ray_dstack/openai/sse.py does the SSE framing (multi-line `data:`, comments, CR/LF, events split across
    reads) on the bytes, with no per-line objects (one event per token: bench/RESULTS.md); an answer that is not
    `text/event-stream`, or an event that is not a JSON object, is a bad upstream response.
    """
    content_type = _media_type(response)
    if "text/event-stream" not in content_type:
        raise errors.upstream_bad_response(
            f"The TGI backend's stream is not server-sent events: expected Content-Type text/event-stream, "
            f"got {content_type!r}")
    async for data in sse_data(response.aiter_bytes()):
        if not data:  # an event with an empty `data`: nothing to parse
            continue
        if data.strip() == b"[DONE]":
            return
        yield tgi_mapping.loads_event(data)


async def _error_event_payload(response: httpx.Response) -> Any:
    """The JSON of the first event of an error answered as server-sent events (TGI may do that), else None."""
    if "text/event-stream" not in _media_type(response):
        return None
    reader = SSEDataReader()
    for data in reader.feed(response.content):
        if data:
            try:
                return json.loads(data)
            except ValueError:
                return None
    return None
