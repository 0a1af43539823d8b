"""Each replica's probe state read back from its log: the last marker line wins, a cut or missing line means
unknown; `deploy`'s timeout names the probes' last answers; `status` marks them ✓ / ×."""

from __future__ import annotations

import json

from ray_dstack.cli.service_cmds import probe_line
from ray_dstack.deploy import probe_state, rollout
from ray_dstack.deploy.dashboard import ClusterError
from ray_dstack.serve.runtime.probes import STATE_LOG_MARKER

FAILING = [{"probe": "GET /fail", "ready": False, "last": "HTTP 503: still warming up"},
           {"probe": "POST /ok", "ready": True, "last": "HTTP 200"}]


def line(states: list[dict]) -> str:
    return f"INFO 2026-12-03 replica.py:1 -- {STATE_LOG_MARKER}{json.dumps(states)}\n"


class FakeClient:
    def __init__(self, logs: dict[str, str]) -> None:
        self.logs = logs
        self.asked: list[tuple[str, str]] = []

    def log(self, *, node_id: str, filename: str, lines: int = 1000) -> str:
        self.asked.append((node_id, filename))
        if filename not in self.logs:
            raise ClusterError("gone")
        return self.logs[filename]


def test_the_last_complete_marker_line_wins():
    first = [{"probe": "GET /fail", "ready": False, "last": "connection refused"}]
    text = line(first) + "[service] hello\n" + line(FAILING) + f"INFO -- {STATE_LOG_MARKER}[{{\"probe\": \"GET"
    assert probe_state.last_state(text) == FAILING
    assert probe_state.last_state(line(first) + "[service] noise\n") == first
    assert probe_state.last_state("[service] nothing here\n") is None


def test_a_timed_out_deploy_names_the_probes_last_answers():
    client = FakeClient({"a.log": line(FAILING), "b.log": line(FAILING), "c.log": "no marker\n"})
    app = {"message": "Deploying", "deployments": {"ServiceReplica": {"message": "", "replicas": [
        {"state": "STARTING", "node_id": "n", "log_file_path": "a.log"},
        {"state": "STARTING", "node_id": "n", "log_file_path": "b.log"},
        {"state": "STARTING", "node_id": "n", "log_file_path": "c.log"},
        {"state": "PENDING_ALLOCATION", "node_id": None, "log_file_path": None},
        {"state": "RUNNING", "node_id": "n", "log_file_path": "d.log"}]}}}
    reason = rollout._timeout_reason(client, app)
    assert reason == "probes not passing: GET /fail last answered HTTP 503: still warming up"  # once for two
    assert ("n", "d.log") not in client.asked  # a running replica passed its probes
    app["deployments"]["ServiceReplica"]["replicas"] = []
    assert rollout._timeout_reason(client, app) == "Deploying"


def test_an_earlier_replica_error_comes_first():
    app = {"deployments": {"ServiceReplica": {"message": "A replica failed to start with exception. Retrying 2 "
                                              "more time(s). Error:\nServiceProcessError: exited with code 3"}}}
    assert rollout._timeout_reason(FakeClient({}), app) == "exited with code 3"


def test_status_fills_the_replicas_of_a_service_with_probes_only():
    client = FakeClient({"a.log": line(FAILING)})
    summary = {"probes": ["GET /fail", "POST /ok"], "replicas": {"items": [
        {"node_id": "n", "log_file_path": "a.log"}, {"node_id": "n", "log_file_path": "gone.log"}]}}
    probe_state.add_probe_states(client, summary)
    assert [r["probes"] for r in summary["replicas"]["items"]] == [FAILING, None]
    assert probe_line(FAILING) == "× GET /fail (HTTP 503: still warming up); ✓ POST /ok (HTTP 200)"
    assert probe_line(None).startswith("unknown")
    without = {"probes": [], "replicas": {"items": [{"node_id": "n", "log_file_path": "a.log"}]}}
    probe_state.add_probe_states(client, without)
    assert "probes" not in without["replicas"]["items"][0]
