"""`deploy` of a service with replica groups: the progress counts every group's replicas, a failure names the
group whose deployment failed, every group's resources are checked against the nodes, and a router that does
not answer GET /workers is reported while deploy waits (deploy/rollout.py)."""

from __future__ import annotations

import pytest

from ray_dstack.deploy import rollout
from tests.deploy.group_fixtures import (
    NO_WORKERS, ROUTER_SVC, TWO_WORKERS, FakeClient, app, app_config, deployment, details, replica, router_line,
)
from tests.deploy.test_rollout import _node

CFG = app_config()
FAILED = ("A replica failed to start with exception. Retrying 2 more time(s). Error:\n"
          "ServiceProcessError: the service's commands exited with code 7 (last lines: boom)")


def _app(router: list, workers: list, *, status: str = "DEPLOYING", workers_status: str = "UPDATING",
         workers_message: str = "", target: int = 2, cfg: dict = CFG) -> dict:
    return app(cfg, {"ServiceReplica": deployment(router, status="HEALTHY" if router and all(
                         r["state"] == "RUNNING" for r in router) else "UPDATING"),
                     "ServiceReplica-workers": deployment(workers, target=target, status=workers_status,
                                                          message=workers_message)}, status=status)


def test_the_progress_line_counts_every_group():
    a = _app([replica("r1234567890")], [replica("w1234567890", "STARTING")])
    assert rollout.progress_line(a) == ("DEPLOYING: router 1/1, workers 0/2 replicas running "
                                        "(router: r1234567 RUNNING; workers: w1234567 STARTING)")
    a = _app([replica("r1")], [replica("w1"), replica("w2")], status="RUNNING", workers_status="HEALTHY")
    assert rollout.progress_line(a).startswith("RUNNING: router 1/1, workers 2/2 replicas running")
    a = _app([], [])
    assert rollout.progress_line(a).endswith("(router: none yet; workers: none yet)")


def test_a_failure_names_the_group_that_failed():
    a = _app([replica("r1")], [], status="DEPLOY_FAILED", workers_status="DEPLOY_FAILED", workers_message=FAILED)
    assert rollout.failure_reason(a) == (
        "group workers: the service's commands exited with code 7 (last lines: boom)")
    a = _app([replica("r1")], [], status="UNHEALTHY", workers_status="UNHEALTHY",
             workers_message="The deployment failed its health check")
    assert rollout.failure_reason(a) == "group workers: The deployment failed its health check"
    a = _app([replica("r1")], [], status="DEPLOY_FAILED")
    a["message"] = "Deploying app 'chat' failed"
    assert rollout.failure_reason(a) == "Deploying app 'chat' failed"


def test_every_groups_resources_are_checked_and_the_group_named():
    text = ROUTER_SVC.replace("    scaling: {metric: rps, target: 10}\n",
                              "    scaling: {metric: rps, target: 10}\n    resources: {gpu: H100}\n")
    cfg = app_config(text)
    a = _app([replica("r1")], [], cfg=cfg)
    nodes = [_node("10.0.0.1", 4)]
    problem = rollout.placement_problems(a, cfg["deployments"], nodes)
    assert problem == ("group workers: no node can host a replica: each needs 1 GPU of type H100, 0.05 CPU. "
                       "Nodes in the cluster: 10.0.0.1 (no GPU, 4 CPU)")
    assert rollout.placement_problems(a, cfg["deployments"], nodes + [_node("10.0.0.2", 4, 1, "H100")]) is None
    # The router group's replica that runs is not checked again, even where no node could host another.
    assert rollout.placement_problems(a, cfg["deployments"][:1], [_node("10.0.0.1", 0)]) is None
    # Nor is a group that wants no replica now (autoscaled to zero).
    a["deployments"]["ServiceReplica-workers"]["target_num_replicas"] = 0
    assert rollout.placement_problems(a, cfg["deployments"], nodes) is None
    a["deployments"]["ServiceReplica-workers"]["target_num_replicas"] = 2

    client = FakeClient(serve=[details({"chat": a})], nodes=nodes)
    result = rollout.wait_for_service(client, "chat", timeout_s=5, on_progress=lambda line: None, poll_s=0,
                                      deployments=cfg["deployments"], unplaceable_after_s=0)
    assert not result.ok and result.reason.startswith("group workers: no node can host a replica")


def test_deploy_reports_the_router_error_while_it_waits(monkeypatch):
    monkeypatch.setattr(rollout, "ROUTER_CHECK_S", 0.0)
    waiting = _app([replica("r1234567890")], [replica("w1", "STARTING")])
    ready = _app([replica("r1234567890")], [replica("w1"), replica("w2")], status="RUNNING",
                 workers_status="HEALTHY")
    logs = {"/serve/r1234567890.log": router_line(NO_WORKERS)}
    client = FakeClient(logs, serve=[details({"chat": waiting}), details({"chat": waiting}), details({"chat": ready})])
    printed: list[str] = []

    def progress(line: str) -> None:
        printed.append(line)
        if len(printed) == 3:  # the router answers from now on
            logs["/serve/r1234567890.log"] += router_line(TWO_WORKERS)

    result = rollout.wait_for_service(client, "chat", timeout_s=5, on_progress=progress, poll_s=0,
                                      previous_deployed_time=1.0)
    assert result.ok
    assert client.asked.count("/serve/r1234567890.log") == 3  # one read per poll (ROUTER_CHECK_S is 0 here)
    assert printed == [
        "DEPLOYING: router 1/1, workers 0/2 replicas running (router: r1234567 RUNNING; workers: w1 STARTING)",
        "router r1234567: the router does not answer GET /workers yet (ConnectError: connection refused)",
        "RUNNING: router 1/1, workers 2/2 replicas running (router: r1234567 RUNNING; workers: w1 RUNNING, "
        "w2 RUNNING)",
        "router r1234567: answers GET /workers, lists 2 worker(s)",
    ]


def test_the_router_log_is_read_at_most_every_router_check_s(monkeypatch):
    monkeypatch.setattr(rollout, "ROUTER_CHECK_S", 3600.0)
    unplaced = _app([replica("r1", "PENDING_ALLOCATION")], [])
    waiting = _app([replica("r1", "STARTING")], [replica("w1", "STARTING")])
    ready = _app([replica("r1")], [replica("w1"), replica("w2")], status="RUNNING", workers_status="HEALTHY")
    client = FakeClient({"/serve/r1.log": router_line(NO_WORKERS)},
                        serve=[details({"chat": a}) for a in (unplaced, waiting, waiting, ready)])
    printed: list[str] = []
    assert rollout.wait_for_service(client, "chat", timeout_s=5, on_progress=printed.append, poll_s=0).ok
    assert client.asked == ["/serve/r1.log"]  # not before the replica is placed, then once
    assert printed[2] == "router r1: the router does not answer GET /workers yet (ConnectError: connection refused)"


def test_a_timeout_names_each_groups_reason():
    probes = ('INFO -- ray-dstack probes: [{"probe": "GET /health", "ready": false, "last": "HTTP 503: loading"}]\n')
    from ray_dstack.serve.runtime.probes import STATE_LOG_MARKER

    probes = probes.replace("ray-dstack probes: ", STATE_LOG_MARKER)
    a = _app([replica("r1")], [replica("w1", "STARTING")])
    client = FakeClient({"/serve/r1.log": router_line(NO_WORKERS), "/serve/w1.log": probes})
    assert rollout._timeout_reason(client, a) == (
        "group router: router r1: the router does not answer GET /workers yet (ConnectError: connection refused)"
        " | group workers: probes not passing: GET /health last answered HTTP 503: loading")
    a = _app([replica("r1")], [replica("w1", "STARTING")], workers_message=FAILED)
    assert rollout._timeout_reason(client, a).startswith("group workers: the service's commands exited with code 7")


@pytest.mark.parametrize("where", ["app", "workers"])
def test_an_unschedulable_group_fails_the_deploy(where):
    message = ("Deployment 'ServiceReplica-workers' has 1 replicas that have taken more than 30s to be scheduled. "
               "Resources required for each replica: {'CPU': 64}")
    a = _app([replica("r1")], [], workers_message=message if where == "workers" else "")
    if where == "app":
        a["message"] = message
    client = FakeClient(serve=[details({"chat": a})], nodes=[_node("10.0.0.1", 4)])
    result = rollout.wait_for_service(client, "chat", timeout_s=5, on_progress=lambda line: None, poll_s=0)
    assert not result.ok
    assert result.reason.startswith(("group workers: " if where == "workers" else "") + "Deployment 'ServiceReplica-")
    assert result.reason.endswith("Nodes in the cluster: 10.0.0.1 (no GPU, 4 CPU)")
