from __future__ import annotations

import contextlib
import json
import threading
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from ray_dstack.ports import free_port  # noqa: F401 - re-exported for the test modules

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Serve (HAProxy mode) keeps every replica it stops reachable for this long before closing its listener, so that
# every node's HAProxy has reloaded without it (30 s by default); a rolling update waits for it once per replica.
# The test clusters are one machine whose HAProxy reloads within a second or two, and a request a stale HAProxy
# still sends afterwards is refused at connect and retried on another replica (Serve's `retry-on`), so 5 s keeps
# what the drain tests check while sparing ~25 s per replica stopped (88 stops in one run of the suite). Every Ray
# the tests start (`ray-dstack deploy`'s local head, `ray start`, `ray.init`) inherits it; production keeps 30.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "5")


POLL_ERRORS = (httpx.HTTPError, AssertionError, json.JSONDecodeError)


def wait_until(predicate, *, timeout: float, interval: float, what: str, retry_on=POLL_ERRORS):
    """Poll `predicate` until it returns something truthy (returned); errors in `retry_on` count as "not yet"."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except retry_on as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


@contextlib.contextmanager
def steady_load(url: str, rate: float):
    """GET `url` at `rate` requests per second on a fixed schedule from a thread while in the block; yields the
    list the status codes are appended to."""
    stop, codes = threading.Event(), []

    def run() -> None:
        start, i = time.monotonic(), 0
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                codes.append(client.get(url).status_code)
                i += 1
                stop.wait(max(0.0, start + i / rate - time.monotonic()))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield codes
    finally:
        stop.set()
        thread.join()


def assert_holds(predicate, *, seconds: float, interval: float, what: str, retry_on=POLL_ERRORS) -> None:
    """Check `predicate` every `interval` for `seconds`: a state that must last (e.g. a replica that must keep
    waiting for a GPU), not one to wait for. Fails at the first poll where it does not hold."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            ok = predicate()
        except retry_on as exc:
            ok = exc
        assert ok is True or (ok and not isinstance(ok, Exception)), f"{what} stopped holding: {ok!r}"
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)


def ray_stop(env: dict[str, str] | None = None) -> None:
    from ray_dstack.deploy.local import reap_orphaned_haproxy

    subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, env=env, timeout=120)
    reap_orphaned_haproxy()  # Ray 2.60's `ray stop` leaves Serve's haproxy holding its ports


@dataclass
class CliCluster:
    """A local Ray head started by `ray-dstack deploy` itself, driven through the console script."""

    env: dict[str, str]
    http_port: int
    home: Path
    deployed: list[str] = field(default_factory=list)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def run(self, *args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
        cmd = [str(BIN / "ray-dstack"), *args]
        if args and args[0] == "deploy":
            cmd += ["--http-port", str(self.http_port)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout, cwd=REPO)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def status(self, name: str) -> dict:
        proc = self.run("status", name, "--json", check=True)
        return json.loads(proc.stdout)

    def wait_until(self, predicate, timeout: float = 120, interval: float = 1.0, what: str = "condition"):
        return wait_until(predicate, timeout=timeout, interval=interval, what=what)


@pytest.fixture(scope="module")
def cli_cluster(tmp_path_factory):
    home = tmp_path_factory.mktemp("ray-dstack-home")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["RAY_DSTACK_HOME"] = str(home)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    ray_stop(env)
    cluster = CliCluster(env=env, http_port=free_port(), home=home)
    yield cluster
    ray_stop(env)


def write_service(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.dstack.yml"
    path.write_text(text)
    return path


@pytest.fixture
def python_exe() -> str:
    return shutil.which("python3", path=str(BIN)) or sys.executable
