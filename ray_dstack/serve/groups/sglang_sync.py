"""The router replica owns its SGLang router's worker list (dstack's `router_worker_sync.py`, spec §1.6).

Every SYNC_S the router replica compares the router's `GET /workers` with the live announcements of the
service's worker replicas (registry.py): a worker not listed is added with `POST /workers {url, worker_type}`
(202 `accepted`; SGLang's router applies it in the background, so a worker posted less than REPOST_S ago is
not posted again), a listed worker that is not live is removed with `DELETE /workers/<id>` (the id from the
listing: the router refuses a URL there). `worker_type` comes from the worker's `GET /server_info`
(`disaggregation_mode: prefill|decode`, with `disaggregation_bootstrap_port` for prefill, as dstack reads it);
a worker without it (vLLM, llama.cpp, any OpenAI server) is `regular`. ray-dstack's list is the truth: anything
else the router lists is removed. The router is asked from the start (its probes may need workers to pass),
and until it answers, `last_error` says why, for `status` and `deploy`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import httpx

from ray_dstack.serve.groups.registry import Watcher

SYNC_S = 1.0
# Logged with the sync's state (describe()) whenever it changes: `status` reads the router replica's log for it,
# as it reads the probes' state (ray_dstack/deploy/probe_state.py), since Serve lets nobody call a replica
# whose constructor has not returned.
STATE_LOG_MARKER = "ray-dstack router state: "
REPOST_S = 15.0
# After the sync changed the router's list, and while a worker it deleted is still listed (for at most
# FOLLOW_UP_FOR_S), the next sync comes this soon, so the logged state (what `status` shows) catches up with
# the change at once rather than a whole SYNC_S later. A DELETE still listed is sent again at most every
# REDELETE_S: the router drains a removed worker in the background, and a second DELETE removes a dead one.
FOLLOW_UP_S = 0.25
FOLLOW_UP_FOR_S = 5.0
REDELETE_S = 1.0
TIMEOUT_S = 10.0  # dstack's timeout for the router's API
SERVER_INFO_TIMEOUT_S = 3.0


def normalized(url: str) -> str:
    return url.strip().rstrip("/")


class SglangWorkerSync:
    def __init__(self, router: httpx.AsyncClient, watcher: Watcher, *, node_id: str | None, logger: logging.Logger,
                 interval_s: float = SYNC_S) -> None:
        self.router = router  # the router's own port (base_url), the way the replica reaches its process
        self.workers_client = httpx.AsyncClient(timeout=SERVER_INFO_TIMEOUT_S, trust_env=False)
        self.watcher = watcher
        self.node_id = node_id
        self.logger = logger
        self.interval_s = interval_s
        self.listed: list[dict[str, Any]] = []  # the router's workers at the last sync
        self.last_error: str | None = None
        self.last_sync: float | None = None
        self._posted: dict[str, float] = {}
        self._deleted: dict[str, tuple[float, float]] = {}  # url → (first, last DELETE) while the router lists it
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        logged = None
        while True:
            changed = False
            try:
                changed = await self.sync_once()
                self.last_error = None
            except Exception as exc:  # noqa: BLE001 - reported in status; tried again next time
                message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, SyncError) else str(exc)
                if message != self.last_error:
                    self.logger.warning("SGLang router worker sync: %s", message)
                self.last_error = message
            state = json.dumps(self.describe(), sort_keys=True)
            if state != logged:
                self.logger.info("%s%s", STATE_LOG_MARKER, state)
                logged = state
            await asyncio.sleep(min(self.interval_s, FOLLOW_UP_S) if changed else self.interval_s)

    async def sync_once(self) -> bool:
        """One comparison of the router's list with the live workers; True when it asked the router to change,
        or a worker it deleted less than FOLLOW_UP_FOR_S ago is still listed (the next sync should come soon)."""
        entries = await asyncio.to_thread(self.watcher.live)
        desired = {normalized(e.url(self.node_id)): e for e in entries}
        try:
            answer = await self.router.get("/workers")
        except httpx.HTTPError as exc:
            raise SyncError(f"the router does not answer GET /workers yet ({type(exc).__name__}: {exc})") from None
        if answer.status_code != 200:
            raise SyncError(f"the router answered GET /workers with {answer.status_code}: {answer.text[:200]}")
        try:
            listed = answer.json()["workers"]
            by_url = {normalized(str(w["url"])): w for w in listed}
        except (ValueError, KeyError, TypeError):
            raise SyncError(f"the router's GET /workers is not SGLang's {{\"workers\": [...]}}: {answer.text[:200]}") from None
        now = time.monotonic()
        problems = []
        changed = False
        for url in desired:
            if url in by_url:
                self._posted.pop(url, None)
                continue
            if now - self._posted.get(url, -REPOST_S) < REPOST_S:
                continue
            body = {"url": url, **await self._worker_type(url)}
            added = await self.router.post("/workers", json=body)
            if added.status_code != 202:
                problems.append(f"POST /workers {url} answered {added.status_code}: {added.text[:200]}")
                continue
            self._posted[url] = now
            changed = True
            self.logger.info("SGLang router: added worker %s (%s)", url, body["worker_type"])
        for url, worker in by_url.items():
            if url in desired:
                continue
            first, last = self._deleted.get(url, (now, -REDELETE_S))
            if now - first < FOLLOW_UP_FOR_S:
                changed = True  # still listed: look again soon
            if now - last < REDELETE_S:
                continue
            removed = await self.router.delete(f"/workers/{worker.get('id')}")
            self._deleted[url] = (first, now)  # refused or not: tried again after REDELETE_S
            if removed.status_code != 202:
                problems.append(f"DELETE /workers/{worker.get('id')} ({url}) answered {removed.status_code}")
                continue
            changed = True
            self.logger.info("SGLang router: removed worker %s", url)
        for url in set(self._posted) - set(desired):
            del self._posted[url]
        for url in set(self._deleted) - set(by_url):
            del self._deleted[url]
        self.listed = [{"url": u, "worker_type": w.get("worker_type"), "healthy": w.get("is_healthy")}
                       for u, w in sorted(by_url.items())]
        self.last_sync = time.time()
        if problems:
            raise SyncError("; ".join(problems))
        return changed

    async def _worker_type(self, url: str) -> dict[str, Any]:
        try:
            info = (await self.workers_client.get(f"{url}/server_info")).json()
        except (httpx.HTTPError, ValueError):
            return {"worker_type": "regular"}
        mode = info.get("disaggregation_mode") if isinstance(info, dict) else None
        if mode == "prefill":
            port = info.get("disaggregation_bootstrap_port")
            return {"worker_type": "prefill", **({"bootstrap_port": port} if isinstance(port, int) else {})}
        if mode == "decode":
            return {"worker_type": "decode"}
        return {"worker_type": "regular"}

    def describe(self) -> dict[str, Any]:
        return {"type": "sglang", "workers": self.listed, "last_error": self.last_error,
                "adding": sorted(self._posted)}

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        await self.router.aclose()
        await self.workers_client.aclose()


class SyncError(Exception):
    pass
