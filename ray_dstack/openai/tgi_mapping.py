"""The field mapping between OpenAI requests/answers and Text Generation Inference (TGI): pure, no I/O.

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

Parameters are checked with `text_generation.types.Parameters` (TGI's own client rules), answers parsed with
`text_generation.types.Response`/`StreamResponse`, error payloads with `text_generation.errors.parse_error`.
The HTTP calls live in `tgi.py`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import orjson
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
)

if TYPE_CHECKING:
    from ray_dstack.openai.templates import ChatTemplate


class ModelLike(Protocol):
    name: str
    eos_token: str | None
    bos_token: str | None


# --- small pieces shared by whole answers and streams -------------------------------------------------------

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


def final_text(text: str, reason: Any, stops: list[str]) -> str:
    """TGI leaves the stop string that ended generation in the text; OpenAI does not."""
    if map_finish_reason(reason) == "stop":
        return trim_stop(text, stops)
    return text


def held_back_len(text: str, stops: list[str]) -> int:
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


def chat_logprob(tok: Token, top: list[Token] | None) -> TokenLogprob:
    return TokenLogprob(
        token=tok.text,
        logprob=tok.logprob if tok.logprob is not None else 0.0,
        bytes=_token_bytes(tok.text),
        top_logprobs=[
            TopLogprob(token=t.text, logprob=t.logprob if t.logprob is not None else 0.0, bytes=_token_bytes(t.text))
            for t in (top or [])
        ],
    )


# --- request mapping ---------------------------------------------------------------------------------------


def template_error(exc: BaseException) -> OpenAIError:
    err = to_openai_error(exc)
    if err.status_code == 500:  # not a TemplateError (e.g. a jinja2 error escaping the wrapper): still the client's template input
        return invalid_request(f"Chat template error: {exc}", param="messages", code="template_error")
    return err


def chat_prompt(req: ChatCompletionRequest, model: ModelLike, template: "ChatTemplate | None") -> str:
    if template is None:
        raise invalid_request(
            f"Model `{model.name}` has no chat template; use /v1/completions or configure `chat_template`",
            param="messages", code="no_chat_template",
        )
    if req.tools and req.tool_choice != "none":
        raise invalid_request("`tools` are not supported by this model's backend (format: tgi)", param="tools")
    messages = [m.for_template() for m in req.messages]
    try:
        prompt = template.render(messages, add_generation_prompt=True)
    except Exception as exc:  # TemplateError (and anything a template raises) → 400 with its message
        raise template_error(exc) from exc
    if not prompt:
        raise invalid_request("The chat template rendered an empty prompt", param="messages")
    return prompt


def prompts(req: CompletionRequest) -> list[str]:
    p = req.prompt
    if isinstance(p, str):
        out = [p]
    elif p and all(isinstance(x, str) for x in p):
        out = list(p)  # type: ignore[arg-type]
    else:
        raise invalid_request("Token-id prompts are not supported by this model's backend (format: tgi); send text",
                              param="prompt")
    if any(not x for x in out):
        raise invalid_request("`prompt` must not be empty", param="prompt")
    if req.suffix:
        raise invalid_request("`suffix` is not supported by this model's backend (format: tgi)", param="suffix")
    return out


def stops(req: ChatCompletionRequest | CompletionRequest, model: ModelLike) -> list[str]:
    out = req.stop_list()
    if model.eos_token and model.eos_token not in out:
        out.append(model.eos_token)
    return out


def _common_parameters(req: ChatCompletionRequest | CompletionRequest, model: ModelLike, *, stream: bool,
                       best_of: int, max_new_tokens: int | None, top_n: int | None) -> dict[str, Any]:
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
    stop = stops(req, model)
    if stop:
        params["stop"] = stop
    if req.seed is not None:
        params["seed"] = req.seed
    if best_of > 1:
        params["best_of"] = best_of
    if not stream:
        params["decoder_input_details"] = True
    if top_n:
        params["top_n_tokens"] = top_n
    return params


def _validated(params: dict[str, Any], req: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    try:
        Parameters(**params)  # text_generation's own checks (temperature > 0, top_p range, best_of rules)
    except (tgi_errors.ValidationError, ValueError) as exc:
        raise invalid_request(str(exc)) from exc
    # text_generation rejects frequency_penalty <= 0, TGI accepts (-2, 2]: add it after validating.
    if req.frequency_penalty:
        params["frequency_penalty"] = req.frequency_penalty
    return params


def chat_parameters(req: ChatCompletionRequest, model: ModelLike, *, stream: bool) -> dict[str, Any]:
    top_n = req.top_logprobs if req.logprobs and req.top_logprobs else None
    params = _common_parameters(req, model, stream=stream, best_of=req.n, max_new_tokens=req.max_new_tokens,
                                top_n=top_n)
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
    return _validated(params, req)


def completion_parameters(req: CompletionRequest, model: ModelLike, *, stream: bool) -> dict[str, Any]:
    best_of = max(req.n, req.best_of or 1)
    if req.best_of is not None and req.best_of < req.n:
        raise invalid_request("`best_of` must be >= `n`", param="best_of")
    if req.echo and stream and req.logprobs is not None:
        raise invalid_request("`echo` with `logprobs` is not supported with `stream: true`", param="echo")
    params = _common_parameters(req, model, stream=stream, best_of=best_of, max_new_tokens=req.max_new_tokens,
                                top_n=req.logprobs or None)
    return _validated(params, req)


# --- TGI's answers -----------------------------------------------------------------------------------------


def tgi_error(status: int, payload: Any) -> OpenAIError:
    """A TGI error answer (`{"error", "error_type"}`, or anything else) as the error the client gets."""
    if isinstance(payload, dict) and "error" in payload:
        err = to_openai_error(tgi_errors.parse_error(status, payload))
        if status == 422 or payload.get("error_type") == "validation":
            err.status_code, err.type = 400, errors.INVALID_REQUEST
        return err
    return errors.from_upstream_status(status, json.dumps(payload).encode() if payload is not None else b"")


def parse_response(payload: Any) -> Response:
    """The JSON of a 200 answer to a non-streaming request (TGI answers a list for some routes)."""
    if isinstance(payload, list):
        if not payload:
            raise errors.upstream_bad_response("The TGI backend answered an empty list")
        payload = payload[0]
    try:
        return Response(**payload)
    except Exception as exc:
        raise errors.upstream_bad_response(f"Unexpected answer from the TGI backend: {json.dumps(payload)[:500]}") from exc


def loads_event(data: bytes | str) -> dict[str, Any]:
    """The JSON object of one server-sent event's `data`. orjson reads it (one event per token: ~5x faster than
    json, bench/RESULTS.md), json what orjson refuses (NaN, Infinity). Integers past 64 bits become floats with
    orjson: no field of TGI's token events holds one."""
    try:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            obj = json.loads(data)
    except ValueError as exc:
        raise errors.upstream_bad_response(f"Invalid event from the TGI backend: {_shown(data)}") from exc
    if not isinstance(obj, dict):
        raise errors.upstream_bad_response(f"Invalid event from the TGI backend: {_shown(data)}")
    return obj


def _shown(data: bytes | str) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, (bytes, bytearray)) else data
    return text[:200]


class PlainToken:
    """`text_generation.types.Token`'s fields, for a token event whose values already have their exact types."""

    __slots__ = ("id", "text", "logprob", "special")

    def __init__(self, id: int, text: str, logprob: float | None, special: bool) -> None:  # noqa: A002 - Token's name
        self.id, self.text, self.logprob, self.special = id, text, logprob, special


class PlainTokenEvent:
    """A `StreamResponse` with a token and nothing else (most events of a stream), built without pydantic."""

    __slots__ = ("token",)
    top_tokens = generated_text = details = None

    def __init__(self, token: PlainToken) -> None:
        self.token = token


def plain_token_event(raw: dict[str, Any]) -> PlainTokenEvent | None:
    """The event as `PlainTokenEvent` when `StreamResponse` would hold exactly these values (each field of the
    exact type pydantic checks, no top tokens, final text or details), else None (pydantic reads it)."""
    tok = raw.get("token")
    if type(tok) is not dict or raw.get("top_tokens") is not None or raw.get("generated_text") is not None \
            or raw.get("details") is not None:
        return None
    id_, text, logprob, special = tok.get("id"), tok.get("text"), tok.get("logprob"), tok.get("special")
    if type(id_) is int and type(text) is str and type(special) is bool and (logprob is None or type(logprob) is float):
        return PlainTokenEvent(PlainToken(id_, text, logprob, special))
    return None


def parse_stream_event(raw: dict[str, Any], status: int) -> StreamResponse | PlainTokenEvent:
    if "error" in raw:
        raise tgi_error(status if status >= 400 else 500, raw)
    plain = plain_token_event(raw)
    if plain is not None:
        return plain
    try:
        return StreamResponse(**raw)
    except Exception as exc:  # pydantic error: not a token event
        raise errors.upstream_bad_response(f"Unexpected event from the TGI backend: {json.dumps(raw)[:500]}") from exc


def sequences(resp: Response) -> Iterator[tuple[str, Any, list[Token], Any]]:
    """`(text, finish_reason, tokens, top_tokens)` of the answer, then of each `best_of` sequence."""
    d = resp.details
    yield resp.generated_text, d.finish_reason, d.tokens, d.top_tokens
    for seq in d.best_of_sequences or []:
        yield seq.generated_text, seq.finish_reason, seq.tokens, seq.top_tokens


def usage(resp: Response) -> UsageInfo:
    d = resp.details
    completion = d.generated_tokens + sum(s.generated_tokens for s in d.best_of_sequences or [])
    return UsageInfo.of(len(d.prefill), completion)


def completion_logprobs(req: CompletionRequest, resp: Response, tokens: list[Token], top: Any) -> CompletionLogprobs:
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


def chat_completion(req: ChatCompletionRequest, resp: Response, stop: list[str]) -> ChatCompletion:
    """The OpenAI answer to a non-streaming chat request from TGI's answer (`stop`: the strings sent)."""
    choices: list[ChatCompletionChoice] = []
    for i, (text, reason, tokens, top) in enumerate(sequences(resp)):
        logprobs = None
        if req.logprobs:
            logprobs = ChoiceLogprobs(content=[
                chat_logprob(t, top[j] if top and j < len(top) else None)
                for j, t in enumerate(tokens) if not t.special
            ])
        choices.append(ChatCompletionChoice(
            index=i,
            message=ChatCompletionMessage(content=final_text(text, reason, stop)),
            logprobs=logprobs,
            finish_reason=map_finish_reason(reason),
        ))
    return ChatCompletion(model=req.model, choices=choices, usage=usage(resp))


def completion(req: CompletionRequest, prompt_list: list[str], results: list[Response], stop: list[str]) -> Completion:
    """The OpenAI answer to a non-streaming completions request from TGI's answers, one per prompt."""
    choices: list[CompletionChoice] = []
    prompt_tokens = completion_tokens = 0
    for prompt, resp in zip(prompt_list, results):
        u = usage(resp)
        prompt_tokens += u.prompt_tokens
        completion_tokens += u.completion_tokens
        for text, reason, tokens, top in list(sequences(resp))[: req.n]:
            final = final_text(text, reason, stop)
            logprobs = None
            if req.logprobs is not None:
                logprobs = completion_logprobs(req, resp, tokens, top)
            choices.append(CompletionChoice(
                index=len(choices),
                text=(prompt + final) if req.echo else final,
                logprobs=logprobs,
                finish_reason=map_finish_reason(reason),
            ))
    return Completion(model=req.model, choices=choices, usage=UsageInfo.of(prompt_tokens, completion_tokens))
