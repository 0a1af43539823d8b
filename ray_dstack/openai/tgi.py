"""OpenAI chat/completions on top of a Text Generation Inference (TGI) backend.

How an OpenAI request becomes a TGI `POST /` (`{"inputs", "parameters", "stream"}`, the body
`text_generation.AsyncClient` sends):

| OpenAI field                          | TGI                                                                   |
|---------------------------------------|-----------------------------------------------------------------------|
| `model`                               | checked against the service's model name (404 otherwise, in service) |
| `messages`                            | `inputs` = chat template(messages, add_generation_prompt=True, bos_token, eos_token) |
| `prompt` (completions)                | `inputs`; a list of strings = one TGI request per prompt (not with `stream`); token ids → 400 |
| `max_completion_tokens` / `max_tokens`| `max_new_tokens` (chat: omitted when unset → TGI's default; completions: OpenAI's default 16) |
| `stop` (str or list) + `eos_token`    | `stop` (de-duplicated); the matched stop string is trimmed from the answer |
| `temperature: 0`                      | greedy: `do_sample: false`, no `temperature`/`top_p`                  |
| `temperature` > 0 or unset            | `do_sample: true` (+ `temperature` when set; OpenAI's default is 1)   |
| `top_p`                               | sent only when < 1 (and not greedy); `top_p: 0` → 400 naming `top_p`  |
| `seed`                                | `seed`; with `n > 1` → 400 naming `seed` (TGI rejects seed with best_of) |
| `n`                                   | `best_of` = n, choices from `generated_text` + `details.best_of_sequences`; `n > 1` with `stream` → 400 naming `n`; with `temperature: 0` → 400 naming `n` |
| `best_of` (completions)               | TGI `best_of` = max(n, best_of); the first `n` sequences are returned |
| `frequency_penalty`                   | `frequency_penalty` when non-zero (TGI accepts (-2, 2])              |
| `presence_penalty`                    | **rejected** when non-zero: 400 naming `presence_penalty` (TGI has no equivalent; ignoring it would silently change results). 0/unset is fine |
| `logprobs` / `top_logprobs` (chat)    | logprobs from `details.tokens` / `top_n_tokens` = top_logprobs       |
| `logprobs` (completions, int)         | legacy logprobs from `details.tokens` (+ `prefill` with `echo`), `top_n_tokens` |
| `response_format`                     | `json_object` → `grammar {type: json, value: {"type": "object"}}`; `json_schema` → its schema |
| `tools`                               | 400 naming `tools` unless `tool_choice: "none"` (the template interface has no tools) |
| `logit_bias`                          | non-empty → 400 naming `logit_bias`                                  |
| `echo` (completions)                  | the prompt is prepended to the text                                  |
| `suffix` (completions)                | non-empty → 400 naming `suffix`                                      |
| `user`, `parallel_tool_calls`, others | ignored                                                               |
| —                                     | `details: true`; `decoder_input_details: true` when not streaming    |

Answers: `finish_reason` `eos_token`/`stop_sequence` → `stop`, `length` → `length`;
`usage.prompt_tokens = len(details.prefill)` (streaming: TGI's `details.input_length`),
`completion_tokens` = sum of `generated_tokens` over all sequences.

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
`frequency_penalty` that TGI accepts. So the adapter holds one long-lived pooled `httpx.AsyncClient`,
builds the same request body, validates parameters with `text_generation.types.Parameters`, parses answers
with `text_generation.types.Response`/`StreamResponse` and errors with `text_generation.errors.parse_error`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

import httpx
from text_generation import errors as tgi_errors
from text_generation.types import Parameters, Response, StreamResponse, Token

from ray_dstack.openai import errors
from ray_dstack.openai.errors import OpenAIError, invalid_request, to_openai_error
from ray_dstack.openai.protocol import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
    now,
    random_id,
)
from ray_dstack.openai.streams import SSE_DONE, ByteStream, close_quietly

if TYPE_CHECKING:
    from ray_dstack.openai.templates import ChatTemplate


class ModelLike(Protocol):
    name: str
    eos_token: str | None
    bos_token: str | None


FINISH_REASONS = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}


def map_finish_reason(reason: Any) -> str:
    value = getattr(reason, "value", reason)
    return FINISH_REASONS.get(str(value), "stop")


def trim_stop(text: str, stops: list[str]) -> str:
    """`text` without the (longest) stop string it ends with."""
    for stop in sorted(stops, key=len, reverse=True):
        if stop and text.endswith(stop):
            return text[: -len(stop)]
    return text


def _held_back_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _chat_logprob(tok: Token, top: list[Token] | None) -> TokenLogprob:
    return TokenLogprob(
        token=tok.text,
        logprob=tok.logprob if tok.logprob is not None else 0.0,
        bytes=_token_bytes(tok.text),
        top_logprobs=[
            TopLogprob(token=t.text, logprob=t.logprob if t.logprob is not None else 0.0, bytes=_token_bytes(t.text))
            for t in (top or [])
        ],
    )


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
            yield _parse_stream_event(raw, self.response.status_code), raw


def _parse_stream_event(raw: dict[str, Any], status: int) -> StreamResponse:
    if "error" in raw:
        raise _tgi_error(status if status >= 400 else 500, raw)
    try:
        return StreamResponse(**raw)
    except Exception as exc:  # pydantic error: not a token event
        raise errors.upstream_bad_response(f"Unexpected event from the TGI backend: {json.dumps(raw)[:500]}") from exc


def _tgi_error(status: int, payload: Any) -> OpenAIError:
    if isinstance(payload, dict) and "error" in payload:
        err = to_openai_error(tgi_errors.parse_error(status, payload))
        if status == 422 or payload.get("error_type") == "validation":
            err.status_code, err.type = 400, errors.INVALID_REQUEST
        return err
    return errors.from_upstream_status(status, json.dumps(payload).encode() if payload is not None else b"")


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
        prompt = self._chat_prompt(req)
        params = self._chat_parameters(req, stream=False)
        resp = await self._generate(prompt, params)
        choices: list[ChatCompletionChoice] = []
        stops = params.get("stop", [])
        for i, (text, reason, tokens, top) in enumerate(self._sequences(resp)):
            logprobs = None
            if req.logprobs:
                logprobs = ChoiceLogprobs(content=[
                    _chat_logprob(t, top[j] if top and j < len(top) else None)
                    for j, t in enumerate(tokens) if not t.special
                ])
            choices.append(ChatCompletionChoice(
                index=i,
                message=ChatCompletionMessage(content=self._final_text(text, reason, stops)),
                logprobs=logprobs,
                finish_reason=map_finish_reason(reason),
            ))
        return ChatCompletion(model=req.model, choices=choices, usage=self._usage(resp))

    async def open_chat_stream(self, req: ChatCompletionRequest) -> ByteStream:
        """Start generating; returns once the first token arrived (upstream errors raise `OpenAIError`)."""
        prompt = self._chat_prompt(req)
        params = self._chat_parameters(req, stream=True)
        upstream = await self._open_stream(prompt, params)
        gen = self._chat_chunks(req, upstream, params.get("stop", []))
        return ByteStream(gen, upstream.aclose)

    chat_stream = open_chat_stream

    async def completions(self, req: CompletionRequest) -> Completion:
        if req.stream:
            raise invalid_request("Use open_completions_stream for `stream: true`", param="stream")
        prompts = self._prompts(req)
        params = self._completion_parameters(req, stream=False)
        results = await asyncio.gather(*(self._generate(p, params) for p in prompts))
        stops = params.get("stop", [])
        choices: list[CompletionChoice] = []
        prompt_tokens = completion_tokens = 0
        for prompt, resp in zip(prompts, results):
            usage = self._usage(resp)
            prompt_tokens += usage.prompt_tokens
            completion_tokens += usage.completion_tokens
            for text, reason, tokens, top in list(self._sequences(resp))[: req.n]:
                final = self._final_text(text, reason, stops)
                logprobs = None
                if req.logprobs is not None:
                    logprobs = self._completion_logprobs(req, resp, tokens, top)
                choices.append(CompletionChoice(
                    index=len(choices),
                    text=(prompt + final) if req.echo else final,
                    logprobs=logprobs,
                    finish_reason=map_finish_reason(reason),
                ))
        return Completion(model=req.model, choices=choices, usage=UsageInfo.of(prompt_tokens, completion_tokens))

    async def open_completions_stream(self, req: CompletionRequest) -> ByteStream:
        prompts = self._prompts(req)
        if len(prompts) != 1:
            raise invalid_request("Streaming supports a single prompt", param="prompt")
        params = self._completion_parameters(req, stream=True)
        upstream = await self._open_stream(prompts[0], params)
        gen = self._completion_chunks(req, prompts[0], upstream, params.get("stop", []))
        return ByteStream(gen, upstream.aclose)

    completions_stream = open_completions_stream

    # --- request mapping ---------------------------------------------------------------------------------

    def _chat_prompt(self, req: ChatCompletionRequest) -> str:
        if self.template is None:
            raise invalid_request(
                f"Model `{self.model.name}` has no chat template; use /v1/completions or configure `chat_template`",
                param="messages", code="no_chat_template",
            )
        if req.tools and req.tool_choice != "none":
            raise invalid_request("`tools` are not supported by this model's backend (format: tgi)", param="tools")
        messages = [m.for_template() for m in req.messages]
        try:
            prompt = self.template.render(messages, add_generation_prompt=True)
        except Exception as exc:  # TemplateError (and anything a template raises) → 400 with its message
            raise _template_error(exc) from exc
        if not prompt:
            raise invalid_request("The chat template rendered an empty prompt", param="messages")
        return prompt

    def _prompts(self, req: CompletionRequest) -> list[str]:
        p = req.prompt
        if isinstance(p, str):
            prompts = [p]
        elif p and all(isinstance(x, str) for x in p):
            prompts = list(p)  # type: ignore[arg-type]
        else:
            raise invalid_request("Token-id prompts are not supported by this model's backend (format: tgi); send text",
                                  param="prompt")
        if any(not x for x in prompts):
            raise invalid_request("`prompt` must not be empty", param="prompt")
        if req.suffix:
            raise invalid_request("`suffix` is not supported by this model's backend (format: tgi)", param="suffix")
        return prompts

    def _stops(self, req: ChatCompletionRequest | CompletionRequest) -> list[str]:
        stops = req.stop_list()
        if self.model.eos_token and self.model.eos_token not in stops:
            stops.append(self.model.eos_token)
        return stops

    def _common_parameters(self, req: ChatCompletionRequest | CompletionRequest, *, stream: bool, best_of: int,
                           max_new_tokens: int | None, top_n: int | None) -> dict[str, Any]:
        if req.presence_penalty:
            raise invalid_request("`presence_penalty` is not supported by this model's backend (format: tgi); "
                                  "use `frequency_penalty`", param="presence_penalty")
        if req.logit_bias:
            raise invalid_request("`logit_bias` is not supported by this model's backend (format: tgi)",
                                  param="logit_bias")
        if req.top_p is not None and req.top_p <= 0:
            raise invalid_request("`top_p` must be > 0", param="top_p")
        greedy = req.temperature == 0
        if best_of > 1:
            if stream:
                raise invalid_request("`n` > 1 is not supported with `stream: true`", param="n")
            if greedy:
                raise invalid_request("`n` > 1 needs sampling: set `temperature` > 0", param="n")
            if req.seed is not None:
                raise invalid_request("`seed` cannot be set when `n` > 1", param="seed")
        params: dict[str, Any] = {"do_sample": not greedy, "details": True}
        if not greedy:
            if req.temperature is not None:
                params["temperature"] = req.temperature
            if req.top_p is not None and req.top_p < 1:
                params["top_p"] = req.top_p
        if max_new_tokens is not None:
            params["max_new_tokens"] = max_new_tokens
        stops = self._stops(req)
        if stops:
            params["stop"] = stops
        if req.seed is not None:
            params["seed"] = req.seed
        if best_of > 1:
            params["best_of"] = best_of
        if not stream:
            params["decoder_input_details"] = True
        if top_n:
            params["top_n_tokens"] = top_n
        return params

    def _validated(self, params: dict[str, Any], req: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
        try:
            Parameters(**params)  # text_generation's own checks (temperature > 0, top_p range, best_of rules)
        except (tgi_errors.ValidationError, ValueError) as exc:
            raise invalid_request(str(exc)) from exc
        # text_generation rejects frequency_penalty <= 0, TGI accepts (-2, 2]: add it after validating.
        if req.frequency_penalty:
            params["frequency_penalty"] = req.frequency_penalty
        return params

    def _chat_parameters(self, req: ChatCompletionRequest, *, stream: bool) -> dict[str, Any]:
        top_n = req.top_logprobs if req.logprobs and req.top_logprobs else None
        params = self._common_parameters(req, stream=stream, best_of=req.n, max_new_tokens=req.max_new_tokens, top_n=top_n)
        rf = req.response_format
        if rf is not None and rf.type != "text":
            if rf.type == "json_object":
                params["grammar"] = {"type": "json", "value": {"type": "object"}}
            else:
                schema = (rf.json_schema or {}).get("schema")
                if not schema:
                    raise invalid_request("`response_format.json_schema.schema` is required",
                                          param="response_format.json_schema.schema")
                params["grammar"] = {"type": "json", "value": schema}
        return self._validated(params, req)

    def _completion_parameters(self, req: CompletionRequest, *, stream: bool) -> dict[str, Any]:
        best_of = max(req.n, req.best_of or 1)
        if req.best_of is not None and req.best_of < req.n:
            raise invalid_request("`best_of` must be >= `n`", param="best_of")
        if req.echo and stream and req.logprobs is not None:
            raise invalid_request("`echo` with `logprobs` is not supported with `stream: true`", param="echo")
        params = self._common_parameters(req, stream=stream, best_of=best_of, max_new_tokens=req.max_new_tokens,
                                         top_n=req.logprobs or None)
        return self._validated(params, req)

    # --- answers -----------------------------------------------------------------------------------------

    def _final_text(self, text: str, reason: Any, stops: list[str]) -> str:
        if map_finish_reason(reason) == "stop":
            return trim_stop(text, stops)
        return text

    @staticmethod
    def _sequences(resp: Response):
        d = resp.details
        yield resp.generated_text, d.finish_reason, d.tokens, d.top_tokens
        for seq in d.best_of_sequences or []:
            yield seq.generated_text, seq.finish_reason, seq.tokens, seq.top_tokens

    @staticmethod
    def _usage(resp: Response) -> UsageInfo:
        d = resp.details
        completion = d.generated_tokens + sum(s.generated_tokens for s in d.best_of_sequences or [])
        return UsageInfo.of(len(d.prefill), completion)

    @staticmethod
    def _completion_logprobs(req: CompletionRequest, resp: Response, tokens: list[Token], top: Any) -> CompletionLogprobs:
        out = CompletionLogprobs()
        offset = 0
        if req.echo:
            for t in resp.details.prefill:
                out.tokens.append(t.text)
                out.token_logprobs.append(t.logprob)
                out.top_logprobs.append(None)
                out.text_offset.append(offset)
                offset += len(t.text)
        for j, t in enumerate(tokens):
            if t.special:
                continue
            out.tokens.append(t.text)
            out.token_logprobs.append(t.logprob)
            alts = top[j] if top and j < len(top) else []
            out.top_logprobs.append({a.text: a.logprob for a in alts} if req.logprobs else None)
            out.text_offset.append(offset)
            offset += len(t.text)
        return out

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
            raise _tgi_error(resp.status_code, payload)
        if isinstance(payload, list):
            if not payload:
                raise errors.upstream_bad_response("The TGI backend answered an empty list")
            payload = payload[0]
        try:
            return Response(**payload)
        except Exception as exc:
            raise errors.upstream_bad_response(f"Unexpected answer from the TGI backend: {json.dumps(payload)[:500]}") from exc

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
                    # TGI may answer an error as an SSE event too
                    payload = _first_sse_payload(content)
                raise _tgi_error(response.status_code, payload) if payload is not None else \
                    errors.from_upstream_status(response.status_code, content)
            events = _sse_events(response)
            raw = await anext(events, None)
            if raw is None:
                raise errors.upstream_bad_response("The TGI backend closed the stream before the first token")
            first = _parse_stream_event(raw, response.status_code)
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
            choice = {"index": 0, "delta": delta,
                      "logprobs": {"content": [lp.model_dump() for lp in logprobs]} if logprobs is not None else None,
                      "finish_reason": finish}
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
            if req.include_usage:
                obj["usage"] = None
            return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

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
            logprobs = None
            if req.logprobs is not None and lps is not None:
                logprobs = {"tokens": [t for t, _, _ in lps], "token_logprobs": [lp for _, lp, _ in lps],
                            "top_logprobs": [top for _, _, top in lps], "text_offset": []}
            obj = {"id": cid, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
            if req.include_usage:
                obj["usage"] = None
            return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

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
                        pending_lps.append(_chat_logprob(tok, ev.top_tokens))
            if ev.details is not None or ev.generated_text is not None:
                reason = ev.details.finish_reason if ev.details is not None else "length"
                text = self._final_text(pending, reason, stops)
                generated = ev.details.generated_tokens if ev.details is not None else 0
                input_length = (raw.get("details") or {}).get("input_length") or 0
                yield text, pending_lps, (map_finish_reason(reason), UsageInfo.of(int(input_length), generated))
                return
            hold = _held_back_len(pending, stops)
            send = pending[: len(pending) - hold]
            if send or (pending_lps and not hold):
                yield send, pending_lps, None
                pending, pending_lps = pending[len(pending) - hold:], []
        raise errors.upstream_bad_response("The TGI backend ended the stream without its final event")


def _template_error(exc: BaseException) -> OpenAIError:
    err = to_openai_error(exc)
    if err.status_code == 500:  # not a TemplateError (e.g. a jinja2 error escaping the wrapper): still the client's template input
        return invalid_request(f"Chat template error: {exc}", param="messages", code="template_error")
    return err


async def _sse_events(response: httpx.Response) -> AsyncGenerator[dict[str, Any], None]:
    """JSON payloads of the `data:` events of a server-sent-events body."""
    data: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                payload = "\n".join(data)
                data = []
                if payload.strip() == "[DONE]":
                    return
                yield _loads_event(payload)
            continue
        if line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
    if data:
        payload = "\n".join(data)
        if payload.strip() != "[DONE]":
            yield _loads_event(payload)


def _loads_event(payload: str) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except ValueError as exc:
        raise errors.upstream_bad_response(f"Invalid event from the TGI backend: {payload[:200]}") from exc
    if not isinstance(obj, dict):
        raise errors.upstream_bad_response(f"Invalid event from the TGI backend: {payload[:200]}")
    return obj


def _first_sse_payload(content: bytes) -> Any:
    for line in content.decode("utf-8", "replace").splitlines():
        if line.startswith("data:"):
            try:
                return json.loads(line[5:])
            except ValueError:
                return None
    return None
