"""End to end through the `ray-dstack` console script on a real local Ray that `deploy` starts itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import httpx
import pytest

from conftest import REPO, write_service

pytestmark = pytest.mark.slow

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def echo_service(python_exe: str, name: str, *, replicas: int = 1, extra: str = "") -> str:
    return f"""
type: service
name: {name}
commands:
  - exec {python_exe} -m tests.apps.echo_server --port $RAY_DSTACK_PORT
working_dir: {REPO}
port: 8000
replicas: {replicas}
probes:
  - type: http
    url: /health
{extra}
"""


def pid_of(cluster, name: str) -> int:
    resp = httpx.get(f"{cluster.http}/{name}/pid", headers=AUTH, timeout=10)
    resp.raise_for_status()
    return resp.json()["pid"]


def pid_set(cluster, name: str, expected: int) -> set[int] | None:
    pids = {pid_of(cluster, name) for _ in range(30)}
    return pids if len(pids) == expected else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting to be reaped is dead for our purposes
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except OSError:
        return False


def test_deploy_http_server_example_with_auth(cli_cluster):
    proc = cli_cluster.run("deploy", "configs/http-server.dstack.yml", "--token", TOKEN, timeout=400)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "is ready" in proc.stdout
    assert f"{cli_cluster.http}/http-server/" in proc.stdout
    # The token is the caller's: it is not echoed back.
    assert TOKEN not in proc.stdout + proc.stderr

    ok = httpx.get(f"{cli_cluster.http}/http-server/", headers=AUTH, timeout=10)
    assert ok.status_code == 200
    assert "Directory listing" in ok.text

    missing = httpx.get(f"{cli_cluster.http}/http-server/", timeout=10)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.get(f"{cli_cluster.http}/http-server/", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401

    status = cli_cluster.status("http-server")
    assert status["name"] == "http-server"
    assert status["status"] == "RUNNING"
    assert status["url"] == f"{cli_cluster.http}/http-server"
    assert status["replicas"]["running"] == 1 and status["replicas"]["target"] == 1
    assert status["model"] is None
    assert status["replicas"]["items"][0]["node_id"]

    listed = json.loads(cli_cluster.run("list", "--json", check=True).stdout)
    assert [s["name"] for s in listed] == ["http-server"]

    # Both use port 8000: free it for the open variant.
    deleted = cli_cluster.run("delete", "http-server", check=True)
    assert "Deleted http-server" in deleted.stdout
    assert json.loads(cli_cluster.run("list", "--json", check=True).stdout) == []


def test_auth_false_variant_is_open(cli_cluster):
    proc = cli_cluster.run("deploy", "configs/http-server-open.dstack.yml", timeout=300)
    assert proc.returncode == 0, proc.stderr
    resp = httpx.get(f"{cli_cluster.http}/http-server-open/", timeout=10)
    assert resp.status_code == 200 and "Directory listing" in resp.text
    cli_cluster.run("delete", "http-server-open", check=True)


def test_two_replicas_serve_and_a_killed_child_is_replaced(cli_cluster, tmp_path, python_exe):
    path = write_service(tmp_path, "echo", echo_service(python_exe, "echo", replicas=2))
    proc = cli_cluster.run("deploy", str(path), "--token", TOKEN, timeout=300)
    assert proc.returncode == 0, proc.stderr

    pids = cli_cluster.wait_until(lambda: pid_set(cli_cluster, "echo", 2), timeout=30, what="two distinct child pids")
    status = cli_cluster.status("echo")
    assert status["replicas"]["running"] == 2

    victim = sorted(pids)[0]
    os.kill(victim, signal.SIGKILL)
    # Serve's health check sees the dead child and replaces the replica.
    new_pids = cli_cluster.wait_until(
        lambda: (s := pid_set(cli_cluster, "echo", 2)) and victim not in s and s,
        timeout=120,
        interval=2,
        what="the killed replica to be replaced",
    )
    assert victim not in new_pids

    # The replica log carries the commands' output and is reachable through `logs`.
    logs = cli_cluster.run("logs", "echo", "-n", "200", check=True)
    assert "service commands started" in logs.stdout


def test_streamed_response_arrives_incrementally(cli_cluster):
    arrivals = []
    start = time.monotonic()
    with httpx.stream("GET", f"{cli_cluster.http}/echo/sse?n=5&delay=0.5", headers=AUTH, timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data:"):
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 5
    # Not buffered: the first event comes long before the last one is produced.
    assert arrivals[0] < 1.5
    assert arrivals[-1] - arrivals[0] >= 1.6


def test_request_body_and_method_forwarded_token_stripped(cli_cluster):
    body = "x" * 5000
    resp = httpx.put(f"{cli_cluster.http}/echo/echo?a=1", content=body, headers=AUTH, timeout=10)
    assert resp.status_code == 200
    got = resp.json()
    assert got["body"] == body and got["method"] == "PUT" and got["query"] == "a=1" and got["path"] == "/echo"
    assert got["authorization"] is None  # the service token is ray-dstack's, not the backend's
    assert got["x_forwarded_for"]


def test_failed_redeploy_keeps_the_old_version(cli_cluster, tmp_path):
    before = pid_of(cli_cluster, "echo")
    broken = write_service(
        tmp_path,
        "echo",
        """
type: service
name: echo
commands:
  - echo "about to fail"
  - exit 3
port: 8000
""",
    )
    proc = cli_cluster.run("deploy", str(broken), "--timeout", "240", timeout=400)
    assert proc.returncode != 0
    assert "exited with code 3" in proc.stderr
    assert "about to fail" in proc.stderr
    assert "previous version keeps serving" in proc.stderr
    assert "Traceback" not in proc.stderr
    cli_cluster.wait_until(lambda: cli_cluster.status("echo")["status"] == "RUNNING", timeout=120, what="rollback")
    assert pid_of(cli_cluster, "echo") > 0
    assert before > 0


def test_commands_that_exit_at_once_leave_nothing(cli_cluster, tmp_path):
    path = write_service(
        tmp_path,
        "crash",
        """
type: service
commands:
  - echo "no such model" >&2
  - exit 7
port: 8000
""",
    )
    proc = cli_cluster.run("deploy", str(path), "--timeout", "240", timeout=400)
    assert proc.returncode == 1
    assert "exited with code 7" in proc.stderr and "no such model" in proc.stderr, proc.stderr  # whole, not cut
    assert "Nothing was left deployed" in proc.stderr
    names = [s["name"] for s in json.loads(cli_cluster.run("list", "--json", check=True).stdout)]
    assert "crash" not in names


def test_gpu_service_on_cpu_cluster_fails_naming_the_gpu(cli_cluster, tmp_path):
    path = write_service(
        tmp_path,
        "needs-gpu",
        """
type: service
commands:
  - python3 -m http.server 8000
port: 8000
resources:
  gpu: 24GB
""",
    )
    start = time.monotonic()
    proc = cli_cluster.run("deploy", str(path), "--timeout", "180", timeout=300)
    assert proc.returncode == 1
    assert time.monotonic() - start < 170
    err = proc.stderr
    assert "GPU" in err
    assert "no GPU" in err  # the nodes present are described
    names = [s["name"] for s in json.loads(cli_cluster.run("list", "--json", check=True).stdout)]
    assert "needs-gpu" not in names


def test_no_child_survives_delete_and_ray_stop(cli_cluster):
    pids = {pid_of(cli_cluster, "echo") for _ in range(20)}
    assert pids
    cli_cluster.run("delete", "echo", check=True)
    cli_cluster.wait_until(lambda: not any(alive(p) for p in pids), timeout=30, what="children to exit on delete")

    # Again with `ray stop` while a service runs.
    def http_servers() -> set[int]:
        out = subprocess.run(["pgrep", "-f", "m http.server"], capture_output=True, text=True).stdout
        return {int(p) for p in out.split()}

    before = http_servers()
    path = REPO / "configs" / "http-server-open.dstack.yml"
    cli_cluster.run("deploy", str(path), check=True, timeout=300)
    started = http_servers() - before
    assert started, "the http.server child should be running"
    from conftest import ray_stop

    ray_stop(cli_cluster.env)
    cli_cluster.wait_until(
        lambda: not any(alive(p) for p in started), timeout=30, what="no http.server left after ray stop"
    )
