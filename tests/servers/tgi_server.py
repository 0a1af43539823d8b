"""A Text Generation Inference (TGI) compatible server backed by a real (tiny) transformers model.

Implements TGI 3.x's generation API as described by /work/shared/reference/tgi-openapi.json:

* `POST /generate` → `GenerateResponse`; `POST /generate_stream` → SSE `StreamResponse` events
  (`data:{...}`, one per generated token, as each token is generated; the last one carries
  `generated_text` and `details`); `POST /` (TGI's compat route: `stream` decides; the non-streaming answer
  is a JSON *list* of one `GenerateResponse`, as the `text_generation` client expects);
* `GET /info` → `Info`; `GET /health` → 200; `POST /tokenize` → `[SimpleToken]`;
* parameters: `max_new_tokens`, `stop`, `do_sample`, `temperature`, `top_p`, `top_k`, `typical_p`,
  `seed`, `repetition_penalty`, `frequency_penalty`, `best_of`, `details`, `decoder_input_details`,
  `return_full_text`, `top_n_tokens`, `truncate` (`watermark`, `adapter_id` accepted and ignored;
  `grammar` is refused). Sampling happens as in TGI when `do_sample` or any warper is set; a seed makes it
  reproducible. `best_of` > 1 samples several sequences and returns the most likely one, the others in
  `details.best_of_sequences`;
* finish reasons `length`, `eos_token`, `stop_sequence` (the stop string stays in `generated_text`, as
  TGI does); `details.prefill` with `decoder_input_details`;
* TGI's validation messages and error bodies `{"error": ..., "error_type": "validation"}` (422);
  on `/generate_stream` errors are an SSE event with HTTP 200, as TGI sends them; more than
  `max_concurrent_requests` requests at once → 429 `overloaded`.

Fault injection for tests, per request with the header `X-Fail: MODE` or for every request with
`--fail-mode MODE`: `before-first-token` (an error instead of any token: SSE error event when streaming,
424 otherwise), `mid-stream` (an SSE error event after `fail_after` tokens — 2 by default, header
`X-Fail-After`), `abort` (the connection is dropped mid-stream), `overloaded` (429), `http-500` (500).
`X-Delay-Ms` / `--token-delay-ms` slow every token down (for timing tests).

Run: `python -m tests.servers.tgi_server --model-dir DIR --port N [--host H] [--model-id ID]`
(DIR omitted: the tiny test model is built into a temp dir). In tests: `TGIServer(model_dir).start()`
(a uvicorn server in a thread, on a free port; `.url`), or the pytest fixture `tgi_server`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ray_dstack.ports import free_port

VERSION = "3.3.6-dev0"
MAX_BEST_OF = 2
MAX_STOP_SEQUENCES = 4
MAX_TOP_N_TOKENS = 5
MAX_INPUT_TOKENS = 1024
MAX_TOTAL_TOKENS = 2048
DEFAULT_MAX_NEW_TOKENS = 100
MAX_CONCURRENT_REQUESTS = 128
FAIL_MODES = ("before-first-token", "mid-stream", "abort", "overloaded", "http-500")


class TGIError(Exception):
    """An error answered with TGI's body `{"error", "error_type"}`."""

    def __init__(self, message: str, error_type: str = "validation", status: int = 422) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type
        self.status = status

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}


def _generation_error(message: str) -> TGIError:
    return TGIError(f"Request failed during generation: {message}", "generation", 424)


# ---------------------------------------------------------------------------------------------------------
# Parameters and validation (messages are TGI router's)
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Params:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop: list[str] = field(default_factory=list)
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    typical_p: float | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    best_of: int = 1
    details: bool = True
    decoder_input_details: bool = False
    return_full_text: bool = False
    top_n_tokens: int = 0
    truncate: int | None = None

    @property
    def sampling(self) -> bool:
        return bool(
            self.do_sample
            or (self.temperature is not None and self.temperature != 1.0)
            or (self.top_k is not None and self.top_k != 0)
            or (self.top_p is not None and self.top_p < 1.0)
            or (self.typical_p is not None and self.typical_p < 1.0)
        )


_TYPES: dict[str, tuple[type, ...]] = {
    "max_new_tokens": (int,), "do_sample": (bool,), "temperature": (int, float), "top_p": (int, float),
    "top_k": (int,), "typical_p": (int, float), "seed": (int,), "repetition_penalty": (int, float),
    "frequency_penalty": (int, float), "best_of": (int,), "details": (bool,), "decoder_input_details": (bool,),
    "return_full_text": (bool,), "top_n_tokens": (int,), "truncate": (int,), "watermark": (bool,),
    "adapter_id": (str,), "stop": (list,), "grammar": (dict,),
}


def _deserialize_error(detail: str) -> TGIError:
    return TGIError(f"Failed to deserialize the JSON body into the target type: {detail}", "validation", 422)


def parse_request(body: Any, *, compat: bool = False, stream: bool = False) -> tuple[str, Params, bool]:
    """(inputs, params, stream) from a request body, or TGIError; `compat`: `stream` comes from the body."""
    if not isinstance(body, dict):
        raise _deserialize_error("invalid type: expected struct GenerateRequest")
    inputs = body.get("inputs")
    if not isinstance(inputs, str):
        raise _deserialize_error("missing field `inputs`" if inputs is None else "inputs: invalid type, expected a string")
    if compat:
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _deserialize_error("stream: invalid type, expected a boolean")
    raw = body.get("parameters") or {}
    if not isinstance(raw, dict):
        raise _deserialize_error("parameters: invalid type, expected struct GenerateParameters")
    params = Params()
    for key, value in raw.items():
        if key not in _TYPES:
            continue  # TGI ignores unknown fields
        if value is None:
            continue
        types = _TYPES[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise _deserialize_error(f"parameters.{key}: invalid type: {type(value).__name__}")
        if key == "grammar":
            raise TGIError("Grammar and tools are not supported by this server", "validation", 422)
        if key in ("watermark", "adapter_id"):
            continue
        if key == "stop" and not all(isinstance(s, str) for s in value):
            raise _deserialize_error("parameters.stop: invalid type, expected a sequence of strings")
        setattr(params, key, float(value) if types == (int, float) else value)
    if raw.get("max_new_tokens") is None:
        params.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    if raw.get("details") is None:
        params.details = True
    if raw.get("best_of") is None:
        params.best_of = 1
    validate(params, stream=stream)
    return inputs, params, stream


def validate(p: Params, *, stream: bool) -> None:
    def fail(msg: str) -> None:
        raise TGIError(msg, "validation", 422)

    if p.best_of is not None and (p.best_of <= 0 or p.best_of > MAX_BEST_OF):
        fail(f"`best_of` must be > 0 and <= {MAX_BEST_OF}. Given: {p.best_of}")
    if p.best_of > 1:
        if stream:
            fail("`best_of` != 1 is not supported when streaming tokens")
        if not p.sampling:
            fail("you must use sampling when `best_of` is > 1")
        if p.seed is not None:
            fail("`seed` must not be set when `best_of` > 1")
    if p.temperature is not None and p.temperature <= 0:
        fail("`temperature` must be strictly positive")
    if p.repetition_penalty is not None and p.repetition_penalty <= 0:
        fail("`repetition_penalty` must be strictly positive")
    if p.frequency_penalty is not None and not (-2.0 <= p.frequency_penalty <= 2.0):
        fail("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if p.top_p is not None and not (0.0 < p.top_p <= 1.0):
        fail("`top_p` must be > 0.0 and < 1.0")
    if p.typical_p is not None and not (0.0 < p.typical_p <= 1.0):
        fail("`typical_p` must be > 0.0 and < 1.0")
    if p.top_k is not None and p.top_k <= 0:
        fail("`top_k` must be strictly positive")
    if p.top_n_tokens < 0 or p.top_n_tokens > MAX_TOP_N_TOKENS:
        fail(f"`top_n_tokens` must be >= 0 and <= {MAX_TOP_N_TOKENS}. Given: {p.top_n_tokens}")
    if p.max_new_tokens <= 0:
        fail("`max_new_tokens` must be strictly positive")
    if len(p.stop) > MAX_STOP_SEQUENCES:
        fail(f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. Given: {len(p.stop)}")
    if stream and p.decoder_input_details:
        fail("`decoder_input_details` == true is not supported when streaming tokens")
    if p.truncate is not None and (p.truncate <= 0 or p.truncate > MAX_INPUT_TOKENS):
        fail(f"`truncate` must be strictly positive and less than {MAX_INPUT_TOKENS}. Given: {p.truncate}")
    if p.seed is not None and p.seed < 0:
        raise _deserialize_error("parameters.seed: invalid value: integer, expected u64")


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Step:
    token: dict[str, Any]
    top_tokens: list[dict[str, Any]]
    finish_reason: str | None  # set on the last step


@dataclass
class Sequence:
    generated_text: str
    finish_reason: str
    tokens: list[dict[str, Any]]
    top_tokens: list[list[dict[str, Any]]]
    seed: int | None
    prefill: list[dict[str, Any]]
    logprob_sum: float

    def details(self, p: Params) -> dict[str, Any]:
        out: dict[str, Any] = {
            "finish_reason": self.finish_reason,
            "generated_tokens": len(self.tokens),
            "seed": self.seed,
            "prefill": self.prefill,
            "tokens": self.tokens,
        }
        if p.top_n_tokens:
            out["top_tokens"] = self.top_tokens
        return out


class Engine:
    """Greedy / sampled decoding with a KV cache, one token at a time (so streams are incremental)."""

    def __init__(self, model_dir: str | Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(1)
        self.torch = torch
        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.special_ids = set(self.tokenizer.all_special_ids)
        self._lock = threading.Lock()  # one forward pass at a time; streams interleave per token

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def prepare(self, inputs: str, p: Params) -> list[int]:
        if not inputs:
            raise TGIError("`inputs` cannot be empty")
        ids = self.encode(inputs)
        if not ids:
            raise TGIError("`inputs` cannot be empty")
        if p.truncate is not None:
            ids = ids[-p.truncate:]
        if len(ids) > MAX_INPUT_TOKENS:
            raise TGIError(f"`inputs` must have less than {MAX_INPUT_TOKENS} tokens. Given: {len(ids)}")
        if len(ids) + p.max_new_tokens > MAX_TOTAL_TOKENS:
            raise TGIError(
                f"`inputs` tokens + `max_new_tokens` must be <= {MAX_TOTAL_TOKENS}. "
                f"Given: {len(ids)} `inputs` tokens and {p.max_new_tokens} `max_new_tokens`"
            )
        return ids

    def _forward(self, ids: list[int], past: Any) -> tuple[Any, Any]:
        torch = self.torch
        with self._lock, torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids]), past_key_values=past, use_cache=True)
        return out.logits[0], out.past_key_values

    def _process(self, scores: Any, all_ids: list[int], p: Params) -> Any:
        torch = self.torch
        scores = scores.clone().float()
        ids = torch.tensor(all_ids)
        if p.repetition_penalty is not None and p.repetition_penalty != 1.0:
            picked = scores[ids]
            picked = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
            scores[ids] = picked
        if p.frequency_penalty:
            freq = torch.zeros_like(scores)
            freq.scatter_add_(0, ids, torch.ones(len(all_ids)))
            scores -= freq / len(all_ids) * p.frequency_penalty
        if p.sampling:
            if p.temperature is not None and p.temperature != 1.0:
                scores = scores / p.temperature
            if p.top_k:
                k = min(p.top_k, scores.numel())
                kth = torch.topk(scores, k).values[-1]
                scores = scores.masked_fill(scores < kth, -math.inf)
            if p.top_p is not None and p.top_p < 1.0:
                sorted_scores, order = torch.sort(scores, descending=True)
                probs = sorted_scores.softmax(-1)
                cum = probs.cumsum(-1)
                remove = cum - probs > p.top_p
                scores[order[remove]] = -math.inf
            if p.typical_p is not None and p.typical_p < 1.0:
                logp = scores.log_softmax(-1)
                probs = logp.exp()
                ent = -(torch.nan_to_num(logp * probs)).sum()
                shifted = (-logp - ent).abs()
                sorted_shift, order = torch.sort(shifted)
                cum = probs[order].cumsum(-1)
                last = int((cum < p.typical_p).sum())
                keep = order[: last + 1]
                mask = torch.ones_like(scores, dtype=torch.bool)
                mask[keep] = False
                scores = scores.masked_fill(mask, -math.inf)
        return scores

    def stream(self, input_ids: list[int], p: Params, seed: int | None, fail: dict[str, Any] | None = None,
               delay_s: float = 0.0) -> Iterator[Step]:
        """Yields one Step per generated token, as soon as it is generated."""
        torch = self.torch
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        logits, past = self._forward(input_ids, None)
        scores = logits[-1]
        all_ids = list(input_ids)
        generated: list[int] = []
        output = ""
        prefix_offset = max(len(input_ids) - 5, 0)
        read_offset = len(input_ids)
        while True:
            processed = self._process(scores, all_ids, p)
            logprobs = processed.log_softmax(-1)
            if p.sampling:
                token_id = int(torch.multinomial(logprobs.exp(), 1, generator=generator))
            else:
                token_id = int(torch.argmax(processed))
            logprob = float(logprobs[token_id])
            top_tokens: list[dict[str, Any]] = []
            if p.top_n_tokens:
                values, indices = torch.topk(logprobs, p.top_n_tokens)
                top_tokens = [
                    self._token(int(i), _finite(float(v))) for v, i in zip(values.tolist(), indices.tolist())
                ]
            all_ids.append(token_id)
            generated.append(token_id)
            # Incremental detokenization (TGI's prefix/read offsets): no broken UTF-8 in token texts.
            prefix_text = self.tokenizer.decode(all_ids[prefix_offset:read_offset], skip_special_tokens=False)
            new_text = self.tokenizer.decode(all_ids[prefix_offset:], skip_special_tokens=False)
            if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
                text = new_text[len(prefix_text):]
                prefix_offset, read_offset = read_offset, len(all_ids)
            else:
                text = ""
            special = token_id in self.special_ids
            if not special:
                output += text
            finish = None
            if len(generated) >= p.max_new_tokens:
                finish = "length"
            elif token_id in self.eos_ids:
                finish = "eos_token"
            elif any(output.endswith(s) for s in p.stop if s):
                finish = "stop_sequence"
            if fail and fail["mode"] in ("mid-stream", "abort") and len(generated) > fail["after"]:
                if fail["mode"] == "abort":
                    raise ConnectionAbortedError("simulated connection drop")
                raise _generation_error("simulated failure after the first tokens (X-Fail: mid-stream)")
            if delay_s:
                time.sleep(delay_s)
            yield Step(token={"id": token_id, "text": text, "logprob": _finite(logprob), "special": special},
                       top_tokens=top_tokens, finish_reason=finish)
            if finish is not None:
                return
            logits, past = self._forward([token_id], past)
            scores = logits[-1]

    def _token(self, token_id: int, logprob: float | None) -> dict[str, Any]:
        return {"id": token_id, "text": self.token_text(token_id), "logprob": logprob,
                "special": token_id in self.special_ids}

    def prefill(self, input_ids: list[int]) -> list[dict[str, Any]]:
        logits, _ = self._forward(input_ids, None)
        logprobs = logits.float().log_softmax(-1)
        out = [{"id": input_ids[0], "text": self.token_text(input_ids[0]), "logprob": None}]
        for i in range(1, len(input_ids)):
            out.append({"id": input_ids[i], "text": self.token_text(input_ids[i]),
                        "logprob": _finite(float(logprobs[i - 1, input_ids[i]]))})
        return out

    def generate(self, input_ids: list[int], p: Params, seed: int | None,
                 fail: dict[str, Any] | None = None) -> Sequence:
        tokens: list[dict[str, Any]] = []
        tops: list[list[dict[str, Any]]] = []
        finish = "length"
        ids: list[int] = []
        for step in self.stream(input_ids, p, seed, fail):
            tokens.append(step.token)
            tops.append(step.top_tokens)
            ids.append(step.token["id"])
            finish = step.finish_reason or finish
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return Sequence(
            generated_text=text, finish_reason=finish, tokens=tokens, top_tokens=tops, seed=seed,
            prefill=self.prefill(input_ids) if p.decoder_input_details else [],
            logprob_sum=sum(t["logprob"] or 0.0 for t in tokens),
        )


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else -1e30  # TGI sends finite floats; -inf is not valid JSON


def _new_seed() -> int:
    return random.randint(1, 2**63 - 1)


# ---------------------------------------------------------------------------------------------------------
# HTTP app
# ---------------------------------------------------------------------------------------------------------
def create_app(model_dir: str | Path, *, model_id: str | None = None, fail_mode: str | None = None,
               token_delay_ms: float = 0.0) -> FastAPI:
    engine = Engine(model_dir)
    app = FastAPI(title="tiny TGI", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    state = {"in_flight": 0}
    model_name = model_id or engine.model_dir.name

    def error_response(err: TGIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    def fault(request: Request) -> dict[str, Any] | None:
        mode = request.headers.get("x-fail") or fail_mode
        if not mode:
            return None
        if mode not in FAIL_MODES:
            raise TGIError(f"unknown X-Fail mode {mode!r}; one of {', '.join(FAIL_MODES)}")
        return {"mode": mode, "after": int(request.headers.get("x-fail-after", "2"))}

    def delay(request: Request) -> float:
        return float(request.headers.get("x-delay-ms", token_delay_ms)) / 1000.0

    async def read_body(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except ValueError as err:
            raise _deserialize_error(str(err)) from None

    def admit(f: dict[str, Any] | None) -> None:
        if (f and f["mode"] == "overloaded") or state["in_flight"] >= MAX_CONCURRENT_REQUESTS:
            raise TGIError("Model is overloaded", "overloaded", 429)
        if f and f["mode"] == "http-500":
            raise TGIError("Incomplete generation", "incomplete_generation", 500)

    def run_generate(inputs: str, p: Params, f: dict[str, Any] | None) -> dict[str, Any]:
        input_ids = engine.prepare(inputs, p)
        if f and f["mode"] == "before-first-token":
            raise _generation_error("simulated failure before the first token (X-Fail: before-first-token)")
        if p.best_of > 1:
            seqs = [engine.generate(input_ids, p, _new_seed(), f) for _ in range(p.best_of)]
            best = max(range(len(seqs)), key=lambda i: seqs[i].logprob_sum)
            main, others = seqs[best], [s for i, s in enumerate(seqs) if i != best]
        else:
            main = engine.generate(input_ids, p, (p.seed if p.seed is not None else _new_seed()) if p.sampling else None, f)
            others = []
        text = inputs + main.generated_text if p.return_full_text else main.generated_text
        response: dict[str, Any] = {"generated_text": text}
        if p.details or p.decoder_input_details:
            details = main.details(p)
            if others:
                details["best_of_sequences"] = [
                    {"generated_text": (inputs + s.generated_text) if p.return_full_text else s.generated_text,
                     **s.details(p)}
                    for s in others
                ]
            response["details"] = details
        return response

    async def generate_json(request: Request, body: Any, *, compat: bool) -> Response:
        try:
            f = fault(request)
            inputs, p, _ = parse_request(body, compat=compat)
            admit(f)
            state["in_flight"] += 1
            try:
                result = await run_in_threadpool(run_generate, inputs, p, f)
            finally:
                state["in_flight"] -= 1
        except TGIError as err:
            return error_response(err)
        return JSONResponse([result] if compat else result)

    def sse(obj: Any) -> bytes:
        return f"data:{json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()

    def event_stream(request: Request, body: Any, compat: bool) -> Iterator[bytes]:
        try:
            f = fault(request)
            inputs, p, _ = parse_request(body, compat=compat, stream=True)
            admit(f)
        except TGIError as err:
            yield sse(err.body())
            return
        state["in_flight"] += 1
        try:
            input_ids = engine.prepare(inputs, p)
            if f and f["mode"] == "before-first-token":
                raise _generation_error("simulated failure before the first token (X-Fail: before-first-token)")
            seed = (p.seed if p.seed is not None else _new_seed()) if p.sampling else None
            ids: list[int] = []
            for index, step in enumerate(engine.stream(input_ids, p, seed, f, delay(request)), start=1):
                ids.append(step.token["id"])
                event: dict[str, Any] = {"index": index, "token": step.token}
                if p.top_n_tokens:
                    event["top_tokens"] = step.top_tokens
                if step.finish_reason is None:
                    event["generated_text"] = None
                    event["details"] = None
                else:
                    text = engine.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                    event["generated_text"] = inputs + text if p.return_full_text else text
                    event["details"] = {
                        "finish_reason": step.finish_reason, "generated_tokens": len(ids),
                        "seed": seed, "input_length": len(input_ids),
                    } if p.details else None
                yield sse(event)
        except TGIError as err:
            yield sse(err.body())
        finally:
            state["in_flight"] -= 1

    def stream_response(request: Request, body: Any, compat: bool) -> StreamingResponse:
        return StreamingResponse(
            event_stream(request, body, compat), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        try:
            body = await read_body(request)
        except TGIError as err:
            return error_response(err)
        return await generate_json(request, body, compat=False)

    @app.post("/generate_stream")
    async def generate_stream(request: Request) -> Response:
        try:
            body = await read_body(request)
        except TGIError as err:
            return error_response(err)
        return stream_response(request, body, compat=False)

    @app.post("/")
    async def compat_generate(request: Request) -> Response:
        try:
            body = await read_body(request)
        except TGIError as err:
            return error_response(err)
        if isinstance(body, dict) and body.get("stream") is True:
            return stream_response(request, body, compat=True)
        return await generate_json(request, body, compat=True)

    @app.get("/info")
    async def info() -> dict[str, Any]:
        return {
            "model_id": model_name, "model_sha": None, "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": MAX_CONCURRENT_REQUESTS, "max_best_of": MAX_BEST_OF,
            "max_stop_sequences": MAX_STOP_SEQUENCES, "max_input_tokens": MAX_INPUT_TOKENS,
            "max_total_tokens": MAX_TOTAL_TOKENS, "validation_workers": 2, "max_client_batch_size": 4,
            "router": "text-generation-router", "version": VERSION, "sha": None, "docker_label": None,
        }

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        try:
            body = await read_body(request)
            inputs, p, _ = parse_request(body)
        except TGIError as err:
            return error_response(err)
        enc = engine.tokenizer(inputs, add_special_tokens=False, return_offsets_mapping=True)
        return JSONResponse([
            {"id": i, "text": inputs[a:b], "start": a, "stop": b}
            for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])
        ])

    return app


# ---------------------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------------------
class TGIServer:
    """The app under uvicorn in a daemon thread (in-process), on a free loopback port."""

    def __init__(self, model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 0, **app_kwargs: Any) -> None:
        import uvicorn

        self.host = host
        self.port = port or free_port(host)
        self.app = create_app(model_dir, **app_kwargs)
        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning", access_log=False,
                                lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> TGIServer:
        self._thread = threading.Thread(target=self._server.run, name="tiny-tgi", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"TGI test server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> TGIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def tgi_server():
    """The TGI-compatible server on the tiny model, shared by a test session (`tgi_server.url`)."""
    from tests.servers.tiny_model import MODEL_ID, tiny_model_dir

    with TGIServer(tiny_model_dir(), model_id=MODEL_ID) as server:
        yield server


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="TGI-compatible server on a (tiny) transformers model")
    parser.add_argument("--model-dir", help="saved model directory (default: build the tiny test model)")
    parser.add_argument("--model-id", help="model_id reported by /info")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--fail-mode", choices=FAIL_MODES, help="inject this fault into every request")
    parser.add_argument("--token-delay-ms", type=float, default=0.0, help="sleep after each generated token")
    args = parser.parse_args(argv)
    model_dir = args.model_dir
    model_id = args.model_id
    if model_dir is None:
        from tests.servers.tiny_model import MODEL_ID, tiny_model_dir

        model_dir = tiny_model_dir()
        model_id = model_id or MODEL_ID
    app = create_app(model_dir, model_id=model_id, fail_mode=args.fail_mode, token_delay_ms=args.token_delay_ms)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
