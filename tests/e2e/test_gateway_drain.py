"""Graceful drain on a real local Ray: replicas being removed finish their in-flight streams.

One `format: tgi` service (`tests/apps/faulty_server.py`, 2 replicas, `--drain-timeout 30`) streams 6 tokens
400 ms apart (2.4 s per stream) to 16 clients that stream back to back through `/v1`, while the service is
redeployed with a new version (a rolling update: every old replica is removed) and then scaled down from 2
replicas to 1. Every stream must end with `[DONE]` and no error: 0 broken streams.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from conftest import write_service
from tests.apps.faulty_server import Outcome, chat, service_yaml

pytestmark = pytest.mark.slow

TOKEN = "drain-token-0123456789abcdef"
MODEL = "acme/drained"
NAME = "drained"
CLIENTS = 16
CONTENT = "[[slow=400]] hello"  # 6 tokens: 2.4 s per stream, so removals always find streams in flight


def deploy(cluster, tmp, **kw):
    path = write_service(tmp, NAME, service_yaml(NAME, model=MODEL, **kw))
    return cluster.run("deploy", str(path), "--token", TOKEN, "--drain-timeout", "30", timeout=300)


@pytest.fixture(scope="module")
def svc(cli_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("drain")
    proc = deploy(cli_cluster, tmp, replicas=2)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    cli_cluster.tmp = tmp
    return cli_cluster


class Streams:
    """`CLIENTS` threads streaming chat completions back to back until `stop()`."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(CLIENTS)]

    def __enter__(self) -> "Streams":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _work(self) -> None:
        with httpx.Client(trust_env=False) as client:
            while not self._stop.is_set():
                self.outcomes.append(chat(client, self.base_url, TOKEN, MODEL, CONTENT, stream=True, timeout=60))

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(70)
        assert not any(t.is_alive() for t in self._threads), "a streaming client hangs"
        return self.outcomes


def replica_ids(cluster) -> set[str]:
    return {r["replica_id"] for r in cluster.status(NAME)["replicas"]["items"]}


def running(cluster, n: int) -> bool:
    s = cluster.status(NAME)
    return s["status"] == "RUNNING" and s["replicas"]["running"] == n and len(s["replicas"]["items"]) == n


def _under_streams(svc, change, what: str) -> list[Outcome]:
    before = replica_ids(svc)
    with Streams(f"{svc.http}/v1") as streams:
        time.sleep(3.0)  # every client is mid-stream
        proc = change()
        assert proc.returncode == 0, proc.stderr + proc.stdout
        svc.wait_until(lambda: not (before & replica_ids(svc)) or len(replica_ids(svc)) < len(before),
                       timeout=90, interval=1, what="the old replicas to be removed")
        time.sleep(3.0)  # and streams keep going on what is left
        outcomes = streams.stop()
    broken = [o for o in outcomes if not o.ok]
    print(f"\n{what}: {len(outcomes)} streams from {CLIENTS} clients, {len(broken)} broken")
    assert not broken, f"{len(broken)} of {len(outcomes)} streams broke, e.g. {broken[:3]}"
    assert len(outcomes) >= 3 * CLIENTS
    return outcomes


def test_rolling_redeploy_breaks_no_stream(svc):
    svc.wait_until(lambda: running(svc, 2), timeout=120, interval=1, what="2 running replicas")
    outcomes = _under_streams(svc, lambda: deploy(svc, svc.tmp, replicas=2, env={"FAULTY_VERSION": "v2"}),
                              "rolling redeploy")
    texts = [o.text for o in outcomes]
    assert any(not t.startswith("v2 ") for t in texts) and texts[-1].startswith("v2 ")


def test_scale_down_breaks_no_stream(svc):
    svc.wait_until(lambda: running(svc, 2), timeout=120, interval=1, what="2 running replicas")
    _under_streams(svc, lambda: deploy(svc, svc.tmp, replicas=1, env={"FAULTY_VERSION": "v2"}), "scale-down 2 -> 1")
    svc.wait_until(lambda: running(svc, 1), timeout=60, interval=1, what="1 running replica")
