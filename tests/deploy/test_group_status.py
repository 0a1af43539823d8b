"""`status`/`list` of a service with replica groups: every group with its deployment, replicas, scaling and (the
router group) router state; a service without groups keeps exactly the summary it always had."""

from __future__ import annotations

import json

from ray_dstack.cli import status_cmds
from ray_dstack.deploy import apps
from tests.deploy.group_fixtures import (
    MEMBERS_SVC, NO_WORKERS, TWO_WORKERS, FakeClient, app, app_config, deployment, details, replica, router_line,
)
from tests.deploy.test_status_summary import METRICS, _details

NODES = [{"node_id": "n1", "resources_total": {"CPU": 4}},
         {"node_id": "n2", "resources_total": {"CPU": 8, "GPU": 1}, "labels": {"ray.io/accelerator-type": "L4"}}]


def grouped_details() -> dict:
    cfg = app_config()
    return details({"chat": app(cfg, {
        "ServiceReplica": deployment([replica("r1")]),
        "ServiceReplica-workers": deployment([replica("w1", node="n2", ip="10.0.0.2"),
                                              replica("w2", "STARTING", node="n2", ip="10.0.0.2")], target=2,
                                             status="UPDATING"),
    }, status="DEPLOYING")})


def test_a_service_without_groups_keeps_its_summary():
    d = _details("type: service\nname: svc\ncommands: [x]\nport: 8000\nreplicas: 1..3\n"
                 "scaling: {metric: rps, target: 10}\n")
    [summary] = apps.service_summaries(d, "http://head.example:8265", NODES)
    assert list(summary) == ["name", "status", "message", "url", "replicas", "model", "auth", "environment",
                             "probes", "scaling"]
    assert list(summary["replicas"]) == ["running", "target", "items"]
    assert list(summary["replicas"]["items"][0]) == ["replica_id", "state", "node_id", "node_ip", "pid",
                                                     "log_file_path", "node_accelerator_type", "node_gpus"]
    assert apps.autoscales(summary)


def test_a_grouped_service_shows_each_group():
    [summary] = apps.service_summaries(grouped_details(), "http://head.example:8265", NODES)
    assert summary["url"] == "http://head.example:8100/chat"
    assert summary["model"]["name"] == "m1"
    assert summary["probes"] == ["GET /health"]
    # The service's replicas: every group's, each naming its group; scaling is per group.
    assert summary["replicas"]["running"] == 2 and summary["replicas"]["target"] == 3
    assert [(r["replica_id"], r["group"]) for r in summary["replicas"]["items"]] == [
        ("r1", "router"), ("w1", "workers"), ("w2", "workers")]
    assert "scaling" not in summary
    router, workers = summary["groups"]
    assert {k: router[k] for k in ("name", "role", "deployment", "status", "message")} == {
        "name": "router", "role": "router", "deployment": "ServiceReplica", "status": "HEALTHY", "message": ""}
    assert router["replicas"]["running"] == 1 and router["replicas"]["target"] == 1
    assert router["router"]["type"] == "sglang" and "scaling" not in router
    assert workers["deployment"] == "ServiceReplica-workers" and workers["role"] == "worker"
    assert workers["replicas"]["running"] == 1 and workers["replicas"]["target"] == 2
    assert [(r["replica_id"], r["state"], r["node_ip"], r["node_accelerator_type"])
            for r in workers["replicas"]["items"]] == [("w1", "RUNNING", "10.0.0.2", "L4"),
                                                       ("w2", "STARTING", "10.0.0.2", "L4")]
    assert workers["scaling"] == {"min": 1, "max": 3, "target_rps": 10, "desired": 2, "measured_rps": None}
    assert "router" not in workers
    assert apps.autoscales(summary)
    json.dumps(summary)  # `status --json`


def test_an_autoscaling_groups_measured_rps_is_the_services():
    """Every group scales on the service's request rate, counted by the ingress group's replicas (the workers
    behind the router take no request from Serve)."""
    text = METRICS.replace('service="svc"', 'service="chat"')
    [summary] = apps.service_summaries(grouped_details(), "http://h:8265")
    apps.with_measured_rps([summary], [text])
    assert summary["groups"][1]["scaling"]["measured_rps"] == 2.5  # r1, the router replica
    assert "scaling" not in summary["groups"][0]


def test_a_group_message_names_its_group():
    d = grouped_details()
    d["applications"]["chat"]["deployments"]["ServiceReplica-workers"]["message"] = "1 replica failed"
    [summary] = apps.service_summaries(d, "http://h:8265")
    assert summary["message"] == "group workers: 1 replica failed"
    assert summary["groups"][1]["message"] == "1 replica failed"


def test_groups_without_a_router_are_members_in_file_order():
    cfg = app_config(MEMBERS_SVC)
    d = details({"chat": app(cfg, {"ServiceReplica": deployment([replica("a1")]),
                                   "ServiceReplica-b": deployment([replica("b1"), replica("b2")])})})
    [summary] = apps.service_summaries(d, "http://h:8265")
    assert [(g["name"], g["role"], g["deployment"], g["replicas"]["running"]) for g in summary["groups"]] == [
        ("a", "member", "ServiceReplica", 1), ("b", "member", "ServiceReplica-b", 2)]
    assert all("router" not in g for g in summary["groups"])
    assert status_cmds.replicas_text(summary) == "3/3 (a 1/1, b 2/2)"


def test_status_text_of_a_grouped_service(capsys):
    [summary] = apps.service_summaries(grouped_details(), "http://h:8265")
    for item in summary["replicas"]["items"]:
        item["probes"] = [{"probe": "GET /health", "ready": item["state"] == "RUNNING", "last": "HTTP 200"}]
    summary["groups"][0]["router"].update(replica_id="r1", workers=TWO_WORKERS["workers"],
                                          adding=TWO_WORKERS["adding"], last_error=NO_WORKERS["last_error"])
    status_cmds.print_summary(summary, detailed=True)
    out = capsys.readouterr().out
    assert "chat  DEPLOYING  2/3 (router 1/1, workers 1/2) replicas" in out
    assert "  group router (router, sglang; deployment ServiceReplica): 1/1 replicas\n" in out
    assert ("    router: listed 2 worker(s) when it last answered: http://10.0.0.2:40001 (regular, healthy), "
            "http://10.0.0.4:40003 (prefill, not healthy)\n") in out
    assert "    router: adding http://10.0.0.3:40002\n" in out
    assert "    router error: the router does not answer GET /workers yet (ConnectError: connection refused)\n" in out
    assert "    replica r1: RUNNING on node 10.0.0.1 (n1)\n      probes: ✓ GET /health (HTTP 200)\n" in out
    assert "  group workers (worker; deployment ServiceReplica-workers): 1/2 replicas\n" in out
    assert "    scaling: 1..3 replicas, target 10 rps; measured n/a rps, desired 2\n" in out
    assert "    replica w2: STARTING on node 10.0.0.2 (n2)\n      probes: × GET /health (HTTP 200)\n" in out


def test_router_lines_when_its_state_is_unknown_or_dynamo():
    assert status_cmds.router_lines({"type": "sglang", "replica_id": "r1", "workers": None}) == [
        "router: state unknown (no router state in the router replica's log yet)"]
    assert status_cmds.router_lines({"type": "sglang", "replica_id": None, "workers": None})[0].endswith(
        "(no router state in the router group (no replica placed yet)'s log yet)")
    assert status_cmds.router_lines({"type": "sglang", "workers": [], "last_error": None}) == [
        "router: lists 0 worker(s)"]
    assert status_cmds.router_lines({**TWO_WORKERS, "adding": []}) == [
        "router: lists 2 worker(s): http://10.0.0.2:40001 (regular, healthy), "
        "http://10.0.0.4:40003 (prefill, not healthy)"]
    # A router that never answered lists nothing: only its error, on one line (its answer may be a page).
    assert status_cmds.router_lines({"type": "sglang", "workers": [], "adding": [],
                                     "last_error": "the router answered GET /workers with 404: <html>\n  <p>x</p>\n"}) == [
        "router error: the router answered GET /workers with 404: <html> <p>x</p>"]
    assert status_cmds.router_lines({"type": "dynamo"})[0].startswith("router: dynamo")


def test_status_reads_the_router_state_once_per_router_group(monkeypatch, capsys):
    client = FakeClient({"/serve/r1.log": router_line(TWO_WORKERS)}, serve=[grouped_details()], nodes=NODES)
    monkeypatch.setattr(status_cmds, "connect", lambda *a, **k: (client, False))
    from ray_dstack.cli.main import main

    assert main(["status", "chat", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["groups"][0]["router"]["workers"][0]["url"] == "http://10.0.0.2:40001"
    assert client.asked.count("/serve/r1.log") == 2  # the probes' state, then the router's
    assert main(["list", "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert [g["name"] for g in listed["groups"]] == ["router", "workers"]
    assert main(["status"]) == 0
    assert "group workers (worker; deployment ServiceReplica-workers): 1/2 replicas" in capsys.readouterr().out
