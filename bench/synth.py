"""A token-rate-controlled synthetic LLM server speaking OpenAI and TGI, for measuring what a proxy costs.

    python -m bench.synth --port 8000 [--rate 50] [--tokens 64] [--ttft-ms 0] [--pace-nonstream]

Every stream emits a fixed number of tokens (`max_tokens` / `max_completion_tokens` / TGI
`parameters.max_new_tokens` when the request sets it, else `--tokens`) at a fixed rate per stream
(`--rate` tokens/s): token *i* is written at `start + ttft + i / rate` (no drift), the first one after
`--ttft-ms`. Non-streaming answers are immediate unless `--pace-nonstream` (they then take as long as the
stream would). There is no model: the server only isolates what sits in front of it.

Routes: `GET /health`, `GET /v1/models`, `GET /info`, `POST /v1/chat/completions`, `POST /v1/completions`
(streaming and not), TGI's `POST /generate_stream`, `POST /generate` and `POST /` (TGI's compat route: the
body's `stream` decides; the non-streaming answer is a JSON list).

It is a hand-written HTTP/1.1 server on asyncio (uvloop when installed) so that the backend costs far less
than anything measured in front of it: keep-alive, Content-Length request bodies, chunked SSE responses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

MODEL = "synth"
TOKEN_TEXT = " tok"


class Settings:
    def __init__(self, rate: float, tokens: int, ttft_ms: float, pace_nonstream: bool, model: str) -> None:
        self.rate = rate
        self.tokens = tokens
        self.ttft_s = ttft_ms / 1000.0
        self.pace_nonstream = pace_nonstream
        self.model = model


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _head(status: int, ctype: bytes, *, length: int | None = None, keep_alive: bool = True) -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}.get(status, b"OK")
    lines = [b"HTTP/1.1 %d %s" % (status, reason), b"content-type: " + ctype]
    if length is None:
        lines += [b"transfer-encoding: chunked", b"cache-control: no-cache", b"x-accel-buffering: no"]
    else:
        lines.append(b"content-length: %d" % length)
    if not keep_alive:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _n_tokens(payload: dict, default: int) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        value = payload.get(key)
        if isinstance(value, int) and value > 0:
            return value
    params = payload.get("parameters")
    if isinstance(params, dict) and isinstance(params.get("max_new_tokens"), int) and params["max_new_tokens"] > 0:
        return params["max_new_tokens"]
    return default


class SynthServer:
    def __init__(self, settings: Settings) -> None:
        self.s = settings

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, version = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                length = int(headers.get("content-length") or 0)
                body = await reader.readexactly(length) if length else b""
                keep_alive = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
                await self.route(method, target.split("?", 1)[0], body, writer, keep_alive)
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass

    async def send_json(self, writer, obj, status: int = 200, keep_alive: bool = True) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode()
        writer.write(_head(status, b"application/json", length=len(data), keep_alive=keep_alive) + data)
        await writer.drain()

    async def route(self, method: str, path: str, body: bytes, writer, keep_alive: bool) -> None:
        if method == "GET":
            if path in ("/health", "/"):
                return await self.send_json(writer, {"status": "ok"}, keep_alive=keep_alive)
            if path == "/v1/models":
                card = {"id": self.s.model, "object": "model", "created": 0, "owned_by": "bench"}
                return await self.send_json(writer, {"object": "list", "data": [card]}, keep_alive=keep_alive)
            if path == "/info":
                return await self.send_json(writer, {"model_id": self.s.model}, keep_alive=keep_alive)
            return await self.send_json(writer, {"error": "not found"}, 404, keep_alive)
        if method != "POST":
            return await self.send_json(writer, {"error": "method not allowed"}, 405, keep_alive)
        try:
            payload = json.loads(body or b"{}")
            assert isinstance(payload, dict)
        except Exception:  # noqa: BLE001
            return await self.send_json(writer, {"error": "invalid json"}, 400, keep_alive)
        n = _n_tokens(payload, self.s.tokens)
        if path in ("/v1/chat/completions", "/v1/completions"):
            chat = path == "/v1/chat/completions"
            if payload.get("stream"):
                return await self.openai_stream(writer, n, chat)
            return await self.openai_once(writer, n, chat, keep_alive)
        if path == "/generate_stream" or (path == "/" and payload.get("stream")):
            return await self.tgi_stream(writer, n)
        if path in ("/generate", "/"):
            return await self.tgi_once(writer, n, as_list=path == "/", keep_alive=keep_alive)
        return await self.send_json(writer, {"error": "not found"}, 404, keep_alive)

    async def _pace(self, start: float, i: int) -> None:
        """Sleep until token `i` (0-based) is due."""
        due = start + self.s.ttft_s + (i / self.s.rate if self.s.rate > 0 else 0.0)
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def openai_stream(self, writer, n: int, chat: bool) -> None:
        start = time.monotonic()
        created = int(time.time())
        cid = b"chatcmpl-synth%d" % id(writer)
        model = self.s.model.encode()
        writer.write(_head(200, b"text/event-stream"))
        if chat:
            first = (b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":"%s","choices":[{"index":0,'
                     b'"delta":{"role":"assistant","content":"%s"},"finish_reason":null}]}\n\n')
            tmpl = (b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":"%s","choices":[{"index":0,'
                    b'"delta":{"content":"%s"},"finish_reason":null}]}\n\n')
            last = (b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":"%s","choices":[{"index":0,'
                    b'"delta":{},"finish_reason":"length"}]}\n\n')
        else:
            first = tmpl = (b'data: {"id":"%s","object":"text_completion","created":%d,"model":"%s","choices":[{"index":0,'
                            b'"text":"%s","finish_reason":null}]}\n\n')
            last = (b'data: {"id":"%s","object":"text_completion","created":%d,"model":"%s","choices":[{"index":0,'
                    b'"text":"","finish_reason":"length"}]}\n\n')
        tok = TOKEN_TEXT.encode()
        for i in range(n):
            await self._pace(start, i)
            writer.write(_chunk((first if i == 0 else tmpl) % (cid, created, model, tok)))
            await writer.drain()
        writer.write(_chunk(last % (cid, created, model)) + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()

    async def openai_once(self, writer, n: int, chat: bool, keep_alive: bool) -> None:
        if self.s.pace_nonstream:
            await self._pace(time.monotonic(), n)
        text = TOKEN_TEXT * n
        usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}
        if chat:
            obj = {"id": "chatcmpl-synth", "object": "chat.completion", "created": int(time.time()), "model": self.s.model,
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
                   "usage": usage}
        else:
            obj = {"id": "cmpl-synth", "object": "text_completion", "created": int(time.time()), "model": self.s.model,
                   "choices": [{"index": 0, "text": text, "finish_reason": "length"}], "usage": usage}
        await self.send_json(writer, obj, keep_alive=keep_alive)

    async def tgi_stream(self, writer, n: int) -> None:
        start = time.monotonic()
        writer.write(_head(200, b"text/event-stream"))
        tok = TOKEN_TEXT.encode()
        tmpl = b'data:{"index":%d,"token":{"id":%d,"text":"%s","logprob":-0.1,"special":false},"generated_text":null,"details":null}\n\n'
        for i in range(n):
            await self._pace(start, i)
            if i < n - 1:
                event = tmpl % (i + 1, 100 + i, tok)
            else:
                event = (b'data:{"index":%d,"token":{"id":%d,"text":"%s","logprob":-0.1,"special":false},'
                         b'"generated_text":"%s","details":{"finish_reason":"length","generated_tokens":%d,'
                         b'"seed":null,"input_length":8}}\n\n') % (i + 1, 100 + i, tok, tok * n, n)
            writer.write(_chunk(event))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def tgi_once(self, writer, n: int, *, as_list: bool, keep_alive: bool) -> None:
        if self.s.pace_nonstream:
            await self._pace(time.monotonic(), n)
        tokens = [{"id": 100 + i, "text": TOKEN_TEXT, "logprob": -0.1, "special": False} for i in range(n)]
        obj = {"generated_text": TOKEN_TEXT * n,
               "details": {"finish_reason": "length", "generated_tokens": n, "seed": None, "prefill": [], "tokens": tokens}}
        await self.send_json(writer, [obj] if as_list else obj, keep_alive=keep_alive)


async def serve(host: str, port: int, settings: Settings) -> None:
    server = await asyncio.start_server(SynthServer(settings).handle, host, port, backlog=4096, limit=1 << 20)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.synth", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rate", type=float, default=50.0, help="tokens per second per stream (0: as fast as possible)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per answer when the request sets no maximum")
    ap.add_argument("--ttft-ms", type=float, default=0.0, help="delay before the first token")
    ap.add_argument("--pace-nonstream", action="store_true", help="non-streaming answers take the stream's time")
    ap.add_argument("--model", default=MODEL)
    args = ap.parse_args(argv)
    try:
        import uvloop  # type: ignore

        uvloop.install()
    except ImportError:
        pass
    settings = Settings(args.rate, args.tokens, args.ttft_ms, args.pace_nonstream, args.model)
    try:
        asyncio.run(serve(args.host, args.port, settings))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
