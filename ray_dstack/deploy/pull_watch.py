"""`deploy`'s side of an image pull's progress: the lines the replicas publish in Ray's internal KV
(ray_dstack/serve/runtime/pull_progress.py says why there and how), read on each poll of the wait loop.

One line per node when its pull's line changes, at most one every `MIN_INTERVAL_S` per node while it runs (a
runtime prints a line per layer step); the outcome ("pulled", "already on the node, reused", or the failure)
always. Best effort: a GCS `deploy` cannot reach costs the progress lines, never the deploy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ray_dstack.deploy.registry_auth import connect_gcs, gcs_address
from ray_dstack.errors import RayDstackError
from ray_dstack.spec import KV_NAMESPACE
from ray_dstack.serve.runtime.pull_progress import PullReport, service_prefix

MIN_INTERVAL_S = 2.0
TIMEOUT_S = 5


@dataclass
class _Shown:
    report: PullReport
    at: float


@dataclass
class PullWatch:
    """The service's pull progress entries, through a GCS client (`internal_kv_keys`/`multi_get`/`del`)."""

    gcs: object
    service: str
    clock: Callable[[], float] = time.monotonic
    min_interval_s: float = MIN_INTERVAL_S
    _shown: dict[str, _Shown] = field(default_factory=dict)
    _errors: int = 0

    @classmethod
    def connect(cls, dashboard_address: str, service: str) -> tuple[PullWatch | None, str | None]:
        """(watch, None), or (None, why not) when the GCS cannot be reached from here."""
        try:
            return cls(connect_gcs(gcs_address(dashboard_address), "show the image pull's progress"), service), None
        except RayDstackError as exc:
            return None, str(exc)

    def _keys(self) -> list[bytes]:
        return list(self.gcs.internal_kv_keys(service_prefix(self.service).encode(), KV_NAMESPACE, timeout=TIMEOUT_S))

    def clear(self) -> None:
        """Forget the service's entries: before a deploy submits (an earlier deploy's are stale) and after."""
        try:  # one call for all of them: delete by the service's prefix
            self.gcs.internal_kv_del(service_prefix(self.service).encode(), True, KV_NAMESPACE, timeout=TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a leftover entry is only replaced or cleared later
            pass

    def lines(self) -> list[str]:
        """The lines to print now (nodes in key order)."""
        if self._errors >= 3:  # the GCS went away: stop asking on every poll
            return []
        try:
            keys = self._keys()
            values = self.gcs.internal_kv_multi_get(keys, KV_NAMESPACE, timeout=TIMEOUT_S) if keys else {}
        except Exception:  # noqa: BLE001 - progress is a courtesy
            self._errors += 1
            return []
        out = []
        now = self.clock()
        for k in sorted(values):
            report = PullReport.decode(values[k])
            if report is None:
                continue
            node = k.decode(errors="replace")
            shown = self._shown.get(node)
            if shown is not None and (shown.report == report or (
                    not report.done and now - shown.at < self.min_interval_s)):
                continue
            self._shown[node] = _Shown(report, now)
            out.append(report.text())
        return out
