"""ray-dstack's `/v1` rules in HAProxy (ray_dstack/serve/ingress/haproxy_v1.py, v1_routes.py) with Ray's own haproxy
binary, outside Ray: a configuration shaped like the one Serve generates (a frontend routing by path prefix,
one backend per application, the gateway at "/"), real HTTP servers behind it, the map replaced through the
admin socket as the map-sync process does it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from conftest import free_port, wait_until
from tests.support.haproxy_config import SERVE_PREAMBLE, answer_json

from ray_dstack.serve.ingress import haproxy_v1
from ray_dstack.serve.ingress import v1_routes
from ray_dstack.spec import V1_ROUTE_HEADER

SERVE_LIKE = SERVE_PREAMBLE + """\
    balance roundrobin
frontend http_frontend
    bind 127.0.0.1:{port}
    acl routes path -i /-/routes
    http-request return status 200 content-type application/json string "{{\\"/svc\\":\\"svc\\",\\"/\\":\\"ray-dstack-gateway\\"}}" if routes
    acl is_svc path_beg /svc/
    acl is_svc path /svc
    acl is_gw path_beg /
    use_backend svc if is_svc
    use_backend gw if is_gw
backend svc
    server a 127.0.0.1:{a}
    server b 127.0.0.1:{b}
backend gw
    server g 127.0.0.1:{g}
"""


class _Echo(BaseHTTPRequestHandler):
    """Answers with who it is, the path it got and the marker header; `status` 503 plays a replica that
    cannot serve."""

    name = ""
    status = 200

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        if len(self.rfile.read(length)) != length:
            self.send_error(400)
            return
        answer_json(self, self.status, {"server": self.name, "path": self.path, "v1": self.headers.get(V1_ROUTE_HEADER)})

    do_GET = do_POST

    def log_message(self, *args):
        pass


def _server(name: str, status: int = 200) -> ThreadingHTTPServer:
    handler = type(f"Echo_{name}", (_Echo,), {"name": name, "status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def front(tmp_path):
    """haproxy with the rules, servers a (503) and b behind `/svc`, g as the gateway; yields a helper."""
    servers = {"a": _server("a", 503), "b": _server("b"), "g": _server("g")}
    port = free_port()
    socket_path = str(tmp_path / "admin.sock")
    config = SERVE_LIKE.format(socket=socket_path, port=port,
                               **{n: s.server_address[1] for n, s in servers.items()})
    map_path = str(tmp_path / haproxy_v1.MAP_FILE_NAME)
    Path(map_path).write_text("")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_v1.inject(config, map_path))
    proc = subprocess.Popen([haproxy_v1.real_binary(), "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    admin = v1_routes.HAProxyAdmin(socket_path)
    try:
        wait_until(lambda: os.path.exists(socket_path) and admin.pid() == proc.pid, timeout=20, interval=0.05,
                   what="haproxy's admin socket")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as client:
            yield client, admin, map_path, proc
    finally:
        proc.terminate()
        proc.wait(10)
        for s in servers.values():
            s.shutdown()


def test_inject_adds_the_rules_after_bind_and_the_retries_to_defaults():
    config = SERVE_LIKE.format(socket="/s", port=1, a=2, b=3, g=4)
    out = haproxy_v1.inject(config, "/m.map")
    lines = out.split("\n")
    bind = next(i for i, line in enumerate(lines) if line.strip().startswith("bind "))
    assert haproxy_v1.MARKER in lines[bind + 1]
    assert "map(/m.map)" in out and f"http-request del-header {V1_ROUTE_HEADER}" in out
    # Before Serve's use_backend rules, which then see the rewritten path.
    assert out.index("set-path") < out.index("use_backend svc")
    assert "    retry-on conn-failure empty-response 503" in lines and "    retries 2" in lines
    assert haproxy_v1.inject(out, "/m.map") == out  # a second wrapper run changes nothing
    assert haproxy_v1.admin_socket_of(config) == "/s"


def test_inject_refuses_a_configuration_of_another_shape():
    with pytest.raises(haproxy_v1.ConfigShapeError, match="bind"):
        haproxy_v1.inject("defaults\n    retry-on conn-failure\nfrontend other\n    bind :1\n", "/m")
    with pytest.raises(haproxy_v1.ConfigShapeError, match="retry-on"):
        haproxy_v1.inject("frontend http_frontend\n    bind :1\n", "/m")


def test_a_mapped_model_goes_to_its_service_with_the_original_path_in_the_header(front):
    client, admin, map_path, _ = front
    admin.replace_map(map_path, {"acme/llama": "/svc"})
    for _ in range(6):  # a answers 503 every time: each request is retried on b
        r = client.post("/v1/chat/completions", json={"model": "acme/llama", "messages": []})
        assert r.status_code == 200, r.text
        assert r.json() == {"server": "b", "path": "/svc/v1/chat/completions", "v1": "/v1/chat/completions"}
    r = client.post("/v1/embeddings?x=1", json={"input": "hi", "model": "acme/llama"})
    assert r.json()["path"] == "/svc/v1/embeddings?x=1"


def test_everything_else_reaches_the_gateway_unchanged(front):
    client, admin, map_path, _ = front
    admin.replace_map(map_path, {"acme/llama": "/svc"})
    cases = [
        ("POST", "/v1/chat/completions", {"model": "unknown"}),
        ("POST", "/v1/chat/completions", {"messages": []}),
        ("POST", "/v1/chat/completions", None),  # not JSON
        ("GET", "/v1/models", None),
        ("GET", "/health", None),
        ("POST", "/v2/chat/completions", {"model": "acme/llama"}),
    ]
    for method, path, body in cases:
        r = client.request(method, path, json=body) if body is not None else client.request(method, path, content=b"x")
        assert r.json() == {"server": "g", "path": path, "v1": None}, (method, path, body)


def test_clients_cannot_set_the_marker_header(front):
    client, admin, map_path, _ = front
    r = client.post("/v1/chat/completions", json={"model": "x"}, headers={V1_ROUTE_HEADER: "/evil"})
    assert r.json()["v1"] is None
    admin.replace_map(map_path, {"x": "/svc"})
    r = client.post("/v1/completions", json={"model": "x"}, headers={V1_ROUTE_HEADER: "/evil"})
    assert r.json()["v1"] == "/v1/completions"


def test_requests_not_rewritten_keep_serves_retry_policy(front):
    client, _, _, _ = front
    statuses = {client.post("/svc/v1/chat/completions", json={"model": "acme/llama"}).status_code for _ in range(6)}
    assert statuses == {200, 503}  # a's 503 reaches the client: no L7 retry outside the /v1 rewrite


def test_the_map_is_replaced_as_a_whole(front):
    client, admin, map_path, _ = front
    admin.replace_map(map_path, {"m1": "/svc", "m2": "/svc"})
    assert client.post("/v1/completions", json={"model": "m2"}).json()["server"] == "b"
    admin.replace_map(map_path, {"m1": "/svc"})
    assert client.post("/v1/completions", json={"model": "m2"}).json()["server"] == "g"
    assert client.post("/v1/completions", json={"model": "m1"}).json()["server"] == "b"


def test_map_sync_pushes_changes_to_its_own_haproxy_and_keeps_the_table_for_the_next(front):
    client, admin, map_path, proc = front
    table: dict[str, list[str]] | None = {"acme/a": ["/svc", "svc"]}
    sync = v1_routes.MapSync(lambda: table, admin, map_path, proc.pid, {"/svc": "svc", "/": "gw"})
    assert sync.step()
    table_file = Path(map_path).parent / haproxy_v1.TABLE_FILE_NAME
    assert json.loads(table_file.read_text()) == {"acme/a": ["/svc", "svc"]}
    assert client.post("/v1/completions", json={"model": "acme/a"}).json()["server"] == "b"
    table = None  # the KV could not be read: nothing changes
    assert sync.step() and client.post("/v1/completions", json={"model": "acme/a"}).json()["server"] == "b"
    # A service this haproxy has no backend for (deploying), or whose prefix is another application's: not mapped.
    table = {"acme/a": ["/svc", "other-app"], "acme/new": ["/new", "new"]}
    assert sync.step()
    assert json.loads(table_file.read_text()) == table  # kept whole: the next haproxy may have those backends
    for model in ("acme/a", "acme/new"):
        assert client.post("/v1/completions", json={"model": model}).json()["server"] == "g"


def test_map_sync_of_a_replaced_haproxy_stops(front):
    client, admin, map_path, proc = front
    other = v1_routes.MapSync(lambda: {"acme/a": ["/svc", "svc"]}, admin, map_path, proc.pid + 1, {"/svc": "svc"})
    assert other.step() is False  # not its haproxy (yet): it writes nothing into the socket's owner
    assert client.post("/v1/completions", json={"model": "acme/a"}).json()["server"] == "g"
    other.owned = True  # it had owned the socket: a newer haproxy answering means it is done
    with pytest.raises(v1_routes.Superseded):
        other.step()


def test_serve_routes_and_routable():
    config = SERVE_LIKE.format(socket="/s", port=1, a=2, b=3, g=4)
    routes = haproxy_v1.serve_routes(config)
    assert routes == {"/svc": "svc", "/": "ray-dstack-gateway"}
    table = {"m1": ["/svc", "svc"], "m2": ["/svc", "old"], "m3": ["/gone", "gone"]}
    assert haproxy_v1.routable(table, routes) == {"m1": "/svc"}
    assert haproxy_v1.serve_routes("frontend http_frontend\n    bind :1\n") == {}


def test_the_constants_agree_with_the_spec():
    from ray_dstack import spec

    assert haproxy_v1.V1_ROUTE_HEADER == spec.V1_ROUTE_HEADER
    assert haproxy_v1.GATEWAY_ROUTE_PREFIX == spec.GATEWAY_ROUTE_PREFIX


def test_retry_on_none_is_replaced_not_extended():
    config = SERVE_LIKE.format(socket="/s", port=1, a=2, b=3, g=4).replace("retry-on conn-failure", "retry-on none")
    assert "    retry-on conn-failure empty-response 503" in haproxy_v1.inject(config, "/m").split("\n")


def test_prepare_keeps_serves_configuration_when_haproxy_refuses_the_result(tmp_path):
    cfg = tmp_path / "haproxy.cfg"
    original = SERVE_LIKE.format(socket=str(tmp_path / "admin.sock"), port=free_port(), a=2, b=3, g=4)
    cfg.write_text(original.replace("balance roundrobin", "balance no-such-algorithm"))
    with pytest.raises(haproxy_v1.ConfigShapeError, match="haproxy -c"):
        haproxy_v1.prepare(haproxy_v1.real_binary(), str(cfg))
    assert haproxy_v1.MARKER not in cfg.read_text()


def test_prepare_leaves_out_an_addition_haproxy_refuses_and_keeps_the_v1_rules(tmp_path, monkeypatch, capfd):
    from ray_dstack.serve.ingress import prefix_affinity

    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(SERVE_LIKE.format(socket=str(tmp_path / "admin.sock"), port=free_port(), a=2, b=3, g=4))
    monkeypatch.setattr(prefix_affinity, "inject", lambda config, map_path: config + "backend broken\n    nonsense\n")
    assert haproxy_v1.prepare(haproxy_v1.real_binary(), str(cfg))[3] == {}
    assert haproxy_v1.MARKER in cfg.read_text() and "nonsense" not in cfg.read_text()
    assert "prefix affinity left out, haproxy -c refused it" in capfd.readouterr().err


def test_prepare_builds_the_map_for_this_haproxys_backends(tmp_path):
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(SERVE_LIKE.format(socket=str(tmp_path / "admin.sock"), port=free_port(), a=2, b=3, g=4))
    (tmp_path / haproxy_v1.TABLE_FILE_NAME).write_text(json.dumps(
        {"acme/a": ["/svc", "svc"], "acme/b": ["/other", "other"]}))
    socket_path, map_path, routes, backends = haproxy_v1.prepare(haproxy_v1.real_binary(), str(cfg))
    assert socket_path == str(tmp_path / "admin.sock") and routes["/svc"] == "svc"
    assert backends == {}  # servers without health checks: prefix affinity adds nothing
    assert Path(map_path).read_text() == "acme/a /svc\n"
    assert haproxy_v1.MARKER in cfg.read_text()
    before = cfg.read_text()
    assert haproxy_v1.prepare(haproxy_v1.real_binary(), str(cfg))[1] == map_path and cfg.read_text() == before


def test_the_wrapper_rewrites_serves_config_in_place_and_becomes_haproxy(tmp_path):
    port = free_port()
    socket_path = str(tmp_path / "admin.sock")
    gw = _server("g")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(SERVE_LIKE.format(socket=socket_path, port=port, a=free_port(), b=free_port(),
                                     g=gw.server_address[1]))
    # Its map-sync child must not find a real cluster on this machine: an address nobody listens on.
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    proc = subprocess.Popen([sys.executable, "-m", "ray_dstack.serve.ingress.haproxy_v1", "-db", "-f", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        admin = v1_routes.HAProxyAdmin(socket_path)
        wait_until(lambda: os.path.exists(socket_path) and admin.pid() == proc.pid, timeout=20, interval=0.05,
                   what="haproxy (the wrapper's pid) on the admin socket")
        assert haproxy_v1.MARKER in cfg.read_text()
        assert (tmp_path / haproxy_v1.MAP_FILE_NAME).exists()
        assert f"{cfg}".encode() in Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        with httpx.Client(trust_env=False) as client:
            r = client.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "m"})
        assert r.json()["server"] == "g"
    finally:
        proc.terminate()
        proc.wait(10)
        gw.shutdown()


def test_the_wrapper_passes_other_calls_to_haproxy_quietly():
    out = subprocess.run([sys.executable, "-m", "ray_dstack.serve.ingress.haproxy_v1", "-v"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0 and "HAProxy version" in out.stdout and "ray-dstack" not in out.stderr


def test_the_gateway_reads_the_original_path_only_from_a_rewritten_request():
    from starlette.requests import Request

    from ray_dstack.serve.ingress.gateway import v1_path

    def request(path: str, header: str | None) -> Request:
        headers = [(V1_ROUTE_HEADER.encode(), header.encode())] if header else []
        return Request({"type": "http", "method": "POST", "path": path, "headers": headers, "query_string": b""})

    assert v1_path(request("/svc/v1/chat/completions", "/v1/chat/completions")) == "/v1/chat/completions"
    assert v1_path(request("/v1/completions", "/v1/chat/completions")) == "/v1/completions"
    assert v1_path(request("/svc/v1/x", "/admin")) == "/svc/v1/x"
    assert v1_path(request("/v1/models", None)) == "/v1/models"


def test_map_table_keeps_what_the_map_can_carry():
    routes = {"acme/llama": {"app": "llama", "route_prefix": "/llama"}, "has space": {"app": "x"},
              "plain": {"app": "plain"}, "root": {"app": "r", "route_prefix": "/"}}
    assert v1_routes.map_table(routes) == {"acme/llama": ["/llama", "llama"], "plain": ["/plain", "plain"]}
    assert haproxy_v1.decode_table(haproxy_v1.encode_table({"a": ["/b", "b"]})) == {"a": ["/b", "b"]}
    assert haproxy_v1.decode_table(b"[1]") is None and haproxy_v1.decode_table(None) is None
    assert haproxy_v1.decode_table(b'{"a": "/b"}') == {}


def test_a_client_that_waits_for_100_continue_is_routed_by_model(front):
    """curl sends `Expect: 100-continue` for bodies over 1 KiB and waits: HAProxy must ask for the body itself."""
    import socket

    client, admin, map_path, _ = front
    admin.replace_map(map_path, {"acme/llama": "/svc"})
    body = json.dumps({"model": "acme/llama", "prompt": "x" * 4000}).encode()
    host, port = client.base_url.host, client.base_url.port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(4096).startswith(b"HTTP/1.1 100")
        sock.sendall(body)
        answer = b""
        while b"}" not in answer:
            answer += sock.recv(65536)
    assert b" 200 " in answer.split(b"\r\n", 1)[0]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["path"] == "/svc/v1/completions"


def test_a_body_larger_than_haproxys_buffer_still_arrives_whole(front):
    client, admin, map_path, _ = front
    admin.replace_map(map_path, {"acme/llama": "/svc"})
    for body in ({"model": "acme/llama", "prompt": "x" * 300_000}, {"prompt": "x" * 300_000, "model": "acme/llama"}):
        r = client.post("/v1/completions", json=body)
        # Every server here reads the whole body before it answers (400 otherwise).
        if next(iter(body)) == "model":
            # Found within HAProxy's buffer: routed to the service, but not retried (HAProxy no longer holds the
            # whole request), so a's 503 reaches the client when a got it.
            assert (r.status_code, r.json()["server"]) in ((200, "b"), (503, "a")), r.text
            assert r.json()["path"] == "/svc/v1/completions"
        else:
            assert r.status_code == 200 and r.json() == {"server": "g", "path": "/v1/completions", "v1": None}
