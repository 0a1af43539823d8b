"""`rate_limits` and `probes` end to end through `ray-dstack deploy` on a real local Ray (one module, one Ray)."""

from __future__ import annotations

import time

import shutil
import sys

import httpx
import pytest

from conftest import BIN, REPO, write_service
from tests.support.haproxy_stats import fallback_addresses, live_admin, mapped_models

pytestmark = pytest.mark.slow
LOAD_S = 18


def service(python_exe: str, name: str, extra: str, server_args: str = "") -> str:
    return f"""
type: service
name: {name}
commands:
  - exec {python_exe} -m tests.apps.traffic_server --port $RAY_DSTACK_PORT {server_args}
working_dir: {REPO}
port: 8000
auth: false
{extra}
"""


LIMITED = """
probes:
  - type: http
    url: /probe
    method: post
    headers:
      - {name: X-Probe, value: secret}
    body: ping
    interval: 2
model: {name: limited-model, format: openai}
rate_limits:
  - {prefix: /, rps: 0.2, burst: 2}
  - {prefix: /open, rps: 1000, burst: 1000}
  - {prefix: /hdr, key: {type: header, header: X-Key}, rps: 0.2}
  - {prefix: /spoof, rps: 0.01}
  - {prefix: /fallback, rps: 0.01}
  - {prefix: /v1/completions, key: {type: header, header: X-Key}, rps: 0.01, burst: 1}
"""


@pytest.fixture(scope="module")
def limited(cli_cluster, tmp_path_factory):
    python_exe = shutil.which("python3", path=str(BIN)) or sys.executable
    path = write_service(tmp_path_factory.mktemp("limited"), "limited", service(python_exe, "limited", LIMITED))
    proc = cli_cluster.run("deploy", str(path), timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return f"{cli_cluster.http}/limited"


def test_429_past_the_rate_with_retry_after(limited):
    answers = [httpx.get(f"{limited}/a", timeout=10) for _ in range(8)]
    codes = [a.status_code for a in answers]
    assert codes[:3] == [200, 200, 200] and set(codes[3:]) == {429}, codes  # burst 2 + 1, then 1 per 5 s
    refused = answers[-1]
    assert int(refused.headers["Retry-After"]) >= 1
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    # A client cannot pick its own partition with X-Forwarded-For: nobody is a trusted proxy. (One request per
    # 100 s under /spoof, so no refill between the two however slow the machine is.)
    assert httpx.get(f"{limited}/spoof", timeout=10).status_code == 200
    spoofed = httpx.get(f"{limited}/spoof", headers={"X-Forwarded-For": "203.0.113.9"}, timeout=10)
    assert spoofed.status_code == 429, spoofed.text


def test_serves_own_proxy_believes_no_x_forwarded_for_either(limited):
    # HAProxy sends a request to Serve's Python proxy (its `backup` server) whenever its check marks the replica
    # down, as on a busy machine: the same client must land in the same partition there, whatever its header.
    proxies = fallback_addresses(live_admin(), "http-limited")
    assert proxies
    assert httpx.get(f"{limited}/fallback", timeout=10).status_code == 200
    for proxy in proxies:
        spoofed = httpx.get(f"http://{proxy}/limited/fallback", headers={"X-Forwarded-For": "203.0.113.9"},
                            timeout=10)
        assert spoofed.status_code == 429, (proxy, spoofed.text)


def test_v1_requests_for_the_model_share_the_services_budget(cli_cluster, limited):
    # The model's `/v1/completions` is the service's path `/v1/completions`: the same rule and the same partition
    # whether the client calls `/v1` or `/limited/v1` (HAProxy sends both to the service's replicas).
    # rps 0.01: no refill during the test however slow the machine is.
    # Once HAProxy's map has the model (requests the gateway routes are checked against its own budget).
    cli_cluster.wait_until(lambda: "limited-model" in mapped_models(live_admin()), timeout=30, interval=0.5,
                           what="the model in HAProxy's /v1 map")
    body = {"model": "limited-model", "prompt": "hi", "max_tokens": 2}
    key = {"X-Key": "carol"}
    via_v1 = [httpx.post(f"{cli_cluster.http}/v1/completions", json=body, headers=key, timeout=30) for _ in range(2)]
    assert [a.status_code for a in via_v1] == [200, 200], [a.text for a in via_v1]  # burst 1 + 1
    direct = httpx.post(f"{limited}/v1/completions", json=body, headers=key, timeout=30)
    assert direct.status_code == 429, direct.text
    refused = httpx.post(f"{cli_cluster.http}/v1/completions", json=body, headers=key, timeout=30)
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    other = httpx.post(f"{cli_cluster.http}/v1/completions", json=body, headers={"X-Key": "dave"}, timeout=30)
    assert other.status_code == 200, other.text  # another partition


def test_status_shows_each_replicas_probes(cli_cluster, limited):
    import json

    proc = cli_cluster.run("status", "limited", "--json", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    items = json.loads(proc.stdout)["replicas"]["items"]
    assert items and all(r["probes"][0]["probe"] == "POST /probe" and r["probes"][0]["ready"] for r in items), items
    assert items[0]["probes"][0]["last"] == "HTTP 200"
    text = cli_cluster.run("status", "limited", timeout=60).stdout
    assert "probes: ✓ POST /probe (HTTP 200)" in text, text


def test_longest_prefix_wins(limited):
    codes = [httpx.get(f"{limited}/open/x", timeout=10).status_code for _ in range(20)]
    assert codes == [200] * 20


def test_header_partitions(limited):
    a = [httpx.get(f"{limited}/hdr", headers={"X-Key": "alice"}, timeout=10).status_code for _ in range(3)]
    b = [httpx.get(f"{limited}/hdr", headers={"X-Key": "bob"}, timeout=10).status_code for _ in range(3)]
    assert a == [200, 429, 429] and b == [200, 429, 429]
    none1 = httpx.get(f"{limited}/hdr", timeout=10).status_code
    none2 = httpx.get(f"{limited}/hdr", timeout=10).status_code
    assert (none1, none2) == (200, 429)  # no header: one shared partition


def test_a_failing_probe_fails_the_deploy_with_its_last_answer(cli_cluster, python_exe, tmp_path):
    extra = "probes:\n  - {type: http, url: /fail, interval: 1, timeout: 2}\n"
    path = write_service(tmp_path, "failing", service(python_exe, "failing", extra))
    proc = cli_cluster.run("deploy", str(path), "--timeout", "30", timeout=200)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "GET /fail last answered HTTP 503: still warming up" in out, out
    cli_cluster.run("delete", "failing", timeout=120)


def test_a_loading_model_is_not_ready_before_it_answers(cli_cluster, python_exe, tmp_path):
    extra = "model: {name: slow-model, format: openai}\n"
    path = write_service(tmp_path, "slow", service(python_exe, "slow", extra, f"--load-s {LOAD_S}"))
    started = time.monotonic()
    proc = cli_cluster.run("deploy", str(path), timeout=300)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert took >= LOAD_S, f"deploy reported ready after {took:.1f}s, before the model loaded ({LOAD_S}s)"
    reply = httpx.post(f"{cli_cluster.http}/v1/chat/completions", timeout=30,
                       json={"model": "slow-model", "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "hi"
    cli_cluster.run("delete", "slow", timeout=120)
