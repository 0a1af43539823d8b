"""Ready worker replicas of a service, announced in Ray's internal KV (namespace `ray-dstack`).

A worker replica (a group behind the service's router) writes `groups/<service>/<deployment>/<replica>` once
its probes passed and rewrites it every HEARTBEAT_S with a new sequence number; it deletes the key when it
stops, fails its health check or is drained. A reader takes an entry as live while its sequence number moved
within STALE_S of the reader's own clock (nodes' clocks need not agree), so a replica killed outright (its
actor, its node) drops out within STALE_S. Serve's controller knows its replicas too, but only a replica
knows when its service passed its probes and at which address a router on another node reaches it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ray_dstack.spec import KV_NAMESPACE

KEY_PREFIX = "groups/"
HEARTBEAT_S = 0.5
STALE_S = 2.0
FORGET_S = 60.0  # an entry stale this long (its replica was killed outright) is deleted by the reader


def service_prefix(service: str) -> str:
    return f"{KEY_PREFIX}{service}/"


def entry_key(service: str, deployment: str, replica: str) -> str:
    return f"{service_prefix(service)}{deployment}/{replica}"


@dataclass(frozen=True)
class WorkerEntry:
    """One announced replica: where a router reaches its service."""

    key: str
    group: str
    deployment: str
    replica: str
    node_id: str
    node_ip: str
    port: int
    seq: int

    def url(self, from_node_id: str | None) -> str:
        """The worker's base URL as seen from a replica on `from_node_id` (loopback on the same node)."""
        host = "127.0.0.1" if from_node_id is not None and from_node_id == self.node_id else self.node_ip
        return f"http://{host}:{self.port}"


class KV:
    """Ray's internal KV in ray-dstack's namespace (blocking calls: run them off the event loop)."""

    def put(self, key: str, value: bytes) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(key, value, overwrite=True, namespace=KV_NAMESPACE)

    def delete(self, key: str) -> None:
        from ray.experimental.internal_kv import _internal_kv_del

        _internal_kv_del(key, namespace=KV_NAMESPACE)

    def list(self, prefix: str) -> dict[str, bytes]:
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

        out: dict[str, bytes] = {}
        for key in _internal_kv_list(prefix, namespace=KV_NAMESPACE):
            name = key.decode() if isinstance(key, bytes) else key
            value = _internal_kv_get(name, namespace=KV_NAMESPACE)
            if value is not None:
                out[name] = value
        return out

    def get(self, key: str) -> bytes | None:
        from ray.experimental.internal_kv import _internal_kv_get

        return _internal_kv_get(key, namespace=KV_NAMESPACE)


class Announcer:
    """A worker replica's heartbeat: its entry exists while `healthy()` says so, and is gone after `close()`."""

    def __init__(self, kv: KV, *, service: str, group: str, deployment: str, replica: str, node_id: str,
                 node_ip: str, port: int, healthy: Callable[[], bool], logger: logging.Logger) -> None:
        self.kv = kv
        self.key = entry_key(service, deployment, replica)
        self.fields: dict[str, Any] = {"group": group, "deployment": deployment, "replica": replica,
                                       "node_id": node_id, "node_ip": node_ip, "port": port}
        self.healthy = healthy
        self.logger = logger
        self.seq = 0
        self.announced = False
        self._task: asyncio.Task | None = None
        # A write already in its thread when close() runs must not land after close()'s delete.
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            try:
                if self.healthy():
                    self.seq += 1
                    value = json.dumps({**self.fields, "seq": self.seq}).encode()
                    await asyncio.to_thread(self._put, value)
                    self.announced = True
                elif self.announced:  # failing: the router drops it now, Serve replaces it soon
                    await asyncio.to_thread(self.kv.delete, self.key)
                    self.announced = False
            except Exception as exc:  # noqa: BLE001 - the GCS briefly away: try again on the next beat
                self.logger.warning("could not announce this replica to the router: %s", exc)
            await asyncio.sleep(HEARTBEAT_S)

    def _put(self, value: bytes) -> None:
        with self._lock:
            if not self._closed:
                self.kv.put(self.key, value)

    def _withdraw(self) -> None:
        with self._lock:
            self._closed = True
            self.kv.delete(self.key)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        try:
            await asyncio.to_thread(self._withdraw)
        except Exception:  # noqa: BLE001 - the cluster is going away; readers drop it after STALE_S
            pass


class Watcher:
    """The live entries of a service's worker groups, as one reader sees them."""

    def __init__(self, kv: KV, service: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.kv = kv
        self.prefix = service_prefix(service)
        self.clock = clock
        self._seen: dict[str, tuple[int, float]] = {}  # key -> (seq, when the reader saw it change)

    def live(self) -> list[WorkerEntry]:
        now = self.clock()
        entries = []
        raw = self.kv.list(self.prefix)
        for key, value in raw.items():
            try:
                data = json.loads(value)
                entry = WorkerEntry(key=key, group=str(data["group"]), deployment=str(data["deployment"]),
                                    replica=str(data["replica"]), node_id=str(data["node_id"]),
                                    node_ip=str(data["node_ip"]), port=int(data["port"]), seq=int(data["seq"]))
            except (ValueError, KeyError, TypeError):
                continue
            seq, since = self._seen.get(key, (-1, now))
            if entry.seq != seq:
                self._seen[key] = (entry.seq, now)
                since = now
            if now - since <= STALE_S:
                entries.append(entry)
            elif now - since > FORGET_S:
                self.kv.delete(key)
        for key in set(self._seen) - set(raw):
            del self._seen[key]
        return sorted(entries, key=lambda e: e.key)
