"""The engine path's HAProxy rules (ray_dstack/serve/ingress/engine_path.py) with Ray's own haproxy binary, outside
Ray: a Serve-shaped configuration (health-checked replica servers, `/v1` rules from haproxy_v1.py), real replica
servers on the host, and a real engine inside a network namespace of its own with no port on the host."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from conftest import free_port, wait_until
from tests.support.haproxy_config import SERVE_PREAMBLE, answer_json

from ray_dstack.serve.ingress import engine_path, haproxy_v1, v1_routes
from ray_dstack.serve.ingress.engine_log import EngineLog, EngineLogLine
from ray_dstack.serve.ingress.engine_path import EngineRoute, EngineServer
from ray_dstack.spec import V1_ROUTE_HEADER

TOKEN = "s3cret-token"
TOKEN_SHA256 = hashlib.sha256(TOKEN.encode()).hexdigest()
MODEL = "acme/llama-3"

SERVE_LIKE = SERVE_PREAMBLE + """\
frontend http_frontend
    bind 127.0.0.1:{port}
    acl is_svc_inner path_beg /svc/v1/embeddings/
    acl is_svc_inner path /svc/v1/embeddings
    acl is_svc path_beg /svc/
    acl is_svc path /svc
    acl is_gw path_beg /
    use_backend svc_inner if is_svc_inner
    use_backend svc if is_svc
    use_backend gw if is_gw
backend svc_inner
    server i 127.0.0.1:{g}
backend svc
    balance leastconn
    option httpchk GET /-/healthz
    http-check expect status 200
    server a 127.0.0.1:{a} check inter 200ms
    server b 127.0.0.1:{b} check inter 200ms
    server fallback 127.0.0.1:{g} check backup
backend gw
    server g 127.0.0.1:{g}
"""

# The engine: answers with what it received (run inside the namespace by `ip netns exec`).
ENGINE = r"""
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        payload = json.loads(body)
        started = time.time()
        time.sleep(payload.get("hold_s", 0))  # a request that keeps the engine busy (back-pressure tests)
        out = json.dumps({"server": "engine", "path": self.path, "authorization": self.headers.get("authorization"),
                          "started": started, "finished": time.time(),
                          "v1": self.headers.get("x-ray-dstack-v1"), "body": payload,
                          "cookie": self.headers.get("cookie"),
                          "accept-encoding": self.headers.get("accept-encoding")}).encode()
        self.send_response(payload.get("status", 200))
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        if self.path == "/v1/completions":
            self.send_header("x-request-id", "engine-own-id")
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a):
        pass
server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
open(sys.argv[2], "w").close()
server.serve_forever()
"""


class _Replica(BaseHTTPRequestHandler):
    name = ""
    healthy = True

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        if self.path == "/-/healthz":
            self.send_response(200 if type(self).healthy else 503)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        answer_json(self, 200, {"server": self.name, "path": self.path,
                                "authorization": self.headers.get("authorization")})

    do_GET = do_POST

    def log_message(self, *args):
        pass


def _replica(name: str) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), type(f"Replica_{name}", (_Replica,), {"name": name}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """An engine listening on 127.0.0.1:<port> inside the namespace /run/netns/<name>: (name, port)."""
    tmp = tmp_path_factory.mktemp("engine")
    netns = f"rdx-engine-{os.getpid()}"
    port = free_port()
    _ip("netns", "add", netns)
    _ip("-n", netns, "link", "set", "lo", "up")
    script, ready = tmp / "engine.py", tmp / "ready"
    script.write_text(ENGINE)
    proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, str(script), str(port), str(ready)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(ready.exists, timeout=20, interval=0.05, what="the engine inside its namespace")
        yield netns, port
    finally:
        proc.terminate()
        proc.wait(10)
        subprocess.run(["ip", "netns", "delete", netns], capture_output=True, timeout=30)


def _route(netns: str, port: int, **overrides) -> EngineRoute:
    values = dict(backend="svc", prefix="/svc", model=MODEL, token_sha256=TOKEN_SHA256,
                  servers=(EngineServer("a", netns, port),), shadowed_by=("svc_inner",))
    values.update(overrides)
    return EngineRoute(**values)


# Serve's per-request metrics log (its template, with metrics on), as the first lines of `frontend http_frontend`.
SERVE_METRICS_LOG = """\
    log global
    log {path} len 8192 format rfc5424 local1 debug
    log-format-sd "%{{+Q,+E}}o [serve@1 app=%[var(txn.serve_app)] route=%[var(txn.serve_route)] method=%HM \
status=%ST latency_ms=%Ta deployment=%[var(txn.serve_deployment)] term_state=%ts]"
    http-request set-var-fmt(txn.serve_app) svc if {{ path_beg /svc/ }}
"""


@contextlib.contextmanager
def _front(tmp_path: Path, routes_of, *, log_socket: str | None = None, serve_metrics_socket: str | None = None):
    """haproxy with Serve's shape, the `/v1` rules and the engine path of `routes_of(replica ports)`, replicas a
    and b behind `/svc` (health-checked) and g as the gateway; yields (client, admin). `log_socket`: the
    engine path's log; `serve_metrics_socket`: Serve's own per-request metrics log, there."""
    replicas = {"a": _replica("a"), "b": _replica("b"), "g": _replica("g")}
    port = free_port()
    socket_path = str(tmp_path / "admin.sock")
    config = SERVE_LIKE.format(socket=socket_path, port=port, **{n: s.server_address[1] for n, s in replicas.items()})
    if serve_metrics_socket is not None:
        head = f"frontend http_frontend\n    bind 127.0.0.1:{port}\n"
        config = config.replace(head, head + SERVE_METRICS_LOG.format(path=serve_metrics_socket))
    map_path = str(tmp_path / haproxy_v1.MAP_FILE_NAME)
    Path(map_path).write_text(f"{MODEL} /svc\n")
    config = haproxy_v1.inject(config, map_path)
    config = engine_path.inject(config, routes_of({n: s.server_address[1] for n, s in replicas.items()}),
                                log_socket=log_socket)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(config)
    check = subprocess.run([haproxy_v1.real_binary(), "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    if log_socket is not None:  # no warning either: a second `log-format-sd` would pass and replace Serve's
        assert "WARNING" not in check.stdout + check.stderr, check.stdout + check.stderr
    proc = subprocess.Popen([haproxy_v1.real_binary(), "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10)
    try:
        admin = v1_routes.HAProxyAdmin(socket_path)
        wait_until(lambda: os.path.exists(socket_path) and admin.pid() == proc.pid, timeout=20, interval=0.05,
                   what="haproxy's admin socket")
        yield client, admin
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)
        for s in replicas.values():
            s.shutdown()


@pytest.fixture
def front(tmp_path, engine):
    netns, port = engine
    with _front(tmp_path, lambda ports: [_route(netns, port)]) as (client, admin):
        yield client, admin


def _chat(client: httpx.Client, path: str = "/svc/v1/chat/completions", *, auth: str | None = f"Bearer {TOKEN}",
          body: dict | None = None, headers: dict | None = None) -> httpx.Response:
    h = dict(headers or {})
    if auth is not None:
        h["authorization"] = auth
    return client.post(path, json=body if body is not None else {"model": MODEL, "messages": []}, headers=h)


def test_an_eligible_request_reaches_the_engine_without_the_token_or_the_prefix(front):
    client, _ = front
    r = _chat(client)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got.pop("started") <= got.pop("finished")
    assert got == {"server": "engine", "path": "/v1/chat/completions", "authorization": None, "v1": None,
                   "body": {"model": MODEL, "messages": []}, "cookie": None, "accept-encoding": "identity"}
    assert re.fullmatch(r"req_[0-9a-f]{32}", r.headers["x-request-id"]), r.headers
    # The scheme is case-insensitive, as the replica's check; an engine's own request id is kept.
    r = _chat(client, "/svc/v1/completions", auth=f"bearer {TOKEN}")
    assert r.json()["server"] == "engine" and r.json()["path"] == "/v1/completions"
    assert r.headers["x-request-id"] == "engine-own-id"


def test_the_engine_gets_only_the_headers_the_replica_forwards(front):
    client, _ = front
    got = _chat(client, headers={"cookie": "session=1", "accept-encoding": "gzip", "x-request-id": "mine"}).json()
    assert got["server"] == "engine" and got["cookie"] is None and got["accept-encoding"] == "identity"


def test_an_engine_failure_is_a_502_as_on_the_replica_path_and_503_stays(front):
    client, _ = front
    for sent, answered in ((500, 502), (502, 502), (503, 503), (429, 429)):
        r = _chat(client, body={"model": MODEL, "messages": [], "status": sent})
        assert r.status_code == answered and r.json()["server"] == "engine", (sent, r.status_code)


def test_an_engine_that_cannot_be_reached_answers_503_in_openais_shape(tmp_path, engine):
    netns, port = engine
    with _front(tmp_path, lambda ports: [_route(netns, port + 1)]) as (client, _):  # nothing listens there
        r = _chat(client)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "upstream_unavailable"


def test_an_engine_refusing_connections_fails_over_to_another_before_any_byte(tmp_path, engine):
    netns, port = engine
    servers = (EngineServer("a", netns, port + 1), EngineServer("b", netns, port))  # a's engine is gone
    with _front(tmp_path, lambda ports: [_route(netns, port, servers=servers)]) as (client, admin):
        answers = [_chat(client) for _ in range(20)]
        assert {(r.status_code, r.json()["server"]) for r in answers} == {(200, "engine")}
        lines = admin.command("show stat").splitlines()
        header = lines[0][2:].split(",")
        row = dict(zip(header, next(line for line in lines if line.startswith("svc--engine,a,")).split(",")))
        assert int(row["wredis"]) > 0  # a was tried first, and its requests went to b


def test_the_admin_socket_is_haproxys_own_user_only_with_the_engine_path(front, tmp_path):
    socket_path = tmp_path / "admin.sock"
    assert socket_path.stat().st_mode & 0o777 == 0o600  # the runtime API could add patterns to the token's ACL


def test_v1_by_model_takes_the_engine_path_too(front):
    client, _ = front
    r = _chat(client, "/v1/chat/completions", headers={V1_ROUTE_HEADER: "/forged"})
    assert r.json()["server"] == "engine"
    assert r.json()["path"] == "/v1/chat/completions" and r.json()["v1"] is None


@pytest.mark.parametrize("case", [
    dict(auth=None),
    dict(auth="Bearer wrong"),
    dict(auth=f"Bearer\t{TOKEN}"),
    dict(auth=f"Bearer  {TOKEN}"),
    dict(auth=f"Basic {TOKEN}"),
    dict(auth=f"Bearer {TOKEN}x"),
    dict(auth=f"Bearer {TOKEN}", headers={"Authorization": f"Bearer {TOKEN}"}),  # two headers
    dict(body={"model": "another", "messages": []}),
    dict(body={"messages": []}),
    dict(path="/svc/v1/embeddings"),  # another application's prefix (svc_inner)
    dict(path="/svc/v1/chat/completions/"),
    dict(path="/svc/chat/completions"),
    dict(path="/svc/v1/chat/completions?x=1"),  # the replica drops a query string; the engine path would not
    dict(raw=b'{"model": "%s", "model": "other"}' % MODEL.encode()),  # the replica's parser takes the last
    dict(raw=b'{"model": "%s", "mod\\u0065l": "other"}' % MODEL.encode()),  # a key spelled with escapes
    dict(chunked=True),  # no Content-Length: is the body whole?
    dict(raw=b'{"model": "%s", "messages": [{"role": "user", "content": "%s"}]}' % (MODEL.encode(), b"x" * 40000)),
], ids=lambda c: json.dumps(c, default=repr))
def test_anything_the_replica_would_not_pass_through_as_it_is_takes_the_replica_path(front, case):
    client, _ = front
    case = dict(case)
    path = case.pop("path", "/svc/v1/chat/completions")
    extra = case.pop("headers", None)
    auth = case.pop("auth", f"Bearer {TOKEN}")
    raw = case.pop("raw", None)
    if case.pop("chunked", False):
        raw = iter([json.dumps({"model": MODEL, "messages": []}).encode()])
    if raw is not None:
        r = client.post(path, content=raw, headers={"authorization": auth, "content-type": "application/json"})
    elif extra:  # httpx merges a dict's keys: send two Authorization headers as a list
        r = client.post(path, json={"model": MODEL, "messages": []},
                        headers=[("authorization", auth), *extra.items()])
    else:
        r = _chat(client, path, auth=auth, **case)
    assert r.json()["server"] in {"a", "b", "g"}, (path, raw, r.json())
    if r.json()["server"] in {"a", "b"} and not extra:  # Serve's backend: the request as sent, token included
        assert r.json()["path"] == path and r.json()["authorization"] == auth


def test_a_token_outside_printable_ascii_takes_the_replica_path(tmp_path, engine):
    """The replica reads the header as latin-1 and strips it: HAProxy hashes only what it would hash alike."""
    netns, port = engine
    token = "t\u00f6ken"
    digest = hashlib.sha256(token.encode()).hexdigest()
    with _front(tmp_path, lambda ports: [_route(netns, port, token_sha256=digest)]) as (client, _):
        r = client.post("/svc/v1/chat/completions", json={"model": MODEL, "messages": []},
                        headers=[(b"authorization", b"Bearer " + token.encode())])
        assert r.json()["server"] in {"a", "b"}


def test_other_methods_and_routes_take_the_replica_path(front):
    client, _ = front
    r = client.get("/svc/v1/models", headers={"authorization": f"Bearer {TOKEN}"})
    assert r.json()["server"] in {"a", "b"}
    r = client.post("/svc/generate", json={"model": MODEL}, headers={"authorization": f"Bearer {TOKEN}"})
    assert r.json()["server"] in {"a", "b"}


def test_the_engine_port_is_not_reachable_from_the_host(engine):
    _, port = engine
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_the_engine_follows_its_replicas_server_in_serves_backend(front):
    client, admin = front
    assert _chat(client).json()["server"] == "engine"
    admin.command("disable server svc/a")  # Serve drains or removes replica a: its engine goes with it
    wait_until(lambda: _chat(client).json()["server"] == "b", timeout=10, interval=0.05, what="replica b")
    assert {_chat(client).json()["server"] for _ in range(10)} == {"b"}
    admin.command("enable server svc/a")
    wait_until(lambda: _chat(client).json()["server"] == "engine", timeout=10, interval=0.05, what="the engine")


def test_a_replica_failing_its_health_check_takes_its_engine_out(front):
    client, admin = front
    # Replica a's health check fails: HAProxy marks it down, and the tracked engine server with it.
    admin.command("set server svc/a health down")
    wait_until(lambda: _chat(client).json()["server"] == "b", timeout=10, interval=0.05, what="replica b")
    stat = admin.command("show stat")
    engine_line = next(line for line in stat.splitlines() if line.startswith("svc--engine,a,"))
    assert ",DOWN," in engine_line, engine_line


def test_auth_false_needs_no_token_and_the_engine_sees_the_clients_header_removed(tmp_path, engine):
    netns, port = engine
    with _front(tmp_path, lambda ports: [_route(netns, port, token_sha256=None)]) as (client, _):
        assert _chat(client, auth=None).json()["server"] == "engine"
        got = _chat(client, auth="Bearer anything").json()
        assert got["server"] == "engine" and got["authorization"] is None


def test_a_share_below_one_sends_the_rest_to_the_other_nodes_replicas(tmp_path, engine):
    netns, port = engine
    # Replica a is this node's (its engine here), b another node's: b takes the other half, a none through Serve.
    def routes(ports):
        return [_route(netns, port, share=(1, 2), remote=(("b", f"127.0.0.1:{ports['b']}"),))]

    with _front(tmp_path, routes) as (client, _):
        servers = [_chat(client).json()["server"] for _ in range(200)]
        engine_part = servers.count("engine") / len(servers)
        assert 0.3 < engine_part < 0.7, engine_part
        assert set(servers) == {"engine", "b"}
        # b's replica got the request as sent: the token is its to check.
        assert next(r for r in (_chat(client).json() for _ in range(50)) if r["server"] == "b")["authorization"]


@pytest.mark.parametrize("overrides, problem", [
    (dict(model='say "hi"'), "model"),
    (dict(model="100%"), "model"),
    (dict(prefix="/svc x"), "prefix"),
    (dict(prefix="/"), "prefix"),
    (dict(token_sha256="ABC"), "digest"),
    (dict(servers=()), "no engine"),
    (dict(servers=(EngineServer("a", "ns x", 1),)), "engine server"),
    (dict(share=(0, 2)), "share"),
    (dict(upstream_prefix="/v1/"), "model prefix"),
    (dict(model="a}b"), "model"),
])
def test_a_route_the_rules_cannot_express_keeps_the_replica_path(overrides, problem):
    route = _route("ns", 8000, **overrides)
    assert problem in route.problem()
    config = SERVE_LIKE.format(socket="/s", port=1, a=2, b=3, g=4)
    assert engine_path.inject(config, [route]) == config


def test_what_the_rules_spell_out_equals_the_replicas_own():
    """engine_path.py imports nothing heavy (haproxy's wrapper runs it on every reload): its copies of the
    replica path's values must stay equal to them."""
    from ray_dstack.openai import errors, passthrough
    from ray_dstack.openai.endpoint import GatewayResponse

    assert set(engine_path.FORWARDED_HEADERS) - {"content-length", "host"} == passthrough._FORWARDED_HEADERS
    unavailable = GatewayResponse.of_error(errors.upstream_unavailable())
    assert unavailable.status == 503 and json.loads(engine_path.UNAVAILABLE_JSON) == json.loads(unavailable.body)
    assert engine_path.BODY_WAIT_S == haproxy_v1.BODY_WAIT_S


def test_inject_puts_the_rules_before_serves_first_use_backend_and_runs_once():
    config = SERVE_LIKE.format(socket="/s", port=1, a=2, b=3, g=4)
    out = engine_path.inject(config, [_route("ns", 8000)])
    assert out.index(engine_path.MARKER) < out.index("use_backend svc_inner") < out.index("\nbackend svc--engine")
    assert "    server a 127.0.0.1:8000 namespace ns track svc/a" in out.split("\n")
    assert TOKEN not in out and TOKEN_SHA256 in out  # the digest only, never the token
    assert engine_path.inject(out, [_route("ns", 8000)]) == out
    assert engine_path.inject("frontend other\n    bind :1\n", [_route("ns", 1)]) == \
        "frontend other\n    bind :1\n"


def test_the_log_target_is_written_only_for_a_socket_path_the_kernel_takes():
    config = SERVE_LIKE.format(socket="/s", port=1, a=2, b=3, g=4)
    with_log = engine_path.inject(config, [_route("ns", 8000)], log_socket="/tmp/x/ray-dstack-log.sock")
    assert "    log /tmp/x/ray-dstack-log.sock len 8192 format rfc5424 local1 notice" in with_log.split("\n")
    assert with_log.count("log-format-sd") == 1 and "    http-request set-log-level notice" in with_log.split("\n")
    long_path = "/tmp/" + "n" * 100 + "/ray-dstack-log.sock"  # over UNIX_PATH_MAX: no log, the engine path stays
    assert engine_path.inject(config, [_route("ns", 8000)], log_socket=long_path) == \
        engine_path.inject(config, [_route("ns", 8000)])
    # A `log-format-sd` the rules cannot extend: a second one would replace it (Serve's metrics read it).
    for sd in ('    log-format-sd "%{+Q}o [serve@1 x=1]"\n    log-format-sd "%{+Q}o [serve@1 y=1]"\n',
               "    log-format-sd %{+Q}o\\ [serve@1\\ x=1]\n"):
        theirs = config.replace("    acl is_svc_inner path_beg", sd + "    acl is_svc_inner path_beg", 1)
        assert engine_path.inject(theirs, [_route("ns", 8000)], log_socket="/tmp/x/ray-dstack-log.sock") == \
            engine_path.inject(theirs, [_route("ns", 8000)])


def test_haproxy_counts_the_engines_responses_for_its_replica(front):
    from ray_dstack.serve.ingress.engine_registration import engine_responses

    client, admin = front
    before = engine_responses(admin.command("show stat"), engine_path.ENGINE_BACKEND_SUFFIX, "a")
    for _ in range(3):
        assert _chat(client).json()["server"] == "engine"
    _chat(client, auth=None)  # the replica's, not the engine's
    after = engine_responses(admin.command("show stat"), engine_path.ENGINE_BACKEND_SUFFIX, "a")
    assert after - before == 3
    assert engine_responses(admin.command("show stat"), engine_path.ENGINE_BACKEND_SUFFIX, "zz") is None


@pytest.mark.parametrize("serve_metrics", [True, False], ids=["serve-metrics-log", "no-serve-metrics-log"])
def test_the_engine_paths_requests_and_no_other_reach_its_log(tmp_path, engine, serve_metrics, monkeypatch):
    """HAProxy logs each engine-path request to the log socket beside its configuration (engine_log.py reads it),
    and no request of the replica path; Serve's own metrics line, when Serve logs one, still parses with both
    elements."""
    from ray.serve._private.haproxy_metrics import HAProxyMetricsCollector

    from ray_dstack.serve.ingress import engine_log

    netns, port = engine
    got: list[tuple[EngineLogLine, str]] = []
    datagrams: list[bytes] = []  # every datagram the socket received, whatever it holds
    parse = engine_log.parse
    monkeypatch.setattr(engine_log, "parse", lambda datagram: datagrams.append(datagram) or parse(datagram))
    serve_socket = tmp_path / "serve-metrics.sock"
    serve_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    serve_sock.bind(str(serve_socket))
    serve_sock.setblocking(False)
    entries = tmp_path / engine_path.ENGINE_DIR_NAME
    entries.mkdir()
    engine_path.entry_path(entries, "a").write_text(_entry(netns, port=port).to_json())
    log_socket = str(engine_path.log_socket_path(entries))
    front = _front(tmp_path, lambda ports: [_route(netns, port)], log_socket=log_socket,
                   serve_metrics_socket=str(serve_socket) if serve_metrics else None)
    reader = EngineLog(entries, lambda line, model: got.append((line, model)))
    with serve_sock, front as (client, _):
        assert reader.lead()
        try:
            assert _chat(client, auth=None).json()["server"] in ("a", "b")  # the replica's: never logged
            assert _chat(client).json()["server"] == "engine"
            assert _chat(client, "/svc/v1/completions").json()["server"] == "engine"
            assert _chat(client, body={"model": MODEL, "messages": [], "status": 500}).status_code == 502
            r = client.post("/v1/completions", json={"model": MODEL}, headers={"authorization": f"Bearer {TOKEN}"})
            assert r.json()["server"] == "engine"  # `/v1` by model
            # Datagrams keep their order: once the fourth line is in, no other can still come.
            wait_until(lambda: len(got) == 4, timeout=10, interval=0.02, what="the engine path's log lines")
        finally:
            reader.close()
        serve_lines = []
        while True:
            try:
                serve_lines.append(serve_sock.recv(65536))
            except BlockingIOError:
                break
    assert len(datagrams) == 4 and all(b'[ray_dstack@1 service="svc" ' in d for d in datagrams), datagrams
    assert sorted((g.service, g.route, g.status, model) for g, model in got) == [
        ("svc", "chat/completions", 200, MODEL), ("svc", "chat/completions", 502, MODEL),
        ("svc", "completions", 200, MODEL), ("svc", "completions", 200, MODEL)]
    assert all(0 <= g.latency_s < 10 for g, _ in got)
    assert not os.path.exists(log_socket)  # the reader removes it when it stops
    if serve_metrics:  # every request, the engine path's too, in Serve's own metrics: its parser reads them
        parsed = [HAProxyMetricsCollector.parse_line(line) for line in serve_lines]
        assert len(parsed) == 5 and all(p is not None for p in parsed), serve_lines
        assert sorted(p.status_code for p in parsed) == ["200"] * 4 + ["502"]
        assert sum(b'[ray_dstack@1 service="svc" ' in line for line in serve_lines) == 4  # the rest: service=""
    else:
        assert serve_lines == []


# --- the entries replicas write, and the routes a node's HAProxy gets from them ----------------------------


def _entry(netns: str = "ns", **overrides) -> engine_path.Entry:
    values = dict(server="a", prefix="/svc", model=MODEL, token_sha256=TOKEN_SHA256, upstream_prefix="/v1",
                  netns=netns, port=8000)
    values.update(overrides)
    return engine_path.Entry(**values)


def test_routes_follow_serves_backends_and_servers():
    config = SERVE_LIKE.format(socket="/s", port=1, a=2, b=3, g=4)
    [route] = engine_path.routes_for(config, [_entry(), _entry(server="gone")])
    assert route == EngineRoute(backend="svc", prefix="/svc", model=MODEL, token_sha256=TOKEN_SHA256,
                                servers=(EngineServer("a", "ns", 8000),), share=(1, 2), shadowed_by=("svc_inner",),
                                remote=(("b", "127.0.0.1:3"),))  # not Serve's `backup` fallback
    both = engine_path.routes_for(config, [_entry(), _entry(server="b", netns="ns2")])
    assert both[0].share == (2, 2) and [s.name for s in both[0].servers] == ["a", "b"] and both[0].remote == ()
    # A prefix Serve has no backend for, a server Serve does not list, two versions at once: no route.
    assert engine_path.routes_for(config, [_entry(prefix="/other")]) == []
    assert engine_path.routes_for(config, [_entry(server="gone")]) == []
    assert engine_path.routes_for(config, [_entry(), _entry(server="b", token_sha256="0" * 64)]) == []
    # Each engine keeps its replica's limit.
    [limited] = engine_path.routes_for(config, [_entry(max_ongoing=256), _entry(server="b", netns="ns2")])
    assert limited.servers == (EngineServer("a", "ns", 8000, 256), EngineServer("b", "ns2", 8000, None))


def test_entries_round_trip_and_a_dead_replicas_entry_is_skipped(tmp_path, engine):
    netns, _ = engine
    alive, dead = _entry(netns), _entry("rdx-no-such-namespace", server="b")
    for entry in (alive, dead):
        engine_path.entry_path(tmp_path, entry.server).write_text(entry.to_json())
    (tmp_path / "junk.json").write_text('{"server": 1}')
    assert engine_path.Entry.from_json(alive.to_json()) == alive
    limited = _entry(netns, max_ongoing=256)
    assert engine_path.Entry.from_json(limited.to_json()) == limited
    for bad in (0, -1, True, "256", 2.5):
        assert engine_path.Entry.from_json(_entry(netns, max_ongoing=bad).to_json()) is None, bad
    assert engine_path.read_entries(tmp_path) == [alive]


def _serve_config_with_an_engine(tmp_path: Path, netns: str, port: int) -> Path:
    """Serve's haproxy.cfg, and replica a's engine registered beside it."""
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(SERVE_LIKE.format(socket=str(tmp_path / "admin.sock"), port=free_port(), a=2, b=3, g=4))
    entries = tmp_path / engine_path.ENGINE_DIR_NAME
    entries.mkdir()
    engine_path.entry_path(entries, "a").write_text(_entry(netns, port=port).to_json())
    return cfg


def test_the_wrapper_adds_the_engine_path_of_registered_engines(tmp_path, engine):
    netns, port = engine
    cfg = _serve_config_with_an_engine(tmp_path, netns, port)
    haproxy_v1.prepare(haproxy_v1.real_binary(), str(cfg))
    text = cfg.read_text()
    assert haproxy_v1.MARKER in text and f"    server a 127.0.0.1:{port} namespace {netns} track svc/a" in text


def test_prefix_affinity_that_haproxy_refuses_leaves_the_engine_path_in(tmp_path, engine, monkeypatch):
    from ray_dstack.serve.ingress import prefix_affinity

    netns, port = engine
    cfg = _serve_config_with_an_engine(tmp_path, netns, port)
    monkeypatch.setattr(prefix_affinity, "inject", lambda config, map_path: config + "backend broken\n    nonsense\n")
    haproxy_v1.prepare(haproxy_v1.real_binary(), str(cfg))
    text = cfg.read_text()
    assert engine_path.MARKER in text and "nonsense" not in text


# --- back-pressure: Serve's max_ongoing_requests as the engine server's maxconn -------------------------------


def test_an_engine_gets_at_most_its_replicas_max_ongoing_requests_and_the_rest_wait(tmp_path, engine):
    """With `max_ongoing` 1, two requests sent at once reach the engine one after the other, and both succeed:
    the second waits in HAProxy's queue, as it would wait in the replica for Serve's slot."""
    netns, port = engine
    route = lambda ports: [_route(netns, port, servers=(EngineServer("a", netns, port, 1),))]  # noqa: E731
    with _front(tmp_path, route) as (client, _):
        body = {"model": MODEL, "messages": [], "hold_s": 0.6}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: _chat(client, body=body), range(2)))
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    first, second = sorted((a.json() for a in answers), key=lambda j: j["started"])
    assert first["server"] == second["server"] == "engine"
    assert second["started"] >= first["finished"], (first, second)  # never both in the engine at once


def test_without_a_limit_the_engine_takes_requests_at_once(tmp_path, engine):
    """The check above, reversed: the same two requests overlap in the engine when no limit is written."""
    netns, port = engine
    with _front(tmp_path, lambda ports: [_route(netns, port)]) as (client, _):
        body = {"model": MODEL, "messages": [], "hold_s": 0.6}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: _chat(client, body=body), range(2)))
    first, second = sorted((a.json() for a in answers), key=lambda j: j["started"])
    assert second["started"] < first["finished"], (first, second)


def test_the_engine_backend_queues_for_the_request_timeout_and_writes_each_limit():
    [route] = [_route("ns", 8000, timeout_s=42, servers=(EngineServer("a", "ns", 8000, 7),))]
    text = "\n".join(engine_path.backend_sections([route]))
    assert "    timeout queue 42s" in text and "    timeout server 42s" in text
    assert "server a 127.0.0.1:8000 namespace ns track svc/a maxconn 7" in text
    assert _route("ns", 8000, servers=(EngineServer("a", "ns", 8000, 0),)).problem() is not None


def test_haproxy_reports_the_engine_paths_requests_in_flight_and_queued(tmp_path, engine):
    """What the replica reports for the scale-to-zero guard: requests at the engine (`scur`) and those waiting
    for it beyond its limit (`qcur`), then none once they are answered."""
    from ray_dstack.serve.ingress.engine_registration import engine_in_flight

    netns, port = engine
    route = lambda ports: [_route(netns, port, servers=(EngineServer("a", netns, port, 1),))]  # noqa: E731
    with _front(tmp_path, route) as (client, admin):
        def in_flight() -> int | None:
            return engine_in_flight(admin.command("show stat"), engine_path.ENGINE_BACKEND_SUFFIX, "a")

        assert in_flight() == 0
        body = {"model": MODEL, "messages": [], "hold_s": 1.5}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = [pool.submit(_chat, client, body=body) for _ in range(2)]
            wait_until(lambda: in_flight() == 2, timeout=5, interval=0.05, what="one request at the engine, one queued")
            assert [a.result().status_code for a in answers] == [200, 200]
        wait_until(lambda: in_flight() == 0, timeout=5, interval=0.05, what="no request left at the engine")
        assert engine_in_flight(admin.command("show stat"), engine_path.ENGINE_BACKEND_SUFFIX, "zz") is None
