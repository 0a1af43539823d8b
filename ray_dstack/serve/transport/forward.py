"""HTTP forwarding from a replica to its own child process: one shared client, streaming both ways."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import httpx
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from ray_dstack.spec import PREFIX_ROUTE_HEADER

# RFC 9110 §7.6.1 hop-by-hop headers, plus the ones a proxy recomputes.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
# Bodies up to this size are read at once: a fixed Content-Length suits every backend (http.server
# rejects chunked request bodies) and saves a round of chunk framing.
BUFFER_BODY_UP_TO = 1 << 20


def filter_headers(
    items: Iterable[tuple[str, str]], *, drop: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    items = list(items)
    named = {
        token.strip().lower()
        for key, value in items
        if key.lower() == "connection"
        for token in value.split(",")
    }
    return [(k, v) for k, v in items if (lk := k.lower()) not in HOP_BY_HOP and lk not in named and lk not in drop]


def path_below_root(scope: Mapping[str, Any]) -> str:
    """The ASGI scope's path below the app's route prefix (`root_path`)."""
    path = scope.get("path", "/")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


def upstream_path(request: Request) -> str:
    """The request's path below the service's route prefix, with the query string."""
    path = path_below_root(request.scope)
    query = request.scope.get("query_string", b"")
    return path + ("?" + query.decode("latin-1") if query else "")


class Forwarder:
    """Forwards a Starlette request to the child and streams the answer back unchanged."""

    def __init__(self, client: httpx.AsyncClient, *, strip_authorization: bool) -> None:
        self.client = client
        # The prefix rules' word to the replica (serve/scaling/metrics.py) is not the service's business.
        drop = {"authorization", PREFIX_ROUTE_HEADER} if strip_authorization else {PREFIX_ROUTE_HEADER}
        self._drop_request = frozenset(drop)

    async def forward(self, request: Request, path: str | None = None) -> Response:
        headers = filter_headers(request.headers.items(), drop=self._drop_request)
        client_host = request.client.host if request.client else None
        if client_host:
            prior = request.headers.get("x-forwarded-for")
            headers.append(("x-forwarded-for", f"{prior}, {client_host}" if prior else client_host))
        if "host" in request.headers:
            headers.append(("x-forwarded-host", request.headers["host"]))
        headers.append(("x-forwarded-proto", request.url.scheme))

        content: bytes | AsyncIterator[bytes]
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) <= BUFFER_BODY_UP_TO:
            content = await request.body()
        elif request.method in ("GET", "HEAD", "OPTIONS", "DELETE") and length is None:
            content = b""
        else:
            content = request.stream()
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]

        upstream_request = self.client.build_request(
            request.method, path if path is not None else upstream_path(request), headers=headers, content=content
        )
        try:
            upstream = await self.client.send(upstream_request, stream=True)
        except ClientDisconnect:
            return Response(status_code=499)
        except httpx.HTTPError as exc:  # the service is down or too slow: 503/504/502 with a message, not a 500
            from ray_dstack.openai.endpoint import GatewayResponse
            from ray_dstack.serve.http import to_starlette

            return to_starlette(GatewayResponse.of_error(exc))
        response_headers = filter_headers(upstream.headers.multi_items())
        if request.method == "HEAD" or upstream.status_code in (204, 304):
            await upstream.aclose()
            response: Response = Response(status_code=upstream.status_code)
        else:
            response = StreamingResponse(_relay(upstream), status_code=upstream.status_code)
        # Raw header list: repeated headers (set-cookie) survive, nothing is re-derived.
        response.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response_headers]
        return response


async def _relay(upstream: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    finally:
        # Runs on completion and when the client goes away (the generator is closed): the upstream
        # connection is released or dropped, which cancels the backend's work.
        await upstream.aclose()
