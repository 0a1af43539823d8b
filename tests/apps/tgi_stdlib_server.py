"""A TGI-wire server on the standard library only, so it runs inside a tiny test image (no pip there).

It is the `text-generation-launcher` of the TGI-shaped test image (tests/support/images.py): it takes TGI's
launcher options (`--port`, `--hostname`, `--model-id`; others are accepted and ignored) and answers the part
of Text Generation Inference's API that the `format: tgi` adapter uses:
- `POST /` with `{"inputs", "parameters", "stream"}`: non-streaming → a JSON list of one `GenerateResponse`;
  streaming → SSE `StreamResponse` events, the last one with `generated_text` and `details`;
- `POST /generate`, `POST /generate_stream`: the same two answers;
- `GET /health` → 200, `GET /info` → `{"model_id", ...}`.
It "generates" `w0 w1 w2 ...` (`min(max_new_tokens, 32)` tokens), prefixed by `$TGI_GREETING` when set, so
a test can see that the service's `env` reached the container.

Run: `python3 tgi_stdlib_server.py --port N [--hostname H] [--model-id ID]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_TOKENS = 32


def _tokens(n: int) -> list[str]:
    greeting = os.environ.get("TGI_GREETING", "")
    return ([f"{greeting} "] if greeting else []) + [f"w{i} " for i in range(n)]


def _tok(i: int, text: str) -> dict:
    return {"id": 100 + i, "text": text, "logprob": -0.5, "special": False}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    model_id = "tgi-stdlib"

    def log_message(self, fmt: str, *args) -> None:  # one line per request on stdout: the replica's log
        sys.stdout.write("tgi-stdlib: " + (fmt % args) + "\n")
        sys.stdout.flush()

    def _json(self, status: int, data) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._json(200, {})
        elif self.path == "/info":
            self._json(200, {"model_id": self.model_id, "max_input_tokens": 1024, "max_total_tokens": 2048,
                             "version": "stdlib-test"})
        else:
            self._json(404, {"error": f"no route {self.path}", "error_type": "not_found"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self._json(422, {"error": "body is not JSON", "error_type": "validation"})
            return
        if self.path not in ("/", "/generate", "/generate_stream"):
            self._json(404, {"error": f"no route {self.path}", "error_type": "not_found"})
            return
        params = body.get("parameters") or {}
        max_new = int(params.get("max_new_tokens") or 20)
        n = max(1, min(max_new, MAX_TOKENS))
        toks = _tokens(n)[:n]
        reason = "length" if n == max_new else "eos_token"
        stream = self.path == "/generate_stream" or (self.path == "/" and bool(body.get("stream")))
        if not stream:
            details = {"finish_reason": reason, "generated_tokens": n, "seed": params.get("seed"),
                       "prefill": [], "tokens": [_tok(i, t) for i, t in enumerate(toks)]}
            answer = {"generated_text": "".join(toks), "details": details}
            self._json(200, [answer] if self.path == "/" else answer)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")  # the stream's end is the connection's end
        self.end_headers()
        self.close_connection = True
        for i, text in enumerate(toks):
            event = {"token": _tok(i, text), "generated_text": None, "details": None}
            if i == n - 1:
                event["generated_text"] = "".join(toks)
                event["details"] = {"finish_reason": reason, "generated_tokens": n, "seed": None}
            self.wfile.write(b"data:" + json.dumps(event).encode() + b"\n\n")
            self.wfile.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TGI-wire test server (standard library only)")
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--hostname", default="0.0.0.0")
    parser.add_argument("--model-id", default="tgi-stdlib")
    args, _ignored = parser.parse_known_args(argv)  # TGI's other launcher options are accepted
    Handler.model_id = args.model_id
    server = ThreadingHTTPServer((args.hostname, args.port), Handler)
    print(f"tgi-stdlib: serving {args.model_id} on {args.hostname}:{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
