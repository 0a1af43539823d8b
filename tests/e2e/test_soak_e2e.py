"""Load: 64 concurrent streams through the `/v1` gateway on a real local Ray, for `RAY_DSTACK_SOAK_SECONDS`
(default 20; the full run is `RAY_DSTACK_SOAK_SECONDS=120 pytest tests/e2e/test_soak_e2e.py`).

Every request must succeed and every stream must end with `data: [DONE]` (0 errors, 0 lost responses), and
the resident memory of the replica and gateway actors must stay flat between the end of a warm-up and the
end of the run.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import pytest

from conftest import write_service
from ray_dstack.deploy.dashboard import DashboardClient
from tests.apps.faulty_server import service_yaml

pytestmark = pytest.mark.slow

TOKEN = "soak-token-0123456789abcdef"
MODEL = "acme/soak"
STREAMS = 64
SECONDS = float(os.environ.get("RAY_DSTACK_SOAK_SECONDS", "20"))
WARMUP_S = min(8.0, SECONDS / 3)
MAX_TOKENS = 8
# RSS growth allowed from the end of the warm-up to the end (allocator noise, lazily built caches).
RSS_SLACK_BYTES = 40 * 1024**2
RSS_SLACK_RATIO = 0.15


@pytest.fixture(scope="module")
def deployed(cli_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("soak")
    path = write_service(tmp, "soak", service_yaml("soak", model=MODEL))
    proc = cli_cluster.run("deploy", str(path), "--token", TOKEN, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return cli_cluster


def actor_pids() -> dict[str, int]:
    """pid of every Serve replica of the service and of the gateway (from the dashboard)."""
    with DashboardClient("http://127.0.0.1:8265") as dashboard:
        details = dashboard.serve_details()
    pids = {}
    for app_name, app in details["applications"].items():
        for dep_name, dep in (app.get("deployments") or {}).items():
            for r in dep.get("replicas") or []:
                if r.get("state") == "RUNNING" and r.get("pid"):
                    pids[f"{app_name}/{dep_name}/{r['replica_id'][:8]}"] = r["pid"]
    return pids


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def stream_forever(client: httpx.AsyncClient, base: str, stop: asyncio.Event, stats: dict, worker: int):
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"soak {worker}"}], "max_tokens": MAX_TOKENS,
            "stream": True}
    while not stop.is_set():
        stats["sent"] += 1
        try:
            async with client.stream("POST", f"{base}/v1/chat/completions", json=body,
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                if resp.status_code != 200:
                    stats["errors"].append(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
                    continue
                tokens, done = 0, False
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        continue
                    event = json.loads(data)
                    if "error" in event:
                        stats["errors"].append(f"error event: {event['error']}")
                    for choice in event.get("choices") or []:
                        if (choice.get("delta") or {}).get("content"):
                            tokens += 1
                if not done or tokens != MAX_TOKENS:
                    stats["lost"].append(f"done={done} tokens={tokens}")
                else:
                    stats["ok"] += 1
        except (httpx.HTTPError, ValueError) as exc:
            stats["errors"].append(repr(exc))


async def soak(base: str, seconds: float, on_warm) -> dict:
    stats = {"sent": 0, "ok": 0, "errors": [], "lost": []}
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=STREAMS, max_keepalive_connections=STREAMS)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=limits, trust_env=False) as client:
        tasks = [asyncio.create_task(stream_forever(client, base, stop, stats, i)) for i in range(STREAMS)]
        await asyncio.sleep(WARMUP_S)
        stats["warm"] = await asyncio.to_thread(on_warm)
        await asyncio.sleep(max(0.0, seconds - WARMUP_S))
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=90)  # every in-flight stream finishes
    return stats


def test_64_concurrent_streams_no_errors_no_lost_responses_flat_memory(deployed):
    pids = actor_pids()
    assert any(k.startswith("soak/") for k in pids) and any(k.startswith("ray-dstack-gateway/") for k in pids), pids

    def sample():
        return {name: rss(pid) for name, pid in pids.items()}

    start = time.monotonic()
    stats = asyncio.run(soak(deployed.http, SECONDS, sample))
    elapsed = time.monotonic() - start
    end = sample()
    warm = stats["warm"]
    print(f"\nsoak: {stats['ok']} streams in {elapsed:.0f}s ({stats['ok'] / elapsed:.1f}/s), "
          + ", ".join(f"{n} RSS {warm[n] / 2**20:.0f}->{end[n] / 2**20:.0f} MiB" for n in end))
    assert not stats["errors"], f"{len(stats['errors'])} errors, e.g. {stats['errors'][:5]}"
    assert not stats["lost"], f"{len(stats['lost'])} lost/incomplete responses, e.g. {stats['lost'][:5]}"
    assert stats["ok"] == stats["sent"] and stats["ok"] >= STREAMS * 2
    for name in end:
        allowed = max(RSS_SLACK_BYTES, warm[name] * RSS_SLACK_RATIO)
        assert end[name] - warm[name] <= allowed, (
            f"{name}: RSS grew {(end[name] - warm[name]) / 2**20:.0f} MiB under steady load "
            f"({warm[name] / 2**20:.0f} -> {end[name] / 2**20:.0f} MiB)")
    # Still healthy afterwards, with the same actors (none was restarted under load).
    assert actor_pids() == pids
    assert deployed.status("soak")["status"] == "RUNNING"
