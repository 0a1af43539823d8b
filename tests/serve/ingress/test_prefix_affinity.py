"""Prefix affinity in HAProxy (ray_dstack/serve/ingress/prefix_affinity.py) with Ray's own haproxy binary, outside
Ray: a configuration shaped like Serve's (three health-checked replicas behind `/svc`, the gateway at `/`), the
`/v1` rules and the affinity rules as the wrapper adds them, real HTTP servers that say who answered."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from conftest import free_port, wait_until
from tests.support.haproxy_config import SERVE_PREAMBLE, answer_json

from ray_dstack.serve.ingress import haproxy_v1, prefix_affinity, v1_routes
from ray_dstack.serve.ingress.serve_haproxy_config import sectioned

MODEL = "acme/chat"
REPLICAS = ("SERVE_REPLICA--svc--r-aaa", "SERVE_REPLICA--svc--r-bbb", "SERVE_REPLICA--svc--r-ccc")

FRONTEND = """\
    balance leastconn
frontend http_frontend
    bind 127.0.0.1:{port}
    acl routes path -i /-/routes
    http-request return status 200 content-type application/json string "{{\\"/svc\\":\\"svc\\",\\"/\\":\\"gw\\"}}" if routes
    acl is_svc path_beg /svc/
    acl is_svc path /svc
    acl is_gw path_beg /
    use_backend svc if is_svc
    use_backend gw if is_gw
backend svc
    option httpchk GET /-/healthz
    http-check expect status 200
    timeout check 5s
{servers}
backend gw
    server g 127.0.0.1:{g}
"""


class _Replica(BaseHTTPRequestHandler):
    """Answers with its name; `hold_s` in the body keeps the request (a busy replica); the health check follows
    `healthy`."""

    protocol_version = "HTTP/1.1"
    name = ""
    healthy = True

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path == "/-/healthz":
            answer_json(self, 200 if type(self).healthy else 503, {})
            return
        asked = json.loads(body) if body else {}
        time.sleep(asked.get("hold_s", 0))
        answer_json(self, asked.get("status", 200), {"server": self.name, "path": self.path,
                                "routed": self.headers.get(prefix_affinity.ROUTED_HEADER)})

    do_GET = do_POST

    def log_message(self, *args):
        pass


def _serve(name: str) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), type(f"Replica_{name[-3:]}", (_Replica,), {"name": name}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def replicas():
    servers = {name: _serve(name) for name in (*REPLICAS, "gw")}
    yield servers
    for server in servers.values():
        server.shutdown()


def _config(tmp_path: Path, replicas, port: int, order=REPLICAS) -> tuple[str, str]:
    servers = "\n".join(f"    server {n} 127.0.0.1:{replicas[n].server_address[1]} check inter 200ms"
                        for n in order)
    config = (SERVE_PREAMBLE.format(socket=str(tmp_path / "admin.sock"))
              + FRONTEND.format(port=port, servers=servers, g=replicas["gw"].server_address[1]))
    v1_map = tmp_path / haproxy_v1.MAP_FILE_NAME
    v1_map.write_text(f"{MODEL} /svc\n")
    prefix_map = tmp_path / prefix_affinity.MAP_FILE_NAME
    prefix_map.write_text(prefix_affinity.map_text({"svc": "svc"}))
    config = prefix_affinity.inject(haproxy_v1.inject(config, str(v1_map)), str(prefix_map))
    return config, str(prefix_map)


@contextlib.contextmanager
def _haproxy(tmp_path: Path, replicas, order=REPLICAS):
    """haproxy with the rules; yields (client, admin, prefix map path)."""
    port = free_port()
    config, prefix_map = _config(tmp_path, replicas, port, order)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(config)
    check = subprocess.run([haproxy_v1.real_binary(), "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.Popen([haproxy_v1.real_binary(), "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=20)
    admin = v1_routes.HAProxyAdmin(str(tmp_path / "admin.sock"))
    try:
        wait_until(lambda: os.path.exists(admin.path) and admin.pid() == proc.pid and _up(admin) == set(order),
                   timeout=20, interval=0.05,
                   what="haproxy with every replica up")
        yield client, admin, prefix_map
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


def _status(admin: v1_routes.HAProxyAdmin) -> dict[str, str]:
    """Each server of Serve's backend → its check status (`UP`, `DOWN`, or `UP 1/3` on its way down)."""
    rows = [line.split(",") for line in admin.command("show stat").splitlines() if line.startswith("svc,")]
    return {row[1]: row[17] for row in rows if row[1] not in ("FRONTEND", "BACKEND")}


def _up(admin: v1_routes.HAProxyAdmin) -> set[str]:
    """The servers of Serve's backend that its health checks hold fully up."""
    return {name for name, status in _status(admin).items() if status == "UP"}


def _system(i: int) -> str:
    return f"You are assistant number {i}. " + "Answer briefly and cite sources. " * 60  # ~2 KB, distinct start


def _chat(client: httpx.Client, system: str | None, user: str, *, path: str = "/svc/v1/chat/completions",
          history: int = 0, **extra) -> str:
    return _routed(client, system, user, path=path, history=history, **extra)[0]


def _routed(client: httpx.Client, system: str | None, user: str, *, path: str = "/svc/v1/chat/completions",
            history: int = 0, **extra) -> tuple[str, str | None]:
    """(the replica that answered, the ROUTED_HEADER it got)."""
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user}]
    for turn in range(history):
        messages += [{"role": "assistant", "content": f"answer {turn}"}, {"role": "user", "content": f"more {turn}"}]
    r = client.post(path, json={"model": MODEL, "messages": messages, **extra},
                    headers={prefix_affinity.ROUTED_HEADER: "forged"})
    assert r.status_code == 200, r.text
    return r.json()["server"], r.json()["routed"]


def test_each_conversation_stays_on_one_replica_whatever_the_turn_field_order_or_route(tmp_path, replicas):
    with _haproxy(tmp_path, replicas) as (client, _, _):
        owners = {}
        for i in range(6):
            seen = {_chat(client, _system(i), f"question {i}", history=turn, max_tokens=turn + 1, stream=turn % 2 == 0)
                    for turn in range(5)}
            # The same conversation by `/v1` (routed by model), with its keys in another order and spaces.
            body = json.dumps({"temperature": 0.5, "messages": [{"content": _system(i), "role": "system"},
                                                                {"content": f"question {i}", "role": "user"}],
                               "model": MODEL}, indent=3)
            r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            seen.add(r.json()["server"])
            assert len(seen) == 1, (i, seen)
            owners[i] = seen.pop()
        assert len(set(owners.values())) >= 2, owners  # six prefixes are spread, not all on one replica
        # Without a system prompt a conversation keys by its first message; a completion by its prompt's first
        # KEY_BYTES bytes (a story that grows by turns).
        first = {_chat(client, None, "hello there, a conversation without a system prompt", history=t)
                 for t in range(4)}
        story = "Once upon a time, " * 100
        prompts = {client.post("/svc/v1/completions", json={"model": MODEL, "prompt": story + " x" * t})
                   .json()["server"] for t in range(0, 2000, 400)}
        assert len(first) == 1 and len(prompts) == 1, (first, prompts)


def test_prefixes_stay_across_a_reload_that_lists_the_replicas_in_another_order(tmp_path, replicas):
    """As Serve reloads: the wrapper (haproxy_v1.prepare) saves the running haproxy's table, the new haproxy
    starts with `-sf`, and its map sync writes the table in before the new process routes by prefix."""
    cfg = tmp_path / "haproxy.cfg"
    port = free_port()

    def serve_config(order) -> str:
        servers = "\n".join(f"    server {n} 127.0.0.1:{replicas[n].server_address[1]} check inter 200ms"
                            for n in order)
        return (SERVE_PREAMBLE.format(socket=str(tmp_path / "admin.sock"))
                + FRONTEND.format(port=port, servers=servers, g=replicas["gw"].server_address[1]))

    (tmp_path / haproxy_v1.TABLE_FILE_NAME).write_bytes(haproxy_v1.encode_table({MODEL: ["/svc", "svc", "prefix"]}))
    procs = []
    try:
        before, after = {}, {}
        for order, seen, keys in ((REPLICAS, before, range(12)), ((*REPLICAS[1:], REPLICAS[0]), after, range(12))):
            cfg.write_text(serve_config(order))
            socket_path, map_path, routes, backends = haproxy_v1.prepare(haproxy_v1.real_binary(), str(cfg))
            procs.append(subprocess.Popen([haproxy_v1.real_binary(), "-db", "-f", str(cfg),
                                           *(["-sf", str(procs[-1].pid)] if procs else [])],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            saved = tmp_path / prefix_affinity.table_state_file(os.getpid())
            if saved.exists():  # the wrapper execs haproxy: the file is named after the new haproxy's pid
                assert len(json.loads(saved.read_text())["svc"]) == 12
                saved.rename(tmp_path / prefix_affinity.table_state_file(procs[-1].pid))
            admin = v1_routes.HAProxyAdmin(socket_path)
            wait_until(lambda: os.path.exists(socket_path) and admin.pid() == procs[-1].pid
                       and _up(admin) == set(REPLICAS), timeout=20, interval=0.05, what="the new haproxy")
            sync = v1_routes.MapSync(lambda: {MODEL: ["/svc", "svc", "prefix"]}, admin, map_path, procs[-1].pid,
                                     routes, backends)
            assert sync.step() and sync.tables_restored
            # A connection of its own: the old haproxy serves the ones it has until they close. The second haproxy
            # sees the prefixes in another order: least connections alone would place them otherwise.
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=20) as client:
                for i in keys:
                    seen[i] = _chat(client, _system(i), "q")
        assert before == after
        assert len(set(before.values())) == 3
        assert not list(tmp_path.glob(prefix_affinity.TABLE_STATE_PREFIX + "*"))  # restored, then removed
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def test_a_replica_that_goes_down_moves_only_its_own_prefixes(tmp_path, replicas):
    with _haproxy(tmp_path, replicas) as (client, admin, _):
        before = {i: _chat(client, _system(i), "q") for i in range(12)}
        victim = max(set(before.values()), key=list(before.values()).count)
        replicas[victim].RequestHandlerClass.healthy = False
        try:
            wait_until(lambda: _status(admin) == {n: "DOWN" if n == victim else "UP" for n in REPLICAS}, timeout=10,
                       interval=0.05, what="the replica down, the others up")
            routed = {i: _routed(client, _system(i), "q") for i in range(12)}
        finally:
            replicas[victim].RequestHandlerClass.healthy = True
        after = {i: server for i, (server, _) in routed.items()}
        moved = {i for i in before if before[i] != after[i]}
        assert moved == {i for i in before if before[i] == victim}, (before, after)
        assert victim not in after.values()
        # What each replica is told: its own prefixes back (`affinity`), the victim's `moved`.
        assert {i: how for i, (_, how) in routed.items()} == {i: "moved" if i in moved else "affinity" for i in before}


def test_a_hot_prefix_spills_to_other_replicas_once_its_own_carries_more_than_its_share(tmp_path, replicas):
    with _haproxy(tmp_path, replicas) as (client, _, _):
        owner, how = _routed(client, _system(99), "q")
        assert how == "new"
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            routed = list(pool.map(lambda _: _routed(client, _system(99), "q", hold_s=1.0), range(12)))
        served = [server for server, _ in routed]
        # Each replica is told how the request came: back to its replica, or spilled by the bound (each of
        # HAProxy's threads checks the bound alone: a burst may pass it by one request per thread).
        assert {(server == owner, how) for server, how in routed} == {(True, "affinity"), (False, "spilled")}
        # 12 at once on 3 replicas: the bound (150 % of the mean of 4) keeps at most 6 on the owner, the rest
        # goes to the replicas with the fewest requests.
        assert served.count(owner) <= 6 + (os.cpu_count() or 1) - 1 and len(set(served)) >= 2, served


def test_a_replica_that_answers_5xx_is_not_remembered_for_the_prefix(tmp_path, replicas):
    with _haproxy(tmp_path, replicas) as (client, _, _):
        messages = [{"role": "system", "content": _system(77)}, {"role": "user", "content": "q"}]
        r = client.post("/svc/v1/chat/completions", json={"model": MODEL, "messages": messages, "status": 500})
        assert r.status_code == 500 and r.json()["routed"] == "new"
        assert _routed(client, _system(77), "q")[1] == "new"  # placed afresh, then remembered
        assert _routed(client, _system(77), "q")[1] == "affinity"


def test_requests_without_a_prompt_and_services_off_the_map_keep_least_connections(tmp_path, replicas):
    with _haproxy(tmp_path, replicas) as (client, admin, prefix_map):
        assert _routed(client, _system(1), "q")[1] == "new"  # keyed: the prefix rules chose
        # A request that is not routed by prefix carries no ROUTED_HEADER, whatever the client sent.
        forged = {prefix_affinity.ROUTED_HEADER: "affinity"}
        image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
        for r in (client.get("/svc/v1/models", headers=forged),
                  client.post("/svc/v1/embeddings", json={"model": MODEL, "input": "x"}, headers=forged),
                  client.post("/svc/v1/chat/completions", headers=forged,
                              json={"model": MODEL, "messages": [{"role": "user", "content": image}]}),
                  client.post("/svc/v1/chat/completions", headers=forged,
                              json={"model": MODEL, "messages": [{"role": "user", "content": ""}]}),
                  client.post("/svc/v1/completions", json={"model": MODEL, "prompt": ""}, headers=forged)):
            assert r.status_code == 200 and r.json()["routed"] is None, r.text
        # The policy switched off (the map sync empties the map): the same conversation spreads by least
        # connections again, unkeyed.
        admin.replace_map(prefix_map, {})
        routed = {_routed(client, _system(1), "q") for _ in range(9)}
        assert {how for _, how in routed} == {None} and len(routed) > 1, (routed, _up(admin))


def test_a_reload_before_the_last_ones_restore_keeps_its_rows(tmp_path):
    """Back-to-back reloads: the table file of a haproxy whose map sync has not restored it yet is merged into the
    next one (the running haproxy's rows win; a file older than the table's expiry is dropped)."""
    config = (SERVE_PREAMBLE.format(socket=str(tmp_path / "admin.sock"))
              + FRONTEND.format(port=1, servers="    server r1 127.0.0.1:2 check", g=3))
    unrestored = tmp_path / prefix_affinity.table_state_file(111)
    unrestored.write_text(json.dumps({"svc": {"A" * 40: 7, "B" * 40: 8}, "gone": {"C" * 40: 9}}))
    expired = tmp_path / prefix_affinity.table_state_file(110)
    expired.write_text(json.dumps({"svc": {"D" * 40: 5}}))
    os.utime(expired, (time.time() - prefix_affinity.TABLE_STATE_MAX_AGE_S - 60,) * 2)
    haproxy_v1.save_prefix_tables(None, config, tmp_path)  # no haproxy answers
    own = tmp_path / prefix_affinity.table_state_file(os.getpid())
    assert json.loads(own.read_text()) == {"svc": {"A" * 40: 7, "B" * 40: 8}}
    assert not unrestored.exists() and not expired.exists()


def test_server_ids_are_stable_unique_and_within_their_space():
    names = [f"SERVE_REPLICA--svc--{i}" for i in range(200)]
    ids = prefix_affinity.server_ids(names)
    assert len(set(ids.values())) == len(names)
    assert all(0 < v <= prefix_affinity.ID_SPACE for v in ids.values())
    assert prefix_affinity.server_ids(list(reversed(names))) == ids
    assert prefix_affinity.server_ids(names[:3])["SERVE_REPLICA--svc--1"] == ids["SERVE_REPLICA--svc--1"]


def test_the_map_names_only_services_with_prefix_routing_that_this_haproxy_has():
    table = {"m1": ["/a", "a", "prefix"], "m2": ["/b", "b"], "m3": ["/c", "c", "prefix"], "m4": ["/d/e", "d", "prefix"]}
    routes = {"/a": "a", "/b": "b", "/d/e": "d"}  # /c is not deployed on this node (yet)
    policies = haproxy_v1.routing_policies(table, routes)
    assert policies == {"/a": "prefix", "/d/e": "prefix"}
    # /d/e has two path segments: HAProxy's key is the first one, so that service keeps least connections.
    assert prefix_affinity.map_entries(policies, {"/a": "http-a", "/b": "http-b", "/d/e": "http-d"}) == {"a": "http-a"}


def test_the_published_table_carries_the_policy_only_when_it_is_prefix():
    routes = {"m1": {"app": "a", "route_prefix": "/a", "routing": "prefix"},
              "m2": {"app": "b", "route_prefix": "/b", "routing": "least_connections"}}
    table = v1_routes.map_table(routes)
    assert table == {"m1": ["/a", "a", "prefix"], "m2": ["/b", "b"]}
    assert haproxy_v1.decode_table(haproxy_v1.encode_table(table)) == table


def test_the_wrapper_adds_the_rules_and_the_map_sync_keeps_the_prefix_map(tmp_path, replicas, monkeypatch):
    """haproxy_v1.prepare on a Serve-shaped file: the rules pass `haproxy -c`, the prefix map is written from the
    last table, and MapSync pushes a policy change into the running haproxy."""
    port = free_port()
    servers = "\n".join(f"    server {n} 127.0.0.1:{replicas[n].server_address[1]} check" for n in REPLICAS)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(SERVE_PREAMBLE.format(socket=str(tmp_path / "admin.sock"))
                   + FRONTEND.format(port=port, servers=servers, g=replicas["gw"].server_address[1]))
    (tmp_path / haproxy_v1.TABLE_FILE_NAME).write_bytes(haproxy_v1.encode_table({MODEL: ["/svc", "svc", "prefix"]}))
    socket_path, map_path, routes, backends = haproxy_v1.prepare(haproxy_v1.real_binary(), str(cfg))
    assert backends == {"/svc": "svc"} and prefix_affinity.MARKER in cfg.read_text()
    assert Path(tmp_path / prefix_affinity.MAP_FILE_NAME).read_text() == "svc svc\n"
    proc = subprocess.Popen([haproxy_v1.real_binary(), "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        admin = v1_routes.HAProxyAdmin(socket_path)
        wait_until(lambda: os.path.exists(socket_path) and admin.pid() == proc.pid, timeout=20, interval=0.05,
                   what="haproxy's admin socket")
        table = {MODEL: ["/svc", "svc"]}  # the service deployed again with `routing: least_connections`
        sync = v1_routes.MapSync(lambda: table, admin, map_path, proc.pid, routes, backends)
        assert sync.step()
        assert admin.command(f"show map {tmp_path / prefix_affinity.MAP_FILE_NAME}").strip() == ""
        table = {MODEL: ["/svc", "svc", "prefix"]}
        assert sync.step()
        assert " svc svc" in admin.command(f"show map {tmp_path / prefix_affinity.MAP_FILE_NAME}")
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_rules_go_into_serves_backend_and_its_servers_get_stable_ids():
    lines = ["    server r1 10.0.0.1:30001 check observe layer4 error-limit 10 on-error mark-down",
             "    server SERVE_PROXY_ACTOR-x 10.0.0.9:8000 check backup"]
    config = (SERVE_PREAMBLE.format(socket="/tmp/x.sock")
              + FRONTEND.format(port=1, servers="    timeout server 600s\n" + "\n".join(lines), g=3))
    text = prefix_affinity.inject(config, "/tmp/ray-dstack-prefix.map")
    ids = prefix_affinity.server_ids(["r1", "SERVE_PROXY_ACTOR-x"])
    backend = [line for section, line in sectioned(text) if section == "backend svc"]
    assert f"{lines[0]} id {ids['r1']}" in backend and f"{lines[1]} id {ids['SERVE_PROXY_ACTOR-x']}" in backend
    assert "    timeout server 600s" in backend
    assert any(line.startswith("    use-server r1 if ") for line in backend)
    assert not any("use-server SERVE_PROXY_ACTOR-x" in line for line in backend)  # the backup: never by prefix
    assert prefix_affinity.inject(text, "/tmp/ray-dstack-prefix.map") == text
