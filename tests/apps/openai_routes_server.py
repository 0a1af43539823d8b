"""A tiny OpenAI-wire backend with routes beyond chat (for the `/v1/<route>` passthrough e2e test).

POST /v1/embeddings → fixed bytes (odd spacing: a gateway that re-encoded JSON would change them)
POST /v1/responses  → with `stream: true`, three SSE events 50 ms apart; else the body back
GET  /health        → ok

Run: `python -m tests.apps.openai_routes_server --port N`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

EMBEDDING_BYTES = b'{"object":"list",  "data":[{"object":"embedding","index":0,"embedding":[0.25, -1.5e-3]}]}'
RESPONSE_EVENTS = [b'data: {"type":"response.created"}\n\n', b'data: {"type":"response.output_text.delta"}\n\n',
                   b'data: {"type":"response.completed"}\n\n']


async def embeddings(_request: Request) -> Response:
    return Response(EMBEDDING_BYTES, media_type="application/json")


async def responses(request: Request) -> Response:
    body = await request.json()

    async def events():
        for event in RESPONSE_EVENTS:
            yield event
            await asyncio.sleep(0.05)

    if body.get("stream"):
        return StreamingResponse(events(), media_type="text/event-stream")
    return JSONResponse({"object": "response", "seen": body})


async def health(_request: Request) -> Response:
    return PlainTextResponse("ok")


app = Starlette(routes=[
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/v1/responses", responses, methods=["POST"]),
    Route("/health", health),
])


def service_yaml(name: str, *, model: str) -> str:
    repo = Path(__file__).resolve().parents[2]
    return f"""
type: service
name: {name}
commands:
  - exec {sys.executable} -m tests.apps.openai_routes_server --port $RAY_DSTACK_PORT
working_dir: {repo}
port: 8000
probes:
  - type: http
    url: /health
    interval: 1
model:
  type: chat
  name: {model}
  format: openai
"""


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
