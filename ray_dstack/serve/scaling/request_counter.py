"""Per-replica request counting for dstack's `scaling: {metric: rps}`.

One `RequestCounter` lives in each `ServiceReplica`. It counts the requests the replica answered, the way
dstack's gateway counted them from nginx's access log: one count per request, **once its status code is
known**, ignoring 401/403/404 (dstack ignored 403/404; ray-dstack also ignores 401, its own auth answer).

Design: count at completion (when the status is known), not at entry
-----------------------------------------------------------------
The replica calls `record(status_code)` exactly once per request, at the moment the response status is
known (when it starts sending the response: for a streamed response that is when the headers go out, not
when the stream ends). A request that fails before any status exists is recorded with its error status (e.g.
`record(502)`) or `record()` (`None` counts). There is no `unrecord()`: undoing a count after its frame has
left the window cannot be done correctly, and nginx's access log (what dstack read) also logged a request at
completion. Waking a service from zero replicas does not depend on this count: Serve scales 0 → N as soon as
a request is queued at a proxy/handle (see `policy.py`).

Frames
------
Counts go into 1-second frames kept in a ring buffer of `ceil(window_s)` slots: `record()` is O(1), memory is
fixed. `requests_in_window()` sums the frames of the last `ceil(window_s)` seconds (the current, partial
second included), so `rps = requests_in_window / window_s` is dstack's `requests / window`.

What reaches the autoscaler
---------------------------
`stats()` is what the deployment's `record_autoscaling_stats()` returns (see `METRIC_*` in `policy.py`):

- `ray_dstack_requests_total`: a monotonic count since the replica started. The policy turns the increase of
  this counter between two reports into its own 1-second frames, kept in the controller, so requests served
  by a replica that has since stopped keep counting until they leave the window (dstack counted at the
  proxy, where replicas coming and going changed nothing).
- `ray_dstack_requests_in_window`, `ray_dstack_window_s`: this replica's own window, used by the policy only
  to seed its frames after the controller lost its state (restart or redeploy), and handy for debugging.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

# Keep in sync with ray_dstack/serve/scaling/autoscaling_policy.py (which must not import this package: it is pickled by
# value into the Serve controller).
METRIC_REQUESTS_TOTAL = "ray_dstack_requests_total"
METRIC_REQUESTS_IN_WINDOW = "ray_dstack_requests_in_window"
METRIC_WINDOW_S = "ray_dstack_window_s"
METRIC_ENGINE_IN_FLIGHT = "ray_dstack_engine_in_flight"  # added by a replica whose engine takes the engine path

IGNORED_STATUS_CODES = frozenset({401, 403, 404})


class RequestCounter:
    """Requests per 1-second frame over the last `window_s` seconds, plus a monotonic total.

    Thread-safe (sync Serve methods run in a thread pool). `clock` returns seconds; the default,
    `time.monotonic`, is right inside a replica; tests pass a fake one.
    """

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s!r}")
        self._window_s = float(window_s)
        self._clock = clock
        self._n = max(1, math.ceil(self._window_s))
        self._counts = [0] * self._n
        # The absolute second each slot currently holds; a slot holding an older second is stale.
        self._seconds: list[int | None] = [None] * self._n
        self._total = 0
        self._lock = threading.Lock()

    @property
    def window_s(self) -> float:
        return self._window_s

    @property
    def total(self) -> int:
        """Requests counted since this counter was created (never decreases)."""
        return self._total

    def record(self, status_code: int | None = None) -> bool:
        """Count one request whose response status is now known; False (not counted) for 401/403/404."""
        if status_code in IGNORED_STATUS_CODES:
            return False
        self.record_many(1)
        return True

    def record_many(self, count: int) -> None:
        """Count `count` requests answered in this second (also those counted elsewhere: HAProxy's, for the
        engine path)."""
        if count <= 0:
            return
        second = math.floor(self._clock())
        slot = second % self._n
        with self._lock:
            if self._seconds[slot] != second:
                self._seconds[slot] = second
                self._counts[slot] = 0
            self._counts[slot] += count
            self._total += count

    def requests_in_window(self) -> int:
        """Requests counted in the last `ceil(window_s)` 1-second frames, the current one included."""
        now = math.floor(self._clock())
        oldest = now - self._n + 1
        with self._lock:
            return sum(
                count
                for second, count in zip(self._seconds, self._counts)
                if second is not None and oldest <= second <= now
            )

    def rps(self) -> float:
        """This replica's requests per second over the window (dstack's `requests / window`)."""
        return self.requests_in_window() / self._window_s

    def stats(self) -> dict[str, float]:
        """The custom autoscaling metrics: return this from the deployment's `record_autoscaling_stats()`."""
        return {
            METRIC_REQUESTS_TOTAL: float(self._total),
            METRIC_REQUESTS_IN_WINDOW: float(self.requests_in_window()),
            METRIC_WINDOW_S: self._window_s,
        }
