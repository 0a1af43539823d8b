"""`/v1` on a real local Ray: `GET /health` at the ingress root, `/v1/<route>` passthrough by model, `/v1`
requests for a known model sent by HAProxy straight to the model's service (its backend counts them, the
gateway's does not), and failover before the first byte when a replica's backend or the replica itself dies
under load.

Two services share one token: `flaky` (`tests/apps/faulty_server.py`, `format: tgi`, 2 replicas) and
`routes` (`tests/apps/openai_routes_server.py`, `format: openai`). The failover tests send 16 concurrent
clients (streaming and not) and kill one replica's backend process, then one replica actor: every request
that had not started (no byte reached the client) must succeed; the retries are read from HAProxy's stats
(the service's backend, `wretr`) and `ray_dstack_gateway_retries_total`, and printed.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import write_service
from tests.apps import openai_routes_server
from tests.apps.faulty_server import Load, service_yaml
from ray_dstack.spec import GATEWAY_APP_NAME
from tests.support.haproxy_stats import RetrySampler, counters, live_admin, mapped_models, stat_rows
from tests.support.prom import metrics_url, scrape, total

pytestmark = pytest.mark.slow

TOKEN = "failover-token-0123456789abcdef"
MODEL = "acme/flaky"
NAME = "flaky"
ROUTES_MODEL = "acme/embedder"
ROUTES_NAME = "routes"
CLIENTS = 16
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def svc(cli_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failover")
    for name, text in ((NAME, service_yaml(NAME, model=MODEL, replicas=2)),
                       (ROUTES_NAME, openai_routes_server.service_yaml(ROUTES_NAME, model=ROUTES_MODEL))):
        proc = cli_cluster.run("deploy", str(write_service(tmp, name, text)), "--token", TOKEN,
                               "--request-timeout", "30", timeout=300)
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return cli_cluster


@pytest.fixture
def client():
    with httpx.Client(trust_env=False, timeout=30) as c:
        yield c


def replicas_healthy(cluster, n: int = 2) -> bool:
    s = cluster.status(NAME)
    return s["status"] == "RUNNING" and s["replicas"]["running"] == n and len(s["replicas"]["items"]) == n


def backend_pids(cluster, client) -> set[int]:
    seen: set[int] = set()
    for _ in range(40):
        seen.add(client.get(f"{cluster.http}/{NAME}/stats", headers=AUTH).json()["pid"])
        if len(seen) == 2:
            break
    return seen


def retries() -> float:
    return total(scrape(metrics_url()), "ray_dstack_gateway_retries_total", service=NAME)


def not_started_failures(outcomes):
    """Failed requests of which no byte had reached the client (a started stream may fail in-band)."""
    return [o for o in outcomes if not o.ok and not (o.status == 200 and o.stream and o.text)]


def test_health_at_the_ingress_root_needs_no_token_and_names_nothing(svc, client):
    r = client.get(f"{svc.http}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    for secret in (NAME, ROUTES_NAME, MODEL, ROUTES_MODEL, "acme"):
        assert secret not in r.text
    assert client.get(f"{svc.http}/v1/models").status_code == 401  # the listing stays authenticated
    assert {m["id"] for m in client.get(f"{svc.http}/v1/models", headers=AUTH).json()["data"]} == {MODEL, ROUTES_MODEL}
    # The services' own routes still win over the root (longest prefix).
    assert client.get(f"{svc.http}/{NAME}/stats", headers=AUTH).json()["pid"] > 0
    assert client.get(f"{svc.http}/{NAME}/stats").status_code == 401
    assert client.get(f"{svc.http}/no-such-thing").status_code == 404


def test_other_v1_routes_pass_through_by_model(svc, client):
    url = f"{svc.http}/v1"
    r = client.post(f"{url}/embeddings", headers=AUTH, json={"model": ROUTES_MODEL, "input": "hi"})
    assert r.status_code == 200 and r.content == openai_routes_server.EMBEDDING_BYTES
    assert client.post(f"{url}/embeddings", json={"model": ROUTES_MODEL, "input": "hi"}).status_code == 401
    with client.stream("POST", f"{url}/responses", headers=AUTH,
                       json={"model": ROUTES_MODEL, "stream": True, "input": "x"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = list(r.iter_raw())
    assert b"".join(chunks) == b"".join(openai_routes_server.RESPONSE_EVENTS)
    r = client.post(f"{url}/responses", headers=AUTH, json={"model": ROUTES_MODEL, "input": "x"})
    assert r.json()["seen"] == {"model": ROUTES_MODEL, "input": "x"}
    # A tgi model has no such API: a 404 that says so, OpenAI-shaped.
    r = client.post(f"{url}/embeddings", headers=AUTH, json={"model": MODEL, "input": "hi"})
    assert r.status_code == 404, r.text
    assert "/v1/embeddings is not supported for `format: tgi`" in r.json()["error"]["message"]
    r = client.post(f"{url}/embeddings", headers=AUTH, json={"model": "nope", "input": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_v1_requests_go_straight_to_the_models_replicas(svc, client):
    """One Python hop: HAProxy sends `/v1` requests for a known model to the service's own backend; only what
    it cannot route by model (here `/v1/models` and an unknown model) reaches the gateway's."""
    gateway, service = f"http-{GATEWAY_APP_NAME}", f"http-{ROUTES_NAME}"
    svc.wait_until(lambda: ROUTES_MODEL in mapped_models(live_admin()), timeout=30, interval=0.5,
                   what="HAProxy's /v1 map to hold the model")

    def measured() -> bool:
        admin = live_admin()
        pid, before = counters(admin, "stot", gateway, service)
        body = {"model": ROUTES_MODEL, "input": "x"}
        for _ in range(5):
            assert client.post(f"{svc.http}/v1/responses", headers=AUTH, json=body).status_code == 200
            assert client.post(f"{svc.http}/v1/embeddings", headers=AUTH, json=body).status_code == 200
        assert client.get(f"{svc.http}/v1/models", headers=AUTH).status_code == 200
        assert client.post(f"{svc.http}/v1/embeddings", headers=AUTH, json={"model": "nope"}).status_code == 404
        after_pid, after = counters(admin, "stot", gateway, service)
        if after_pid != pid:
            return False  # Serve reloaded haproxy meanwhile (counters start again): measure again
        assert after[service] - before[service] == 10
        assert after[gateway] - before[gateway] == 2
        return True

    svc.wait_until(measured, timeout=60, interval=1, what="a measurement within one haproxy process")


def _kill_under_load(svc, kill, what: str) -> None:
    svc.wait_until(lambda: replicas_healthy(svc), timeout=120, interval=1, what="2 healthy replicas")
    url = metrics_url()
    before = total(scrape(url), "ray_dstack_gateway_retries_total", service=NAME)
    with RetrySampler(f"http-{NAME}") as haproxy, Load(
            f"{svc.http}/v1", TOKEN, MODEL, workers=CLIENTS, content="[[slow=30]] hello", timeout=60) as load:
        time.sleep(2.0)
        kill()
        time.sleep(10.0)
        outcomes = load.stop()
    bad = not_started_failures(outcomes)
    in_band = [o for o in outcomes if not o.ok and all(o is not b for b in bad)]
    # `/v1` requests are retried by HAProxy (rewritten to the service's route), any the gateway routed by the
    # gateway (its counter reaches the metrics within a few seconds): reported, as the issue asks; what is
    # asserted is that no request that had not started failed.
    gateway = total(scrape(url), "ray_dstack_gateway_retries_total", service=NAME) - before
    print(f"\n{what}: {len(outcomes)} requests from {CLIENTS} clients, at least {haproxy.retries} retried by "
          f"HAProxy, {int(gateway)} by the gateway, "
          f"{len(in_band)} started streams ended in-band, {len(bad)} failed before their first byte")
    assert not bad, f"{len(bad)} of {len(outcomes)} requests failed before their first byte, e.g. {bad[:3]}"
    assert len(outcomes) > 100
    for o in in_band:
        assert o.error and (o.done or o.exception == "RemoteProtocolError"), o


def test_backend_killed_under_16_clients_fails_no_request_that_had_not_started(svc, client):
    victim = min(backend_pids(svc, client))
    _kill_under_load(svc, lambda: os.kill(victim, signal.SIGKILL), "backend process killed")
    svc.wait_until(lambda: replicas_healthy(svc) and victim not in backend_pids(svc, client), timeout=120,
                   interval=2, what="the replica with the dead backend to be replaced")


def test_replica_actor_killed_under_16_clients_fails_no_request_that_had_not_started(svc, client):
    svc.wait_until(lambda: replicas_healthy(svc), timeout=120, interval=1, what="2 healthy replicas")
    victim = svc.status(NAME)["replicas"]["items"][0]
    _kill_under_load(svc, lambda: os.kill(victim["pid"], signal.SIGKILL), "replica actor killed")
    svc.wait_until(
        lambda: replicas_healthy(svc)
        and victim["replica_id"] not in {r["replica_id"] for r in svc.status(NAME)["replicas"]["items"]},
        timeout=120, interval=2, what="the killed replica to be replaced")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    assert all(client.post(f"{svc.http}/v1/chat/completions", headers=AUTH, json=body).status_code == 200
               for _ in range(4))


# --- prefix affinity ([3.4], ray_dstack/serve/ingress/prefix_affinity.py) ----------------------------------------

AFFINITY_NAME = "aff"
AFFINITY_MODEL = "acme/affine"


@pytest.fixture(scope="module")
def affinity(cli_cluster, tmp_path_factory):
    from tests.apps.replica_id_server import service_yaml as replica_id_yaml

    tmp = tmp_path_factory.mktemp("affinity")
    text = replica_id_yaml(AFFINITY_NAME, model=AFFINITY_MODEL, replicas=3, python=sys.executable,
                           repo=str(Path(__file__).resolve().parents[2]))
    proc = cli_cluster.run("deploy", str(write_service(tmp, AFFINITY_NAME, text)), "--token", TOKEN, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "routing: prefix affinity" in cli_cluster.run("status", AFFINITY_NAME, check=True).stdout
    cli_cluster.wait_until(lambda: f"http-{AFFINITY_NAME}" in prefix_mapped(live_admin()), timeout=30,
                           interval=0.5, what="HAProxy's prefix map to hold the service")
    return cli_cluster


def prefix_mapped(admin) -> set[str]:
    from ray_dstack.serve.ingress.prefix_affinity import MAP_FILE_NAME

    path = os.path.join(os.path.dirname(admin.path), MAP_FILE_NAME)
    return {line.split()[2] for line in admin.command(f"show map {path}").splitlines() if len(line.split()) == 3}


def _conversation(i: int, turns: int = 0) -> list[dict]:
    system = f"You are assistant {i}. " + "Keep answers short and cite sources. " * 50
    messages = [{"role": "system", "content": system}, {"role": "user", "content": f"question {i}"}]
    for t in range(turns):
        messages += [{"role": "assistant", "content": f"answer {t}"}, {"role": "user", "content": f"and {t}?"}]
    return messages


def _replica_of(cluster, client, i: int, turns: int = 0, *, via_v1: bool = False, **extra) -> str:
    url = f"{cluster.http}/v1" if via_v1 else f"{cluster.http}/{AFFINITY_NAME}/v1"
    r = client.post(f"{url}/chat/completions", headers=AUTH,
                    json={"model": AFFINITY_MODEL, "messages": _conversation(i, turns), **extra})
    assert r.status_code == 200, r.text
    return r.json()["replica"]


def _owners(cluster, client, prefixes=range(6)) -> dict[int, str]:
    owners = {}
    for i in prefixes:
        seen = {_replica_of(cluster, client, i, turns, via_v1=turns % 2 == 1, max_tokens=turns + 1)
                for turns in range(4)}
        assert len(seen) == 1, (i, seen)
        owners[i] = seen.pop()
    return owners


def test_prefix_affinity_keeps_each_conversation_on_one_replica_and_a_crash_moves_only_its_own(affinity, client):
    affinity.wait_until(lambda: affinity.status(AFFINITY_NAME)["replicas"]["running"] == 3, timeout=120,
                        what="3 replicas")
    before = _owners(affinity, client)
    assert len(set(before.values())) >= 2, before  # six long prefixes over three replicas, not all on one
    victim = before[0]
    _replica_of(affinity, client, 0, die=True)  # its model server answers, then crashes

    def settled() -> dict[int, str] | None:
        status = affinity.status(AFFINITY_NAME)
        if status["replicas"]["running"] != 3 or status["status"] != "RUNNING":
            return None
        now = _owners(affinity, client)
        return now if victim not in now.values() else None

    after = affinity.wait_until(settled, timeout=180, interval=2, what="the crashed replica replaced")
    survivors = set(before.values()) - {victim}
    for i, owner in before.items():
        if owner in survivors:  # a survivor keeps its prefixes, or gives some to the newcomer: never to the other
            assert after[i] in (owner, *(set(after.values()) - set(before.values()))), (before, after)
    print(f"\nprefix owners before the crash {before}, after {after}")


def test_a_hot_prefix_spreads_once_its_replica_carries_more_than_its_share(affinity, client):
    import concurrent.futures

    def measured() -> list[str] | None:
        """12 requests of one prefix at once, all through one haproxy process (the bound counts per process: a
        reload meanwhile would split them over two): who served them, or None to try again."""
        pid = live_admin().pid()
        owner = _replica_of(affinity, client, 42)
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            served = list(pool.map(lambda _: _replica_of(affinity, client, 42, hold_s=1.5), range(12)))
        if live_admin().pid() != pid:
            return None
        return [owner, *served]

    owner, *served = affinity.wait_until(measured, timeout=120, interval=1, what="a measurement in one haproxy")
    # The bound (150 % of the mean of 4) is 6 per replica, the rest go to the least busy; Serve's haproxy runs 4
    # threads, each of which may pick the owner before the others' picks are counted, so a burst can pass it by up
    # to 3 (9 seen in one run).
    assert served.count(owner) <= 6 + 3 and len(set(served)) >= 2, served


EXPORT_INTERVAL_S = 11  # Ray's metrics export interval (10 s) and a margin


def _prefix_routed(url: str, replicas: set[str] | None = None) -> dict[str, dict[str, float]]:
    """ray_dstack_prefix_routed_total of the affinity service: replica → outcome → count."""
    out: dict[str, dict[str, float]] = {}
    for labels, value in scrape(url).get("ray_dstack_prefix_routed_total", []):
        if labels.get("service") == AFFINITY_NAME and (replicas is None or labels.get("replica") in replicas):
            out.setdefault(labels["replica"], {})[labels["outcome"]] = value
    return out


def test_a_replica_taken_out_of_haproxy_moves_exactly_its_own_prefixes(affinity, client):
    """Serve's server for one replica put in maintenance: the prefixes of that replica, and no other, move, and
    stay where they moved when it is back (their new replica holds their cache now). Each replica counts how its
    requests were routed (ray_dstack_prefix_routed_total): the new prefixes, those that moved, the rest back to
    their own."""
    affinity.wait_until(lambda: affinity.status(AFFINITY_NAME)["replicas"]["running"] == 3, timeout=120,
                        what="3 replicas")
    url = metrics_url()
    prefixes = range(100, 112)
    pid = live_admin().pid()

    def exported() -> dict | None:
        """The counts once the earlier tests' are all exported (Ray exports every few seconds): two scrapes
        an export interval apart agree."""
        first = _prefix_routed(url)
        time.sleep(EXPORT_INTERVAL_S)
        return first if _prefix_routed(url) == first else None

    start = affinity.wait_until(exported, timeout=90, interval=0.1, what="the earlier prefix_routed counts exported")
    before = _owners(affinity, client, prefixes)
    admin = live_admin()
    backend = f"http-{AFFINITY_NAME}"
    servers = sorted(r["svname"] for r in stat_rows(admin.command("show stat"))
                     if r["pxname"] == backend and r["svname"] != "BACKEND" and r.get("bck") == "0")
    assert len(servers) == 3, servers
    try:
        assert admin.command(f"disable server {backend}/{servers[0]}").strip() == ""
        after = _owners(affinity, client, prefixes)
    finally:
        admin.command(f"enable server {backend}/{servers[0]}")
    moved = {i for i in prefixes if before[i] != after[i]}
    gone = {before[i] for i in moved}
    assert len(gone) == 1 and not gone & set(after.values()), (before, after)  # 12 prefixes: some were its
    assert moved == {i for i in prefixes if before[i] in gone}, (before, after)
    assert _owners(affinity, client, prefixes) == after
    print(f"\n{len(moved)} of {len(prefixes)} prefixes moved with one replica out of HAProxy")
    if live_admin().pid() != pid:
        print("haproxy reloaded during the test: its prefix_routed counts are not checked")
        return  # a reload meanwhile: some prefixes may have been placed again, the counts below would not hold
    # 3 rounds of 4 requests per prefix: the first of each prefix is `new`, the first after the move `moved`.
    sent = 3 * 4 * len(prefixes)
    replicas = set(_prefix_routed(url)) | set(start)

    def counted():
        now = _prefix_routed(url, replicas)
        delta = {how: sum(now.get(r, {}).get(how, 0) - start.get(r, {}).get(how, 0) for r in replicas)
                 for how in ("affinity", "spilled", "moved", "new")}
        assert sum(delta.values()) <= sent, delta  # more would be requests counted twice, or another test's
        return delta if sum(delta.values()) == sent else None

    delta = affinity.wait_until(counted, timeout=60, interval=2, what="the replicas' prefix_routed counts")
    assert delta == {"affinity": sent - len(prefixes) - len(moved), "spilled": 0, "moved": len(moved),
                     "new": len(prefixes)}, delta
