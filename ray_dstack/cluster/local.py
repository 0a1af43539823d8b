"""Finding the cluster to talk to, and starting a local Ray head when there is none."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from ray_dstack.cluster.dashboard import DEFAULT_DASHBOARD, ClusterError, DashboardClient

START_TIMEOUT_S = 120.0


def address_from_env() -> str | None:
    for var in ("RAY_DSTACK_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(var, "").strip()
        if value.startswith(("http://", "https://")):
            return value
    return None


def _ray_executable() -> str:
    beside = Path(sys.executable).parent / "ray"
    if beside.exists():
        return str(beside)
    found = shutil.which("ray")
    if not found:
        raise ClusterError("the `ray` command is not installed in this environment (pip install 'ray[serve]')")
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def start_local_head(dashboard_port: int = 8265) -> None:
    """`ray start --head` with the dashboard on loopback; the cluster outlives this command (`ray stop`)."""
    extra: list[str] = []
    # Another Ray on this machine (a driver's `ray.init`) may hold the agents' default ports; a node whose
    # agent cannot bind serves no logs, so take free ones then.
    if not _port_free(52365):
        extra += ["--dashboard-agent-listen-port", str(_free_port())]
    cmd = [
        _ray_executable(),
        "start",
        "--head",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard_port),
        "--disable-usage-stats",
        *extra,
    ]
    env = dict(os.environ)
    # Serve's HAProxy front end instead of its Python HTTP proxy: measured 3.6x the streamed tokens/s at
    # 64 streams and 2.8x the small-request rate on 2 cores (bench/RESULTS.md). Opt-in (RAY_DSTACK_HA_PROXY=1):
    # in Ray 2.60 `ray stop` leaves the haproxy process running on its fixed ports (8404, 9101), and the
    # next cluster's Serve then fails to start.
    if os.environ.get("RAY_DSTACK_HA_PROXY") == "1":
        env.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=START_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"`{' '.join(cmd)}` did not finish within {START_TIMEOUT_S:.0f}s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise ClusterError(f"starting a local Ray head failed (`{' '.join(cmd)}`):\n{tail}")


def connect(address: str | None, *, start_if_missing: bool, on_start=None) -> tuple[DashboardClient, bool]:
    """A client for the cluster at `address` (or the environment's, or a local one). Returns (client, started)."""
    address = address or address_from_env()
    if address:
        client = DashboardClient(address)
        if not client.ping():
            client.close()
            raise ClusterError(
                f"cannot reach the Ray dashboard at {client.address}: check the address "
                "(the head's dashboard, default port 8265) and that the cluster is up"
            )
        return client, False
    client = DashboardClient(DEFAULT_DASHBOARD)
    if client.ping():
        return client, False
    if not start_if_missing:
        client.close()
        raise ClusterError(
            f"no Ray cluster at {DEFAULT_DASHBOARD}: pass --address http://<head>:8265 (or set RAY_ADDRESS), "
            "or run `ray-dstack deploy` once to start a local one"
        )
    if on_start:
        on_start()
    start_local_head()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not client.ping():
        if time.monotonic() > deadline:
            raise ClusterError(f"a local Ray head was started but its dashboard never answered at {DEFAULT_DASHBOARD}")
        time.sleep(0.5)
    return client, True
