"""Faults on a real local Ray, through the `ray-dstack` console script and the `/v1` gateway.

One `format: tgi` service (`tests/apps/faulty_server.py`, 2 replicas, `--request-timeout 3`) is deployed once
for the module; the tests inject faults through prompt markers and by killing processes, in this order:
garbage from the backend, a backend that never answers, the backend killed mid-stream, a replica killed
under load, a rolling redeploy under load, a failed redeploy under load. See tests/README.md.
"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

from conftest import write_service
from tests.apps.faulty_server import Load, chat, service_yaml

pytestmark = pytest.mark.slow

TOKEN = "faults-token-0123456789abcdef"
MODEL = "acme/faulty"
NAME = "flaky"
REQUEST_TIMEOUT_S = 3


def deploy(cluster, path, *extra: str, timeout: float = 300):
    return cluster.run("deploy", str(path), "--token", TOKEN, "--request-timeout", str(REQUEST_TIMEOUT_S),
                       *extra, timeout=timeout)


@pytest.fixture(scope="module")
def svc(cli_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    path = write_service(tmp, NAME, service_yaml(NAME, model=MODEL, replicas=2))
    proc = deploy(cli_cluster, path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    cli_cluster.tmp = tmp
    return cli_cluster


@pytest.fixture
def client():
    with httpx.Client(trust_env=False) as c:
        yield c


def v1(cluster) -> str:
    return f"{cluster.http}/v1"


def ask(cluster, client, content: str, *, stream: bool, timeout: float = 30.0):
    return chat(client, v1(cluster), TOKEN, MODEL, content, stream=stream, timeout=timeout)


def replicas_healthy(cluster, n: int = 2) -> bool:
    s = cluster.status(NAME)
    return s["status"] == "RUNNING" and s["replicas"]["running"] == n and len(s["replicas"]["items"]) == n


def backend_stats(cluster, client) -> dict[int, dict]:
    """`/stats` of every replica's backend (by pid), reached through the service's own route."""
    seen: dict[int, dict] = {}
    for _ in range(30):
        r = client.get(f"{cluster.http}/{NAME}/stats", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        r.raise_for_status()
        seen[r.json()["pid"]] = r.json()
        if len(seen) == 2:
            break
    return seen


def backend_stats_or_none(cluster, client) -> set[int]:
    try:
        return set(backend_stats(cluster, client))
    except httpx.HTTPError:
        return set()


def assert_clean_failure(o, what: str) -> None:
    """A failed request failed properly: promptly, with an HTTP 5xx and a message (or an SSE error event)."""
    assert o.exception is None or o.exception == "RemoteProtocolError" and o.stream, f"{what}: {o}"
    assert o.elapsed < 30, f"{what}: took {o.elapsed:.1f}s"
    assert o.error, f"{what}: no error message: {o}"
    if o.status != 200:
        assert o.status is not None and 500 <= o.status < 600, f"{what}: {o}"


def test_garbage_from_the_backend_is_502_with_a_message(svc, client):
    for stream in (False, True):
        o = ask(svc, client, "[[garbage]] hi", stream=stream)
        assert o.status == 502, o
        assert "TGI backend" in o.error and ("invalid JSON" in o.error or "Invalid event" in o.error), o
    assert ask(svc, client, "hi", stream=False).ok


def test_slow_backend_times_out_with_504_and_the_upstream_request_is_cancelled(svc, client):
    before = sum(s["cancelled"] for s in backend_stats(svc, client).values())
    for stream in (False, True):
        o = ask(svc, client, "[[hang]] are you there?", stream=stream)
        assert o.status == 504, o
        assert "did not answer in time" in o.error
        assert REQUEST_TIMEOUT_S - 0.5 < o.elapsed < REQUEST_TIMEOUT_S + 10, o
    # The replica dropped the upstream request: the backend saw the disconnect and holds nothing.
    svc.wait_until(
        lambda: (stats := backend_stats(svc, client))
        and sum(s["cancelled"] for s in stats.values()) >= before + 2
        and all(s["active"] == 0 for s in stats.values()),
        timeout=20, what="the backend to see both requests cancelled",
    )
    assert ask(svc, client, "hi", stream=True).ok


def test_backend_killed_mid_stream_ends_the_stream_cleanly_and_the_service_recovers(svc, client):
    pids_before = set(backend_stats(svc, client))
    o = ask(svc, client, "[[kill]] tell me a story", stream=True, timeout=60)
    assert o.status == 200, o  # the stream had started: the failure arrives in-band ...
    assert o.text.startswith("w0 w1"), o
    assert o.error, o  # ... as an SSE error event ...
    assert o.done and o.exception is None, o  # ... followed by [DONE]: a clean end, no hang
    assert o.elapsed < 15, o

    # Until Serve's health check replaces the replica whose backend died, a request routed to it fails fast
    # with 503; every request either succeeds or fails that way, and soon they all succeed again.
    # The service's own route (plain forwarding) behaves the same: 503 with a message, never a bare 500.
    deadline = time.monotonic() + 90
    streak = 0
    while streak < 6:
        assert time.monotonic() < deadline, "the service did not recover"
        r = ask(svc, client, "hi", stream=streak % 2 == 0)
        direct = client.get(f"{svc.http}/{NAME}/stats", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        if r.ok and direct.status_code == 200:
            streak += 1
            continue
        streak = 0
        if not r.ok:
            assert r.status == 503 and r.elapsed < 10 and "unavailable" in r.error.lower(), r
        if direct.status_code != 200:
            assert direct.status_code == 503 and "unavailable" in direct.json()["error"]["message"], direct.text
        time.sleep(0.5)
    svc.wait_until(lambda: replicas_healthy(svc), timeout=120, interval=2, what="2 healthy replicas")
    svc.wait_until(lambda: backend_stats_or_none(svc, client) - pids_before, timeout=60,
                   what="a new backend process in place of the killed one")


def test_replica_killed_under_load_fails_requests_cleanly_and_recovers(svc, client):
    svc.wait_until(lambda: replicas_healthy(svc), timeout=120, interval=2, what="2 healthy replicas")
    victim = svc.status(NAME)["replicas"]["items"][0]
    with Load(v1(svc), TOKEN, MODEL, workers=8, content="[[slow=100]] hello", timeout=60) as load:
        load.wait_for_answers(8)
        os.kill(victim["pid"], signal.SIGKILL)  # the Ray actor of one replica (its backend goes with it)
        load.wait_for_answers(40)  # the crash, Serve noticing it, and requests flowing again
        outcomes = load.stop()
    failures = [o for o in outcomes if not o.ok]
    assert outcomes and len(failures) < len(outcomes), outcomes[:5]
    for o in failures:
        assert_clean_failure(o, "request during the replica crash")
    # Serve replaces the replica; every request succeeds again.
    svc.wait_until(
        lambda: replicas_healthy(svc) and victim["replica_id"] not in
        {r["replica_id"] for r in svc.status(NAME)["replicas"]["items"]},
        timeout=120, interval=2, what="the killed replica to be replaced",
    )
    after = [ask(svc, client, "hi", stream=i % 2 == 0) for i in range(6)]
    assert all(o.ok for o in after), after


def test_redeploy_under_load_is_a_rolling_update_with_no_failed_request(svc, client):
    svc.wait_until(lambda: replicas_healthy(svc), timeout=120, interval=2, what="2 healthy replicas")
    path = write_service(svc.tmp, NAME, service_yaml(NAME, model=MODEL, replicas=2, env={"FAULTY_VERSION": "v2"}))
    with Load(v1(svc), TOKEN, MODEL, workers=8, content="[[slow=20]] hello", timeout=60) as load:
        load.wait_for_answers(8)
        proc = deploy(svc, path)
        load.wait_for_answers(16)  # the new version under load after the rollout
        outcomes = load.stop()
    assert proc.returncode == 0, proc.stderr
    failures = [o for o in outcomes if not o.ok]
    assert not failures, f"{len(failures)} of {len(outcomes)} failed, e.g. {failures[:3]}"
    assert len(outcomes) > 50
    assert any(o.text.startswith("v2 ") for o in outcomes), "the new version never answered during the load"
    assert outcomes[-1].text.startswith("v2 ")
    assert all(ask(svc, client, "hi", stream=False).text.startswith("v2 ") for _ in range(6))


def test_failed_redeploy_under_load_keeps_the_old_version_serving(svc, client):
    """Extends tests/e2e/test_deploy_cli.py::test_failed_redeploy_keeps_the_old_version: under load, via /v1."""
    svc.wait_until(lambda: replicas_healthy(svc), timeout=120, interval=2, what="2 healthy replicas")
    broken = service_yaml(NAME, model=MODEL, replicas=2).replace(
        "  - exec ", "  - echo loading weights, out of memory >&2\n  - exit 9\n  - exec ")
    path = write_service(svc.tmp, NAME, broken)
    with Load(v1(svc), TOKEN, MODEL, workers=6, content="hello", timeout=60) as load:
        proc = deploy(svc, path, "--timeout", "120", timeout=240)
        load.wait_for_answers(8)  # the old version still answering after the failed rollout's rollback
        outcomes = load.stop()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "exited with code 9" in proc.stderr and "out of memory" in proc.stderr, proc.stderr
    assert "previous version keeps serving" in proc.stderr
    assert "Traceback" not in proc.stderr
    failures = [o for o in outcomes if not o.ok]
    assert not failures, f"{len(failures)} of {len(outcomes)} failed during the failed redeploy, e.g. {failures[:3]}"
    svc.wait_until(lambda: replicas_healthy(svc), timeout=120, interval=2, what="the old version to be back")
    assert all(ask(svc, client, "hi", stream=False).text.startswith("v2 ") for _ in range(4))
    # The service's own route keeps working with the same token.
    r = client.get(f"{svc.http}/{NAME}/stats", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert r.status_code == 200 and json.loads(r.text)["version"] == "v2"
