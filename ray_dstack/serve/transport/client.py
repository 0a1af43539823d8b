"""The transport of every client that talks to a model server: several small connection pools, not one big one.

httpcore (1.0.x, under httpx) scans its whole pool twice per request, and each scan is quadratic in the
number of connections (`_assign_requests_to_connections` builds a list of all connections for every idle
one), plus, with httpcore's own network backend, a `poll()` per idle connection. One pool holding the
connections of 128 concurrent streams made a replica 12x slower per request than one holding 20 (measured
in-process: 657 req/s with 21 connections, 158 with 64, 52 with 128; bench/RESULTS.md). Spreading requests round-robin over `SHARDS` independent pools
keeps each pool at 1/SHARDS of the connections, so the per-request cost stays flat as concurrency grows.
"""

from __future__ import annotations

import functools
import itertools
import ssl

import httpcore
import httpx

from ray_dstack.serve.transport.bulk_http11 import BulkConnectionPool
from ray_dstack.serve.transport.loop_stream import LoopBackend

SHARDS = 16


class ShardedTransport(httpx.AsyncBaseTransport):
    """`shards` independent `httpx.AsyncHTTPTransport` pools; each request goes to the next one in turn.

    A streamed response keeps its connection in the pool that opened it until it is closed, as with one
    transport; limits apply per pool."""

    def __init__(self, *, limits: httpx.Limits, shards: int = SHARDS,
                 network_backend: httpcore.AsyncNetworkBackend | None = None) -> None:
        if shards < 1:
            raise ValueError("shards must be at least 1")
        per_pool = httpx.Limits(
            max_connections=_split(limits.max_connections, shards),
            max_keepalive_connections=_split(limits.max_keepalive_connections, shards),
            keepalive_expiry=limits.keepalive_expiry,
        )
        self.pools = [plain_transport(per_pool, network_backend) for _ in range(shards)]
        self._next = itertools.cycle(self.pools)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await next(self._next).handle_async_request(request)

    async def aclose(self) -> None:
        for pool in self.pools:
            await pool.aclose()


def plain_transport(limits: httpx.Limits,
                    network_backend: httpcore.AsyncNetworkBackend | None = None) -> httpx.AsyncHTTPTransport:
    """httpx's transport (plain HTTP/1.1), its connections opened by `network_backend` (a replica's namespace:
    ray_dstack/serve/transport/netns_connect.py) or else by `LoopBackend` (ray_dstack/serve/transport/loop_stream.py: reads without
    anyio's per-read cancel scope). httpx does not take a backend, so its pool is replaced by httpcore's with that
    backend, `BulkConnectionPool` (ray_dstack/serve/transport/bulk_http11.py: chunked bodies read a read at a
    time, not a chunk at a time); tests/serve/transport/test_netns_connect.py, test_loop_stream.py and
    test_bulk_http11.py check both are used.
    All of them share one TLS context (`tls_context`)."""
    context = tls_context()
    transport = httpx.AsyncHTTPTransport(verify=context, limits=limits)
    transport._pool = BulkConnectionPool(
        ssl_context=context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=network_backend if network_backend is not None else LoopBackend(),
    )
    return transport


@functools.cache
def tls_context() -> ssl.SSLContext:
    """httpx's default TLS context (its CA bundle), built once per process. httpx builds one per transport
    otherwise, loading the bundle each time: ~20 ms of CPU, so 0.3 s for the 16 pools of every replica's client
    at start-up, though a model server on the node speaks plain HTTP."""
    return httpx.create_ssl_context()


def _split(total: int | None, shards: int) -> int | None:
    return None if total is None else max(1, -(-total // shards))


def upstream_client(*, base_url: str = "", timeout: httpx.Timeout, max_connections: int | None,
                    max_keepalive: int, keepalive_expiry: float = 30.0,
                    network_backend: httpcore.AsyncNetworkBackend | None = None) -> httpx.AsyncClient:
    """A long-lived client to a model server on the replica's node: sharded pools, no proxies from the
    environment (a replica's traffic never leaves for a proxy), no redirects followed."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_keepalive,
                          keepalive_expiry=keepalive_expiry)
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=timeout,
        transport=ShardedTransport(limits=limits, network_backend=network_backend),
        trust_env=False,
        follow_redirects=False,
    )


CONNECT_TIMEOUT_S = 10.0
WRITE_TIMEOUT_S = 60.0
# Below the keep-alive timeout of common model servers (uvicorn's 5 s, so vLLM's and SGLang's): a connection the
# server is about to close is not picked for the next request.
KEEPALIVE_EXPIRY_S = 4.0


def model_server_client(base_url: str, timeout_s: float | None,
                        network_backend: httpcore.AsyncNetworkBackend | None = None) -> httpx.AsyncClient:
    """The one client a replica keeps to its model server, shared by plain forwarding and the OpenAI adapters.

    `timeout_s` bounds each read (so the gap between two streamed chunks), not a whole stream: a long stream
    that keeps producing is never cut. No connection limit (one connection per in-flight stream)."""
    connect = CONNECT_TIMEOUT_S if timeout_s is None else min(CONNECT_TIMEOUT_S, timeout_s)
    return upstream_client(
        base_url=base_url,
        timeout=httpx.Timeout(connect=connect, read=timeout_s, write=WRITE_TIMEOUT_S, pool=None),
        max_connections=None,
        max_keepalive=512,
        keepalive_expiry=KEEPALIVE_EXPIRY_S,
        network_backend=network_backend,
    )
