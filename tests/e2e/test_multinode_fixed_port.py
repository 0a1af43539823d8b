"""A `replicas: 2` service with a FIXED port on two nodes, both serving through the one Serve HTTP address.

Raylets that share this machine's loopback cannot run two children listening on the same port, so this test
gives every node a host of its own: each raylet runs in its own network namespace (tests/support/netns.py) with
its own address on a private bridge, like machines on a LAN. The head (CPU only, dashboard, Serve
controller) is `10.213.N.1`; two workers that look like "A10G 24 GB x1" machines are `.2` and `.3`. The
cluster is started the way `ray up` starts one: `ray start --head` / `ray start --address`, Ray token
auth on, and `ray-dstack` drives it from outside over the bridge.

The service's commands are what a user writes for a fixed-port server: `python -m http.server 8000` on all
interfaces. Each child serves a file naming its pid and its host's addresses, so requests through the
head's Serve HTTP address show that both nodes' children answer.

Run under the machine-wide lock: `flock /tmp/ray-e2e.lock python -m pytest tests/e2e/test_multinode_fixed_port.py`.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.multinode import RequestLoop, info_service_yaml, run_cli
from tests.support.netns import Host, NetnsLab
from conftest import POLL_ERRORS, REPO, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BIN = Path(sys.executable).parent
SERVE_HTTP_PORT = 8100  # ray-dstack's default: the service's own 8000 stays free on every node
SERVICE_PORT = 8000
OBJECT_STORE = str(80 * 1024 * 1024)


@dataclass
class LanCluster:
    lab: NetnsLab
    head: Host
    workers: dict[str, Host]
    env: dict[str, str]

    @property
    def dashboard(self) -> str:
        return f"http://{self.head.ip}:8265"

    @property
    def http(self) -> str:
        return f"http://{self.head.ip}:{SERVE_HTTP_PORT}"

    def run(self, *args: str, timeout: float = 180, check: bool = False) -> subprocess.CompletedProcess:
        flags = ["--http-host", "0.0.0.0"]
        return run_cli(args, dashboard=self.dashboard, env=self.env, deploy_flags=flags, timeout=timeout, check=check)

    def status(self, name: str) -> dict:
        return json.loads(self.run("status", name, "--json", check=True).stdout)

    def host_of_ip(self, ip: str | None) -> str | None:
        for host in self.lab.hosts.values():
            if host.ip == ip:
                return host.name
        return None


def ray_start(lab: NetnsLab, host: Host, env: dict[str, str], root: Path, *args: str) -> None:
    # A temp dir per node: Ray's Unix sockets live in the file system, which the namespaces share.
    argv = [str(BIN / "ray"), "start", "--block", "--node-ip-address", host.ip, "--num-cpus", "1"]
    argv += ["--temp-dir", str(root / host.name), "--object-store-memory", OBJECT_STORE, *args]
    lab.popen(host, argv, env=env, log=root / f"{host.name}.log")


@pytest.fixture(scope="module")
def lan(tmp_path_factory):
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.fail("network namespaces need root and iproute2 (`ip`): this test builds its own hosts with them")
    root = Path(tempfile.mkdtemp(prefix="rdlan-"))  # short: Unix socket paths are limited to 107 bytes
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DSTACK_ADDRESS", "RAY_DSTACK_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    # One fixed-port replica per node, each node a host of its own: the fallback where nodes lack pasta.
    env["RAY_DSTACK_NETWORK_NAMESPACES"] = "off"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    lab = NetnsLab.create()
    try:
        head = lab.add_host("head")
        ray_start(lab, head, env, root, "--head", "--port", "6379", "--num-gpus", "0", "--dashboard-host", "0.0.0.0")
        workers = {}
        for name in ("a10g-1", "a10g-2"):
            workers[name] = host = lab.add_host(name)
            ray_start(
                lab, host, env, root, "--address", f"{head.ip}:6379", "--num-gpus", "1",
                "--labels", "ray.io/accelerator-type=A10G", "--resources", '{"accelerator_type:A10G": 1}',
            )  # fmt: skip
        env["RAY_DSTACK_HOME"] = str(tmp_path_factory.mktemp("ray-dstack-home"))
        cluster = LanCluster(lab=lab, head=head, workers=workers, env=env)

        from ray_dstack.deploy.dashboard import ClusterError, DashboardClient

        def all_alive() -> bool:
            with DashboardClient(cluster.dashboard, timeout_s=5, token=token.read_text()) as client:
                return sum(n.get("state") == "ALIVE" for n in client.nodes()) == 3

        wait_until(all_alive, timeout=90, interval=1, what="three nodes", retry_on=(*POLL_ERRORS, ClusterError))
        yield cluster
    finally:
        lab.teardown()  # kills every process in every namespace: raylets, replicas, service children
        shutil.rmtree(root, ignore_errors=True)


def fixed_port_service(name: str, workdir: Path) -> str:
    """What a user writes for a fixed-port server: `python -m http.server 8000` on all interfaces."""
    return info_service_yaml(name, workdir, gpu="24GB", replicas=2, port=SERVICE_PORT, bind=None)


def children_answering(lan: LanCluster, name: str, expected: int, tries: int = 60) -> dict[str, int]:
    """host name -> pid of the children answering behind the head's Serve HTTP address."""
    seen: dict[str, int] = {}
    with httpx.Client(timeout=5) as client:
        for _ in range(tries):
            resp = client.get(f"{lan.http}/{name}/info.json")
            resp.raise_for_status()
            data = resp.json()
            [ip] = data["ips"].split()
            seen[lan.host_of_ip(ip) or ip] = data["pid"]
            assert data["cuda"] == "0"
            if len(seen) == expected:
                break
    return seen


def running(status: dict) -> list[dict]:
    return [r for r in status["replicas"]["items"] if r["state"] == "RUNNING"]


# The two-node rate limit: rps and burst for the service as a whole, driven well above the rate for a window.
RL_RPS, RL_BURST, RL_REPLICAS = 10.0, 5, 2
RL_WINDOW_S, RL_CLIENTS, RL_CLIENT_RPS = 10.0, 4, 20.0  # 80 requests/s offered: 8x the limit


@dataclass
class Sent:
    sent: float  # client clock (time.monotonic), when the request left
    done: float
    status: int  # 0: no answer
    host: str | None  # the worker whose child answered a 200
    retry_after: str | None
    error_code: str | None


def drive(url: str, lan: LanCluster, start: float) -> list[Sent]:
    """RL_CLIENTS threads, each sending GETs at RL_CLIENT_RPS from `start` for RL_WINDOW_S (paced on the clock,
    a late request goes at once), every answer recorded with the client's timestamps."""
    out: list[Sent] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        mine: list[Sent] = []
        # Threads offset within one period, so the offered load is spread rather than in lockstep.
        due = start + i / (RL_CLIENT_RPS * RL_CLIENTS)
        with httpx.Client(timeout=10) as http:
            while due < start + RL_WINDOW_S:
                time.sleep(max(0.0, due - time.monotonic()))  # pacing to a schedule, not waiting on a condition
                t0 = time.monotonic()
                try:
                    resp = http.get(url)
                except httpx.HTTPError as exc:
                    mine.append(Sent(t0, time.monotonic(), 0, None, None, repr(exc)))
                else:
                    host = lan.host_of_ip(resp.json()["ips"].split()[0]) if resp.status_code == 200 else None
                    code = resp.json()["error"]["code"] if resp.status_code == 429 else None
                    mine.append(Sent(t0, time.monotonic(), resp.status_code, host, resp.headers.get("retry-after"), code))
                due += 1.0 / RL_CLIENT_RPS
        with lock:
            out.extend(mine)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(RL_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=RL_WINDOW_S + 60)
    return sorted(out, key=lambda r: r.sent)


def test_a_rate_limit_holds_for_the_service_across_two_nodes(lan, tmp_path):
    """docs/traffic.md, "Cluster-wide, and its tolerance": each of N replicas enforces rps/N and burst/N. With one
    replica per node and the requests spread over both by Serve, the service as a whole serves, in any window T
    from a fresh start, at most rps*T + burst + N (GCRA per replica: floor(T*rps/N + burst/N) + 1), and at least
    about rps*T while every replica is offered more than its share; each refusal is a 429 with Retry-After."""
    name = "limited"
    path = tmp_path / f"{name}.dstack.yml"
    limit = f"rate_limits:\n  - {{prefix: /, rps: {RL_RPS:g}, burst: {RL_BURST}}}\n"
    path.write_text(info_service_yaml(name, tmp_path, gpu="24GB", replicas=RL_REPLICAS, port=SERVICE_PORT, bind=None)
                    + limit)
    try:
        proc = lan.run("deploy", str(path))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        replicas = running(lan.status(name))
        assert sorted(lan.host_of_ip(r["node_ip"]) for r in replicas) == ["a10g-1", "a10g-2"], replicas

        # No request reached the service before: every replica's partition starts fresh at `start`.
        start = time.monotonic() + 0.2
        sent = drive(f"{lan.http}/{name}/info.json", lan, start)
    finally:
        lan.run("delete", name, timeout=120)  # the GPUs are the next test's

    n = RL_REPLICAS
    accepted = [r for r in sent if r.status == 200]
    refused = [r for r in sent if r.status == 429]
    others = [r for r in sent if r.status not in (200, 429)]
    # Every decision was made between `start` and the last answer; the lower bound uses the last request sent.
    span = max(r.done for r in sent) - start
    sending = max(r.sent for r in sent) - start
    per_node = {h: sum(r.host == h for r in accepted) for h in lan.workers}
    late = [r for r in accepted if r.sent >= start + RL_WINDOW_S / 2]
    steady = len(late) / (RL_WINDOW_S / 2)
    upper = RL_RPS * span + RL_BURST + n
    lower = 0.8 * RL_RPS * sending
    print(f"\nrate limit rps={RL_RPS:g} burst={RL_BURST} over {n} replicas on two nodes: offered "
          f"{len(sent) / RL_WINDOW_S:.1f} req/s for {RL_WINDOW_S:g} s; accepted {len(accepted)} "
          f"({len(accepted) / sending:.2f}/s over {sending:.2f} s; second half {steady:.2f}/s vs rps {RL_RPS:g}), "
          f"refused {len(refused)}, other {len(others)}; bounds [{lower:.1f}, {upper:.1f}]; per node {per_node}; "
          f"first second {sum(r.sent < start + 1 for r in accepted)} accepted")
    assert not others, others[:5]
    assert len(sent) / RL_WINDOW_S >= 3 * RL_RPS, "the clients did not drive the service well above its limit"
    assert lower <= len(accepted) <= upper
    # Each replica enforces its share (rps/N, burst/N), and the proxy gave both enough to use it.
    for host, count in per_node.items():
        assert RL_RPS / n * 0.5 * sending <= count <= RL_RPS / n * span + RL_BURST / n + 1, (host, count)
    # A refusal waits at most one of a replica's intervals (N/rps): Retry-After is whole seconds, at least 1.
    assert refused and all(r.error_code == "rate_limit_exceeded" for r in refused)
    assert {r.retry_after for r in refused} == {str(max(1, math.ceil(n / RL_RPS)))}


def test_fixed_port_replicas_run_on_two_nodes_and_both_serve(lan, tmp_path):
    path = tmp_path / "fixed.dstack.yml"
    path.write_text(fixed_port_service("fixed", tmp_path))
    plan = json.loads(lan.run("plan", str(path), "--json", check=True).stdout)
    assert "max_replicas_per_node" in json.dumps(plan)  # a fixed port: one replica per node

    proc = lan.run("deploy", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "is ready" in proc.stdout

    status = lan.status("fixed")
    replicas = running(status)
    assert len(replicas) == 2
    assert sorted(lan.host_of_ip(r["node_ip"]) for r in replicas) == ["a10g-1", "a10g-2"]
    assert {r["node_accelerator_type"] for r in replicas} == {"A10G"}

    # Both children listen on port 8000 of their own host, and Serve's one address reaches both.
    answering = children_answering(lan, "fixed", 2)
    assert sorted(answering) == ["a10g-1", "a10g-2"], answering
    for name, host in lan.workers.items():
        direct = httpx.get(f"http://{host.ip}:{SERVICE_PORT}/info.json", timeout=5).json()
        assert direct["pid"] == answering[name]


def test_losing_one_of_the_two_nodes_keeps_the_service_answering(lan, tmp_path):
    """Power off a2's whole host (every process in its namespace): requests keep being answered by the
    other node's child; none hangs."""
    status = lan.status("fixed")
    assert len(running(status)) == 2
    lost = "a10g-2"

    with RequestLoop(f"{lan.http}/fixed/info.json", lambda resp: resp.json()["ips"].strip(), timeout=10) as loop:
        loop.wait_for_results(10)
        lan.workers[lost].kill_everything()
        wait_until(
            lambda: [lan.host_of_ip(r["node_ip"]) for r in running(lan.status("fixed"))] == ["a10g-1"],
            timeout=90,
            interval=1,
            what="the lost node's replica to be gone",
        )
        loop.wait_for_results(20)  # the last ten checked below all ran after the replica was gone

    results, failed = loop.results, loop.failed()
    print(f"\nwhile a node died: {len(results) - len(failed)} ok, {len(failed)} failed; "
          f"errors: {sorted({w for *_, w in failed})[:5]}")
    assert not loop.hung(), "a request hung until the client timeout"
    assert len(failed) <= 0.2 * len(results), failed[:5]
    assert all(r[1] for r in results[-10:])
    assert {w for _, good, w in results[-10:] if good} == {lan.workers["a10g-1"].ip}
    lan.run("delete", "fixed", check=True, timeout=120)
