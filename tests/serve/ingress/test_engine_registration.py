"""A replica's side of the engine path (ray_dstack/serve/ingress/engine_registration.py): which services take it,
the namespace and entry a replica registers, HAProxy's counts folded into the request counter, and the drain."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import free_port, wait_until

from ray_dstack.serve.ingress import engine_path, engine_registration
from ray_dstack.serve.ingress.engine_registration import EngineRegistration, EngineRequests, ineligible
from ray_dstack.serve.runtime import netns
from ray_dstack.serve.scaling.request_counter import RequestCounter
from ray_dstack.spec import AuthSpec, GroupSpec, ModelSpec, RateLimitSpec, ServiceSpec

LOG = logging.getLogger("test")


def spec(**fields) -> ServiceSpec:
    base = dict(name="svc", commands=["true"], port=8000, network_namespace=True,
                model=ModelSpec(name="m", format="openai"), auth=AuthSpec(token_sha256="0" * 64))
    return ServiceSpec(**{**base, **fields})


def test_only_passthrough_services_in_their_own_namespace_take_the_engine_path(monkeypatch):
    monkeypatch.delenv(engine_registration.ENGINE_PATH_ENV, raising=False)
    assert "RAY_DSTACK_ENGINE_PATH" in ineligible(spec())  # off by default
    monkeypatch.setenv(engine_registration.ENGINE_PATH_ENV, "on")
    assert ineligible(spec()) is None
    assert ineligible(spec(auth=AuthSpec(enabled=False))) is None
    cases = {
        "format: openai": spec(model=ModelSpec(name="m", format="tgi")),
        "network namespace": spec(network_namespace=False),
        "strip_prefix": spec(strip_prefix=False),
        "rate_limits": spec(rate_limits=[RateLimitSpec(rps=1)]),
        "replica groups": spec(group=GroupSpec(name="0", deployment="d", role="member", groups=["0", "1"])),
        "without a token": spec(auth=AuthSpec()),
    }
    for reason, s in cases.items():
        assert reason in ineligible(s), reason
    assert "format: openai" in ineligible(spec(model=None))
    assert "namespace" in ineligible(spec(port_from_env=True))


def test_a_private_port_maps_no_host_port():
    argv = netns.pasta_argv("/usr/bin/pasta", 40000, 8000, uid=0, map_host_port=False)
    assert argv[argv.index("-t") + 1] == "none"
    argv = netns.pasta_argv("/usr/bin/pasta", 40000, 8000, uid=0)
    assert argv[argv.index("-t") + 1] == "127.0.0.1/40000:8000"


def test_haproxys_count_goes_into_the_request_counter_across_reloads():
    counter = RequestCounter(60)
    counting = EngineRequests(counter, server="a", admin_socket="/nowhere")
    readings = (None, (1, 5), (1, 5), (1, 9), (2, 2), (2, 4), None, (3, 7))
    added = [counting.step(r) for r in readings]
    assert added == [0, 5, 0, 4, 2, 2, 0, 7]  # pid 2, pid 3: new HAProxy processes, each counting from zero
    counter.record_many(sum(added))
    assert counter.total == 20 and counter.requests_in_window() == 20
    assert counting.read() is None  # no HAProxy there: nothing counted, no error


def test_the_log_reader_warns_when_haproxy_drops_lines_at_most_once_a_minute(tmp_path, caplog, monkeypatch):
    from ray_dstack.serve.ingress import engine_registration
    from ray_dstack.serve.ingress.engine_log import EngineLog

    entries = tmp_path / "engines"
    entries.mkdir()
    reader = EngineLog(entries, lambda line, model: None)
    polling = EngineRequests(RequestCounter(60), server="a", admin_socket="/nowhere", log=reader)
    clock = [1000.0]
    monkeypatch.setattr(engine_registration.time, "monotonic", lambda: clock[0])
    warnings = []
    try:
        # (pid, DroppedLogs) per poll: drops before this replica read the log are not its own; a new HAProxy
        # process counts from zero.
        for reading, advance in (((1, 7), 0), ((1, 7), 1), ((1, 9), 1), ((1, 12), 1), ((1, 12), 60), ((1, 13), 1),
                                 ((2, 3), 60)):
            clock[0] += advance
            polling.dropped_now = reading
            caplog.clear()
            polling.poll_log()
            warnings.append([r.getMessage().split(" log line")[0] for r in caplog.records if r.levelname == "WARNING"])
    finally:
        reader.close()
    assert reader.models == {} and not reader.reading
    assert warnings == [[], [], ["HAProxy dropped 2"], [], ["HAProxy dropped 3"], [], ["HAProxy dropped 3"]]


@pytest.fixture
def namespace_init(tmp_path):
    """A process inside a network namespace of its own, listening on a Unix socket (as the replica's init)."""
    name = f"rdx-reg-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    path = str(tmp_path / "init.sock")
    code = ("import socket, sys, time; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(); "
            "c = socket.socket(); c.bind(('127.0.0.1', 0)); time.sleep(600)")
    proc = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-c", code, path])
    try:
        wait_until(lambda: os.path.exists(path), timeout=20, interval=0.05, what="the init's socket")
        yield proc, path, name
    finally:
        proc.kill()
        proc.wait(10)
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def test_registration_binds_the_namespace_and_writes_the_entry_then_removes_both(tmp_path, namespace_init):
    proc, path, name = namespace_init
    assert engine_registration.peer_pid(path) == proc.pid
    directory = tmp_path / "engines"
    registration = EngineRegistration.create(spec(), connector_path=path, port=8000,
                                             server="SERVE_REPLICA__svc-svc-abc123", directory=directory,
                                             max_ongoing=256)
    bound = Path(engine_path.NETNS_DIR, registration.entry.netns)
    try:
        assert bound.exists()
        assert os.stat(bound).st_ino == os.stat(f"/proc/{proc.pid}/ns/net").st_ino  # the init's namespace
        [entry] = engine_path.read_entries(directory)
        assert entry == registration.entry
        assert (entry.prefix, entry.model, entry.port, entry.token_sha256, entry.max_ongoing) == (
            "/svc", "m", 8000, "0" * 64, 256)
        registration.withdraw()  # the entry goes first: no later reload lists the engine
        assert engine_path.read_entries(directory) == [] and bound.exists()
    finally:
        registration.release()  # the namespace last
    assert not bound.exists()


def test_established_connections_are_read_from_the_namespaces_tcp_table():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        registration = EngineRegistration(
            engine_path.Entry("a", "/svc", "m", None, "/v1", "ns", port), Path("/nowhere"), os.getpid())
        assert engine_registration.connections_to_engine(registration) == 0
        client = socket.create_connection(("127.0.0.1", port))
        server, _ = listener.accept()
        assert engine_registration.connections_to_engine(registration) == 1

        def close_later():
            time.sleep(0.5)
            client.close()
            server.close()

        threading.Thread(target=close_later).start()
        t0 = time.monotonic()
        asyncio.run(engine_registration.drain(registration, LOG, max_s=20))
        assert 0.4 < time.monotonic() - t0 < 10
        t0 = time.monotonic()
        asyncio.run(engine_registration.drain(registration, LOG, max_s=20))  # nothing open: at once
        assert time.monotonic() - t0 < 0.2


def test_a_dead_replicas_entry_and_namespace_are_collected(tmp_path, namespace_init):
    proc, path, _ = namespace_init
    directory = tmp_path / "engines"
    alive = EngineRegistration.create(spec(), connector_path=path, port=8000, server="alive", directory=directory)
    try:
        dead_ns = f"rdx-dead-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", dead_ns], check=True, capture_output=True)  # no process in it
        dead = engine_path.Entry("dead", "/svc", "m", None, "/v1", dead_ns, 8000)
        engine_path.entry_path(directory, "dead").write_text(dead.to_json())
        assert engine_registration.collect_stale(directory) == [dead_ns]
        assert not Path(engine_path.NETNS_DIR, dead_ns).exists()
        assert engine_path.read_entries(directory) == [alive.entry]
        # A namespace the current configuration still names is kept (a HAProxy may be starting from it).
        (tmp_path / "haproxy.cfg").write_text(f"    server x 127.0.0.1:8000 namespace {dead_ns} track b/x\n")
        subprocess.run(["ip", "netns", "add", dead_ns], check=True, capture_output=True)
        engine_path.entry_path(directory, "dead").write_text(dead.to_json())
        assert engine_registration.collect_stale(directory) == []
        subprocess.run(["ip", "netns", "delete", dead_ns], capture_output=True)
    finally:
        alive.withdraw()
        alive.release()


def test_engine_namespaces_a_stopped_ray_left_bound_are_collected(tmp_path):
    """`ray stop` kills replicas before they release their namespace: the next registration on the machine
    unbinds those with no process left that no running HAProxy names."""
    from ray_dstack.serve.ingress import haproxy_v1

    base = f"{engine_registration.REPLICA_NETNS_PREFIX}_rdxtest-{os.getpid()}"
    dead, named, alive = f"{base}-dead", f"{base}-named", f"{base}-alive"
    for name in (dead, named, alive):
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    inside = subprocess.Popen(["ip", "netns", "exec", alive, "sleep", "600"])
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"""global
    stats socket {tmp_path / "admin.sock"} mode 600 level admin
defaults
    mode http
    timeout connect 1s
    timeout client 1s
    timeout server 1s
frontend f
    bind 127.0.0.1:{free_port()}
    default_backend b
backend b
    server s 127.0.0.1:1 namespace {named}
""")
    haproxy = subprocess.Popen([haproxy_v1.real_binary(), "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: (tmp_path / "admin.sock").exists(), timeout=20, interval=0.05, what="haproxy")
        wait_until(lambda: subprocess.run(["ip", "netns", "pids", alive], capture_output=True, text=True).stdout,
                   timeout=20, interval=0.05, what="a process in the namespace")
        removed = engine_registration.collect_orphaned_namespaces()
        assert dead in removed and named not in removed and alive not in removed
        assert sorted(n for n in os.listdir(engine_path.NETNS_DIR) if n.startswith(base)) == [alive, named]
    finally:
        haproxy.terminate()
        haproxy.wait(10)
        inside.kill()
        inside.wait(10)
        for name in (dead, named, alive):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def test_outside_a_replica_no_max_ongoing_requests_is_written():
    assert engine_registration.max_ongoing_requests() is None
