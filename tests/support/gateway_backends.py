"""Real HTTP backends for the gateway tests: a TGI-wire server and an OpenAI-wire server.

Both run uvicorn in a background thread. The "model" is a tiny deterministic bigram model over the prompt's
own tokens: the next token is one that followed the current token somewhere in the prompt (the first such
follower when greedy, a seeded random one when sampling); a token with no follower ends the generation with
the special end-of-sequence token `</s>`. So answers are computed from the input, and a test can predict
them with `generate()` below.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse



from ray_dstack.ports import free_port  # noqa: E402,F401 - re-exported for the test modules

EOS = "</s>"
_TOKEN_RE = re.compile(r"\s*\S+|\s+")


def tokenize(text: str) -> list[str]:
    return _TOKEN_RE.findall(text)


def token_id(tok: str) -> int:
    return sum(tok.encode()) % 997 + 3


@dataclass
class Gen:
    tokens: list[str]
    special: list[bool]
    finish_reason: str
    seed: int | None

    @property
    def text(self) -> str:
        return "".join(t for t, s in zip(self.tokens, self.special) if not s)


def generate(prompt: str, *, max_new_tokens: int = 20, stop: list[str] = (), do_sample: bool = False,
             seed: int | None = None) -> Gen:
    toks = tokenize(prompt)
    rng = random.Random(seed)
    followers: dict[str, list[str]] = {}
    for a, b in zip(toks, toks[1:]):
        followers.setdefault(a.strip(), []).append(b)
    out: list[str] = []
    special: list[bool] = []
    cur = toks[-1] if toks else ""
    text = ""
    while len(out) < max_new_tokens:
        nxt = followers.get(cur.strip())
        if not nxt:
            out.append(EOS)
            special.append(True)
            return Gen(out, special, "eos_token", seed)
        cur = rng.choice(nxt) if do_sample else nxt[0]
        out.append(cur)
        special.append(False)
        text += cur
        if any(s and text.endswith(s) for s in stop):
            return Gen(out, special, "stop_sequence", seed)
    return Gen(out, special, "length", seed)


def _logprob(i: int) -> float:
    return round(-0.1 * (i + 1), 4)


def _token(tok: str, special: bool, i: int) -> dict[str, Any]:
    return {"id": token_id(tok), "text": tok, "logprob": _logprob(i), "special": special}


def _top(tok: str, i: int, n: int | None) -> list[dict[str, Any]]:
    if not n:
        return []
    alts = [tok] + [f"{tok}~{k}" for k in range(1, n)]
    return [{"id": token_id(a), "text": a, "logprob": _logprob(i) - k, "special": False} for k, a in enumerate(alts)]


@dataclass
class Control:
    fail_before: dict[str, Any] | None = None  # {"status": 424, "error": "...", "error_type": "generation"}
    fail_after: int | None = None  # tokens streamed before an error event
    delay: float = 0.0  # seconds between streamed tokens
    requests: list[dict[str, Any]] = field(default_factory=list)
    raw_bodies: list[bytes] = field(default_factory=list)
    disconnects: int = 0
    completed: int = 0
    streaming: int = 0  # streams in progress (not reset: they belong to whichever test opened them)

    def reset(self, quiet_timeout: float = 15.0) -> None:
        """Back to defaults once no stream of an earlier test is still running: a stream whose client went
        away may notice it late on a loaded machine, and must not count in the next test's tallies."""
        deadline = time.monotonic() + quiet_timeout
        while self.streaming and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not self.streaming, f"{self.streaming} stream(s) of an earlier test still running"
        self.__init__()


def tgi_app(control: Control) -> FastAPI:
    app = FastAPI()

    def validate(body: dict[str, Any], stream: bool) -> str | None:
        p = body.get("parameters") or {}
        if not body.get("inputs"):
            return "`inputs` cannot be empty"
        if p.get("temperature") is not None and p["temperature"] <= 0:
            return "`temperature` must be strictly positive"
        if p.get("top_p") is not None and not 0 < p["top_p"] < 1:
            return "`top_p` must be > 0.0 and < 1.0"
        best_of = p.get("best_of") or 1
        if best_of > 1:
            if stream:
                return "`best_of` != 1 is not supported when streaming tokens"
            if p.get("seed") is not None:
                return "`seed` must not be set when `best_of` > 1"
            if not (p.get("do_sample") or p.get("temperature") or p.get("top_p")):
                return "you must use sampling when `best_of` is > 1"
        fp = p.get("frequency_penalty")
        if fp is not None and not -2 < fp <= 2:
            return "`frequency_penalty` must be > -2.0 and <= 2.0"
        if len(p.get("stop") or []) > 5:
            return "`stop` supports up to 5 stop sequences"
        return None

    def run(body: dict[str, Any], seed_offset: int = 0) -> Gen:
        p = body.get("parameters") or {}
        seed = p.get("seed")
        if p.get("do_sample") and seed is None:
            seed = 1000 + seed_offset
        return generate(body["inputs"], max_new_tokens=p.get("max_new_tokens") or 20, stop=p.get("stop") or [],
                        do_sample=bool(p.get("do_sample")), seed=seed)

    def err(status: int, message: str, error_type: str) -> JSONResponse:
        return JSONResponse({"error": message, "error_type": error_type}, status_code=status)

    def details(body: dict[str, Any], g: Gen) -> dict[str, Any]:
        p = body.get("parameters") or {}
        prefill = []
        if p.get("decoder_input_details"):
            prefill = [{"id": token_id(t), "text": t, "logprob": None if i == 0 else -1.0}
                       for i, t in enumerate(tokenize(body["inputs"]))]
        return {
            "finish_reason": g.finish_reason, "generated_tokens": len(g.tokens), "seed": g.seed, "prefill": prefill,
            "tokens": [_token(t, s, i) for i, (t, s) in enumerate(zip(g.tokens, g.special))],
            "top_tokens": [_top(t, i, p.get("top_n_tokens")) for i, t in enumerate(g.tokens)] if p.get("top_n_tokens") else None,
        }

    async def generate_once(body: dict[str, Any]) -> Response:
        if control.fail_before:
            f = control.fail_before
            return err(f.get("status", 424), f.get("error", "Request failed during generation"), f.get("error_type", "generation"))
        problem = validate(body, stream=False)
        if problem:
            return err(422, problem, "validation")
        g = run(body)
        d = details(body, g)
        best_of = (body.get("parameters") or {}).get("best_of") or 1
        if best_of > 1:
            seqs = []
            for k in range(1, best_of):
                gk = run(body, seed_offset=k)
                dk = details(body, gk)
                dk.pop("best_of_sequences", None)
                seqs.append({"generated_text": gk.text, **dk})
            d["best_of_sequences"] = seqs
        control.completed += 1
        return JSONResponse({"generated_text": g.text, "details": d})

    async def generate_stream(body: dict[str, Any]) -> Response:
        if control.fail_before:
            f = control.fail_before
            return err(f.get("status", 424), f.get("error", "Request failed during generation"), f.get("error_type", "generation"))
        problem = validate(body, stream=True)
        if problem:
            return err(422, problem, "validation")
        g = run(body)
        p = body.get("parameters") or {}
        n_input = len(tokenize(body["inputs"]))

        async def events():
            control.streaming += 1
            try:
                for i, (t, s) in enumerate(zip(g.tokens, g.special)):
                    if control.fail_after is not None and i == control.fail_after:
                        yield "data:" + json.dumps({"error": "Request failed during generation: boom", "error_type": "generation"}) + "\n\n"
                        return
                    if control.delay:
                        await asyncio.sleep(control.delay)
                    ev: dict[str, Any] = {"index": i, "token": _token(t, s, i),
                                          "top_tokens": _top(t, i, p.get("top_n_tokens")),
                                          "generated_text": None, "details": None}
                    if i == len(g.tokens) - 1:
                        ev["generated_text"] = g.text
                        ev["details"] = {"finish_reason": g.finish_reason, "generated_tokens": len(g.tokens),
                                         "seed": g.seed, "input_length": n_input}
                    yield "data:" + json.dumps(ev) + "\n\n"
                control.completed += 1
            except asyncio.CancelledError:
                control.disconnects += 1
                raise
            finally:
                control.streaming -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    async def body_of(request: Request) -> dict[str, Any]:
        raw = await request.body()
        body = json.loads(raw)
        control.requests.append(body)
        return body

    @app.post("/")
    async def compat(request: Request) -> Response:
        body = await body_of(request)
        if body.get("stream"):
            return await generate_stream(body)
        resp = await generate_once(body)
        if resp.status_code == 200:
            return JSONResponse([json.loads(resp.body)])
        return resp

    @app.post("/generate")
    async def gen(request: Request) -> Response:
        return await generate_once(await body_of(request))

    @app.post("/generate_stream")
    async def gen_stream(request: Request) -> Response:
        return await generate_stream(await body_of(request))

    return app


def openai_app(control: Control, model: str = "oai-model") -> FastAPI:
    """An OpenAI-wire backend (under /v1) with deliberately unusual byte formatting and SGLang's `finish_reason: ""`."""
    app = FastAPI()

    def answer_text(body: dict[str, Any]) -> Gen:
        if "messages" in body:
            prompt = " ".join(m.get("content") or "" for m in body["messages"])
        else:
            prompt = body["prompt"] if isinstance(body["prompt"], str) else " ".join(body["prompt"])
        stop = body.get("stop") or []
        return generate(prompt, max_new_tokens=body.get("max_tokens") or 16, stop=[stop] if isinstance(stop, str) else stop)

    async def handle(request: Request, kind: str) -> Response:
        raw = await request.body()
        control.raw_bodies.append(raw)
        if control.fail_before:
            f = control.fail_before
            if f.get("plain"):
                return Response(f.get("error", "backend exploded"), status_code=f.get("status", 500), media_type="text/plain")
            if f.get("detail"):
                return JSONResponse({"detail": f["error"]}, status_code=f.get("status", 422))
            return JSONResponse({"error": {"message": f.get("error", "bad"), "type": "BadRequestError", "param": f.get("param"),
                                           "code": 400}}, status_code=f.get("status", 400))
        body = json.loads(raw)
        control.requests.append(body)
        if body.get("model") != model:
            return JSONResponse({"error": {"message": f"model {body.get('model')} not served", "type": "NotFoundError",
                                           "param": "model", "code": 404}}, status_code=404)
        g = answer_text(body)
        created = 1700000000
        obj = "chat.completion" if kind == "chat" else "text_completion"
        if not body.get("stream"):
            if kind == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": g.text}, "finish_reason": ""}
            else:
                choice = {"index": 0, "text": g.text, "finish_reason": ""}
            # Odd but valid formatting, to check bytes are forwarded untouched.
            payload = json.dumps({"id": "x-1", "object": obj, "created": created, "model": model, "choices": [choice],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": len(g.tokens), "total_tokens": 3 + len(g.tokens)}},
                                 indent=1)
            return Response(payload.encode(), media_type="application/json")

        async def chunks():
            control.streaming += 1
            try:
                for i, (t, s) in enumerate(zip(g.tokens, g.special)):
                    if control.fail_after is not None and i == control.fail_after:
                        raise RuntimeError("backend died mid-stream")
                    if control.delay:
                        await asyncio.sleep(control.delay)
                    if s:
                        continue
                    delta = {"content": t} if kind == "chat" else None
                    choice = {"index": 0, "delta": delta, "finish_reason": None} if kind == "chat" else \
                        {"index": 0, "text": t, "finish_reason": None}
                    yield ("data:  " + json.dumps({"id": "x-1", "object": obj + ".chunk", "created": created, "model": model,
                                                   "choices": [choice]}, separators=(",", ":")) + "\r\n\r\n").encode()
                yield ("data: " + json.dumps({"id": "x-1", "object": obj + ".chunk", "created": created, "model": model,
                                              "choices": [{"index": 0, "delta": {}, "finish_reason": ""}]}) + "\n\n").encode()
                yield b"data: [DONE]\n\n"
                control.completed += 1
            except asyncio.CancelledError:
                control.disconnects += 1
                raise
            finally:
                control.streaming -= 1

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, "completion")

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [{"id": model, "object": "model", "created": 1, "owned_by": "me"}]})

    return app


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test backend did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(5)
