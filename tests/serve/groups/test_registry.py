"""Ready replicas announced in a KV (registry.py): the Announcer's heartbeat and the Watcher's view of it, with an
in-memory KV (registry.KV's interface) and the reader's clock moved by hand. No Ray."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import pytest

from ray_dstack.serve.groups import registry
from ray_dstack.serve.groups.registry import Announcer, Watcher, WorkerEntry

LOG = logging.getLogger("test.groups.registry")


class MemoryKV:
    """registry.KV's interface (put/get/list/delete) over a dict; safe to call from asyncio.to_thread."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.puts = 0
        self.deleted: list[str] = []
        self._lock = threading.Lock()

    def put(self, key: str, value: bytes) -> None:
        with self._lock:
            self.puts += 1
            self.data[key] = value

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self.data.get(key)

    def list(self, prefix: str) -> dict[str, bytes]:
        with self._lock:
            return {k: v for k, v in self.data.items() if k.startswith(prefix)}

    def delete(self, key: str) -> None:
        with self._lock:
            self.deleted.append(key)
            self.data.pop(key, None)


class Clock:
    """The reader's clock, moved by the test."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def announce(kv: MemoryKV, *, service: str = "svc", deployment: str = "ServiceReplica-workers",
             replica: str = "r1", node_id: str = "node-a", node_ip: str = "10.0.0.1", port: int = 8000,
             seq: int = 1, group: str = "workers") -> str:
    """Write one entry the way an Announcer does; returns its key."""
    key = registry.entry_key(service, deployment, replica)
    kv.put(key, json.dumps({"group": group, "deployment": deployment, "replica": replica, "node_id": node_id,
                            "node_ip": node_ip, "port": port, "seq": seq}).encode())
    return key


async def until(predicate, *, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def seq_of(kv: MemoryKV, key: str) -> int | None:
    raw = kv.get(key)
    return None if raw is None else json.loads(raw)["seq"]


# --- Watcher -------------------------------------------------------------------------------------------------


def test_an_announced_entry_is_read_back_whole():
    kv = MemoryKV()
    key = announce(kv, replica="r7", node_id="n1", node_ip="10.1.2.3", port=9001, seq=4)
    assert Watcher(kv, "svc", clock=Clock()).live() == [WorkerEntry(
        key=key, group="workers", deployment="ServiceReplica-workers", replica="r7", node_id="n1",
        node_ip="10.1.2.3", port=9001, seq=4)]
    assert key == "groups/svc/ServiceReplica-workers/r7"


def test_an_entry_whose_seq_keeps_moving_stays_live():
    kv, clock = MemoryKV(), Clock()
    watcher = Watcher(kv, "svc", clock=clock)
    for seq in range(1, 20):
        announce(kv, seq=seq)
        assert [e.seq for e in watcher.live()] == [seq]
        clock.now += registry.STALE_S * 0.9  # well past STALE_S in all, never STALE_S without a change


def test_an_entry_that_stops_moving_is_dropped_after_stale_s():
    kv, clock = MemoryKV(), Clock()
    watcher = Watcher(kv, "svc", clock=clock)
    key = announce(kv, seq=5)
    assert len(watcher.live()) == 1
    clock.now += registry.STALE_S
    assert len(watcher.live()) == 1  # exactly STALE_S: still live
    clock.now += 0.01
    assert watcher.live() == []
    assert kv.get(key) is not None  # dropped from the view, not yet from the KV


def test_a_stale_entry_is_live_again_once_its_seq_moves():
    kv, clock = MemoryKV(), Clock()
    watcher = Watcher(kv, "svc", clock=clock)
    announce(kv, seq=1)
    watcher.live()
    clock.now += registry.STALE_S + 1
    assert watcher.live() == []
    announce(kv, seq=2)
    assert [e.seq for e in watcher.live()] == [2]


def test_staleness_is_measured_on_the_readers_clock_from_first_sight():
    """Nodes' clocks need not agree: an entry a new reader sees for the first time is fresh for it."""
    kv, clock = MemoryKV(), Clock()
    announce(kv, seq=3)
    first = Watcher(kv, "svc", clock=clock)
    first.live()
    clock.now += registry.STALE_S + 1
    assert first.live() == []
    assert len(Watcher(kv, "svc", clock=clock).live()) == 1


def test_an_entry_stale_longer_than_forget_s_is_deleted_from_the_kv():
    kv, clock = MemoryKV(), Clock()
    watcher = Watcher(kv, "svc", clock=clock)
    dead = announce(kv, replica="dead", seq=1)
    alive = announce(kv, replica="alive", seq=1)
    watcher.live()
    for step in range(1, int(registry.FORGET_S) + 1):  # `alive` beats every second, `dead` never again
        clock.now += 1.0
        announce(kv, replica="alive", seq=1 + step)
        expected = ["alive", "dead"] if step <= registry.STALE_S else ["alive"]
        assert [e.replica for e in watcher.live()] == expected
    assert kv.get(dead) is not None and dead not in kv.deleted  # stale exactly FORGET_S: kept
    clock.now += 0.5
    announce(kv, replica="alive", seq=1000)
    assert [e.replica for e in watcher.live()] == ["alive"]
    assert kv.get(dead) is None and kv.deleted == [dead]
    assert kv.get(alive) is not None
    assert [e.replica for e in watcher.live()] == ["alive"]  # and its bookkeeping is gone with it


@pytest.mark.parametrize("value", [
    b"not json", b"\xff\xfe", b"null", b"[]", b"42", b'"text"', b"{}",
    json.dumps({"group": "w", "deployment": "d", "replica": "r", "node_id": "n", "node_ip": "1.2.3.4",
                "seq": 1}).encode(),  # no port
    json.dumps({"group": "w", "deployment": "d", "replica": "r", "node_id": "n", "node_ip": "1.2.3.4",
                "port": "http", "seq": 1}).encode(),
    json.dumps({"group": "w", "deployment": "d", "replica": "r", "node_id": "n", "node_ip": "1.2.3.4",
                "port": 8000, "seq": None}).encode(),
], ids=["text", "bad-utf8", "null", "list", "number", "string", "empty", "no-port", "port-not-int", "seq-null"])
def test_garbage_values_are_ignored(value):
    kv, clock = MemoryKV(), Clock()
    good = announce(kv, replica="good")
    kv.put("groups/svc/ServiceReplica-workers/garbage", value)
    watcher = Watcher(kv, "svc", clock=clock)
    assert [e.key for e in watcher.live()] == [good]
    clock.now += registry.FORGET_S + 1
    announce(kv, replica="good", seq=2)
    assert [e.key for e in watcher.live()] == [good]


def test_only_this_services_entries_are_read():
    kv = MemoryKV()
    mine = announce(kv, service="svc", replica="a")
    announce(kv, service="svc2", replica="b")  # a service whose name extends this one's
    announce(kv, service="other", replica="c")
    assert [e.key for e in Watcher(kv, "svc", clock=Clock()).live()] == [mine]


def test_live_entries_come_sorted_by_key():
    kv = MemoryKV()
    for replica in ("r3", "r1", "r2"):
        announce(kv, replica=replica)
    assert [e.replica for e in Watcher(kv, "svc", clock=Clock()).live()] == ["r1", "r2", "r3"]


def test_worker_url_is_loopback_on_the_same_node_and_the_node_ip_otherwise():
    entry = WorkerEntry(key="k", group="g", deployment="d", replica="r", node_id="node-a", node_ip="10.0.0.7",
                        port=8123, seq=1)
    assert entry.url("node-a") == "http://127.0.0.1:8123"
    assert entry.url("node-b") == "http://10.0.0.7:8123"
    assert entry.url(None) == "http://10.0.0.7:8123"  # a reader that does not know its node


# --- Announcer -----------------------------------------------------------------------------------------------


@pytest.fixture
def fast_heartbeat(monkeypatch):
    monkeypatch.setattr(registry, "HEARTBEAT_S", 0.01)


def announcer(kv, healthy, **kw) -> Announcer:
    fields = dict(service="svc", group="workers", deployment="ServiceReplica-workers", replica="r1",
                  node_id="node-a", node_ip="10.0.0.1", port=8000)
    fields.update(kw)
    return Announcer(kv, healthy=healthy, logger=LOG, **fields)


KEY = registry.entry_key("svc", "ServiceReplica-workers", "r1")


def test_announcer_writes_its_entry_with_a_moving_seq_while_healthy(fast_heartbeat):
    kv = MemoryKV()

    async def scenario():
        a = announcer(kv, lambda: True)
        a.start()
        try:
            await until(lambda: (seq_of(kv, KEY) or 0) >= 3, what="three heartbeats")
        finally:
            await a.close()

    asyncio.run(scenario())
    assert kv.puts >= 3


def test_announcer_entry_is_what_a_watcher_reads(fast_heartbeat):
    kv = MemoryKV()

    async def scenario():
        a = announcer(kv, lambda: True, replica="r9", node_id="node-b", node_ip="10.9.9.9", port=8111)
        a.start()
        try:
            return await until(lambda: Watcher(kv, "svc").live(), what="the watcher to see the replica")
        finally:
            await a.close()

    (entry,) = asyncio.run(scenario())
    assert (entry.group, entry.deployment, entry.replica, entry.node_id, entry.port) == (
        "workers", "ServiceReplica-workers", "r9", "node-b", 8111)
    assert entry.url("node-a") == "http://10.9.9.9:8111"


def test_announcer_deletes_its_entry_when_unhealthy_and_writes_it_again_when_healthy(fast_heartbeat):
    kv = MemoryKV()
    state = {"healthy": True}

    async def scenario():
        a = announcer(kv, lambda: state["healthy"])
        a.start()
        try:
            await until(lambda: kv.get(KEY) is not None, what="the first announcement")
            state["healthy"] = False
            await until(lambda: kv.get(KEY) is None, what="the entry to be deleted")
            assert a.announced is False
            state["healthy"] = True
            await until(lambda: kv.get(KEY) is not None, what="the entry to come back")
        finally:
            await a.close()

    asyncio.run(scenario())
    assert KEY in kv.deleted


def test_announcer_that_was_never_healthy_writes_and_deletes_nothing(fast_heartbeat):
    kv = MemoryKV()
    calls = []

    async def scenario():
        a = announcer(kv, lambda: calls.append(1) or False)
        a.start()
        await until(lambda: len(calls) >= 5, what="five heartbeats")
        a._task.cancel()  # stop it without close(), which deletes on purpose

    asyncio.run(scenario())
    assert kv.puts == 0 and kv.deleted == []


def test_announcer_close_deletes_its_entry_and_stops(fast_heartbeat):
    kv = MemoryKV()

    async def scenario():
        a = announcer(kv, lambda: True)
        a.start()
        await until(lambda: kv.get(KEY) is not None, what="the first announcement")
        await a.close()
        assert kv.get(KEY) is None
        puts = kv.puts
        await asyncio.sleep(registry.HEARTBEAT_S * 20)  # a state that must last: nothing writes it again
        assert kv.get(KEY) is None and kv.puts == puts

    asyncio.run(scenario())


def test_announcer_keeps_beating_after_a_kv_error(fast_heartbeat, caplog):
    class FlakyKV(MemoryKV):
        failures = 2

        def put(self, key: str, value: bytes) -> None:
            if self.failures:
                self.failures -= 1
                raise ConnectionError("GCS unavailable")
            super().put(key, value)

    kv = FlakyKV()

    async def scenario():
        a = announcer(kv, lambda: True)
        a.start()
        try:
            await until(lambda: kv.get(KEY) is not None, what="an announcement after the failures")
        finally:
            await a.close()

    with caplog.at_level(logging.WARNING, logger=LOG.name):
        asyncio.run(scenario())
    assert kv.failures == 0
    assert sum("could not announce this replica to the router" in r.getMessage() for r in caplog.records) == 2


def test_announcer_close_during_a_write_leaves_no_entry(fast_heartbeat):
    entered, release = threading.Event(), threading.Event()

    class SlowPutKV(MemoryKV):
        def put(self, key: str, value: bytes) -> None:
            entered.set()
            release.wait(5)
            super().put(key, value)

    kv = SlowPutKV()

    async def scenario():
        a = announcer(kv, lambda: True)
        a.start()
        await asyncio.to_thread(entered.wait, 5)  # the first heartbeat's put is in its thread now
        await a.close()  # the replica stops: its entry must be gone for good
        release.set()
        await asyncio.sleep(0.2)

    asyncio.run(scenario())
    assert kv.get(KEY) is None
