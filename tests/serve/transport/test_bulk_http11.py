"""The replica's client reads chunked bodies a read at a time (ray_dstack/serve/transport/bulk_http11.py): the same
bytes as before in far fewer pieces, the connection reused after a whole body and dropped otherwise, and
httpx's errors for a body that is cut short or malformed. Over real sockets, on asyncio and on uvloop."""

from __future__ import annotations

import asyncio
import itertools

import httpx
import pytest
import uvloop

from ray_dstack.serve.transport.bulk_http11 import BulkConnectionPool, BulkHTTP11Connection
from ray_dstack.serve.transport.client import model_server_client
from tests.support.raw_http import STREAM_HEAD, chunk, read_request, serve

LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}
TOKENS = [b'data: {"choices":[{"delta":{"content":"t%d"}}]}\n\n' % i for i in range(64)]
END = b"0\r\n\r\n"


@pytest.fixture(params=sorted(LOOPS))
def run(request):
    return LOOPS[request.param]


def answering(*bodies: bytes, head: bytes = STREAM_HEAD):
    """A handler answering each request on a connection with `head` and the next of `bodies`."""
    async def handler(reader, writer):
        for body in bodies:
            await read_request(reader)
            writer.write(head + body)
            await writer.drain()
        await reader.read()  # until the client closes
    return handler


def one_pool(client: httpx.AsyncClient) -> None:
    """Every request through the client's first pool, so the server's count of connections shows reuse."""
    client._transport.pools = client._transport.pools[:1]
    client._transport._next = itertools.cycle(client._transport.pools)


async def pieces_of(client: httpx.AsyncClient, method: str = "GET") -> list[bytes]:
    async with client.stream(method, "/") as response:
        return [piece async for piece in response.aiter_raw()]


def test_the_replicas_client_uses_the_bulk_connections(run):
    async def main():
        server, url, _ = await serve(answering(chunk(b"hi") + END))
        async with server, model_server_client(url, 5.0) as client:
            assert all(isinstance(pool._pool, BulkConnectionPool) for pool in client._transport.pools)
            assert await pieces_of(client) == [b"hi"]
            connections = [c._connection for pool in client._transport.pools for c in pool._pool.connections]
            assert len(connections) == 1 and isinstance(connections[0], BulkHTTP11Connection)
    run(main())


def test_chunks_that_arrive_together_are_one_piece_and_the_connection_is_reused(run):
    body = b"".join(chunk(t) for t in TOKENS) + END

    async def main():
        server, url, seen = await serve(answering(body, body, body))
        async with server, model_server_client(url, 5.0) as client:
            one_pool(client)
            for _ in range(3):
                pieces = await pieces_of(client)
                assert b"".join(pieces) == b"".join(TOKENS)
                assert len(pieces) < len(TOKENS) // 4  # h11 alone gives one piece per chunk
        assert seen["connections"] == 1
    run(main())


@pytest.mark.parametrize("head, body", [
    (STREAM_HEAD.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n"), chunk(b"ok") + END),  # asks to close
    (STREAM_HEAD.replace(b"HTTP/1.1", b"HTTP/1.0"), chunk(b"ok") + END),  # HTTP/1.0: no keep-alive by default
    (STREAM_HEAD, chunk(b"ok") + END + b"HTTP/1.1 200 OK\r\n"),  # bytes after the body's end
], ids=["connection-close", "http-1.0", "bytes-after-end"])
def test_a_connection_that_cannot_serve_another_request_is_dropped(run, head, body):
    async def main():
        server, url, seen = await serve(answering(body, body, head=head))
        async with server, model_server_client(url, 5.0) as client:
            one_pool(client)
            assert await pieces_of(client) == [b"ok"]
            assert await pieces_of(client) == [b"ok"]
        assert seen["connections"] == 2
    run(main())


def test_a_response_closed_before_its_end_closes_the_connection(run):
    closed = None

    async def handler(reader, writer):
        nonlocal closed
        await read_request(reader)
        writer.write(STREAM_HEAD + chunk(b"first"))
        await writer.drain()
        closed = await reader.read()  # b"" once the client drops the connection

    async def main():
        server, url, seen = await serve(handler)
        async with server, model_server_client(url, 5.0) as client:
            async with client.stream("GET", "/") as response:
                async for piece in response.aiter_raw():
                    assert piece == b"first"
                    break
            for _ in range(100):
                if seen["disconnects"]:
                    break
                await asyncio.sleep(0.01)
        assert closed == b"" and seen["disconnects"] == 1
    run(main())


@pytest.mark.parametrize("body, message", [
    (chunk(b"partial"), "incomplete chunked read"),
    (chunk(b"partial") + b"zz\r\n", "illegal chunk header"),
    (b"5\r\nhelloXY", "malformed chunk end"),
])
def test_a_body_cut_short_or_malformed_is_a_protocol_error_after_its_data(run, body, message):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(STREAM_HEAD + body)
        await writer.drain()
        writer.close()

    async def main():
        server, url, _ = await serve(handler)
        got = []
        async with server, model_server_client(url, 5.0) as client:
            with pytest.raises(httpx.RemoteProtocolError, match=message):
                async with client.stream("GET", "/") as response:
                    async for piece in response.aiter_raw():
                        got.append(piece)
        return b"".join(got)
    data = run(main())
    assert data == (b"partial" if body.startswith(chunk(b"partial")) else b"hello")


def test_a_head_request_reads_no_body_and_keeps_the_connection(run):
    async def main():
        server, url, seen = await serve(answering(b"", chunk(b"x") + END))
        async with server, model_server_client(url, 5.0) as client:
            one_pool(client)
            assert await pieces_of(client, "HEAD") == []
            assert await pieces_of(client) == [b"x"]
        assert seen["connections"] == 1
    run(main())


def test_a_content_length_body_is_read_as_before(run):
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"

    async def main():
        server, url, seen = await serve(answering(b"hello", b"hello", head=head))
        async with server, model_server_client(url, 5.0) as client:
            one_pool(client)
            assert (await client.get("/")).content == b"hello"
            assert (await client.get("/")).content == b"hello"
        assert seen["connections"] == 1
    run(main())


def test_a_reader_that_stops_at_the_last_event_still_leaves_the_connection_reusable(run):
    """The TGI adapter stops at `[DONE]` without asking for the body's end: when the end came in the same read,
    the connection is whole and serves the next request."""
    body = chunk(b"data: 1\n\n") + chunk(b"data: [DONE]\n\n") + END

    async def main():
        server, url, seen = await serve(answering(body, body))
        async with server, model_server_client(url, 5.0) as client:
            one_pool(client)
            for _ in range(2):
                async with client.stream("GET", "/") as response:
                    async for piece in response.aiter_raw():
                        if b"[DONE]" in piece:
                            break
        assert seen["connections"] == 1
    run(main())


def test_the_pool_refuses_what_it_does_not_open():
    with pytest.raises(ValueError, match="no proxy, no HTTP/2"):
        BulkConnectionPool(http2=True)
