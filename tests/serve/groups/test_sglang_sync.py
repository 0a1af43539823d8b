"""SglangWorkerSync against the real SGLang router (SMG, `pip install smg`) and two real HTTP workers: the router's
own `GET /workers` is what is checked, never the sync's idea of it. No Ray: the registry is an in-memory KV.

SMG is installed once into `$TMPDIR/ray-dstack-test-smg-venv` (reused while its `bin/smg` exists; ~10-30 s from
PyPI the first time).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from ray_dstack.ports import free_port
from ray_dstack.serve.groups import sglang_sync
from ray_dstack.serve.groups.registry import Watcher
from ray_dstack.serve.groups.sglang_sync import SglangWorkerSync, SyncError
from tests.serve.groups.test_registry import Clock, MemoryKV, announce

pytestmark = pytest.mark.slow

LOG = logging.getLogger("test.groups.sglang_sync")
NODE = "node-a"  # the sync's node: entries on it are reached at 127.0.0.1
TIMEOUT_S = 60.0

WORKER = textwrap.dedent("""\
    import json, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    port, mode = int(sys.argv[1]), sys.argv[2]
    SERVER_INFO = {"disaggregation_mode": "prefill", "disaggregation_bootstrap_port": 8998, "status": "ready"}

    class Handler(BaseHTTPRequestHandler):
        def send(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                self.send(200, {})
            elif self.path == "/v1/models":
                self.send(200, {"object": "list", "data": [{"id": "m", "object": "model"}]})
            elif self.path == "/server_info" and mode == "prefill":
                self.send(200, SERVER_INFO)
            else:
                self.send(404, {"error": "not found"})

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
""")


# --- processes ----------------------------------------------------------------------------------------------


def smg_venv() -> Path:
    return Path(os.environ.get("TMPDIR") or tempfile.gettempdir()) / "ray-dstack-test-smg-venv"


@pytest.fixture(scope="session")
def smg_bin() -> Path:
    venv = smg_venv()
    smg = venv / "bin" / "smg"
    with open(str(venv) + ".lock", "w") as lock:  # two test runs at once: one installs, the other waits
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not smg.exists():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
            done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "smg"],
                                  capture_output=True, text=True, timeout=600)
            if done.returncode != 0 or not smg.exists():
                pytest.fail(f"pip install smg failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return smg


def stop(proc: subprocess.Popen) -> None:
    """Kill a process this test started (its own session) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def wait_http(url: str, what: str, proc: subprocess.Popen, log: Path | None = None) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}: "
                                 f"{log.read_text()[-3000:] if log else ''}")
        try:
            answer = httpx.get(url, timeout=2, trust_env=False)
            if answer.status_code == 200:
                return
            last = answer.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"{what} did not answer {url} within {TIMEOUT_S:.0f}s; last: {last!r}")


class Worker:
    def __init__(self, port: int, proc: subprocess.Popen) -> None:
        self.port, self.proc = port, proc
        self.url = f"http://127.0.0.1:{port}"


@pytest.fixture
def workers(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    started: dict[str, Worker] = {}
    try:
        for mode in ("regular", "prefill"):
            port = free_port()
            proc = subprocess.Popen([sys.executable, str(script), str(port), mode], start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            started[mode] = Worker(port, proc)
            # Up before anyone posts it: SMG retries a failed first health check only after 30 s.
            wait_http(f"{started[mode].url}/health", f"the {mode} worker", proc)
        yield started
    finally:
        for worker in started.values():
            stop(worker.proc)


class Router:
    def __init__(self, port: int, proc: subprocess.Popen, log: Path) -> None:
        self.port, self.proc, self.log = port, proc, log
        self.url = f"http://127.0.0.1:{port}"

    def listed(self) -> dict[str, dict]:
        """The router's own worker list, by URL."""
        answer = httpx.get(f"{self.url}/workers", timeout=5, trust_env=False)
        assert answer.status_code == 200, answer.text
        return {w["url"]: w for w in answer.json()["workers"]}


@pytest.fixture
def router(smg_bin, tmp_path):
    port, metrics = free_port(), free_port()
    log = tmp_path / "smg.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(smg_bin), "launch", "--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(metrics),
             "--policy", "round_robin"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/workers", "smg", proc, log)
        yield Router(port, proc, log)
    finally:
        stop(proc)


# --- the sync -----------------------------------------------------------------------------------------------


def make_sync(router: Router, kv: MemoryKV, **kw) -> SglangWorkerSync:
    client = httpx.AsyncClient(base_url=router.url, timeout=sglang_sync.TIMEOUT_S, trust_env=False)
    # The reader's clock stands still: the entries stay live for as long as they are in the KV.
    return SglangWorkerSync(client, Watcher(kv, "svc", clock=Clock()), node_id=NODE, logger=LOG, **kw)


def entry_for(kv: MemoryKV, worker: Worker, replica: str) -> str:
    return announce(kv, replica=replica, node_id=NODE, node_ip="10.255.0.1", port=worker.port)


async def sync_until(sync: SglangWorkerSync, router: Router, predicate, what: str) -> dict[str, dict]:
    """Run sync_once until the router's own list satisfies `predicate`; returns that list."""
    deadline = time.monotonic() + TIMEOUT_S
    listed: dict[str, dict] = {}
    while time.monotonic() < deadline:
        await sync.sync_once()
        listed = await asyncio.to_thread(router.listed)
        if predicate(listed):
            return listed
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; the router lists {sorted(listed)}; "
                         f"smg log tail:\n{router.log.read_text()[-3000:]}")


async def poll(predicate, what: str) -> None:
    """Wait (on the event loop) until `predicate()` holds."""
    deadline = time.monotonic() + TIMEOUT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_sync_adds_the_announced_workers_with_their_worker_type(router, workers):
    kv = MemoryKV()
    entry_for(kv, workers["regular"], "r1")
    entry_for(kv, workers["prefill"], "r2")
    regular, prefill = workers["regular"].url, workers["prefill"].url

    async def scenario():
        sync = make_sync(router, kv)
        try:
            listed = await sync_until(sync, router, lambda l: {regular, prefill} <= set(l), "both workers")
            await sync.sync_once()
            return listed, sync.describe()
        finally:
            await sync.aclose()

    listed, described = asyncio.run(scenario())
    assert set(listed) == {regular, prefill}
    assert listed[regular]["worker_type"] == "regular"
    assert listed[prefill]["worker_type"] == "prefill" and listed[prefill]["bootstrap_port"] == 8998
    assert [(w["url"], w["worker_type"]) for w in described["workers"]] == sorted(
        [(regular, "regular"), (prefill, "prefill")])
    assert described["last_error"] is None and described["adding"] == []


def test_sync_deletes_a_worker_whose_entry_is_gone(router, workers):
    kv = MemoryKV()
    leaving = entry_for(kv, workers["regular"], "r1")
    entry_for(kv, workers["prefill"], "r2")
    regular, prefill = workers["regular"].url, workers["prefill"].url

    async def scenario():
        sync = make_sync(router, kv)
        try:
            await sync_until(sync, router, lambda l: {regular, prefill} <= set(l), "both workers")
            kv.delete(leaving)
            return await sync_until(sync, router, lambda l: set(l) == {prefill}, "the regular worker to go")
        finally:
            await sync.aclose()

    assert set(asyncio.run(scenario())) == {prefill}


def test_sync_removes_a_worker_the_router_lists_but_ray_dstack_does_not_know(router, workers):
    kv = MemoryKV()
    entry_for(kv, workers["prefill"], "r2")
    stranger, prefill = workers["regular"].url, workers["prefill"].url

    async def scenario():
        sync = make_sync(router, kv)
        try:
            await sync_until(sync, router, lambda l: set(l) == {prefill}, "the announced worker")
            async with httpx.AsyncClient(base_url=router.url, trust_env=False) as client:
                added = await client.post("/workers", json={"url": stranger, "worker_type": "regular"})
            assert added.status_code == 202, added.text
            deadline = time.monotonic() + TIMEOUT_S  # the router applies a POST in the background
            while stranger not in await asyncio.to_thread(router.listed):
                assert time.monotonic() < deadline, "the router never listed the worker posted to it"
                await asyncio.sleep(0.1)
            return await sync_until(sync, router, lambda l: set(l) == {prefill}, "the unknown worker to go")
        finally:
            await sync.aclose()

    assert set(asyncio.run(scenario())) == {prefill}


def test_sync_once_raises_when_the_router_does_not_answer(router, workers):
    kv = MemoryKV()
    entry_for(kv, workers["regular"], "r1")
    stop(router.proc)

    async def scenario():
        sync = make_sync(router, kv)
        try:
            with pytest.raises(SyncError) as info:
                await sync.sync_once()
            return str(info.value)
        finally:
            await sync.aclose()

    assert asyncio.run(scenario()).startswith("the router does not answer GET /workers yet (ConnectError")


def test_running_sync_reports_a_stopped_router_in_last_error(router, workers, caplog):
    kv = MemoryKV()
    entry_for(kv, workers["regular"], "r1")
    regular = workers["regular"].url

    async def scenario():
        sync = make_sync(router, kv, interval_s=0.05)
        sync.start()
        try:
            await poll(lambda: [w["url"] for w in sync.listed] == [regular] and sync.last_sync is not None,
                       "the sync to see the worker listed")
            assert sync.last_error is None
            await asyncio.to_thread(stop, router.proc)
            await poll(lambda: sync.last_error is not None, "last_error")
            return sync.last_error, sync.describe()
        finally:
            await sync.aclose()

    with caplog.at_level(logging.INFO, logger=LOG.name):
        error, described = asyncio.run(scenario())
    assert error.startswith("the router does not answer GET /workers yet (ConnectError")
    assert described["last_error"] == error
    states = [r.getMessage() for r in caplog.records if r.getMessage().startswith(sglang_sync.STATE_LOG_MARKER)]
    assert any('"last_error": null' in s and regular in s for s in states), states
    assert '"last_error": "the router does not answer GET /workers yet' in states[-1], states


def test_the_state_after_a_removal_is_logged_before_the_next_regular_sync(router, workers, caplog):
    """A change is followed by a quick sync, so `status` (the logged state) shows a departed worker at once."""
    kv = MemoryKV()
    leaving = entry_for(kv, workers["regular"], "r1")
    entry_for(kv, workers["prefill"], "r2")
    regular, prefill = workers["regular"].url, workers["prefill"].url
    interval_s = 4.0

    def routed(state: list[dict]) -> set[str]:  # what the router still sends requests to
        return {w["url"] for w in state if w["healthy"] is not False}

    async def scenario():
        sync = make_sync(router, kv, interval_s=interval_s)
        sync.start()
        try:
            await poll(lambda: routed(sync.listed) == {regular, prefill}, "both workers listed")
            kv.delete(leaving)
            await poll(lambda: any("removed worker" in r.getMessage() for r in caplog.records), "the DELETE")
            removed_at = time.monotonic()
            await poll(lambda: routed(sync.listed) == {prefill}, "the departed worker out of the logged state")
            return time.monotonic() - removed_at
        finally:
            await sync.aclose()

    with caplog.at_level(logging.INFO, logger=LOG.name):
        took = asyncio.run(scenario())
    assert took < interval_s / 2, f"the state caught up {took:.2f}s after the DELETE (regular sync every {interval_s}s)"
