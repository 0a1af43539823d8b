"""A fast, fault-injecting TGI-wire backend for the reliability tests (no model, no torch: starts in ~1 s).

It speaks the part of Text Generation Inference's API that the `format: tgi` adapter uses — `POST /` with
`{"inputs", "parameters", "stream"}` (non-streaming: a JSON list of one `GenerateResponse`; streaming: SSE
`StreamResponse` events, the last with `generated_text` and `details`) — and generates `w0 w1 w2 ...`,
`min(max_new_tokens, 32)` tokens, prefixed by `$FAULTY_VERSION` when set (tells versions apart in a rolling
update).

The gateway builds the backend request itself (client headers do not reach it), so faults are chosen by
markers in the prompt, which reaches the backend verbatim through the chat template:

| marker          | what the backend does                                                                         |
|-----------------|-----------------------------------------------------------------------------------------------|
| `[[kill]]`      | streams 2 tokens, then SIGKILLs its own process (the service's process dies mid-stream)       |
| `[[hang]]`      | never answers; polls for the client's disconnect and counts it in `/stats` `cancelled`        |
| `[[garbage]]`   | 200 with non-JSON (`text/html` body; when streaming, SSE `data:` lines that are not JSON)      |
| `[[slow=MS]]`   | sleeps MS milliseconds before each token                                                       |

`GET /stats` → `{"pid", "version", "started", "active", "cancelled", "completed"}`; `GET /health` → ok.
The `[[...]]` markers never appear in answers.

Run: `python -m tests.apps.faulty_server --port N`.
`service_yaml(...)` below writes a `.dstack.yml` that runs it as a `format: tgi` model service.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

MAX_TOKENS = 32
KILL_AFTER = 2
STATS = {"started": 0, "active": 0, "cancelled": 0, "completed": 0}
SLOW_RE = re.compile(r"\[\[slow=(\d+)\]\]")

# A minimal ChatML-like template: the prompt carries every message's content verbatim.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
EOS = "</s>"


def version() -> str:
    return os.environ.get("FAULTY_VERSION", "")


def _tokens(n: int) -> list[str]:
    prefix = [f"{version()} "] if version() else []
    return (prefix + [f"w{i} " for i in range(n)])[:n]


def _tok(i: int, text: str) -> dict:
    return {"id": 100 + i, "text": text, "logprob": -0.5, "special": False}


async def _wait_for_disconnect(request: Request) -> None:
    STATS["active"] += 1
    try:
        while not await request.is_disconnected():
            await asyncio.sleep(0.05)
        STATS["cancelled"] += 1
    finally:
        STATS["active"] -= 1


async def generate(request: Request) -> Response:
    body = await request.json()
    inputs = str(body.get("inputs", ""))
    params = body.get("parameters") or {}
    stream = bool(body.get("stream"))
    STATS["started"] += 1
    if "[[hang]]" in inputs:
        await _wait_for_disconnect(request)
        return Response(status_code=499)
    if "[[garbage]]" in inputs:
        if stream:
            return StreamingResponse(iter([b"data: <html>not json\n\n", b"data: {broken\n\n"]),
                                     media_type="text/event-stream")
        return Response(b"<html><body>502 Bad Gateway (nginx)</body></html>", media_type="text/html")
    max_new = params.get("max_new_tokens") or 20
    n = max(1, min(int(max_new), MAX_TOKENS))
    toks = _tokens(n)
    slow = SLOW_RE.search(inputs)
    delay = int(slow.group(1)) / 1000.0 if slow else 0.0
    kill = "[[kill]]" in inputs
    top_n = params.get("top_n_tokens") or 0
    best_of = int(params.get("best_of") or 1)
    reason = "length" if n == int(max_new) else "eos_token"

    if not stream:
        STATS["active"] += 1
        try:
            if delay:
                await asyncio.sleep(delay * n)
            tokens = [_tok(i, t) for i, t in enumerate(toks)]
            details = {
                "finish_reason": reason, "generated_tokens": n, "seed": params.get("seed"),
                "prefill": [{"id": 1, "text": "<s>", "logprob": None}],
                "tokens": tokens,
                "top_tokens": [[t] for t in tokens] if top_n else None,
                "best_of_sequences": [
                    {"generated_text": "".join(toks), "finish_reason": reason, "generated_tokens": n,
                     "seed": None, "prefill": [], "tokens": tokens,
                     "top_tokens": [[t] for t in tokens] if top_n else None}
                    for _ in range(best_of - 1)
                ] or None,
            }
            STATS["completed"] += 1
            return JSONResponse([{"generated_text": "".join(toks), "details": details}])
        finally:
            STATS["active"] -= 1

    async def events():
        STATS["active"] += 1
        try:
            for i, text in enumerate(toks):
                if kill and i == KILL_AFTER:
                    os.kill(os.getpid(), signal.SIGKILL)
                if delay:
                    await asyncio.sleep(delay)
                event: dict = {"token": _tok(i, text), "top_tokens": [_tok(i, text)] if top_n else None,
                               "generated_text": None, "details": None}
                if i == n - 1:
                    event["generated_text"] = "".join(toks)
                    event["details"] = {"finish_reason": reason, "generated_tokens": n, "seed": None,
                                        "input_length": 3}
                yield b"data:" + json.dumps(event).encode() + b"\n\n"
            STATS["completed"] += 1
        except asyncio.CancelledError:
            STATS["cancelled"] += 1
            raise
        finally:
            STATS["active"] -= 1

    return StreamingResponse(events(), media_type="text/event-stream")


async def stats(_request: Request) -> Response:
    return JSONResponse({**STATS, "pid": os.getpid(), "version": version()})


async def health(_request: Request) -> Response:
    return PlainTextResponse("ok")


app = Starlette(routes=[
    Route("/", generate, methods=["POST"]),
    Route("/stats", stats),
    Route("/health", health),
])


def service_yaml(name: str, *, model: str, replicas: int = 1, env: dict[str, str] | None = None,
                 chat_template: str = CHAT_TEMPLATE, extra: str = "") -> str:
    """A `.dstack.yml` running this server as a `format: tgi` model (template and eos set: no Hub lookup)."""
    repo = Path(__file__).resolve().parents[2]
    env_lines = "".join(f"  - {k}={v}\n" for k, v in (env or {}).items())
    template = json.dumps(chat_template)  # a JSON string is a valid YAML double-quoted scalar
    return f"""
type: service
name: {name}
commands:
  - exec {sys.executable} -m tests.apps.faulty_server --port $RAY_DSTACK_PORT
working_dir: {repo}
port: 8000
replicas: {replicas}
{"env:" + chr(10) + env_lines if env_lines else ""}probes:
  - type: http
    url: /health
    interval: 1
model:
  type: chat
  name: {model}
  format: tgi
  eos_token: "{EOS}"
  chat_template: {template}
{extra}
"""


# --- client side, for the tests that drive a service running this server ---------------------------------


@dataclass
class Outcome:
    """One OpenAI request as the client saw it."""

    status: int | None  # None: no HTTP answer (connection error, timeout)
    elapsed: float
    stream: bool
    text: str = ""  # the generated text
    error: str | None = None  # the OpenAI error message (JSON body or SSE error event), or the exception
    done: bool = False  # streaming: `data: [DONE]` arrived
    exception: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and (self.done or not self.stream) and bool(self.text)


def chat(client: httpx.Client, base_url: str, token: str | None, model: str, content: str, *, stream: bool,
         max_tokens: int = 6, timeout: float = 60.0) -> Outcome:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": stream}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    start = time.monotonic()
    status = None
    text, error, done = [], None, False
    try:
        with client.stream("POST", f"{base_url}/chat/completions", json=body, headers=headers,
                           timeout=timeout) as resp:
            status = resp.status_code
            if status != 200 or not resp.headers.get("content-type", "").startswith("text/event-stream"):
                raw = resp.read()
                try:
                    payload = json.loads(raw)
                except ValueError:
                    payload = None
                if status == 200 and isinstance(payload, dict) and payload.get("choices"):
                    text.append(payload["choices"][0]["message"]["content"] or "")
                else:
                    err = payload.get("error") if isinstance(payload, dict) else None
                    error = err.get("message") if isinstance(err, dict) else raw.decode(errors="replace")[:500]
            else:
                for line in resp.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        continue
                    event = json.loads(data)
                    if "error" in event:
                        error = event["error"].get("message") or json.dumps(event["error"])
                    for choice in event.get("choices") or []:
                        text.append((choice.get("delta") or {}).get("content") or "")
    except (httpx.HTTPError, ValueError) as exc:
        return Outcome(status, time.monotonic() - start, stream, "".join(text), error or repr(exc), done,
                       exception=type(exc).__name__)
    return Outcome(status, time.monotonic() - start, stream, "".join(text), error, done)


class Load:
    """`workers` threads sending chat requests (alternately streaming and not) until `stop()`."""

    def __init__(self, base_url: str, token: str | None, model: str, *, workers: int = 8,
                 content: str = "hello", timeout: float = 60.0) -> None:
        self.base_url, self.token, self.model = base_url, token, model
        self.content, self.timeout = content, timeout
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(workers)]

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _work(self, i: int) -> None:
        with httpx.Client(trust_env=False) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                self.outcomes.append(chat(client, self.base_url, self.token, self.model, self.content,
                                          stream=(i + n) % 2 == 0, timeout=self.timeout))

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 10)
        assert not any(t.is_alive() for t in self._threads), "a load worker hangs"
        return self.outcomes

    def wait_for_answers(self, n: int, timeout: float = 60.0) -> None:
        """Block until `n` more requests have finished (whatever their outcome): load is really flowing."""
        target = len(self.outcomes) + n
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < target:
            assert time.monotonic() < deadline, f"only {len(self.outcomes)} of {target} requests finished"
            self._stop.wait(0.05)

    def failures(self) -> list[Outcome]:
        return [o for o in list(self.outcomes) if not o.ok]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=1)


if __name__ == "__main__":
    main()
