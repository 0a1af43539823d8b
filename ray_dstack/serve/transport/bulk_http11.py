"""httpcore's HTTP/1.1 connection with chunked response bodies read by `ChunkedDecoder`: one piece per read.

Everything else is httpcore's (and h11's): the request, the response head, `Content-Length` and read-to-close
bodies, keep-alive, upgrades. Once a response's head says its body is chunked, the body's bytes (what h11 had
buffered past the head, then each network read) go through `ChunkedDecoder` instead of h11's event per chunk;
at the body's end the connection returns to the pool as httpcore would return it (a fresh h11 state, as
`start_next_cycle` leaves it), also when its reader stops at the last event and never asks for the end. A
response closed before its body's last byte arrived closes its connection, as before.

This reaches into httpcore 1.0's connection classes (`pyproject.toml` pins `httpcore<1.1`);
tests/serve/transport/test_bulk_http11.py checks that the replica's client uses them and that a connection is
reused after a chunked body.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import h11
import httpcore
from httpcore._async.connection import AsyncHTTPConnection
from httpcore._async.http11 import AsyncHTTP11Connection, HTTPConnectionState

from ray_dstack.serve.transport.chunked import ChunkedBodyError, ChunkedDecoder


class BulkHTTP11Connection(AsyncHTTP11Connection):
    """An HTTP/1.1 connection whose chunked response bodies are decoded a read at a time."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._chunked: ChunkedDecoder | None = None  # the response being read has a chunked body
        self._body_start = b""  # its bytes that arrived with the head

    async def _receive_response_headers(self, request: httpcore.Request):
        self._chunked = None
        http_version, status, reason, headers, trailing = await super()._receive_response_headers(request)
        if _has_chunked_body(request, status, headers):
            self._chunked, self._body_start = ChunkedDecoder(), trailing
        return http_version, status, reason, headers, trailing

    async def _receive_response_body(self, request: httpcore.Request) -> AsyncIterator[bytes]:
        decoder = self._chunked
        if decoder is None:
            async for piece in super()._receive_response_body(request):
                yield piece
            return
        timeout = request.extensions.get("timeout", {}).get("read", None)
        data, self._body_start = self._body_start, b""
        stream = self._network_stream
        while True:
            try:
                piece = decoder.feed(data)
            except ChunkedBodyError as exc:
                raise httpcore.RemoteProtocolError(str(exc)) from None
            if piece:
                yield piece
            if decoder.done:
                break
            if decoder.failed:  # raised by the next feed, after the data before the fault
                data = b""
                continue
            data = await stream.read(self.READ_NUM_BYTES, timeout=timeout)
            if not data:
                raise httpcore.RemoteProtocolError(
                    "peer closed connection without sending complete message body (incomplete chunked read)")

    async def _response_closed(self) -> None:
        if self._chunked is None:
            await super()._response_closed()
            return
        async with self._state_lock:
            # Reusable: the body's last byte was read (its reader may stop at the last event, before asking for
            # the end), nothing came after it, and h11 saw the request through with keep-alive (a `Connection:
            # close` either way, or an HTTP/1.0 answer, turns h11's DONE into MUST_CLOSE).
            decoder, self._chunked = self._chunked, None
            reusable = decoder.done and not decoder.after_end and self._h11_state.our_state is h11.DONE
            if not reusable:
                await self.aclose()
                return
            # What `start_next_cycle` leaves: h11 saw only the head of the response the decoder finished.
            self._h11_state = h11.Connection(our_role=h11.CLIENT,
                                             max_incomplete_event_size=self.MAX_INCOMPLETE_EVENT_SIZE)
            self._state = HTTPConnectionState.IDLE
            if self._keepalive_expiry is not None:
                self._expire_at = time.monotonic() + self._keepalive_expiry


class BulkHTTPConnection(AsyncHTTPConnection):
    """httpcore's connection (plain HTTP/1.1, no HTTP/2) with a `BulkHTTP11Connection` inside."""

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        if not self.can_handle_request(request.url.origin):
            raise RuntimeError(f"Attempted to send request to {request.url.origin} on connection to {self._origin}")
        try:
            async with self._request_lock:
                if self._connection is None:
                    stream = await self._connect(request)  # TLS too, for an https origin
                    self._connection = BulkHTTP11Connection(origin=self._origin, stream=stream,
                                                            keepalive_expiry=self._keepalive_expiry)
        except BaseException:
            self._connect_failed = True
            raise
        return await self._connection.handle_async_request(request)


class BulkConnectionPool(httpcore.AsyncConnectionPool):
    """httpcore's pool (no proxy, HTTP/1.1) of `BulkHTTPConnection`s."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self._proxy is not None or self._http2:
            raise ValueError("BulkConnectionPool opens plain HTTP/1.1 connections: no proxy, no HTTP/2")

    def create_connection(self, origin: httpcore.Origin) -> httpcore.AsyncConnectionInterface:
        return BulkHTTPConnection(
            origin=origin,
            ssl_context=self._ssl_context,
            keepalive_expiry=self._keepalive_expiry,
            http1=True,
            http2=False,
            retries=self._retries,
            local_address=self._local_address,
            uds=self._uds,
            network_backend=self._network_backend,
            socket_options=self._socket_options,
        )


def _has_chunked_body(request: httpcore.Request, status: int, headers: list[tuple[bytes, bytes]]) -> bool:
    # h11's framing rules (h11/_connection.py, _body_framing): no body for HEAD, 1xx, 204, 304 and a CONNECT's 2xx;
    # otherwise chunked when Transfer-Encoding is present (h11 accepts only `chunked` there).
    if request.method == b"HEAD" or status < 200 or status in (204, 304):
        return False
    if request.method == b"CONNECT" and 200 <= status < 300:
        return False
    return any(name.lower() == b"transfer-encoding" for name, _ in headers)

