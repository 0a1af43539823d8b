"""`deploy`'s side of an image pull's progress: what the replicas left in the internal KV becomes one line per
node when it changes (rate-limited while the pull runs, the outcome always), and the entries are cleared."""

from __future__ import annotations

from ray_dstack.deploy import rollout
from ray_dstack.deploy.pull_watch import PullWatch
from ray_dstack.spec import KV_NAMESPACE
from ray_dstack.serve.runtime.pull_progress import Publisher, key


class FakeGcs:
    """The GcsClient calls PullWatch makes, over a dict (namespace checked)."""

    def __init__(self) -> None:
        self.kv: dict[bytes, bytes] = {}
        self.broken = False

    def _check(self, namespace):
        assert namespace == KV_NAMESPACE
        if self.broken:
            raise ConnectionError("GCS gone")

    def internal_kv_keys(self, prefix, namespace, timeout=None):
        self._check(namespace)
        return [k for k in self.kv if k.startswith(prefix)]

    def internal_kv_multi_get(self, keys, namespace, timeout=None):
        self._check(namespace)
        return {k: self.kv[k] for k in keys if k in self.kv}

    def internal_kv_del(self, k, del_by_prefix, namespace, timeout=None):
        self._check(namespace)
        gone = [key for key in self.kv if key.startswith(k)] if del_by_prefix else [k] if k in self.kv else []
        for key in gone:
            del self.kv[key]
        return len(gone)

    def put(self, k: str, value: bytes) -> None:
        self.kv[k.encode()] = value


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def node(gcs: FakeGcs, node_id: str, name: str, service: str = "web") -> Publisher:
    return Publisher(service, "reg/acme/web:1", name, node_id=node_id, put=gcs.put, min_interval_s=0)


def test_one_line_per_node_when_it_changes_rate_limited_outcome_always():
    gcs, clock = FakeGcs(), Clock()
    watch = PullWatch(gcs, "web", clock=clock, min_interval_s=2.0)
    a, b = node(gcs, "n1", "node-a"), node(gcs, "n2", "node-b")
    node(gcs, "n3", "node-c", service="other").line("not this service's")
    assert watch.lines() == []
    a.line("Trying to pull reg/acme/web:1...")
    b.line("Copying blob sha256:bb")
    assert watch.lines() == ["pulling reg/acme/web:1 on node-a: Trying to pull reg/acme/web:1...",
                             "pulling reg/acme/web:1 on node-b: Copying blob sha256:bb"]
    assert watch.lines() == []  # unchanged: nothing new to print
    clock.now = 1.0
    a.line("Copying blob sha256:aa")  # changed, but within 2 s of node-a's last line
    b.finish("pulled")  # an outcome is never held back
    assert watch.lines() == ["pulling reg/acme/web:1 on node-b: pulled"]
    clock.now = 2.5
    assert watch.lines() == ["pulling reg/acme/web:1 on node-a: Copying blob sha256:aa"]
    a.finish("pulling image reg/acme/web:1 on node node-a failed: unauthorized: authentication required",
             failed=True)
    assert watch.lines() == ["pulling image reg/acme/web:1 on node node-a failed: unauthorized: authentication required"]


def test_clear_removes_only_the_services_entries():
    gcs = FakeGcs()
    node(gcs, "n1", "node-a").line("Copying blob")
    node(gcs, "n1", "node-a", service="other").line("Copying blob")
    PullWatch(gcs, "web").clear()
    assert list(gcs.kv) == [key("other", "n1").encode()]


def test_an_unreachable_gcs_costs_the_lines_not_the_deploy():
    gcs = FakeGcs()
    watch = PullWatch(gcs, "web")
    gcs.broken = True
    for _ in range(5):
        assert watch.lines() == []
    watch.clear()
    gcs.broken = False
    node(gcs, "n1", "node-a").line("Copying blob")
    assert watch.lines() == []  # given up after 3 failures: no GCS call on every poll


def test_connect_says_why_not_when_the_gcs_is_unreachable(monkeypatch):
    monkeypatch.setenv("RAY_DSTACK_GCS_ADDRESS", "127.0.0.1:1")
    watch, why = PullWatch.connect("http://127.0.0.1:8265", "web")
    assert watch is None and "127.0.0.1:1" in why and "RAY_DSTACK_GCS_ADDRESS" in why


class Client:
    """A dashboard with the app already RUNNING and HEALTHY on the first poll."""

    def serve_details(self):
        return {"applications": {"web": {"status": "RUNNING", "last_deployed_time_s": 2.0, "deployments": {
            "Replica": {"status": "HEALTHY", "target_num_replicas": 1,
                        "replicas": [{"replica_id": "abcdefgh1", "state": "RUNNING"}]}}}}}


def test_wait_for_service_prints_the_pull_lines_with_the_replica_states(monkeypatch):
    monkeypatch.setattr(rollout, "REPLICA_DEPLOYMENT_NAME", "Replica")
    printed: list[str] = []
    result = rollout.wait_for_service(Client(), "web", timeout_s=5, on_progress=printed.append,
                                      previous_deployed_time=1.0,
                                      more_progress=lambda: ["pulling img on node-a: pulled"])
    assert result.ok
    assert printed[0] == "pulling img on node-a: pulled" and printed[1].startswith("RUNNING: 1/1")
