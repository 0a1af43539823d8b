"""A simulated multi-node GPU cluster on one machine, for end-to-end placement tests.

`ray.cluster_utils.Cluster` runs several raylets on this machine: a CPU head (with the dashboard, which
`ray-dstack` talks to) and worker nodes that *declare* GPUs they do not have. Each GPU worker gets what a
real node of its type has on a `ray up cluster.yaml` cluster:

- `GPU: N` (Ray would detect it with NVML; here `num_gpus=N` declares it),
- the node label `ray.io/accelerator-type: <T>` (Ray sets it itself from NVML on a real GPU; cluster.yaml
  sets it explicitly, which is the only way to tell A100-40G from A100-80G),
- the resource `accelerator_type:<T>: 1` (likewise: auto-detected on real GPUs, set by cluster.yaml).

Ray hands out fake GPU ids (0..N-1) exactly as it does real ones, so a replica with `num_gpus: 2` gets
`CUDA_VISIBLE_DEVICES=0,1`.

Every port is chosen free (several engineers run Ray on this machine), nothing is written to the default
`ray start` address file for good (it is restored on teardown), and the cluster is torn down by killing
the processes it started: never `ray stop`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from conftest import POLL_ERRORS, free_port, wait_until

REPO = Path(__file__).resolve().parent.parent.parent
BIN = Path(sys.executable).parent
ACCEL_LABEL = "ray.io/accelerator-type"
RAY_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")

# name -> (accelerator type as labelled on the node, GPUs): "A10G 24 GB x1", "A100 80 GB x2", "L4 24 GB x1".
GPU_NODES: dict[str, tuple[str, int]] = {
    "a10g": ("A10G", 1),
    "a100": ("A100-80G", 2),
    "l4": ("L4", 1),
}


def run_cli(args: tuple[str, ...], *, dashboard: str, env: dict[str, str], deploy_flags: list[str],
            timeout: float, check: bool) -> subprocess.CompletedProcess:
    """The `ray-dstack` console script against the cluster whose dashboard is `dashboard`."""
    cmd = [str(BIN / "ray-dstack"), *args]
    if args[0] != "plan":  # the only command that needs no cluster
        cmd += ["--address", dashboard]
    if args[0] == "deploy":
        cmd += deploy_flags
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


class RequestLoop:
    """GETs `url` every 50 ms from a thread while in the `with` block; `results` holds
    (seconds taken, ok, what) per request, `what` being `describe(response)` or the error."""

    def __init__(self, url: str, describe: Callable[[httpx.Response], str], *, timeout: float = 5.0) -> None:
        self.url, self.describe, self.timeout = url, describe, timeout
        self.results: list[tuple[float, bool, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout) as client:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    resp = client.get(self.url)
                    ok = resp.status_code == 200
                    what = self.describe(resp) if ok else f"HTTP {resp.status_code}: {resp.text[:200]}"
                except (httpx.HTTPError, ValueError) as exc:
                    ok, what = False, f"{exc.__class__.__name__}: {exc}"
                self.results.append((time.monotonic() - t0, ok, what))
                time.sleep(0.05)

    def __enter__(self) -> RequestLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout * 3)

    def wait_for_results(self, n: int, timeout: float = 30.0) -> None:
        """Block until `n` more requests have finished (whatever their outcome)."""
        target = len(self.results) + n
        wait_until(lambda: len(self.results) >= target, timeout=timeout, interval=0.05,
                   what=f"{n} more requests to finish")

    def failed(self, since: int = 0) -> list[tuple[float, bool, str]]:
        return [r for r in self.results[since:] if not r[1]]

    def hung(self) -> bool:
        """Did any request run into the client timeout?"""
        return any("Timeout" in what for _, _, what in self.results)


def info_service_yaml(name: str, workdir: Path, *, gpu: str, replicas: int, port: int | None,
                      bind: str | None = "127.0.0.1") -> str:
    """A service whose child serves `info.json`: its pid, the addresses of the host it runs on, and the
    CUDA_VISIBLE_DEVICES its replica got. `port=None`: the commands use $RAY_DSTACK_PORT; a number is a fixed
    port (the commands never mention $RAY_DSTACK_PORT, so the plan sets `max_replicas_per_node: 1`)."""
    listen = "$RAY_DSTACK_PORT" if port is None else str(port)
    commands = [
        'd="$PWD/r$$"',
        'mkdir -p "$d"',
        "printf '{\"pid\": %s, \"ips\": \"%s\", \"cuda\": \"%s\"}' \"$$\" \"$(hostname -I)\" "
        "\"${CUDA_VISIBLE_DEVICES-unset}\" > \"$d/info.json\"",
        f'exec "{sys.executable}" -m http.server {listen}' + (f" --bind {bind}" if bind else "") + ' --directory "$d"',
    ]
    lines = "\n".join(f"  - {json.dumps(c)}" for c in commands)
    return (
        f"type: service\nname: {name}\ncommands:\n{lines}\nworking_dir: {workdir}\n"
        f"port: {port or 8000}\nreplicas: {replicas}\nauth: false\nresources:\n  gpu: {gpu}\n"
    )


def gpu_node_args(accel: str, gpus: int, *, num_cpus: float = 1) -> dict[str, Any]:
    """`Cluster.add_node` arguments for a worker that looks like a real `accel` GPU node."""
    return {
        "num_cpus": num_cpus,
        "num_gpus": gpus,
        "labels": {ACCEL_LABEL: accel},
        "resources": {f"accelerator_type:{accel}": 1},
        "metrics_export_port": free_port(),
        "metrics_agent_port": free_port(),
        "runtime_env_agent_port": free_port(),
        "object_store_memory": 80 * 1024 * 1024,
    }


@dataclass
class SimCluster:
    cluster: Any  # ray.cluster_utils.Cluster
    dashboard: str
    http_port: int
    env: dict[str, str]
    nodes: dict[str, Any] = field(default_factory=dict)  # name -> ray._private.node.Node
    children: set[int] = field(default_factory=set)  # pids of service processes the tests talked to
    lost_children: set[int] = field(default_factory=set)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    # --- the console script ---------------------------------------------------------------------------

    def run(self, *args: str, timeout: float = 180, check: bool = False) -> subprocess.CompletedProcess:
        flags = ["--http-port", str(self.http_port), "--http-host", "127.0.0.1"]
        return run_cli(args, dashboard=self.dashboard, env=self.env, deploy_flags=flags, timeout=timeout, check=check)

    def status(self, name: str) -> dict:
        return json.loads(self.run("status", name, "--json", check=True).stdout)

    def services(self) -> list[str]:
        return [s["name"] for s in json.loads(self.run("list", "--json", check=True).stdout)]

    def delete(self, name: str) -> None:
        if name in self.services():
            self.run("delete", name, check=True, timeout=120)

    # --- nodes ----------------------------------------------------------------------------------------

    def node_id(self, name: str) -> str:
        return self.nodes[name].node_id

    def kind_of(self, node_id: str | None) -> str | None:
        """The name ("head", "a10g", ...) of the node with this id."""
        for name, node in self.nodes.items():
            if node.node_id == node_id:
                return name
        return None

    def add_gpu_node(self, name: str, accel: str, gpus: int) -> Any:
        node = self.cluster.add_node(**gpu_node_args(accel, gpus))
        self.nodes[name] = node
        return node

    def kill_node(self, name: str) -> None:
        """Kill a worker node's processes without a graceful shutdown (like a machine that dies)."""
        node = self.nodes.pop(name)
        self.cluster.remove_node(node, allow_graceful=False)

    def reap_children(self) -> list[int]:
        """Kill the service processes (ours: `http.server` children seen by the tests) still running."""
        leaked = []
        for pid in sorted(self.children):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"http.server" in cmdline:
                leaked.append(pid)
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        return leaked

    def wait_until(self, predicate, timeout: float = 60, interval: float = 0.5, what: str = "condition"):
        return wait_until(predicate, timeout=timeout, interval=interval, what=what, retry_on=(*POLL_ERRORS, KeyError))


def start_sim_cluster(home: Path) -> SimCluster:
    """Head (1 CPU, no GPU, dashboard) + the GPU workers of `GPU_NODES` (1 CPU each)."""
    from ray.cluster_utils import Cluster

    dash_port = free_port()
    head_args = {
        "num_cpus": 1,
        "num_gpus": 0,
        "include_dashboard": True,
        "dashboard_host": "127.0.0.1",
        "dashboard_port": dash_port,
        "gcs_server_port": free_port(),
        "dashboard_agent_listen_port": free_port(),
        "metrics_export_port": free_port(),
        "metrics_agent_port": free_port(),
        "runtime_env_agent_port": free_port(),
        "object_store_memory": 80 * 1024 * 1024,
    }
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    env = dict(os.environ)
    for var in ("RAY_ADDRESS", "RAY_DSTACK_ADDRESS", "RAY_DSTACK_TOKEN"):
        env.pop(var, None)
    env["RAY_DSTACK_HOME"] = str(home)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # These tests place fixed-port replicas one per node (the fallback where nodes lack pasta).
    env["RAY_DSTACK_NETWORK_NAMESPACES"] = "off"
    sim = SimCluster(cluster=cluster, dashboard=f"http://127.0.0.1:{dash_port}", http_port=free_port(), env=env)
    sim.nodes["head"] = cluster.head_node
    try:
        for name, (accel, gpus) in GPU_NODES.items():
            sim.add_gpu_node(name, accel, gpus)
        from ray_dstack.deploy.dashboard import DashboardClient

        with DashboardClient(sim.dashboard, timeout_s=10) as client:
            sim.wait_until(client.ping, timeout=60, what="the dashboard")
            sim.wait_until(
                lambda: sum(n.get("state") == "ALIVE" for n in client.nodes()) == len(sim.nodes),
                timeout=60,
                what="all nodes to register",
            )
    except BaseException:
        cluster.shutdown()
        raise
    return sim


class AddressFileGuard:
    """`Cluster()` records its head in /tmp/ray/ray_current_cluster, where a bare `ray.init()` of anyone on
    this machine would find it; put the previous content back afterwards."""

    def __init__(self) -> None:
        try:
            self.previous: str | None = RAY_ADDRESS_FILE.read_text()
        except OSError:
            self.previous = None

    def restore(self) -> None:
        try:
            if self.previous is None:
                RAY_ADDRESS_FILE.unlink(missing_ok=True)
            else:
                RAY_ADDRESS_FILE.write_text(self.previous)
        except OSError:
            pass
