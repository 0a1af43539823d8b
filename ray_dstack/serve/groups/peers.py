"""A service with several groups and no router (dstack: every ready replica of every group takes traffic).

Serve's HTTP proxy sends a service's requests to one deployment, the ingress group's; the other groups'
replicas announce themselves while ready (registry.py) and each ingress replica spreads its requests at
random over its own model server and theirs, as dstack's in-server proxy does (`random.choice` over the
service's registered replicas, whatever their group). A request still makes one Python hop: the ingress
replica relays it to one model server, its own or another group's, with the same auth, limits and metrics.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, Awaitable, Callable, Generic, TypeVar

from ray_dstack.serve.groups.registry import Watcher

REFRESH_S = 1.0
# A peer that left is chosen no more at once, but requests already on its way keep its connections: its client
# is closed this much later (past `deploy --request-timeout`'s default).
RETIRE_S = 660.0
B = TypeVar("B")


class PeerPool(Generic[B]):
    def __init__(self, watcher: Watcher, *, node_id: str | None, make: Callable[[str], B],
                 close: Callable[[B], Awaitable[None]], logger: logging.Logger, interval_s: float = REFRESH_S,
                 rng: random.Random | None = None, own_deployment: str | None = None,
                 retire_s: float = RETIRE_S) -> None:
        """`own_deployment`: the ingress group's deployment; its replicas announce themselves too, so that each
        one knows how many share the traffic (see choose())."""
        self.watcher = watcher
        self.node_id = node_id
        self.make = make
        self.close = close
        self.logger = logger
        self.interval_s = interval_s
        self.rng = rng or random.Random()
        self.backends: dict[str, B] = {}
        self.own_deployment = own_deployment
        self.ingress_replicas = 1
        self.retire_s = retire_s
        self._retiring: dict[asyncio.Task, B] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - the GCS briefly away: keep the last known peers
                self.logger.warning("could not read the other groups' replicas: %s", exc)
            await asyncio.sleep(self.interval_s)

    async def refresh(self) -> None:
        entries = await asyncio.to_thread(self.watcher.live)
        ingress = [e for e in entries if e.deployment == self.own_deployment]
        self.ingress_replicas = max(1, len(ingress))
        urls = {entry.url(self.node_id) for entry in entries if entry.deployment != self.own_deployment}
        for url in sorted(urls - set(self.backends)):
            self.backends[url] = self.make(url)
            self.logger.info("another group's replica takes this service's traffic too: %s", url)
        for url in sorted(set(self.backends) - urls):
            backend = self.backends.pop(url)
            self.logger.info("another group's replica left: %s", url)
            task = asyncio.get_running_loop().create_task(self._retire(backend))
            self._retiring[task] = backend
            task.add_done_callback(lambda done: self._retiring.pop(done, None))

    async def _retire(self, backend: B) -> None:
        await asyncio.sleep(self.retire_s)
        await self.close(backend)

    def choose(self, own: B) -> B:
        """Every ready replica of every group equally likely, as dstack's proxy picks: HAProxy gives this
        replica 1/N of the traffic (N ingress replicas), so it keeps N/(N+M) of it for its own model server
        and spreads the rest over the M other replicas."""
        if not self.backends:
            return own
        n, m = self.ingress_replicas, len(self.backends)
        if self.rng.random() < n / (n + m):
            return own
        return self.rng.choice(list(self.backends.values()))

    def describe(self) -> dict[str, Any]:
        return {"peers": sorted(self.backends)}

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        retiring = list(self._retiring.items())
        self._retiring.clear()
        for task, backend in retiring:  # the replica is going away: nothing waits for them any more
            task.cancel()
            await self.close(backend)
        for backend in self.backends.values():
            await self.close(backend)
        self.backends.clear()
