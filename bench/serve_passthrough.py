"""The baseline a user would write with Ray Serve alone: a FastAPI ingress that relays OpenAI requests to a
backend with one shared httpx client (`max_ongoing_requests` raised, access log off in the Serve config).

Deployed by the bench through the dashboard REST API next to ray-dstack's applications:
`import_path: bench.serve_passthrough:build`, `args: {"backend": "http://127.0.0.1:PORT"}`.
"""


from typing import Any

import httpx
from fastapi import FastAPI, Request
from ray import serve
from starlette.responses import Response, StreamingResponse

app = FastAPI()


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class HandPassthrough:
    def __init__(self, backend: str) -> None:
        self.client = httpx.AsyncClient(
            base_url=backend,
            timeout=httpx.Timeout(600.0, connect=10.0),
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256),
            trust_env=False,
        )

    async def _relay(self, path: str, request: Request) -> Response:
        body = await request.body()
        upstream = await self.client.send(
            self.client.build_request("POST", path, content=body, headers={"content-type": "application/json"}),
            stream=True,
        )
        ctype = upstream.headers.get("content-type", "application/json")
        if ctype.startswith("text/event-stream"):
            async def chunks():
                try:
                    async for chunk in upstream.aiter_raw():
                        yield chunk
                finally:
                    await upstream.aclose()

            return StreamingResponse(chunks(), status_code=upstream.status_code, media_type="text/event-stream")
        data = await upstream.aread()
        await upstream.aclose()
        return Response(data, status_code=upstream.status_code, media_type=ctype)

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self._relay("/v1/chat/completions", request)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._relay("/v1/completions", request)


def build(args: dict[str, Any]):
    return HandPassthrough.bind(args["backend"])
