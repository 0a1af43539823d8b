"""The ingress replica of a service without a router spreads requests over its own model server and the other
groups' ready replicas (peers.py): the pool follows the registry, and picks at random. No Ray."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter

from ray_dstack.serve.groups.peers import PeerPool
from ray_dstack.serve.groups.registry import Watcher
from tests.serve.groups.test_registry import Clock, MemoryKV, announce

LOG = logging.getLogger("test.groups.peers")


class Backend:
    def __init__(self, url: str) -> None:
        self.url = url
        self.closed = False

    def __repr__(self) -> str:
        return f"Backend({self.url})"


class Harness:
    def __init__(self, *, node_id: str | None = "node-a", seed: int = 7) -> None:
        self.kv, self.clock = MemoryKV(), Clock()
        self.made: list[str] = []
        self.closed: list[str] = []
        self.pool: PeerPool[Backend] = PeerPool(
            Watcher(self.kv, "svc", clock=self.clock), node_id=node_id, make=self.make, close=self.close,
            logger=LOG, rng=random.Random(seed))

    def make(self, url: str) -> Backend:
        self.made.append(url)
        return Backend(url)

    async def close(self, backend: Backend) -> None:
        backend.closed = True
        self.closed.append(backend.url)

    def refresh(self) -> None:
        asyncio.run(self.pool.refresh())


def test_refresh_adds_a_backend_per_announced_replica():
    h = Harness()
    announce(h.kv, replica="r1", node_id="node-a", port=9001)
    announce(h.kv, replica="r2", node_id="node-b", node_ip="10.0.0.2", port=9002)
    h.refresh()
    assert sorted(h.pool.backends) == ["http://10.0.0.2:9002", "http://127.0.0.1:9001"]
    assert sorted(h.made) == sorted(h.pool.backends)
    assert h.pool.describe() == {"peers": ["http://10.0.0.2:9002", "http://127.0.0.1:9001"]}


def test_refresh_keeps_existing_backends():
    h = Harness()
    announce(h.kv, replica="r1", port=9001)
    h.refresh()
    first = h.pool.backends["http://127.0.0.1:9001"]
    announce(h.kv, replica="r1", port=9001, seq=2)
    h.refresh()
    assert h.pool.backends["http://127.0.0.1:9001"] is first and h.made == ["http://127.0.0.1:9001"]
    assert h.closed == []


def test_refresh_closes_and_removes_a_replica_that_left():
    h = Harness()
    gone = announce(h.kv, replica="r1", port=9001)
    announce(h.kv, replica="r2", port=9002)
    h.refresh()
    leaving = h.pool.backends["http://127.0.0.1:9001"]
    h.kv.delete(gone)
    h.refresh()
    assert list(h.pool.backends) == ["http://127.0.0.1:9002"]
    assert h.closed == ["http://127.0.0.1:9001"] and leaving.closed


def test_refresh_drops_a_replica_whose_heartbeat_stopped():
    h = Harness()
    announce(h.kv, replica="r1", port=9001)
    h.refresh()
    h.clock.now += 10.0  # far past STALE_S without a new seq
    h.refresh()
    assert h.pool.backends == {} and h.closed == ["http://127.0.0.1:9001"]


def test_choose_returns_own_without_peers():
    h = Harness()
    own = Backend("own")
    assert all(h.pool.choose(own) is own for _ in range(50))
    h.refresh()  # an empty registry
    assert h.pool.choose(own) is own


def test_choose_spreads_over_own_and_every_peer():
    h = Harness(seed=1234)
    for i in range(3):
        announce(h.kv, replica=f"r{i}", port=9000 + i)
    h.refresh()
    own = Backend("own")
    picks = Counter(h.pool.choose(own).url for _ in range(200))
    assert set(picks) == {"own", "http://127.0.0.1:9000", "http://127.0.0.1:9001", "http://127.0.0.1:9002"}
    assert min(picks.values()) >= 25  # about 50 each: uniform, as dstack's random.choice


def test_aclose_closes_every_backend():
    h = Harness()
    announce(h.kv, replica="r1", port=9001)
    announce(h.kv, replica="r2", port=9002)
    h.refresh()

    async def close_pool():
        await h.pool.aclose()

    asyncio.run(close_pool())
    assert sorted(h.closed) == ["http://127.0.0.1:9001", "http://127.0.0.1:9002"] and h.pool.backends == {}


def test_started_pool_follows_the_registry():
    h = Harness()
    h.pool.interval_s = 0.01

    async def scenario():
        h.pool.start()
        try:
            announce(h.kv, replica="r1", port=9001)
            while "http://127.0.0.1:9001" not in h.pool.backends:
                await asyncio.sleep(0.005)
            h.kv.delete("groups/svc/ServiceReplica-workers/r1")
            while h.pool.backends:
                await asyncio.sleep(0.005)
        finally:
            await h.pool.aclose()

    asyncio.run(asyncio.wait_for(scenario(), 5))
    assert h.closed == ["http://127.0.0.1:9001"]
