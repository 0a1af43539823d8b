"""Passthrough to a backend that already speaks OpenAI (`format: openai`: vLLM, SGLang, llama.cpp, …).

The client's body bytes are forwarded unchanged (only the fields the client set, in its own encoding), and
answers come back as the backend's bytes: streamed chunks are relayed as they arrive, never parsed or
re-encoded (so non-standard values such as SGLang's `finish_reason: ""` pass through untouched).

- One shared `httpx.AsyncClient` per backend, pooled for hundreds of concurrent streams; its timeout bounds
  connect and the gap between two reads, never the total duration of a stream.
- The upstream status and the first body chunk are awaited before answering: an upstream error becomes an
  HTTP error (4xx keep status and message, wrapped in OpenAI's error shape when the body is not one already;
  5xx → 502), an unreachable backend is 503, a timeout 504.
- Mid-stream failures end the stream with an SSE `error` event and `data: [DONE]`.
- Closing the returned stream (client disconnect) closes the upstream connection, so the backend stops.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field

import httpx

from ray_dstack.openai import errors
from ray_dstack.openai.errors import to_openai_error
from ray_dstack.openai.streams import SSE_DONE, ByteStream, close_quietly

# Response headers worth relaying (hop-by-hop and length/encoding headers are recomputed by our server).
_RELAYED_HEADERS = {"content-type", "x-request-id", "openai-processing-ms", "openai-version"}
# Request headers the backend may care about. Authorization is NOT forwarded: it carries the gateway's token.
_FORWARDED_HEADERS = {"content-type", "accept", "user-agent", "x-request-id", "openai-organization", "openai-project"}


@dataclass
class UpstreamResponse:
    """What the backend answered: status, relayed headers, and bytes (or a byte stream)."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | ByteStream = b""

    @property
    def is_stream(self) -> bool:
        return not isinstance(self.body, (bytes, bytearray))


class OpenAIPassthrough:
    def __init__(self, base_url: str, prefix: str = "/v1", timeout: float | None = 600.0, *,
                 client: httpx.AsyncClient) -> None:
        """`client`: the caller's connection pool to the model server (the caller closes it)."""
        self.base_url = base_url.rstrip("/")
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self.timeout = timeout
        self.client = client

    def url(self, route: str) -> str:
        return f"{self.base_url}{self.prefix}/{route.lstrip('/')}"

    async def chat_completions(self, body: bytes, headers: Mapping[str, str] | None = None) -> UpstreamResponse:
        return await self.forward("POST", "chat/completions", body, headers)

    async def completions(self, body: bytes, headers: Mapping[str, str] | None = None) -> UpstreamResponse:
        return await self.forward("POST", "completions", body, headers)

    async def models(self, headers: Mapping[str, str] | None = None) -> UpstreamResponse:
        return await self.forward("GET", "models", b"", headers)

    async def forward(self, method: str, route: str, body: bytes = b"",
                      headers: Mapping[str, str] | None = None) -> UpstreamResponse:
        """Send `body` as is to `<base_url><prefix>/<route>`; raises `OpenAIError` on upstream failure."""
        out_headers = {k.lower(): v for k, v in (headers or {}).items() if k.lower() in _FORWARDED_HEADERS}
        if body:
            out_headers.setdefault("content-type", "application/json")
        # Identity encoding: the bytes we relay are the bytes the backend produced, with no decoding step.
        out_headers["accept-encoding"] = "identity"
        request = self.client.build_request(method, self.url(route), content=body or None, headers=out_headers)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise to_openai_error(exc) from exc
        try:
            relayed = {k: v for k, v in response.headers.items() if k.lower() in _RELAYED_HEADERS}
            if response.status_code >= 400:
                content = await response.aread()
                raise errors.from_upstream_status(response.status_code, content)
            chunks = response.aiter_raw()
            first = b""
            async for piece in chunks:  # read up to the first non-empty chunk before answering
                if piece:
                    first = piece
                    break
            else:
                chunks = None  # body was empty or fully read
            content_type = response.headers.get("content-type", "")
            if chunks is None or not content_type.startswith("text/event-stream"):
                # Non-streaming: read it all and answer it as is.
                rest = b"".join([piece async for piece in chunks]) if chunks is not None else b""
                await response.aclose()
                return UpstreamResponse(response.status_code, relayed, first + rest)
        except BaseException as exc:
            await close_quietly(response.aclose)
            if isinstance(exc, httpx.HTTPError):
                raise to_openai_error(exc) from exc
            raise
        relayed.setdefault("content-type", "text/event-stream")
        return UpstreamResponse(response.status_code, relayed, ByteStream(_relay(response, first, chunks), response.aclose))


async def _relay(response: httpx.Response, first: bytes, chunks) -> AsyncGenerator[bytes, None]:
    try:
        yield first
        async for piece in chunks:
            if piece:
                yield piece
    except httpx.HTTPError as exc:
        # The backend died mid-stream: tell the client in-band and end cleanly.
        yield b"\n\n" + errors.sse_error_event(exc)
        yield SSE_DONE
    finally:
        await close_quietly(response.aclose)
