"""Counters of the node's Serve HAProxy, read through its admin socket (`show stat`), for e2e tests.

HAProxy's counters start again at 0 in every process, and Serve reloads haproxy (a new process) whenever an
application's replicas change, so `RetrySampler` samples while a test runs and adds up the highest value seen
per process.
"""

from __future__ import annotations

import glob
import os
import threading

from ray_dstack.serve.ingress.v1_routes import HAProxyAdmin

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


def read(admin: HAProxyAdmin) -> tuple[int | None, dict[str, dict[str, str]]]:
    """(the answering haproxy's pid, `show stat`'s BACKEND rows by backend name), from one connection, so both
    come from the same process (Serve names an application's backend `http-<app>`)."""
    text = admin.command("show info;show stat")
    pid = next((int(line.split(":", 1)[1]) for line in text.splitlines() if line.startswith("Pid:")), None)
    return pid, {r["pxname"]: r for r in stat_rows(text) if r.get("svname") == "BACKEND"}


def stat_rows(text: str) -> list[dict[str, str]]:
    """The rows of `show stat`'s CSV in `text` (after its `# pxname,...` header), one dict per proxy/server."""
    if "# pxname" not in text:
        return []
    lines = text[text.index("# pxname"):].splitlines()
    header = lines[0].lstrip("# ").split(",")
    return [dict(zip(header, line.split(","))) for line in lines[1:] if line]


def fallback_addresses(admin: HAProxyAdmin, backend: str) -> list[str]:
    """`host:port` of each `backup` server of `backend`: Serve's own Python proxies, where HAProxy sends an
    application's requests while its replicas are marked down."""
    return sorted({r["addr"] for r in stat_rows(admin.command("show stat"))
                   if r.get("pxname") == backend and r.get("svname") != "BACKEND" and r.get("bck") == "1"})


def counters(admin: HAProxyAdmin, field: str, *backends: str) -> tuple[int | None, dict[str, int]]:
    pid, stats = read(admin)
    return pid, {b: int(stats.get(b, {}).get(field) or 0) for b in backends}


def mapped_models(admin: HAProxyAdmin) -> set[str]:
    """The models in the `/v1` map of the haproxy answering on `admin` (ray_dstack/serve/ingress/haproxy_v1.py)."""
    from ray_dstack.serve.ingress.haproxy_v1 import MAP_FILE_NAME

    path = os.path.join(os.path.dirname(admin.path), MAP_FILE_NAME)
    return {line.split()[1] for line in admin.command(f"show map {path}").splitlines() if len(line.split()) == 3}


class RetrySampler:
    """Retries (`wretr`) of one backend while the `with` block runs, over however many haproxy processes served
    (a process's counters are lost once it exits, so this is a lower bound)."""

    def __init__(self, backend: str, interval_s: float = 0.2) -> None:
        self.backend = backend
        self.interval_s = interval_s
        self._by_pid: dict[int, int] = {}
        self._base: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            pid, values = counters(live_admin(), "wretr", self.backend)
        except (OSError, AssertionError, ValueError):
            return
        if pid is not None:
            self._by_pid[pid] = max(self._by_pid.get(pid, 0), values[self.backend])

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
