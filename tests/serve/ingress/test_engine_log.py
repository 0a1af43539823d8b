"""Reading the engine path's log (ray_dstack/serve/ingress/engine_log.py): the lines, and one reader per node.
HAProxy writing these lines is tested with Ray's haproxy in test_engine_path.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_until

from ray_dstack.serve.ingress import engine_path
from ray_dstack.serve.ingress.engine_log import CLIENT_LEFT, LOCK_NAME, EngineLog, EngineLogLine, datagram_socket, parse

# As HAProxy sends them (test_engine_path.py shows the same shape coming from haproxy itself).
SERVE_AND_OURS = (b'<141>1 2026-12-07T14:14:05.990503+00:00 - haproxy 25833 - [serve@1 app="svc" route="" '
                  b'method="POST" status=200 latency_ms=1 deployment="" term_state=--][ray_dstack@1 service="svc" '
                  b'route="chat/completions" status=200 latency_ms=1234] 127.0.0.1:41400 '
                  b'"POST /svc/v1/chat/completions HTTP/1.1"\n')


def _line(**fields: str) -> bytes:
    values = {"service": '"svc"', "route": '"completions"', "status": "200", "latency_ms": "7"}
    values.update(fields)
    return b"<141>1 - - haproxy 1 - [ray_dstack@1 " + " ".join(f"{k}={v}" for k, v in values.items()).encode() + b"] x"


def test_a_line_gives_the_service_route_status_and_latency():
    assert parse(SERVE_AND_OURS) == EngineLogLine("svc", "chat/completions", 200, 1.234)
    assert parse(_line()) == EngineLogLine("svc", "completions", 200, 0.007)
    assert parse(_line(service='"a\\"b"')) == EngineLogLine('a"b', "completions", 200, 0.007)  # HAProxy's +E


def test_a_request_the_client_left_before_its_answer_counts_as_499():
    assert parse(_line(status="-1")).status == CLIENT_LEFT == 499
    assert parse(_line(status="1000")).status == CLIENT_LEFT  # not an HTTP status: never a tag of its own


@pytest.mark.parametrize("datagram", [
    b"<142>1 - - haproxy 1 - - Connect from 127.0.0.1:1 to 127.0.0.1:2",  # not a request line
    b'<142>1 - - haproxy 1 - [serve@1 app="svc" status=200 latency_ms=1] x',  # Serve's element only
    _line(service='""'),  # the replica path's requests: no service set (they are logged at info, too)
    _line(route='"models"'),  # a route the engine path never takes
    _line(status='"x"'),
    _line(latency_ms="-"),
])
def test_a_line_without_a_whole_engine_path_element_is_skipped(datagram):
    assert parse(datagram) is None


MODEL = "acme/llama-3"


def _engines(tmp_path, *services: str):
    """An engine directory with an entry per service (the log socket lies beside it, as beside Serve's
    haproxy.cfg), and the socket's path."""
    entries = tmp_path / engine_path.ENGINE_DIR_NAME
    entries.mkdir()
    for i, service in enumerate(services):
        _register(entries, service, server=f"s{i}")
    return entries, engine_path.log_socket_path(entries)


def _register(entries, service: str, *, model: str = MODEL, server: str = "a") -> None:
    entry = engine_path.Entry(server=server, prefix=f"/{service}", model=model, token_sha256=None,
                              upstream_prefix="/v1", netns="ns", port=8000)
    engine_path.entry_path(entries, server).write_text(entry.to_json())


def _until(predicate) -> None:
    wait_until(predicate, timeout=5, interval=0.01, what="the reader's thread to record the line")


def test_one_replica_per_node_reads_the_log_and_another_takes_over_when_it_stops(tmp_path):
    got: list[tuple[EngineLogLine, str]] = []
    entries, log_socket = _engines(tmp_path, "svc")

    def record(line, model):
        got.append((line, model))

    first, second = EngineLog(entries, record), EngineLog(entries, record)
    assert first.lead() and not second.lead()
    assert log_socket.stat().st_mode & 0o777 == 0o600
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as haproxy:
        haproxy.sendto(_line(), str(log_socket))
        _until(lambda: got)
        first.close()
        assert not log_socket.exists()
        assert second.lead() and second.reading
        haproxy.sendto(_line(route='"chat/completions"'), str(log_socket))
        _until(lambda: len(got) == 2)
    second.close()
    assert [(g.route, model) for g, model in got] == [("completions", MODEL), ("chat/completions", MODEL)]


def test_a_line_for_a_service_not_registered_on_the_node_is_dropped(tmp_path):
    """Root's processes can write to the socket: a forged line adds no series."""
    got: list[str] = []
    entries, log_socket = _engines(tmp_path, "svc")

    reader = EngineLog(entries, lambda line, model: got.append(line.service))
    assert reader.lead()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as haproxy:
        haproxy.sendto(_line(service='"forged"'), str(log_socket))
        haproxy.sendto(_line(), str(log_socket))  # datagrams keep their order: the forged one came first
        _until(lambda: got)
    reader.close()
    assert got == ["svc"]


def test_the_model_tag_follows_the_services_registration(tmp_path):
    entries, _ = _engines(tmp_path, "svc")
    reader = EngineLog(entries, lambda line, model: None)
    reader.refresh()
    assert reader.models == {"svc": MODEL}
    _register(entries, "svc", model="acme/llama-4", server="s0")  # redeployed with another model
    engine_path.entry_path(entries, "gone").write_text("")
    reader.refresh()
    assert reader.models == {"svc": "acme/llama-4"}
    engine_path.entry_path(entries, "s0").unlink()  # withdrawn: its last requests keep their model tag
    reader.refresh()
    assert reader.models == {"svc": "acme/llama-4"}


def test_a_reader_that_died_leaves_the_log_to_the_next_one(tmp_path):
    """SIGKILL: the kernel drops its lock; its socket file is left and the next reader replaces it."""
    entries, log_socket = _engines(tmp_path, "svc")
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, os, socket, sys, time
fd = os.open({str(entries / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind({str(log_socket)!r})
print("ready", flush=True)
time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    got: list[EngineLogLine] = []
    try:
        assert holder.stdout.readline().strip() == "ready"

        reader = EngineLog(entries, lambda line, model: got.append(line))
        assert not reader.lead()
        holder.kill()
        holder.wait(10)
        assert reader.lead()  # the stale socket file was replaced ...
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as haproxy:
            haproxy.sendto(_line(), str(log_socket))
            _until(lambda: got)
        reader.close()
    finally:
        holder.kill()
        holder.wait(10)
    assert got == [EngineLogLine("svc", "completions", 200, 0.007)]  # ... by one that reads


def test_a_reader_whose_socket_was_replaced_steps_down_without_removing_the_other(tmp_path):
    """The lock file removed under a reader (a /tmp cleaner): a second reader binds the path anew. The first
    sees the path is not its socket any more, stops, and leaves the second's socket in place."""
    entries, log_socket = _engines(tmp_path, "svc")

    first, second = EngineLog(entries, lambda line, model: None), EngineLog(entries, lambda line, model: None)
    assert first.lead()
    (entries / LOCK_NAME).unlink()
    assert second.lead()
    assert not first.lead() and not first.reading
    assert log_socket.exists() and second.lead()
    second.close()
    assert not log_socket.exists()


def test_the_log_socket_made_in_a_namespace_queues_more_than_the_hosts_ten_datagrams(tmp_path):
    """The queue is set from the creating namespace's `net.unix.max_dgram_qlen`; the path is reached from the
    host's namespace all the same."""
    name = f"rdx-log-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        with datagram_socket(f"/run/netns/{name}") as reader, \
                socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as haproxy:
            reader.bind(str(tmp_path / "log.sock"))
            haproxy.setblocking(False)  # as HAProxy sends: a full queue drops the line
            for i in range(100):
                haproxy.sendto(_line(), str(tmp_path / "log.sock"))  # BlockingIOError past the host's 10
            assert parse(reader.recv(65536)) == EngineLogLine("svc", "completions", 200, 0.007)
        host_queue = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
        with datagram_socket(None) as reader, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as haproxy:
            reader.bind(str(tmp_path / "host.sock"))
            haproxy.setblocking(False)
            with pytest.raises(BlockingIOError):
                for i in range(host_queue + 2):
                    haproxy.sendto(_line(), str(tmp_path / "host.sock"))
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
