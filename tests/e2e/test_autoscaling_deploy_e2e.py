"""`scaling: {metric: rps}` end to end: services deployed with `ray-dstack deploy` follow dstack's rule
(one replica per `target` requests per second) through Serve's own autoscaler, down to zero and back."""

from __future__ import annotations

import sys
import time

import httpx
import pytest

from conftest import REPO, steady_load, write_service

pytestmark = pytest.mark.slow


def scaling_service(name: str, replicas: str, target: float) -> str:
    return f"""
type: service
name: {name}
commands:
  - exec {sys.executable} -m tests.apps.echo_server --port $RAY_DSTACK_PORT
working_dir: {REPO}
port: 8000
auth: false
replicas: {replicas}
scaling:
  metric: rps
  target: {target}
  window: 4s
  scale_up_delay: 1s
  scale_down_delay: 3s
"""


def replicas(cluster, name: str) -> tuple[int, int]:
    status = cluster.status(name)
    return status["replicas"]["running"], status["replicas"]["target"]


def test_load_at_3x_target_scales_1_to_3_and_back(cli_cluster, tmp_path):
    path = write_service(tmp_path, "scale", scaling_service("scale", "1..3", target=2))
    proc = cli_cluster.run("deploy", str(path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert replicas(cli_cluster, "scale") == (1, 1)

    # 7 requests/s on a fixed schedule: 3.5x the target, i.e. 3 replicas after clipping to max
    with steady_load(f"{cli_cluster.http}/scale/pid", rate=7.0) as sent:
        cli_cluster.wait_until(lambda: replicas(cli_cluster, "scale") == (3, 3), timeout=60, what="3 replicas")
        status = cli_cluster.status("scale")
        assert status["scaling"]["min"] == 1 and status["scaling"]["max"] == 3
        assert status["scaling"]["desired"] == 3
        # The measured RPS (exported by the replicas through Ray's metrics) shows in `status`.
        measured = cli_cluster.wait_until(
            lambda: (rps := cli_cluster.status("scale")["scaling"]["measured_rps"]) and rps > 1 and rps,
            timeout=40,
            what="measured rps in status",
        )
        assert 1 < measured < 12
    assert sent and all(code == 200 for code in sent)
    cli_cluster.wait_until(lambda: replicas(cli_cluster, "scale") == (1, 1), timeout=60, what="back to 1 replica")
    cli_cluster.run("delete", "scale", check=True)


def test_idle_service_scales_to_zero_and_a_request_wakes_it(cli_cluster, tmp_path):
    path = write_service(tmp_path, "idle", scaling_service("idle", "0..2", target=5))
    proc = cli_cluster.run("deploy", str(path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    cli_cluster.wait_until(lambda: replicas(cli_cluster, "idle") == (0, 0), timeout=60, what="zero replicas")

    start = time.monotonic()
    resp = httpx.get(f"{cli_cluster.http}/idle/pid", timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.json()["pid"] > 0
    cold_start = time.monotonic() - start
    assert cold_start < 120
    assert replicas(cli_cluster, "idle")[0] >= 1
    cli_cluster.run("delete", "idle", check=True)
