"""dstack 0.21's replica groups on a local Ray, through the console script: SGLang's router (SMG, installed by the
router group's own commands) in front of llama.cpp workers serving SmolLM2 (configs/router-local-chat.dstack.yml),
and a Dynamo-shaped service whose worker reaches its router replica at $DSTACK_ROUTER_INTERNAL_IP.

Which worker served a request is read from the workers' own access logs (Serve keeps each replica's output in its
log); which workers the router lists, from the router replica's state lines (serve/groups/sglang_sync.py).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import time

import pytest

from conftest import REPO, write_service
from ray_dstack.deploy.dashboard import DashboardClient
from ray_dstack.serve.groups.sglang_sync import STATE_LOG_MARKER

pytestmark = pytest.mark.slow

import openai  # noqa: E402 - the test extra installs it

from ray_dstack.demo.model_server import packaged_model  # noqa: E402

packaged_model()  # fails here, with the install command, if the test extra's model package is missing

SERVICE = "router-chat"
MODEL = "smollm2-135m-routed"
WORKERS = "ServiceReplica-workers"
CONFIG = (REPO / "configs" / "router-local-chat.dstack.yml").read_text()


def with_workers(count: int) -> str:
    text, n = re.subn(r"(- name: workers\n\s+replicas:) \d+", rf"\1 {count}", CONFIG)
    assert n == 1
    return text


def dashboard() -> DashboardClient:
    return DashboardClient("http://127.0.0.1:8265")


def replicas(deployment: str, app: str = SERVICE) -> list[dict]:
    details = dashboard().serve_details()
    return (details["applications"][app]["deployments"].get(deployment) or {}).get("replicas") or []


def replica_log(replica: dict) -> str:
    return dashboard().log(node_id=replica["node_id"], filename=replica["log_file_path"], lines=20000)


def router_state() -> dict | None:
    """The router replica's last logged sync state."""
    router = [r for r in replicas("ServiceReplica") if r["state"] == "RUNNING"]
    if not router:
        return None
    text = replica_log(router[0])
    at = text.rfind(STATE_LOG_MARKER)
    return json.loads(text[at + len(STATE_LOG_MARKER):].split("\n", 1)[0]) if at >= 0 else None


def listed_workers() -> set[str]:
    state = router_state() or {}
    return {w["url"] for w in state.get("workers") or []}


STATE_LINE = re.compile(r"^\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*" + re.escape(STATE_LOG_MARKER) + r"(.*)$", re.M)


def router_states_since(wall: float) -> list[tuple[float, dict]]:
    """The router's logged states after `wall` (time.time()), with the time each was logged."""
    router = [r for r in replicas("ServiceReplica") if r["state"] == "RUNNING"]
    out = []
    for match in STATE_LINE.finditer(replica_log(router[0])):
        at = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()  # the node's local time
        if at >= wall:
            out.append((at, json.loads(match.group(2))))
    return out


def chats_per_worker() -> dict[str, int]:
    return {r["replica_id"]: replica_log(r).count('"POST /v1/chat/completions')
            for r in replicas(WORKERS) if r["state"] == "RUNNING"}


@pytest.fixture(scope="module")
def service(cli_cluster, tmp_path_factory):
    """Deployed with one worker, then scaled to two by a redeploy (the scaling test checks what happened)."""
    tmp = tmp_path_factory.mktemp("router")
    one = write_service(tmp, SERVICE, with_workers(1))
    proc = cli_cluster.run("deploy", str(one), "--timeout", "600", timeout=900)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    token = re.search(r"Token \(shown once; saved to [^)]*\):\n\s+(\S+)", proc.stdout).group(1)
    cli_cluster.wait_until(lambda: len(listed_workers()) == 1, timeout=60, what="the router lists 1 worker")
    before = {"router": [r["replica_id"] for r in replicas("ServiceReplica")],
              "workers": [r["replica_id"] for r in replicas(WORKERS)]}
    two = write_service(tmp, SERVICE, with_workers(2))
    scaled = cli_cluster.run("deploy", str(two), "--timeout", "600", timeout=900)
    assert scaled.returncode == 0, scaled.stderr + scaled.stdout
    started = time.monotonic()
    cli_cluster.wait_until(lambda: len(listed_workers()) == 2, timeout=120, what="the router lists 2 workers")
    return {"cluster": cli_cluster, "token": token, "before": before, "scaled_in_s": time.monotonic() - started,
            "tmp": tmp}


def test_scaling_the_worker_group_adds_the_new_worker_to_the_router(service):
    router = [r["replica_id"] for r in replicas("ServiceReplica")]
    workers = [r["replica_id"] for r in replicas(WORKERS) if r["state"] == "RUNNING"]
    assert router == service["before"]["router"]  # the router was not restarted
    assert len(workers) == 2 and set(service["before"]["workers"]) < set(workers)  # the first worker kept
    assert len(listed_workers()) == 2
    status = service["cluster"].status(SERVICE)
    groups = {g["name"]: g for g in status["groups"]}
    assert groups["router"]["role"] == "router" and groups["workers"]["role"] == "worker"
    assert groups["workers"]["replicas"]["running"] == 2 and status["replicas"]["running"] == 3
    assert {w["url"] for w in groups["router"]["router"]["workers"]} == listed_workers()
    logs = service["cluster"].run("logs", SERVICE, "--group", "workers", check=True).stdout
    assert "GET /health" in logs  # the workers' own access log (the router's health checks)


@pytest.mark.parametrize("base", ["/v1", f"/{SERVICE}/v1"])
def test_openai_sdk_through_the_router_streams_and_not(service, base):
    client = openai.OpenAI(base_url=service["cluster"].http + base, api_key=service["token"], max_retries=0)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    answer = client.chat.completions.create(model=MODEL, messages=question, max_tokens=24, temperature=0)
    assert re.search(r"\bparis\b", answer.choices[0].message.content, re.I), answer
    chunks = client.chat.completions.create(model=MODEL, messages=question, max_tokens=24, temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert re.search(r"\bparis\b", streamed, re.I), streamed
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=service["cluster"].http + base, api_key="wrong", max_retries=0).models.list()


def test_only_the_routers_inference_paths_are_public(service):
    import httpx

    headers = {"Authorization": f"Bearer {service['token']}"}
    base = f"{service['cluster'].http}/{SERVICE}"
    for path in ("/workers", "/health", "/metrics", "/get_server_info", "/v1/%2e%2e/workers"):
        answer = httpx.get(base + path, headers=headers, timeout=30)
        assert answer.status_code == 403, (path, answer.text)
        assert "Path is not allowed" in answer.json()["error"]["message"]
    added = httpx.post(base + "/workers", headers=headers, json={"url": "http://example.com"}, timeout=30)
    assert added.status_code == 403
    assert len(listed_workers()) == 2  # nothing reached the router's admin API
    models = httpx.get(base + "/v1/models", headers=headers, timeout=30)
    assert models.status_code == 200 and MODEL in models.text


def test_requests_sharing_a_long_prefix_land_on_one_worker(service):
    """SMG's cache_aware policy: a conversation's prefix stays with the worker whose prompt cache holds it."""
    client = openai.OpenAI(base_url=service["cluster"].http + "/v1", api_key=service["token"], max_retries=0)
    placements = []
    for topic in ("the history of the Roman empire", "how volcanoes form and erupt"):
        system = (f"You are a patient teacher. Today's lesson is about {topic}. " * 12).strip()
        before = chats_per_worker()
        for question in ("Give one fact.", "Give another fact.", "Summarise in one line.", "Ask me a question."):
            client.chat.completions.create(
                model=MODEL, max_tokens=4, temperature=0,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])
        after = service["cluster"].wait_until(
            lambda: (lambda now: now if sum(now.values()) - sum(before.values()) == 4 else None)(chats_per_worker()),
            timeout=30, what="4 chat requests in the workers' logs")
        delta = {w: after[w] - before.get(w, 0) for w in after}
        placements.append(delta)
        assert sorted(delta.values()) == [0, 4], placements  # all four on one worker


def test_a_killed_worker_leaves_the_router_within_5s_and_its_replacement_joins(service):
    workers = [r for r in replicas(WORKERS) if r["state"] == "RUNNING"]
    assert len(workers) == 2 and len(listed_workers()) == 2
    listed_before = listed_workers()
    victim = workers[0]
    killed_at = time.time()
    os.kill(victim["pid"], signal.SIGKILL)  # the replica's actor: its supervisor takes the model server down too

    def dropped_at() -> tuple[float, set[str]] | None:
        """When the router stopped routing to one of the two workers (removed, or marked unhealthy), and which.
        Serve's replacement may join in the same second, so the count of workers need never drop to one."""
        for at, state in router_states_since(killed_at):
            routed = {w["url"] for w in state["workers"] if w.get("healthy") is not False}
            gone = listed_before - routed
            if gone:
                return at, gone
        return None

    dropped, gone = service["cluster"].wait_until(dropped_at, timeout=30, what="the router drops the killed worker")
    assert dropped - killed_at <= 5.0, f"the router dropped the killed worker after {dropped - killed_at:.1f}s"
    assert len(gone) == 1, gone  # one worker went, the other was still routed then

    def replaced() -> bool:  # the dead worker removed (not only marked unhealthy), the survivor kept, a new one
        listed = listed_workers()
        return len(listed) == 2 and not gone & listed and listed_before - gone <= listed

    service["cluster"].wait_until(replaced, timeout=180, what="the dead worker removed and its replacement listed")
    assert victim["replica_id"] not in {r["replica_id"] for r in replicas(WORKERS) if r["state"] == "RUNNING"}
    client = openai.OpenAI(base_url=service["cluster"].http + "/v1", api_key=service["token"], max_retries=0)
    answer = client.chat.completions.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert answer.choices[0].message.content


def test_changing_the_worker_groups_commands_rolls_that_group_only(service):
    """dstack rolls the group that changed: the router keeps running (same replica) and learns the new workers."""
    router = [r["replica_id"] for r in replicas("ServiceReplica")]
    old_workers = {r["replica_id"] for r in replicas(WORKERS)}
    text = with_workers(2).replace("      - python -m ray_dstack.demo.model_server serve",
                                   "      - echo rolled\n      - python -m ray_dstack.demo.model_server serve")
    assert "echo rolled" in text
    path = write_service(service["tmp"], SERVICE, text)
    proc = service["cluster"].run("deploy", str(path), "--timeout", "600", timeout=900)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    service["cluster"].wait_until(
        lambda: len(listed_workers()) == 2 and not old_workers & {r["replica_id"] for r in replicas(WORKERS)},
        timeout=180, what="the new workers listed by the router, the old ones gone")
    assert [r["replica_id"] for r in replicas("ServiceReplica")] == router
    client = openai.OpenAI(base_url=service["cluster"].http + "/v1", api_key=service["token"], max_retries=0)
    answer = client.chat.completions.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert answer.choices[0].message.content


DYNAMO = """
type: service
name: dynamo-shape
port: 8000
groups:
  - name: frontend
    replicas: 1
    router:
      type: dynamo
    commands:
      # what etcd/NATS would be on a real Dynamo router: a second port of the router replica
      - mkdir -p side && echo "hello from the router" > side/hello.txt
      - python3 -m http.server {side_port} --bind 0.0.0.0 --directory side &
      - python3 -m http.server $RAY_DSTACK_PORT --bind 0.0.0.0
  - name: workers
    replicas: 1
    commands:
      - echo "router at $DSTACK_ROUTER_INTERNAL_IP says $(python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode().strip())' http://$DSTACK_ROUTER_INTERNAL_IP:{side_port}/hello.txt)"
      - echo "gpus=$DSTACK_GPUS_NUM nodes=$DSTACK_NODES_NUM rank=$DSTACK_NODE_RANK run=$DSTACK_RUN_NAME master=$DSTACK_MASTER_NODE_IP"
      - python3 -m http.server $RAY_DSTACK_PORT --bind 0.0.0.0
auth: false
"""


def test_a_dynamo_worker_reaches_its_router_at_dstack_router_internal_ip(cli_cluster, tmp_path):
    from ray_dstack.ports import free_port

    path = write_service(tmp_path, "dynamo-shape", DYNAMO.format(side_port=free_port()))
    proc = cli_cluster.run("deploy", str(path), "--timeout", "300", timeout=400)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    worker = replicas(WORKERS, app="dynamo-shape")[0]
    log = cli_cluster.wait_until(
        lambda: (lambda text: text if "router at" in text else None)(replica_log(worker)),
        timeout=60, what="the worker's first line")
    ip = worker["node_ip"]
    assert f"router at {ip} says hello from the router" in log, log[-2000:]
    assert f"gpus=0 nodes=1 rank=0 run=dynamo-shape master={ip}" in log
    cli_cluster.run("delete", "dynamo-shape", check=True)


GROUPS_WITHOUT_ROUTER = """
type: service
name: two-groups
port: 8000
replicas:
  - name: small
    count: 1
    commands:
      - mkdir -p www && echo small > www/group.txt
      - python3 -m http.server $RAY_DSTACK_PORT --bind 0.0.0.0 --directory www
  - name: large
    count: 1
    commands:
      - mkdir -p www && echo large > www/group.txt
      - python3 -m http.server $RAY_DSTACK_PORT --bind 0.0.0.0 --directory www
auth: false
"""


def test_without_a_router_every_groups_replicas_take_traffic(cli_cluster, tmp_path):
    """dstack 0.21.2's spelling (`replicas: [{count}]`); no router: requests spread over both groups."""
    import httpx

    path = write_service(tmp_path, "two-groups", GROUPS_WITHOUT_ROUTER)
    proc = cli_cluster.run("deploy", str(path), "--timeout", "300", timeout=400)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    url = f"{cli_cluster.http}/two-groups/group.txt"

    def both_answer():
        seen = {httpx.get(url, timeout=30).text.strip() for _ in range(30)}
        return seen if seen == {"small", "large"} else None

    cli_cluster.wait_until(both_answer, timeout=30, what="both groups answer")
    cli_cluster.run("delete", "two-groups", check=True)
