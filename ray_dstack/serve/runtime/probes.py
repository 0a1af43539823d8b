"""dstack's HTTP probes for one replica: readiness before it takes traffic, health while it serves.

- Ready: every probe has answered 2xx `ready_after` times in a row. Until the first success a probe is
  retried every min(interval, 1 s), so a service that comes up early is noticed early; after that the
  successes are `interval` apart, as on dstack. The replica's constructor waits for this, so Serve sends no
  request to a replica that is not ready.
- Serving: each probe without `until_ready` keeps running every `interval` (from the end of one to the start of
  the next). After FAILURES_UNHEALTHY failures in a row `health_problem()` names the probe, the replica's
  `check_health` raises, and Serve, after its own 3 failed health checks in a row (`health_check_period_s`
  apart), stops routing to the replica and replaces it. One failure alone is not enough: a probe that times
  out once under a burst of traffic would otherwise cost a replica exactly when it is needed.
- State for `ray-dstack status` and `deploy`: whenever a probe's readiness or last answer changes, the replica
  logs one line `STATE_LOG_MARKER` + JSON (`as_dicts()`), and `status`/`deploy` read the last such line from the
  replica's log through the dashboard (ray_dstack/deploy/probe_state.py). The log is the one channel that also
  works while the replica's constructor still waits on the probes, when no method of the replica can be called.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from ray_dstack.spec import ProbeSpec

FAILURES_UNHEALTHY = 3
FIRST_SUCCESS_RETRY_S = 1.0
# Prefix of the log line that carries the probes' state (a JSON list of ProbeState.as_dict()).
STATE_LOG_MARKER = "ray-dstack probe state: "


class ProbeError(Exception):
    """The probes did not pass in time (the message carries each failing probe's last answer)."""


@dataclass
class ProbeState:
    spec: ProbeSpec
    successes: int = 0  # in a row
    failures: int = 0  # in a row
    last: str = "not probed yet"  # "HTTP 200", "HTTP 503", "timed out after 10s", "connection refused"
    last_at: float | None = None
    ever_ready: bool = False
    history: list[bool] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.successes >= self.spec.ready_after

    def describe(self) -> str:
        return f"{self.spec.method.upper()} {self.spec.path}"

    def as_dict(self) -> dict:
        return {
            "probe": self.describe(), "ready": self.ready, "successes": self.successes,
            "failures": self.failures, "last": self.last, "last_at": self.last_at,
            "active": not (self.spec.until_ready and self.ever_ready),
        }


class ProbeRunner:
    def __init__(self, probes: list[ProbeSpec], base_url: str, *, logger: logging.Logger | None = None,
                 client: httpx.AsyncClient | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.states = [ProbeState(p) for p in probes]
        self.logger = logger or logging.getLogger(__name__)
        self._client = client or httpx.AsyncClient()
        self._tasks: list[asyncio.Task] = []
        self._logged: list[tuple[bool, str]] | None = None

    async def probe(self, state: ProbeState) -> bool:
        spec = state.spec
        try:
            resp = await self._client.request(
                spec.method.upper(), self.base_url + spec.path, headers=spec.headers,
                content=spec.body.encode() if spec.body is not None else None, timeout=spec.timeout_s,
            )
            ok = 200 <= resp.status_code < 300
            answer = f"HTTP {resp.status_code}"
            if not ok:
                text = resp.text.strip().replace("\n", " ")
                answer += f": {text[:200]}" if text else ""
        except httpx.TimeoutException:
            ok, answer = False, f"timed out after {spec.timeout_s:g}s"
        except httpx.ConnectError:
            ok, answer = False, "connection refused"
        except httpx.HTTPError as exc:
            ok, answer = False, f"{type(exc).__name__}: {exc}".rstrip(": ")
        state.last, state.last_at = answer, time.time()
        if ok:
            state.successes, state.failures = state.successes + 1, 0
            if state.ready:
                state.ever_ready = True
        else:
            if state.failures == 0 and state.ever_ready:
                self.logger.warning("probe %s failed: %s", state.describe(), answer)
            state.successes, state.failures = 0, state.failures + 1
        self._log_state()
        return ok

    def _log_state(self) -> None:
        """One log line when what status shows changes (not on every probe: a steady state logs nothing)."""
        now = [(s.ready, s.last) for s in self.states]
        if now != self._logged:
            self._logged = now
            self.logger.info("%s%s", STATE_LOG_MARKER, json.dumps(self.as_dicts()))

    async def wait_ready(self, timeout_s: float, exited: Callable[[], str | None] = lambda: None) -> None:
        """Return once every probe is ready; raise ProbeError (last answers) when `timeout_s` runs out, or
        ProbeError with `exited()`'s text when the service's process ended meanwhile."""
        deadline = time.monotonic() + timeout_s
        next_at = {id(s): 0.0 for s in self.states}
        while True:
            now = time.monotonic()
            due = [s for s in self.states if not s.ready and next_at[id(s)] <= now]
            results = await asyncio.gather(*(self.probe(s) for s in due))
            now = time.monotonic()
            for state, ok in zip(due, results):
                wait = state.spec.interval_s if ok else min(state.spec.interval_s, FIRST_SUCCESS_RETRY_S)
                next_at[id(state)] = now + wait
            if all(s.ready for s in self.states):
                return
            why = exited()
            if why:
                raise ProbeError(why)
            if now >= deadline:
                raise ProbeError(f"probes not passing after {timeout_s:.0f}s: " + self.summary())
            pending = [next_at[id(s)] for s in self.states if not s.ready]
            await asyncio.sleep(max(0.0, min(min(pending), deadline) - now))

    def summary(self) -> str:
        return "; ".join(
            f"{s.describe()} last answered {s.last}" + (f" ({s.successes}/{s.spec.ready_after} successes)"
                                                         if s.successes else "")
            for s in self.states if not s.ready
        ) or "all passing"

    def start(self) -> None:
        """Keep probing (probes without `until_ready`) while the replica serves."""
        for state in self.states:
            if not state.spec.until_ready:
                self._tasks.append(asyncio.create_task(self._loop(state)))

    async def _loop(self, state: ProbeState) -> None:
        while True:
            await asyncio.sleep(state.spec.interval_s)
            try:
                await self.probe(state)
            except Exception as exc:  # noqa: BLE001 - a probe must never end the loop
                state.last = f"probe error: {exc!r}"

    def health_problem(self) -> str | None:
        """Why the replica should be replaced, or None."""
        failing = [s for s in self.states if s.failures >= FAILURES_UNHEALTHY and not s.spec.until_ready]
        if not failing:
            return None
        return "probes failing: " + "; ".join(
            f"{s.describe()} failed {s.failures} times in a row, last answered {s.last}" for s in failing)

    def as_dicts(self) -> list[dict]:
        return [s.as_dict() for s in self.states]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self._tasks.clear()
        await self._client.aclose()
