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
        self._last: tuple[int, int] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        while True:
            now = (self.counter.total(), self.counter.requests_in_window())
            if now != self._last:
                value = json.dumps({"total": now[0], "in_window": now[1]}).encode()
                try:
                    await asyncio.to_thread(_internal_kv_put, self.key, value, True, namespace=KV_NAMESPACE)
                    self._last = now
                except Exception as exc:  # noqa: BLE001 - the GCS briefly away: the next round publishes it
                    self.logger.warning("could not publish the request count for the groups' autoscaling: %s", exc)
            await asyncio.sleep(PUBLISH_S)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        try:
            from ray.experimental.internal_kv import _internal_kv_del

            await asyncio.to_thread(_internal_kv_del, self.key, namespace=KV_NAMESPACE)
        except Exception:  # noqa: BLE001 - the cluster is going away
            pass
