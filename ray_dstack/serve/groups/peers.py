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
B = TypeVar("B")


class PeerPool(Generic[B]):
    def __init__(self, watcher: Watcher, *, node_id: str | None, make: Callable[[str], B],
                 close: Callable[[B], Awaitable[None]], logger: logging.Logger, interval_s: float = REFRESH_S,
                 rng: random.Random | None = None) -> None:
        self.watcher = watcher
        self.node_id = node_id
        self.make = make
        self.close = close
        self.logger = logger
        self.interval_s = interval_s
        self.rng = rng or random.Random()
        self.backends: dict[str, B] = {}
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
        urls = {entry.url(self.node_id) for entry in entries}
        for url in sorted(urls - set(self.backends)):
            self.backends[url] = self.make(url)
            self.logger.info("another group's replica takes this service's traffic too: %s", url)
        for url in sorted(set(self.backends) - urls):
            backend = self.backends.pop(url)
            self.logger.info("another group's replica left: %s", url)
            await self.close(backend)

    def choose(self, own: B) -> B:
        if not self.backends:
            return own
        return self.rng.choice([own, *self.backends.values()])

    def describe(self) -> dict[str, Any]:
        return {"peers": sorted(self.backends)}

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for backend in self.backends.values():
            await self.close(backend)
        self.backends.clear()
