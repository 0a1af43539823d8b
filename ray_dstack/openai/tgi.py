"""OpenAI chat/completions on top of a Text Generation Inference (TGI) backend: the HTTP side.

The field mapping (OpenAI request → TGI parameters, TGI answer → OpenAI answer) is in `tgi_mapping.py`;
this module sends the requests over the connection pool it is given and turns TGI's token events into
OpenAI's stream.

Streaming: one `chat.completion.chunk` per generated token (special tokens skipped; text that could be
the start of a stop string is held back until it is known not to be one, then sent with the next chunk),
the first chunk carries `delta.role = "assistant"`, the last TGI event's token is kept (minus the stop string
that ended generation), then a chunk with `finish_reason`, then (with `stream_options.include_usage`) a
chunk with `usage` and empty `choices`, then `data: [DONE]`. The chunks of the tokens one read of TGI's body
brings leave together, as one piece (at engine speed a read holds ~16 tokens). An upstream error before the
first token is raised as `OpenAIError` by `open_chat_stream` (so the HTTP layer answers a real status); an
error later is sent as a final `data: {"error": {...}}` event (after the chunks before it) followed by
`data: [DONE]`.

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
from collections.abc import AsyncGenerator, AsyncIterator, Callable
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
from ray_dstack.openai.sse import SSEDataReader
from ray_dstack.openai.streams import SSE_DONE, ByteStream, close_quietly
from ray_dstack.openai.tgi_mapping import ModelLike, PlainTokenEvent, final_text, map_finish_reason

if TYPE_CHECKING:
    from ray_dstack.openai.templates import ChatTemplate


class _Upstream:
    """An open TGI SSE stream whose first event has been read (and parsed: a bad one fails before the answer)."""

    def __init__(self, response: httpx.Response, events: AsyncGenerator[list[dict[str, Any]], None],
                 first: StreamResponse | PlainTokenEvent, first_batch: list[dict[str, Any]]):
        self.response = response
        self.events = events  # the events of each read of the body
        self.first = first  # `first_batch[0]`, parsed
        self.first_batch = first_batch

    async def aclose(self) -> None:
        await close_quietly(self.events.aclose)
        await close_quietly(self.response.aclose)

    async def batches(self) -> AsyncIterator[list[tuple[StreamResponse | PlainTokenEvent, dict[str, Any]]]]:
        """The token events, a list per read of the body: everything per token after this is plain function
        calls, one async step per read (at engine speed a read holds ~16 tokens: bench/RESULTS.md)."""
        status = self.response.status_code
        parsed: list[tuple[StreamResponse | PlainTokenEvent, dict[str, Any]]] = [(self.first, self.first_batch[0])]
        rest = self.first_batch[1:]
        while True:
            for raw in rest:
                try:
                    parsed.append((tgi_mapping.parse_stream_event(raw, status), raw))
                except Exception:
                    if parsed:  # the tokens before the bad event still go out
                        yield parsed
                    raise
            if parsed:
                yield parsed
            batch = await anext(self.events, None)
            if batch is None:
                return
            parsed, rest = [], batch


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
        return await _owning(upstream, lambda: self._chat_chunks(req, upstream, params.get("stop", [])))

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
        return await _owning(upstream, lambda: self._completion_chunks(req, prompts[0], upstream, params.get("stop", [])))

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
            events = _sse_batches(response)
            batch = await anext(events, None)
            if batch is None:
                raise errors.upstream_bad_response("The TGI backend closed the stream before the first token")
            first = tgi_mapping.parse_stream_event(batch[0], response.status_code)
        except BaseException as exc:
            if events is not None:
                await close_quietly(events.aclose)
            await close_quietly(response.aclose)
            if isinstance(exc, httpx.HTTPError):
                raise to_openai_error(exc) from exc
            raise
        return _Upstream(response, events, first, batch)

    # --- SSE producers -------------------------------------------------------------------------------------

    def _chat_chunks(self, req: ChatCompletionRequest, upstream: _Upstream, stops: list[str]) -> AsyncGenerator[bytes, None]:
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

        def final_chunks(text: str, lps: list[TokenLogprob], finish: str, usage: UsageInfo) -> list[bytes]:
            out = [chunk({"content": text}, logprobs=lps if req.logprobs else None)] if text or lps else []
            out.append(chunk({}, finish))
            if req.include_usage:
                out.append(_usage_chunk(cid, "chat.completion.chunk", created, model, usage))
            return out

        return _chunks_per_read(upstream, _TokenTexts(stops, req.logprobs), [],
                                lambda text, lps: chunk({"content": text}, logprobs=lps if req.logprobs else None),
                                final_chunks)

    def _completion_chunks(self, req: CompletionRequest, prompt: str, upstream: _Upstream, stops: list[str]) -> AsyncGenerator[bytes, None]:
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

        def final_chunks(text: str, lps: list[Any], finish: str, usage: UsageInfo) -> list[bytes]:
            out = [chunk(text, lps=lps)] if text else []
            out.append(chunk("", finish))
            if req.include_usage:
                out.append(_usage_chunk(cid, "text_completion", created, model, usage))
            return out

        return _chunks_per_read(upstream, _TokenTexts(stops, req.logprobs is not None, legacy=True),
                                [chunk(prompt)] if req.echo else [], lambda text, lps: chunk(text, lps=lps),
                                final_chunks)


def _usage_chunk(cid: str, object_: str, created: int, model: str, usage: UsageInfo) -> bytes:
    """`stream_options.include_usage`'s last chunk: no choices, the stream's usage."""
    obj = {"id": cid, "object": object_, "created": created, "model": model, "choices": [], "usage": usage.model_dump()}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def _owning(upstream: _Upstream, chunks: Callable[[], AsyncGenerator[bytes, None]]) -> ByteStream:
    """The stream of `chunks()`, which owns `upstream` (closed however it ends, or now if building it fails)."""
    try:
        return ByteStream(chunks(), upstream.aclose)
    except BaseException:
        await upstream.aclose()
        raise


async def _chunks_per_read(upstream: _Upstream, texts: "_TokenTexts", head: list[bytes],
                           token_chunk: Callable[[str, list[Any]], bytes],
                           final_chunks: Callable[[str, list[Any], str, UsageInfo], list[bytes]],
                           ) -> AsyncGenerator[bytes, None]:
    """A stream's OpenAI chunks, one piece per read of the TGI body (one write downstream): `head` first, a chunk
    per token `texts` lets out, the final chunks, `[DONE]`. A failure mid-stream ends it with an error event
    after the chunks before it, then `[DONE]`; the upstream is closed however the stream ends."""
    out = head
    try:
        async for batch in upstream.batches():
            for ev, raw in batch:
                step = texts.step(ev, raw)
                if step is None:
                    continue
                text, lps, final = step
                if final is None:
                    out.append(token_chunk(text, lps))
                    continue
                out += final_chunks(text, lps, *final)
                out.append(SSE_DONE)
                yield b"".join(out)
                return
            if out:
                data, out = b"".join(out), []
                yield data
        raise errors.upstream_bad_response("The TGI backend ended the stream without its final event")
    except Exception as exc:  # mid-stream failure: a final error event, then a clean end
        out += (errors.sse_error_event(exc), SSE_DONE)
        yield b"".join(out)
    finally:
        await upstream.aclose()


class _TokenTexts:
    """What to send for each TGI token event: `step` returns `(text, logprobs, final)`, or None while the text is
    held back; `final` = (finish_reason, usage) on the last event.

    Text that may be the beginning of a stop string is held back and sent with a later token, so that a stop
    string spanning several tokens never reaches the client.
    """

    def __init__(self, stops: list[str], want_logprobs: bool | None, legacy: bool = False) -> None:
        self.stops = stops
        self.want_logprobs = want_logprobs
        self.legacy = legacy
        self.pending = ""
        self.pending_lps: list[Any] = []

    def step(self, ev: StreamResponse | PlainTokenEvent, raw: dict[str, Any]):
        tok = ev.token
        if not tok.special:
            self.pending += tok.text
            if self.want_logprobs:
                if self.legacy:
                    top = {t.text: t.logprob for t in (ev.top_tokens or [])} or None
                    self.pending_lps.append((tok.text, tok.logprob, top))
                else:
                    self.pending_lps.append(tgi_mapping.chat_logprob(tok, ev.top_tokens))
        if ev.details is not None or ev.generated_text is not None:
            reason = ev.details.finish_reason if ev.details is not None else "length"
            text = final_text(self.pending, reason, self.stops)
            generated = ev.details.generated_tokens if ev.details is not None else 0
            input_length = (raw.get("details") or {}).get("input_length") or 0
            return text, self.pending_lps, (map_finish_reason(reason), UsageInfo.of(int(input_length), generated))
        pending = self.pending
        hold = tgi_mapping.held_back_len(pending, self.stops)
        send = pending[: len(pending) - hold]
        if send or (self.pending_lps and not hold):
            lps = self.pending_lps
            self.pending, self.pending_lps = pending[len(pending) - hold:], []
            return send, lps, None
        return None


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


async def _sse_batches(response: httpx.Response) -> AsyncGenerator[list[dict[str, Any]], None]:
    """The JSON objects of TGI's server-sent events, a list per read of the body (never empty), until
    `data: [DONE]` or the end of the body.

    ray_dstack/openai/sse.py does the SSE framing (multi-line `data:`, comments, CR/LF, events split across
    reads) on the bytes, with no per-line objects (one event per token: bench/RESULTS.md); an answer that is not
    `text/event-stream`, or an event that is not a JSON object, is a bad upstream response (raised after the
    events before it).
    """
    content_type = _media_type(response)
    if "text/event-stream" not in content_type:
        raise errors.upstream_bad_response(
            f"The TGI backend's stream is not server-sent events: expected Content-Type text/event-stream, "
            f"got {content_type!r}")
    reader = SSEDataReader()
    async for piece in response.aiter_bytes():
        batch = []
        for data in reader.feed(piece):
            if not data:  # an event with an empty `data`: nothing to parse
                continue
            if data.strip() == b"[DONE]":
                if batch:
                    yield batch
                return
            try:
                batch.append(tgi_mapping.loads_event(data))
            except Exception:
                if batch:
                    yield batch
                raise
        if batch:
            yield batch


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
