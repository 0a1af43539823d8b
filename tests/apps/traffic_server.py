"""A stdlib HTTP server for the traffic e2e tests (rate limits, probes, a model that loads slowly).

GET  /anything            → 200 "ok"
POST /probe               → 200 only with header `X-Probe: secret` and body `ping` (else 400)
GET  /fail                → 503 "still warming up"
POST /v1/chat/completions → 503 for --load-s seconds after start (port open, weights "loading"), then a
                            one-choice OpenAI answer
"""

from __future__ import annotations

import argparse
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STARTED = time.monotonic()
LOAD_S = 0.0


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.startswith("/fail"):
            self._send(503, b"still warming up")
        else:
            self._send(200, b"ok")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/probe":
            good = self.headers.get("X-Probe") == "secret" and body == b"ping"
            self._send(200 if good else 400, b"probe ok" if good else b"bad probe")
        elif self.path == "/v1/chat/completions":
            if time.monotonic() - STARTED < LOAD_S:
                self._send(503, b'{"error": {"message": "loading", "type": "server_error"}}', "application/json")
                return
            model = json.loads(body or b"{}").get("model", "m")
            answer = {"id": "c1", "object": "chat.completion", "created": 1, "model": model, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
            self._send(200, json.dumps(answer).encode(), "application/json")
        else:
            self._send(200, b"ok")


def main() -> None:
    global LOAD_S
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--load-s", type=float, default=0.0)
    args = parser.parse_args()
    LOAD_S = args.load_s
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
