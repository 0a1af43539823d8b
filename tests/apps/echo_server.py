"""A small HTTP service for end-to-end tests, started by a service's `commands`.

GET  /pid            → {"pid": ..., "port": ...} (tells replicas apart)
GET  /sse?n=N&delay=S → N server-sent events, S seconds apart (checks streaming is not buffered)
POST /echo           → the request body and selected headers back
GET  /health         → ok
"""

import argparse
import asyncio
import json
import os

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route


async def pid(request: Request):
    return JSONResponse({"pid": os.getpid(), "port": request.url.port})


async def sse(request: Request):
    n = int(request.query_params.get("n", "5"))
    delay = float(request.query_params.get("delay", "0.3"))

    async def events():
        for i in range(n):
            yield f"data: {json.dumps({'i': i})}\n\n".encode()
            await asyncio.sleep(delay)

    return StreamingResponse(events(), media_type="text/event-stream")


async def echo(request: Request):
    body = await request.body()
    return JSONResponse(
        {
            "body": body.decode(errors="replace"),
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "authorization": request.headers.get("authorization"),
            "x_forwarded_for": request.headers.get("x-forwarded-for"),
        }
    )


async def health(_request: Request):
    return PlainTextResponse("ok")


app = Starlette(
    routes=[
        Route("/pid", pid),
        Route("/sse", sse),
        Route("/echo", echo, methods=["POST", "PUT", "PATCH"]),
        Route("/health", health),
    ]
)

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
