"""Counters of the node's Serve HAProxy, read through its admin socket (`show stat`), for e2e tests.

HAProxy's counters start again at 0 in every process, and Serve reloads haproxy (a new process) whenever an
application's replicas change, so `RetrySampler` samples while a test runs and adds up the highest value seen
per process.
"""

from __future__ import annotations

import glob
import os
import threading

from ray_dstack.serve.v1_routes import HAProxyAdmin

SOCKETS = "/tmp/haproxy-serve/*/admin.sock"


def live_admin() -> HAProxyAdmin:
    """The admin socket a running haproxy answers on (the most recently created one that does)."""
    for path in sorted(glob.glob(SOCKETS), key=os.path.getmtime, reverse=True):
        admin = HAProxyAdmin(path, timeout=2)
        try:
            if admin.pid():
                return admin
        except OSError:
            continue
    raise AssertionError(f"no haproxy answers on {SOCKETS}")


def backend_stats(admin: HAProxyAdmin) -> dict[str, dict[str, str]]:
    """`show stat`'s BACKEND rows by backend name (Serve names an application's backend `http-<app>`)."""
    lines = admin.command("show stat").splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = (dict(zip(header, line.split(","))) for line in lines[1:] if line)
    return {r["pxname"]: r for r in rows if r.get("svname") == "BACKEND"}


def counter(admin: HAProxyAdmin, backend: str, field: str) -> int:
    return int(backend_stats(admin).get(backend, {}).get(field) or 0)


class RetrySampler:
    """Retries (`wretr`) of one backend while the `with` block runs, over however many haproxy processes served."""

    def __init__(self, backend: str, interval_s: float = 0.2) -> None:
        self.backend = backend
        self.interval_s = interval_s
        self._by_pid: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            admin = live_admin()
            pid = admin.pid()
            value = counter(admin, self.backend, "wretr")
        except (OSError, AssertionError, ValueError):
            return
        if pid is not None:
            self._by_pid[pid] = max(self._by_pid.get(pid, 0), value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> RetrySampler:
        self._sample()
        self._base = dict(self._by_pid)  # counted before the block: not ours
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def retries(self) -> int:
        return sum(v - self._base.get(pid, 0) for pid, v in self._by_pid.items())
