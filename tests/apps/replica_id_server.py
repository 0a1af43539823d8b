"""An OpenAI-wire chat backend that says which replica answered (for the prefix-affinity e2e test).

POST /v1/chat/completions, /v1/completions → an OpenAI-shaped answer with `"replica": <this process's id>`;
`hold_s` in the body keeps the request that long (a busy replica); `die: true` ends the process at once (a
crashed model server: its replica fails its health check and Serve replaces it)
GET  /health → ok

Run: `python -m tests.apps.replica_id_server --port N`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPLICA = uuid.uuid4().hex[:12]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
        time.sleep(float(body.get("hold_s", 0)))
        self._json({"id": "chatcmpl-1", "object": "chat.completion", "model": body.get("model"), "replica": REPLICA,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                 "finish_reason": "stop"}]})
        if body.get("die"):  # after the answer: HAProxy must not retry it on another replica
            self.wfile.flush()
            os._exit(1)

    def do_GET(self):
        self._json({"status": "ok", "replica": REPLICA})

    def _json(self, payload: dict) -> None:
        out = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


def service_yaml(name: str, *, model: str, replicas: int, python: str, repo: str) -> str:
    return f"""
type: service
name: {name}
commands:
  - exec {python} -m tests.apps.replica_id_server --port $RAY_DSTACK_PORT
working_dir: {repo}
port: 8000
replicas: {replicas}
routing: prefix
probes:
  - type: http
    url: /health
    interval: 1
model:
  name: {model}
  format: openai
"""


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()
