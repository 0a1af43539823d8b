"""An image pull's progress, from the replica that pulls to the `deploy` that waits (images are gigabytes).

The replica pulls in its constructor, where Serve reports nothing but "STARTING", and `deploy` cannot call a
replica that is still being constructed. So the replica publishes its pull's latest line in Ray's internal KV
(namespace `ray-dstack`, the one `registry_auth` travels through) under one key per service and node,
`pull-progress/<service>/<node id>`: several replicas pulling on one node share it (they pull the same image;
the runtime downloads each layer once). `deploy` clears the service's keys before it submits, reads them on
each poll of its wait loop and prints a line per node when it changes (ray_dstack/deploy/pull_watch.py), and
clears them when it is done; `delete` clears them too. Nothing secret goes in: the lines are scrubbed of the
registry password before they get here (ray_dstack.serve.runtime.container.pull).

Publishing is best effort: a KV write that fails never fails the pull or the replica.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ray_dstack.spec import KV_NAMESPACE

KEY_PREFIX = "pull-progress/"
MIN_INTERVAL_S = 1.0  # at most one KV write per second per replica while the pull runs; the last always goes
MAX_LINE = 300  # a runtime's line can be long (a layer digest plus an error); the KV is no log


def service_prefix(service: str) -> str:
    return f"{KEY_PREFIX}{service}/"


def key(service: str, node_id: str) -> str:
    return f"{service_prefix(service)}{node_id}"


@dataclass(frozen=True)
class PullReport:
    """What one node's pull looks like now, as `deploy` prints it."""

    image: str
    node: str  # the node's name (its hostname, as in the replica's error messages)
    line: str  # the runtime's latest line; once `done` the outcome (failed: the whole error, image and node named)
    done: bool = False
    failed: bool = False

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, raw: bytes) -> PullReport | None:
        try:
            data = json.loads(raw)
            return cls(image=str(data["image"]), node=str(data["node"]), line=str(data["line"]),
                       done=bool(data.get("done")), failed=bool(data.get("failed")))
        except (ValueError, KeyError, TypeError):
            return None  # another version's entry, or not ours: not worth failing a deploy over

    def text(self) -> str:
        if self.failed:
            return self.line
        return f"pulling {self.image} on {self.node}: {self.line}"


def _kv_put(k: str, value: bytes) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(k, value, overwrite=True, namespace=KV_NAMESPACE)


def _node_id() -> str:
    import ray

    if not ray.is_initialized():  # get_runtime_context() would start a local Ray outside a worker
        raise RuntimeError("not in a Ray worker: no node id")
    return ray.get_runtime_context().get_node_id()


class Publisher:
    """The replica's side: `line()` for each line the runtime prints (throttled), `finish()` once."""

    def __init__(self, service: str, image: str, node: str, *, node_id: str | None = None,
                 put: Callable[[str, bytes], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 min_interval_s: float | None = None) -> None:
        self.image, self.node = image, node
        self._put = put or _kv_put
        self._clock = clock
        self._min_interval_s = MIN_INTERVAL_S if min_interval_s is None else min_interval_s
        self._last_put: float | None = None
        self._failed_writes = 0
        self._pending: str | None = None
        self._timer: threading.Timer | None = None
        self._finished = False
        self._lock = threading.Lock()
        try:
            self._key = key(service, node_id or _node_id())
        except Exception:  # noqa: BLE001 - outside a Ray worker: nothing to publish to
            self._key = None

    def line(self, text: str) -> None:
        text = text.strip()
        if not text:
            return
        with self._lock:
            now = self._clock()
            wait = 0.0 if self._last_put is None else self._min_interval_s - (now - self._last_put)
            if wait > 0:
                # Throttled: the latest line goes out when the interval is over (lines come in bursts, one
                # per layer, then nothing for minutes while the layers download: the burst's last must show).
                self._pending = text
                if self._timer is None:
                    self._timer = threading.Timer(wait, self._flush)
                    self._timer.daemon = True
                    self._timer.start()
                return
            self._last_put = now
            self._publish(PullReport(self.image, self.node, text[:MAX_LINE]))

    def _flush(self) -> None:
        with self._lock:
            self._timer = None
            text, self._pending = self._pending, None
            if text is None or self._finished:
                return
            self._last_put = self._clock()
            self._publish(PullReport(self.image, self.node, text[:MAX_LINE]))

    def finish(self, outcome: str, *, failed: bool = False) -> None:
        with self._lock:
            self._finished = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._publish(PullReport(self.image, self.node, outcome.strip()[:MAX_LINE], done=True, failed=failed))

    def _publish(self, report: PullReport) -> None:
        # Under the lock: a delayed line must never land after the outcome.
        if self._key is None or self._failed_writes >= 3:  # the KV is unreachable: stop trying, keep pulling
            return
        try:
            self._put(self._key, report.encode())
        except Exception:  # noqa: BLE001 - progress is a courtesy; the pull goes on without it
            self._failed_writes += 1
