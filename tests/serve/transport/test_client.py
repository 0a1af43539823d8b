"""The replica's client to its model server spreads connections over small pools (ray_dstack/serve/transport/client.py):
64 concurrent requests leave every pool with a few connections, all requests answered, connections reused."""

from __future__ import annotations

import asyncio
import ssl

import httpx
import pytest

from ray_dstack.serve.transport.client import model_server_client, SHARDS, ShardedTransport, tls_context

BODY = b'{"ok": true}'


async def keepalive_server(delay_s: float):
    """HTTP/1.1 keep-alive server answering every request after `delay_s`; counts the connections it saw."""
    seen = {"connections": 0, "requests": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["connections"] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                seen["requests"] += 1
                await asyncio.sleep(delay_s)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(BODY), BODY))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", seen


def pool_sizes(client: httpx.AsyncClient) -> list[int]:
    transport = client._transport
    assert isinstance(transport, ShardedTransport)
    return [len(pool._pool.connections) for pool in transport.pools]


def test_64_concurrent_requests_spread_over_small_pools():
    """The one client a replica keeps to its model server (forwarding and the OpenAI adapters share it)."""
    async def run() -> None:
        server, url, seen = await keepalive_server(delay_s=0.05)
        client = model_server_client(url, 30.0)
        try:
            for _ in range(3):  # three waves: the second and third reuse the first wave's connections
                answers = await asyncio.gather(*[client.post("/v1/chat/completions", content=b"{}") for _ in range(64)])
                assert all(a.status_code == 200 and a.content == BODY for a in answers)
            sizes = pool_sizes(client)
            assert len(sizes) == SHARDS and sum(sizes) == 64, sizes
            assert max(sizes) <= 2 * 64 // SHARDS, sizes
            assert seen == {"connections": 64, "requests": 3 * 64}
        finally:
            await client.aclose()
            server.close()
            await server.wait_closed()

    asyncio.run(run())


def test_limits_are_split_between_the_pools():
    transport = ShardedTransport(limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256), shards=16)
    limits = {(p._pool._max_connections, p._pool._max_keepalive_connections) for p in transport.pools}
    assert limits == {(64, 16)}
    with pytest.raises(ValueError):
        ShardedTransport(limits=httpx.Limits(), shards=0)


def test_the_pools_share_one_tls_context_with_httpx_defaults():
    # One context built for the process, not one per pool (each loads the CA bundle: ~20 ms of CPU), and the
    # same verification httpx would do by default.
    transport = ShardedTransport(limits=httpx.Limits(max_connections=None, max_keepalive_connections=64), shards=16)
    contexts = {id(p._pool._ssl_context) for p in transport.pools}
    assert contexts == {id(tls_context())}
    assert tls_context().verify_mode == ssl.CERT_REQUIRED and tls_context().check_hostname
    assert tls_context().cert_store_stats()["x509_ca"] > 0
