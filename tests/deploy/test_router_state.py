"""The router group's state read back from its replica's log (deploy/router_state.py): the last complete marker
line wins, a cut or missing line means unknown; `status` fills the router group's `router` with it."""

from __future__ import annotations

from ray_dstack.deploy import apps, router_state
from ray_dstack.serve.groups.sglang_sync import STATE_LOG_MARKER
from ray_dstack.serve.runtime.probes import STATE_LOG_MARKER as PROBES_MARKER
from tests.deploy.group_fixtures import (
    NO_WORKERS, TWO_WORKERS, FakeClient, app, app_config, deployment, replica, router_line,
)


def test_the_last_complete_router_state_line_wins():
    text = (router_line(NO_WORKERS) + "[service] smg: listening\n" + router_line(TWO_WORKERS)
            + f"INFO -- {STATE_LOG_MARKER}{{\"type\": \"sglang\", \"workers\": [{{\"url")
    assert router_state.last_router_state(text) == TWO_WORKERS
    assert router_state.last_router_state(router_line(NO_WORKERS) + "noise\n") == NO_WORKERS
    assert router_state.last_router_state("[service] nothing here\n") is None
    # The probes' marker line (a list) is not the router's, and a router line that is no object is skipped.
    assert router_state.last_router_state(f"{PROBES_MARKER}[]\n{STATE_LOG_MARKER}[1, 2]\n") is None


def test_the_router_replica_read_is_a_running_one_else_a_placed_one():
    starting, running, pending = replica("s1", "STARTING"), replica("r1"), replica("p1", "PENDING_ALLOCATION")
    assert router_state.router_replica([pending, starting, running]) is running
    assert router_state.router_replica([pending, starting]) is starting
    assert router_state.router_replica([pending]) is None
    client = FakeClient({"/serve/r1.log": router_line(TWO_WORKERS)})
    assert router_state.router_state(client, "sglang", [running]) == (running, TWO_WORKERS)
    assert router_state.router_state(client, "dynamo", [running]) == (None, None)  # nothing logged: no read
    assert client.asked == ["/serve/r1.log"]
    assert router_state.router_state(FakeClient(), "sglang", [running]) == (running, None)  # log unreadable


def _summary(router: str, logs: dict[str, str], router_replicas: list[dict]) -> dict:
    cfg = app_config(router=router)
    details = app(cfg, {"ServiceReplica": deployment(router_replicas),
                        "ServiceReplica-workers": deployment([replica("w1", node="n2", ip="10.0.0.2")])})
    summary = apps.service_summary("chat", details, "http://h:8100")
    router_state.add_router_states(FakeClient(logs), summary)
    return summary


def test_status_fills_the_router_groups_state_from_its_log():
    summary = _summary("sglang", {"/serve/r1.log": router_line(NO_WORKERS) + router_line(TWO_WORKERS)},
                       [replica("r1")])
    router, workers = summary["groups"]
    assert router["router"] == {
        "type": "sglang", "replica_id": "r1", "last_error": None, "adding": ["http://10.0.0.3:40002"],
        "workers": [{"url": "http://10.0.0.2:40001", "worker_type": "regular", "healthy": True},
                    {"url": "http://10.0.0.4:40003", "worker_type": "prefill", "healthy": False}]}
    assert "router" not in workers

    failing = _summary("sglang", {"/serve/r1.log": router_line(NO_WORKERS)}, [replica("r1", "STARTING")])
    assert failing["groups"][0]["router"]["last_error"].startswith("the router does not answer GET /workers yet")
    assert failing["groups"][0]["router"]["workers"] == []


def test_an_unknown_router_state_stays_none():
    unknown = _summary("sglang", {"/serve/r1.log": "[service] pip install smg\n"}, [replica("r1", "STARTING")])
    assert unknown["groups"][0]["router"] == {"type": "sglang", "replica_id": "r1", "workers": None,
                                              "last_error": None, "adding": None}
    unplaced = _summary("sglang", {}, [replica("r1", "PENDING_ALLOCATION")])
    assert unplaced["groups"][0]["router"]["replica_id"] is None
    dynamo = _summary("dynamo", {}, [replica("r1")])
    assert dynamo["groups"][0]["router"]["type"] == "dynamo" and dynamo["groups"][0]["router"]["workers"] is None


def test_the_deploy_progress_line_of_the_router():
    r = replica("abcdefgh123")
    assert router_state.progress_line(r, NO_WORKERS) == (
        "router abcdefgh: the router does not answer GET /workers yet (ConnectError: connection refused)")
    assert router_state.progress_line(r, TWO_WORKERS) == "router abcdefgh: answers GET /workers, lists 2 worker(s)"
    assert router_state.progress_line(r, None) is None and router_state.progress_line(None, TWO_WORKERS) is None
