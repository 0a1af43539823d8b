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
    def __init__(self, *, node_id: str | None = "node-a", seed: int = 7, retire_s: float = 0.0) -> None:
        """`retire_s` 0: a replica that left is closed as soon as refresh() lets its retirement run."""
        self.kv, self.clock = MemoryKV(), Clock()
        self.made: list[str] = []
        self.closed: list[str] = []
        self.pool: PeerPool[Backend] = PeerPool(
            Watcher(self.kv, "svc", clock=self.clock), node_id=node_id, make=self.make, close=self.close,
            logger=LOG, rng=random.Random(seed), own_deployment="ServiceReplica", retire_s=retire_s)

    def make(self, url: str) -> Backend:
        self.made.append(url)
        return Backend(url)

    async def close(self, backend: Backend) -> None:
        backend.closed = True
        self.closed.append(backend.url)

    def refresh(self) -> None:
        async def go() -> None:
            await self.pool.refresh()
            await asyncio.gather(*self.pool._retiring)

        asyncio.run(go())


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


def test_a_replica_that_left_is_chosen_no_more_but_its_requests_keep_their_connections():
    h = Harness(retire_s=3600.0)
    gone = announce(h.kv, replica="r1", port=9001)

    async def scenario() -> tuple[list[str], list[str]]:
        await h.pool.refresh()
        h.kv.delete(gone)
        await h.pool.refresh()
        own = Backend("own")
        chosen = {h.pool.choose(own).url for _ in range(50)}
        closed_while_running = list(h.closed)
        await h.pool.aclose()  # the replica stops: now it is closed
        return sorted(chosen), closed_while_running

    chosen, closed_while_running = asyncio.run(scenario())
    assert chosen == ["own"] and closed_while_running == [] and h.closed == ["http://127.0.0.1:9001"]


def test_each_replica_of_every_group_is_equally_likely_with_several_ingress_replicas():
    """2 ingress replicas (HAProxy gives each half) and 1 other: each of the 3 should serve a third."""
    h = Harness(seed=99)
    announce(h.kv, replica="i1", port=8001, deployment="ServiceReplica")
    announce(h.kv, replica="i2", port=8002, deployment="ServiceReplica")
    announce(h.kv, replica="w1", port=9001)
    h.refresh()
    assert list(h.pool.backends) == ["http://127.0.0.1:9001"] and h.pool.ingress_replicas == 2
    own = Backend("own")
    picks = Counter(h.pool.choose(own).url for _ in range(3000))
    # this replica keeps 2/3 of its half: 1/3 of all; the other group's replica gets 1/3 of all from each half
    assert abs(picks["own"] / 3000 - 2 / 3) < 0.03
