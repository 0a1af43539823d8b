"""The service's request counters, published by its ingress replicas for the groups that scale on them.

dstack scales every replica group on the service's request rate (with a router, every request reaches the
router). Serve's autoscaling sees only a deployment's own replicas, and a group behind the router (or beside
the ingress group of a service without one) takes no request from Serve. So each replica of the ingress
group puts its monotonic request count in Ray's internal KV every PUBLISH_S, under
`<SERVICE_COUNTERS_PREFIX><service>/<replica>`, and those groups' policy (autoscaling_policy.py with
`service_counters_prefix`) folds them into its window exactly as it folds its own replicas' counters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

from ray_dstack.serve.scaling.request_counter import RequestCounter
from ray_dstack.spec import KV_NAMESPACE, SERVICE_COUNTERS_PREFIX

PUBLISH_S = 1.0


def counters_prefix(service: str) -> str:
    return f"{SERVICE_COUNTERS_PREFIX}{service}/"


class CounterPublisher:
    def __init__(self, counter: RequestCounter, *, service: str, replica: str, logger: logging.Logger) -> None:
        self.counter = counter
        self.key = counters_prefix(service) + replica
        self.logger = logger
        self._task: asyncio.Task | None = None
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        while True:
            # Every round, changed or not: the time tells the policy this replica still runs.
            value = json.dumps({"total": self.counter.total(), "in_window": self.counter.requests_in_window(),
                                "time": time.time()}).encode()
            try:
                await asyncio.to_thread(self._put, _internal_kv_put, value)
            except Exception as exc:  # noqa: BLE001 - the GCS briefly away: the next round publishes it
                self.logger.warning("could not publish the request count for the groups' autoscaling: %s", exc)
            await asyncio.sleep(PUBLISH_S)

    def _put(self, put, value: bytes) -> None:
        with self._lock:  # a write already in its thread must not land after aclose()'s delete
            if not self._closed:
                put(self.key, value, True, namespace=KV_NAMESPACE)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        try:
            from ray.experimental.internal_kv import _internal_kv_del

            def withdraw() -> None:
                with self._lock:
                    self._closed = True
                    _internal_kv_del(self.key, namespace=KV_NAMESPACE)

            await asyncio.to_thread(withdraw)
        except Exception:  # noqa: BLE001 - the cluster is going away; the policy ignores it once stale
            pass
