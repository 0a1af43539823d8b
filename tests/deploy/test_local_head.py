"""The environment `deploy` starts a local Ray head with (ray_dstack/deploy/local.py)."""

from __future__ import annotations

import os
import subprocess

import pytest

from ray_dstack.deploy.local import HAPROXY_WRAPPER, haproxy_wrapper_env


def test_serves_haproxy_is_started_through_ray_dstacks_wrapper():
    path = haproxy_wrapper_env()["RAY_SERVE_HAPROXY_BINARY_PATH"]
    assert os.path.basename(path) == HAPROXY_WRAPPER and os.access(path, os.X_OK)
    # The wrapper hands its arguments to Ray's haproxy: `-v` prints haproxy's version.
    out = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "HAProxy version" in out.stdout, out.stdout + out.stderr


# The smallest machine the local head is for: a 2-core laptop or CI box (issue: 4 idle services filled it).
LAPTOP_CPUS = 2


def test_the_local_head_advertises_the_machines_cores(monkeypatch):
    """`deploy` starts the head without `--num-cpus`/`--resources`: Ray advertises the machine's cores, so a
    `cpu: N` in a YAML is a hard request against real cores (`cpu: 4` does not fit a 2-core laptop)."""
    from ray_dstack.deploy import local

    seen: list[list[str]] = []

    def fake_run(cmd, **kw):
        seen.append(list(cmd))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(local.subprocess, "run", fake_run)
    monkeypatch.setattr(local, "reap_orphaned_haproxy", lambda: [])
    local.start_local_head()
    [cmd] = seen
    assert cmd[1:3] == ["start", "--head"]
    assert not any(a.startswith(("--num-cpus", "--resources", "--num-gpus")) for a in cmd), cmd


def _requested_cpus(config: dict) -> float:
    """CPUs a merged Serve config reserves when every deployment runs its (minimum) replicas."""
    total = 0.0
    for app in config["applications"]:
        for dep in app["deployments"]:
            count = dep.get("num_replicas")
            if count is None or count == "auto":
                count = dep["autoscaling_config"]["min_replicas"]
            total += float((dep.get("ray_actor_options") or {}).get("num_cpus", 1)) * count
    return total


def test_a_laptops_local_head_holds_12_idle_services_beside_the_demo_model():
    """12 one-replica services without `cpu`, the demo model (`cpu: 1..`) and the /v1 gateway: what the merged
    Serve config `deploy` sends reserves at most the 2 CPUs a 2-core laptop's head advertises. With the old
    0.5 default the 5th service did not fit."""
    from ray_dstack.config import load_service, parse_service
    from ray_dstack.deploy import apps
    from ray_dstack.plan import build_plan, defaults
    from tests.config.test_configs_examples import CONFIGS, placeholder_env

    applications = {}
    for i in range(1, 13):
        text = (f"type: service\nname: svc{i}\nauth: false\n"
                "commands: ['python3 -m http.server $RAY_DSTACK_PORT']\nport: 8000\n")
        p = build_plan(parse_service(text, f"svc{i}.dstack.yml"))
        assert p.ray_actor_options == {"num_cpus": defaults.DEFAULT_NUM_CPUS}
        applications[p.name] = p.application()
    [demo_path] = [c for c in CONFIGS if c.name == "local-chat.dstack.yml"]
    demo = build_plan(load_service(demo_path, environ=placeholder_env(demo_path)), token_sha256="ab" * 32)
    assert demo.ray_actor_options["num_cpus"] == 1  # explicit `cpu: 1..` stays a hard request
    applications[demo.name] = demo.application()
    details = {
        "http_options": {"host": "127.0.0.1", "port": 8100},
        "applications": {
            n: {"status": "RUNNING", "deployed_app_config": c, "deployments": {}} for n, c in applications.items()
        },
    }
    merged = apps.merged_config(details)
    assert {a["name"] for a in merged["applications"]} == {*applications, apps.GATEWAY_APP_NAME}
    total = _requested_cpus(merged)
    assert total == pytest.approx(12 * defaults.DEFAULT_NUM_CPUS + 1)  # the gateway requests no CPU
    assert total <= LAPTOP_CPUS, total
    # Without the model the same head holds 40 such services; Ray still counts them (the share is not 0).
    assert 40 * defaults.DEFAULT_NUM_CPUS <= LAPTOP_CPUS and defaults.DEFAULT_NUM_CPUS > 0
