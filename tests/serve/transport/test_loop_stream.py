"""The replica's client reads its model server through `LoopBackend` (ray_dstack/serve/transport/loop_stream.py): httpcore's
semantics (end of stream, timeouts, errors, keep-alive, flow control, cancellation) over real sockets, on asyncio
and on uvloop (Serve's loop)."""

from __future__ import annotations

import asyncio
import socket
import struct

import httpcore
import httpx
import pytest
import uvloop

from ray_dstack.serve.transport.loop_stream import HIGH_WATER, LoopBackend, LoopStream
from ray_dstack.serve.transport.client import model_server_client, plain_transport
from tests.support.raw_http import STREAM_HEAD, chunk, port_of, read_request, serve

LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


@pytest.fixture(params=sorted(LOOPS))
def run(request):
    return LOOPS[request.param]


async def open_stream(url: str) -> LoopStream:
    """A `LoopStream` to the test server at `url`, opened as the replica's pools open theirs."""
    return await LoopBackend().connect_tcp("127.0.0.1", port_of(url), timeout=5.0)


def test_the_replicas_pools_open_connections_with_the_loop_backend():
    pool = plain_transport(httpx.Limits())._pool
    assert isinstance(pool._network_backend, LoopBackend)
    client = model_server_client("http://127.0.0.1:1", 5.0)
    assert all(isinstance(t._pool._network_backend, LoopBackend) for t in client._transport.pools)


def test_a_stream_arrives_chunk_by_chunk_and_the_connection_is_reused(run):
    events = [b"data: {\"n\": %d}\n\n" % i for i in range(20)]

    async def handler(reader, writer):
        while True:
            body = await read_request(reader)
            assert body == b'{"stream": true}'
            writer.write(STREAM_HEAD)
            for event in events:
                writer.write(chunk(event))
                await writer.drain()
                await asyncio.sleep(0.001)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    async def main():
        server, url, seen = await serve(handler)
        async with model_server_client(url, 5.0) as client:
            for _ in range(3):
                client._transport._next = iter([client._transport.pools[0]] * 3)  # one pool: reuse is visible
                async with client.stream("POST", "/v1/chat/completions", content=b'{"stream": true}') as r:
                    got = [piece async for piece in r.aiter_raw()]
                assert b"".join(got) == b"".join(events)
                assert len(got) > 1  # relayed as it came, not gathered
        server.close()
        assert seen["connections"] == 1

    run(main())


def test_a_stalled_server_is_a_read_timeout(run):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(STREAM_HEAD + chunk(b"data: first\n\n"))
        await writer.drain()
        await asyncio.sleep(30)

    async def main():
        server, url, _ = await serve(handler)
        async with model_server_client(url, 0.3) as client:
            async with client.stream("POST", "/", content=b"{}") as r:
                loop = asyncio.get_running_loop()
                start = loop.time()
                with pytest.raises(httpx.ReadTimeout):
                    async for _ in r.aiter_raw():
                        pass
                assert 0.25 <= loop.time() - start < 2.0
        server.close()

    run(main())


def test_refused_connection_is_a_connect_error(run):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: refused

    async def main():
        async with model_server_client(f"http://127.0.0.1:{port}", 5.0) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get("/health")

    run(main())


def test_a_server_that_closes_mid_stream_ends_the_stream_with_an_error(run):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(STREAM_HEAD + chunk(b"data: one\n\n"))
        await writer.drain()
        writer.close()  # before the end of the chunked body

    async def main():
        server, url, _ = await serve(handler)
        async with model_server_client(url, 5.0) as client:
            async with client.stream("POST", "/", content=b"{}") as r:
                got = []
                with pytest.raises(httpx.RemoteProtocolError):  # h11: the body ended early
                    async for piece in r.aiter_raw():
                        got.append(piece)
                assert b"".join(got) == b"data: one\n\n"
        server.close()

    run(main())


def test_a_reset_connection_is_a_read_error(run):
    async def main():
        sent_first = asyncio.Event()
        reset = asyncio.Event()

        async def handler(reader, writer):
            writer.write(b"first")
            await writer.drain()
            sent_first.set()
            await reset.wait()
            # SO_LINGER 0: close() sends a RST, as the kernel does for a killed process with unread data
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

        server, url, _ = await serve(handler)
        stream = await open_stream(url)
        await sent_first.wait()
        assert await stream.read(100, timeout=5.0) == b"first"
        reset.set()
        with pytest.raises(httpcore.ReadError):
            await stream.read(100, timeout=5.0)
        await stream.aclose()
        server.close()

    run(main())


def test_an_idle_connection_the_server_closed_is_not_reused(run):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        # then close the kept-alive connection, as servers do after their keep-alive timeout

    async def main():
        server, url, seen = await serve(handler)
        async with model_server_client(url, 5.0) as client:
            client._transport._next = iter([client._transport.pools[0]] * 10)
            pool = client._transport.pools[0]._pool
            for _ in range(3):
                r = await client.get("/")
                assert r.status_code == 200 and r.content == b"ok"
                for _ in range(200):  # until the client's side of the kept-alive connection saw the close
                    if all(c._connection._network_stream.get_extra_info("is_readable") for c in pool.connections):
                        break
                    await asyncio.sleep(0.01)
        server.close()
        assert seen["connections"] == 3

    run(main())


def test_a_large_answer_read_slowly_arrives_whole_with_bounded_buffering(run):
    payload = bytes(range(256)) * (16 * 1024)  # 4 MiB

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(payload))
        writer.write(payload)
        await writer.drain()

    async def main():
        server, url, _ = await serve(handler)
        stream = await open_stream(url)
        await stream.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", timeout=5.0)
        got = bytearray()
        most_buffered = 0
        while len(got) < len(payload) + 40:
            piece = await stream.read(4096, timeout=5.0)
            if not piece:
                break
            got += piece
            most_buffered = max(most_buffered, stream._protocol.buffered)
            await asyncio.sleep(0)  # a slow consumer: the socket fills the buffer meanwhile
        await stream.aclose()
        server.close()
        assert got.endswith(payload)
        # Reading pauses above HIGH_WATER; what one socket read brings on top of it bounds the excess.
        assert most_buffered <= HIGH_WATER + 1024 * 1024

    run(main())


def test_a_large_request_body_is_written_whole(run):
    body = b"x" * (8 * 1024 * 1024)

    async def handler(reader, writer):
        received = await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(str(len(received))))
        writer.write(str(len(received)).encode())
        await writer.drain()

    async def main():
        server, url, _ = await serve(handler)
        async with model_server_client(url, 5.0) as client:
            r = await client.post("/", content=body)
        server.close()
        assert r.content == str(len(body)).encode()

    run(main())


def test_a_server_that_takes_nothing_is_a_write_timeout_and_a_close_ends_a_blocked_write(run):
    async def main():
        server, url, _ = await serve(lambda reader, writer: asyncio.sleep(30))  # never reads
        port = port_of(url)
        stream = await LoopBackend().connect_tcp("127.0.0.1", port, timeout=5.0)
        block = b"x" * (4 * 1024 * 1024)
        with pytest.raises(httpcore.WriteTimeout):
            for _ in range(64):  # until the socket's buffers and the transport's are full
                await stream.write(block, timeout=0.3)
        await stream.aclose()

        blocked = await LoopBackend().connect_tcp("127.0.0.1", port, timeout=5.0)

        async def fill() -> None:
            for _ in range(64):
                await blocked.write(block, timeout=30.0)

        writing = asyncio.create_task(fill())
        for _ in range(500):  # until the writer waits on flow control
            if blocked._protocol.write_paused:
                break
            await asyncio.sleep(0.01)
        assert blocked._protocol.write_paused
        loop = asyncio.get_running_loop()
        start = loop.time()
        await blocked.aclose()
        with pytest.raises(httpcore.WriteError):
            await writing
        assert loop.time() - start < 5.0  # at once, not after the 30 s write timeout
        server.close()

    run(main())


def test_cancelling_a_read_closes_the_connection_so_the_server_stops(run):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(STREAM_HEAD)
        await writer.drain()
        while True:  # keeps producing until the client goes away
            writer.write(chunk(b"data: tick\n\n"))
            await writer.drain()
            await asyncio.sleep(0.01)

    async def main():
        server, url, seen = await serve(handler)
        client = model_server_client(url, 5.0)

        async def consume():
            async with client.stream("POST", "/", content=b"{}") as r:
                async for _ in r.aiter_raw():
                    pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if seen["disconnects"]:
                break
            await asyncio.sleep(0.01)
        assert seen["disconnects"] == 1
        await client.aclose()
        server.close()

    run(main())


def test_sockets_are_wrapped_and_opened_with_their_options(run):
    async def main():
        server, url, _ = await serve(lambda reader, writer: reader.read())
        port = port_of(url)
        sock = socket.create_connection(("127.0.0.1", port))
        stream = await LoopStream.from_socket(sock)
        assert stream.get_extra_info("server_addr")[1] == port
        assert stream.get_extra_info("is_readable") is False
        assert stream.get_extra_info("socket").fileno() == sock.fileno()
        await stream.aclose()
        opened = await LoopBackend().connect_tcp("127.0.0.1", port, timeout=5.0,
                                                 socket_options=[(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)])
        raw = opened.get_extra_info("socket")
        assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert raw.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        await opened.aclose()
        server.close()

    run(main())


def test_write_after_close_is_a_write_error(run):
    async def main():
        server, url, _ = await serve(lambda reader, writer: reader.read())
        stream = await open_stream(url)
        await stream.aclose()
        with pytest.raises(httpcore.WriteError):
            await stream.write(b"GET / HTTP/1.1\r\n\r\n")
        server.close()

    run(main())


def test_a_requests_head_and_body_leave_in_one_send():
    """httpcore writes the head, then the body: one send() for both (asyncio's transport, whose `write` a test
    can count; uvloop's is the same code path in LoopStream)."""
    received: list[bytes] = []

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()  # keeps the connection open until the client closes it

    async def main():
        server, url, _ = await serve(handler)
        stream = await open_stream(url)
        sent = []
        write = stream._transport.write
        stream._transport.write = lambda data: (sent.append(data), write(data))
        await stream.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n", timeout=5.0)
        await stream.write(b"{}", timeout=5.0)
        assert sent == []  # not yet: at the end of this step of the loop
        answer = b""
        while not answer.endswith(b"ok"):
            answer += await stream.read(4096, timeout=5.0)
        assert sent == [b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"]
        await stream.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", timeout=5.0)
        await stream.aclose()  # what is still unsent goes out before the close
        assert sent[-1] == b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"
        received.append(answer)
        server.close()

    asyncio.run(main())
    assert received[0].endswith(b"ok")
