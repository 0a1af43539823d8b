"""The replica's side of an image pull's progress: its latest line per (service, node) in Ray's internal KV,
throttled, the outcome always last, never the password, and a KV that fails never fails the pull."""

from __future__ import annotations

import json
import sys
import threading

import pytest

from ray_dstack.serve.runtime import container as c
from ray_dstack.serve.runtime import container_prepare
from ray_dstack.serve.runtime import pull_progress
from ray_dstack.serve.runtime.pull_progress import Publisher, PullReport
from ray_dstack.spec import RegistryAuthRef, ServiceSpec


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Kv:
    """The internal KV's put, recording every write in order."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, PullReport]] = []
        self.written = threading.Event()

    def put(self, key: str, value: bytes) -> None:
        self.writes.append((key, PullReport.decode(value)))
        self.written.set()

    def lines(self) -> list[str]:
        return [r.line for _, r in self.writes]


def publisher(kv: Kv, clock: Clock, **kw) -> Publisher:
    return Publisher("web", "reg:5000/acme/web:1", "node-a", node_id="n1", put=kv.put, clock=clock, **kw)


def test_key_is_per_service_and_node_and_the_report_round_trips():
    assert pull_progress.key("web", "n1") == "pull-progress/web/n1"
    assert pull_progress.key("web", "n1").startswith(pull_progress.service_prefix("web"))
    report = PullReport("reg:5000/acme/web:1", "node-a", "Copying blob sha256:ab", done=False)
    assert PullReport.decode(report.encode()) == report
    assert report.text() == "pulling reg:5000/acme/web:1 on node-a: Copying blob sha256:ab"
    assert PullReport.decode(b"not json") is None and PullReport.decode(b'{"image": 1}') is None


def test_lines_are_throttled_and_the_outcome_always_goes_last():
    kv, clock = Kv(), Clock()
    pub = publisher(kv, clock, min_interval_s=60.0)  # the delayed line's timer never fires within the test
    pub.line("Trying to pull reg:5000/acme/web:1...")
    clock.now += 0.2
    pub.line("Copying blob sha256:aa")  # within the interval: held back
    pub.line("   ")  # blank lines are nothing to show
    pub.finish("pulled")
    assert kv.lines() == ["Trying to pull reg:5000/acme/web:1...", "pulled"]
    assert {k for k, _ in kv.writes} == {"pull-progress/web/n1"}
    assert kv.writes[-1][1].done and not kv.writes[-1][1].failed


def test_a_held_back_line_goes_out_when_the_interval_is_over():
    kv, clock = Kv(), Clock()
    pub = publisher(kv, clock, min_interval_s=0.2)
    pub.line("Copying blob sha256:aa")
    pub.line("Copying blob sha256:bb")  # the burst's last line: it must not be lost for the whole download
    kv.written.clear()
    assert kv.written.wait(5), "the held-back line was never written"
    assert kv.lines() == ["Copying blob sha256:aa", "Copying blob sha256:bb"]


def test_a_failing_kv_never_fails_the_pull_and_is_given_up_on():
    attempts = []

    def broken(key, value):
        attempts.append(key)
        raise ConnectionError("GCS gone")

    pub = Publisher("web", "img", "node-a", node_id="n1", put=broken, min_interval_s=0)
    for i in range(10):
        pub.line(f"line {i}")
    pub.finish("pulled")
    assert len(attempts) == 3


def test_outside_a_ray_worker_nothing_is_published(monkeypatch):
    def no_ray():
        raise RuntimeError("not in a Ray worker")

    monkeypatch.setattr(pull_progress, "_node_id", no_ray)
    kv = Kv()
    pub = Publisher("web", "img", "node-a", put=kv.put)
    pub.line("Trying to pull")
    pub.finish("pulled")
    assert kv.writes == []


def fake_podman(tmp_path, script: str) -> c.Runtime:
    exe = tmp_path / "podman"
    exe.write_text(f"#!{sys.executable}\nimport sys\n" + script)
    exe.chmod(0o755)
    return c.Runtime("podman", str(exe))


def spec(image: str) -> ServiceSpec:
    return ServiceSpec(name="web", commands=[], port=8000, image=image,
                       registry_auth=RegistryAuthRef(username="bot", kv_key="registry-auth/web/k"))


@pytest.fixture
def kv(monkeypatch) -> Kv:
    kv = Kv()
    monkeypatch.setattr(pull_progress, "_kv_put", kv.put)
    monkeypatch.setattr(pull_progress, "_node_id", lambda: "n1")
    monkeypatch.setattr(pull_progress, "MIN_INTERVAL_S", 0.0)
    return kv


def test_the_replicas_pull_publishes_its_lines_and_outcome(tmp_path, kv):
    rt = fake_podman(tmp_path, "print('Trying to pull reg/acme/web:1...')\nprint('Copying blob sha256:aa done')\n")
    logged: list[str] = []
    assert container_prepare.pull_with_progress(rt, spec("reg/acme/web:1"), "bot", "pw-secret-1", logged.append)
    assert logged == ["[pull] Trying to pull reg/acme/web:1...", "[pull] Copying blob sha256:aa done"]
    assert kv.lines() == ["Trying to pull reg/acme/web:1...", "Copying blob sha256:aa done", "pulled"]
    assert kv.writes[-1][1].text() == f"pulling reg/acme/web:1 on {c.node_name()}: pulled"


def test_a_failed_pull_publishes_the_reason_without_the_password(tmp_path, kv):
    rt = fake_podman(tmp_path, "print('Error: reading manifest: unauthorized: authentication required "
                               "(pw-secret-1)')\nsys.exit(125)\n")
    with pytest.raises(c.ContainerError):
        container_prepare.pull_with_progress(rt, spec("reg/acme/web:1"), "bot", "pw-secret-1", lambda _: None)
    last = kv.writes[-1][1]
    assert last.failed and "unauthorized: authentication required" in last.text()
    assert all("pw-secret-1" not in json.dumps(r.__dict__) for _, r in kv.writes)
