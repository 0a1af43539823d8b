"""Replicas isolated as dstack isolates them, on one local Ray node through the console script: a network
namespace per replica (two replicas and an autoscaled service all on port 8000), the service's own Python
environment (`python: "3.12"` while Ray runs 3.11; `pip install` stays out of Ray's Python; a missing version
fails the deploy), a working directory per replica, and nothing left behind after a crash or `delete`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import BIN, REPO, CliCluster, free_port, ray_stop, steady_load, write_service
from tests.support.prom import metrics_url, scrape, total

from ray_dstack.plan.defaults import MAX_ONGOING_REQUESTS

pytestmark = pytest.mark.slow

NODE = f"{sys.version_info[0]}.{sys.version_info[1]}"
PYENV = Path.home() / ".pyenv" / "versions"
OTHER = "3.12" if NODE != "3.12" else "3.13"
MISSING = "3.10"  # left out of the node's interpreters below


def interpreter(version: str) -> Path:
    found = sorted(PYENV.glob(f"{version}.*/bin/python{version}"))
    assert found, f"this kind of machine has Python {version} under {PYENV} (shared/notes/environment.md)"
    return found[-1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray whose node offers only Python NODE and OTHER, with env and work roots of its own."""
    base = tmp_path_factory.mktemp("isolation")
    pythons = base / "pythons"
    pythons.mkdir()
    for version in (NODE, OTHER):
        (pythons / f"python{version}").symlink_to(interpreter(version))
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update({
        "RAY_DSTACK_HOME": str(base / "home"),
        "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        "RAY_DSTACK_ENV_ROOT": str(base / "envs"),
        "RAY_DSTACK_WORK_ROOT": str(base / "work"),
        "RAY_DSTACK_PYTHON_DIRS": str(pythons),
        "RAY_DSTACK_NETWORK_NAMESPACES": "auto",
        "RAY_DSTACK_ENGINE_PATH": "on",  # the model service below (the others publish no model)
    })
    ray_stop(env)
    c = CliCluster(env=env, http_port=free_port(), home=base / "home")
    c.base = base
    yield c
    ray_stop(env)


def service(name: str, body: str, *, bind: str = "0.0.0.0", python: str | None = None) -> str:
    return f"""
type: service
name: {name}
{f'python: "{python}"' if python else ''}
port: 8000
auth: false
commands:
  - echo "$$-$RANDOM" > who
  - python -c "import sys; print('%d.%d' % sys.version_info[:2], sys.prefix)" > python
  - exec python -m http.server 8000 --bind {bind}
{body}
"""


def get(cluster, path: str) -> str:
    resp = httpx.get(f"{cluster.http}{path}", timeout=10)
    resp.raise_for_status()
    return resp.text.strip()


def our_processes() -> dict[int, str]:
    """pasta and supervisor processes on this machine."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if comm.startswith(("pasta", "passt")):
            found[int(entry)] = "pasta"
        elif "ray_dstack.serve.runtime.supervise" in cmd:
            found[int(entry)] = cmd
    return found


def workdirs(cluster) -> set[Path]:
    """The replicas' working directories (each with its namespace connector's socket beside it)."""
    found = set((cluster.base / "work").iterdir())
    dirs = {p for p in found if p.is_dir()}
    assert found - dirs == {Path(f"{d}.sock") for d in dirs}, "a socket without its replica, or the reverse"
    return dirs


def running(cluster, name: str) -> int:
    return cluster.status(name)["replicas"]["running"]


def test_two_replicas_on_port_8000_with_their_own_files_env_and_pip(cluster, tmp_path):
    body = "replicas: 2\n"
    text = service("iso", body).replace("  - exec python", "  - pip install -q pyjokes\n  - exec python")
    proc = cluster.run("deploy", str(write_service(tmp_path, "iso", text)), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert running(cluster, "iso") == 2
    # Both replicas listen on 8000 on this one node; each serves the file it wrote in its own directory.
    whos = cluster.wait_until(lambda: len(s := {get(cluster, "/iso/who") for _ in range(20)}) == 2 and s,
                              timeout=30, interval=0.2, what="answers from both replicas")
    assert len(whos) == 2
    version, prefix = get(cluster, "/iso/python").split()
    env_dir = cluster.base / "envs" / f"iso-py{NODE}"
    assert version == NODE and Path(prefix) == env_dir
    # pip installed into the service's env, not into the Python Ray runs from.
    assert list((env_dir / "lib").glob("python*/site-packages/pyjokes"))
    ray_python = BIN / "python"
    check = subprocess.run([str(ray_python), "-c", "import pyjokes"], capture_output=True, timeout=60)
    assert check.returncode != 0
    status = cluster.status("iso")
    assert status["environment"]["network_namespace"] is True
    assert status["environment"]["python"] == "the node's version"
    assert len(workdirs(cluster)) == 2

    # A replica crash (its worker SIGKILLed): its pasta, supervisor, service and directory go with it, and
    # the replacement reuses the environment (no reinstall).
    victim = status["replicas"]["items"][0]["pid"]
    before = our_processes()
    dirs = workdirs(cluster)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    cluster.wait_until(lambda: {p for p, c in our_processes().items() if p in before} != set(before),
                       timeout=30, interval=0.2, what="the killed replica's processes to go")
    cluster.wait_until(lambda: running(cluster, "iso") == 2 and len({get(cluster, "/iso/who") for _ in range(20)}) == 2,
                       timeout=120, interval=0.5, what="the replacement replica")
    restart_s = time.monotonic() - killed_at
    print(f"replica replaced and serving {restart_s:.1f}s after SIGKILL")
    now = workdirs(cluster)
    assert len(now) == 2 and len(now & dirs) == 1  # the dead replica's directory and socket are gone
    alive = our_processes()
    assert len([c for c in alive.values() if "supervise --cleanup" in c]) == 2 * 2  # anchor + guard per replica
    assert list(alive.values()).count("pasta") == 2

    assert cluster.run("delete", "iso").returncode == 0
    cluster.wait_until(lambda: not our_processes(), timeout=30, interval=0.2, what="no pasta/supervisor left")
    assert list((cluster.base / "work").iterdir()) == []
    assert env_dir.is_dir()  # kept for the next deploy; collected once unused for a day


def test_python_version_of_the_service(cluster, tmp_path):
    proc = cluster.run("deploy", str(write_service(tmp_path, "py", service("py", "", python=OTHER))), timeout=300)
    assert proc.returncode == 0, proc.stderr
    version, prefix = get(cluster, "/py/python").split()
    assert version == OTHER and NODE != OTHER == version
    assert Path(prefix) == cluster.base / "envs" / f"py-py{OTHER}"
    assert cluster.status("py")["environment"]["python"] == OTHER
    cluster.run("delete", "py", check=True)


def test_missing_python_version_fails_the_deploy(cluster, tmp_path):
    started = time.monotonic()
    proc = cluster.run("deploy", str(write_service(tmp_path, "nopy", service("nopy", "", python=MISSING))),
                       "--timeout", "120", timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    import socket

    assert f'python: "{MISSING}"' in out and socket.gethostname() in out and f"{NODE}, {OTHER}" in out
    assert "Traceback" not in out
    print(f"deploy failed in {time.monotonic() - started:.1f}s")


def test_seed_autoscaling_shape_scales_past_one_replica_on_one_node(cluster, tmp_path):
    body = ("replicas: 1..3\nscaling:\n  metric: rps\n  target: 2\n  window: 4s\n"
            "  scale_up_delay: 1s\n  scale_down_delay: 3s\n")
    path = write_service(tmp_path, "auto", service("auto", body, bind="127.0.0.1"))
    assert cluster.run("deploy", str(path), timeout=300).returncode == 0
    with steady_load(f"{cluster.http}/auto/who", rate=7.0) as sent:  # 3.5x the target
        cluster.wait_until(lambda: running(cluster, "auto") == 3, timeout=90, what="3 replicas on one node")
        answers = {get(cluster, "/auto/who") for _ in range(30)}
        assert len(answers) == 3  # three processes, all on port 8000
    assert sent and all(code == 200 for code in sent)
    cluster.wait_until(lambda: cluster.status("auto")["replicas"]["target"] == 1 and running(cluster, "auto") == 1,
                       timeout=90, what="back to 1 replica")
    cluster.run("delete", "auto", check=True)
    cluster.wait_until(lambda: not our_processes(), timeout=30, interval=0.2, what="no pasta/supervisor left")


ENGINE_TOKEN = "engine-path-token-0123"
# An OpenAI-shaped engine that answers with what it received (path, Authorization), on port 8000 in its namespace.
ECHO_ENGINE = """
type: service
name: eng
port: 8000
replicas: 2..3
scaling:
  metric: rps
  target: 1000
commands:
  - |
    cat > engine.py <<'EOF'
    import json, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
            if body.get("stream"):
                return self.stream(body)
            out = json.dumps({"path": self.path, "authorization": self.headers.get("authorization")}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
        def stream(self, body):
            # `n` events `delay` s apart; marks in a file whether the client stayed to the end or left.
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            try:
                for i in range(body["n"]):
                    data = b"data: %d\\n\\n" % i
                    self.wfile.write(b"%x\\r\\n%s\\r\\n" % (len(data), data))
                    self.wfile.flush()
                    time.sleep(body["delay"])
                self.wfile.write(b"0\\r\\n\\r\\n")
                self.wfile.flush()
            except OSError:
                open("left-" + body["id"], "w").close()
                return
            open("finished-" + body["id"], "w").close()
        do_GET = do_POST
        def log_message(self, *a):
            pass
    ThreadingHTTPServer(("0.0.0.0", 8000), H).serve_forever()
    EOF
  - exec python engine.py
model:
  name: echo-model
  format: openai
"""


def _node(cluster) -> str:
    return cluster.status("eng")["replicas"]["items"][0]["node_id"]


def _engine_responses(cluster) -> int | None:
    from ray_dstack.serve.ingress import v1_routes
    from ray_dstack.serve.ingress.engine_registration import engine_responses, haproxy_admin_socket

    stat = v1_routes.HAProxyAdmin(haproxy_admin_socket(_node(cluster))).command("show stat")
    rows = [line.split(",") for line in stat.splitlines() if line.split(",")[0].endswith("eng--engine")]
    servers = [row[1] for row in rows if row[1] not in ("FRONTEND", "BACKEND")]
    if len(servers) != 2:
        return None
    return sum(engine_responses(stat, "--engine", server) or 0 for server in servers)


def test_the_engine_path_skips_the_replica_and_its_port_is_reachable_only_through_haproxy(cluster, tmp_path):
    from ray_dstack.serve.ingress.engine_path import ENGINE_DIR_NAME
    from ray_dstack.serve.ingress.engine_registration import haproxy_dir
    from ray_dstack.serve.ingress.haproxy_v1 import config_file_name

    path = write_service(tmp_path, "eng", ECHO_ENGINE)
    proc = cluster.run("deploy", str(path), "--token", ENGINE_TOKEN, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # Both replicas' engines are in HAProxy's engine backend (after Serve's reload that lists them).
    cluster.wait_until(lambda: _engine_responses(cluster) is not None, timeout=60, interval=0.5,
                       what="the engine backend with both engines")
    before = _engine_responses(cluster)
    auth = {"authorization": f"Bearer {ENGINE_TOKEN}"}
    body = {"model": "echo-model", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=cluster.http, timeout=10, trust_env=False) as client:
        for _ in range(20):
            r = client.post("/eng/v1/chat/completions", json=body, headers=auth)
            assert r.status_code == 200, r.text
            assert r.json() == {"path": "/v1/chat/completions", "authorization": None}  # the token stays out
        r = client.post("/v1/completions", json={**body, "model": "echo-model"}, headers=auth)  # `/v1` by model
        assert r.json() == {"path": "/v1/completions", "authorization": None}
        # HAProxy sent them to the engines itself: its engine servers answered every one.
        assert _engine_responses(cluster) - before == 21
        # What the replica decides stays the replica's: a missing token, another model, the model list.
        r = client.post("/eng/v1/chat/completions", json=body)
        assert r.status_code == 401 and "error" in r.json()
        r = client.post("/eng/v1/chat/completions", json={**body, "model": "other"}, headers=auth)
        assert r.status_code == 404 and "other" in r.text
        r = client.get("/eng/v1/models", headers=auth)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "echo-model"
        assert _engine_responses(cluster) - before == 21
        # The engine path's requests count for `scaling: {metric: rps}` (HAProxy's counts, read by the replicas).
        for _ in range(40):
            client.post("/eng/v1/chat/completions", json=body, headers=auth)
        cluster.wait_until(lambda: (cluster.status("eng").get("scaling") or {}).get("measured_rps") or 0,
                           timeout=60, interval=1.0, what="the engine path's requests in the measured RPS")
    # ... and in ray-dstack's request metrics, from HAProxy's log (one replica reads it): 60 chats, 1 completion.
    url, engine_tags = metrics_url(), {"service": "eng", "model": "echo-model", "status": "200"}

    def counted(name: str, route: str) -> float:
        return total(scrape(url), name, route=route, **engine_tags)

    cluster.wait_until(lambda: counted("ray_dstack_requests_total", "chat/completions") == 60
                       and counted("ray_dstack_requests_total", "completions") == 1, timeout=60, interval=1.0,
                       what="the engine path's requests in ray-dstack's metrics")
    assert counted("ray_dstack_request_latency_s_count", "chat/completions") == 60
    # No port of the node reaches an engine: pasta maps none (`-t none`), so only HAProxy (entering the
    # namespace) and the replica (through its namespace's init) reach port 8000.
    pastas = [pid for pid, what in our_processes().items() if what == "pasta"]
    assert len(pastas) == 2
    for pid in pastas:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"-t") + 1] == b"none", argv
    entries = haproxy_dir(_node(cluster)) / ENGINE_DIR_NAME
    assert len(list(entries.glob("*.json"))) == 2
    # Serve's max_ongoing_requests of each replica is its engine's limit in HAProxy (back-pressure as Serve's).
    assert {json.loads(p.read_text())["max_ongoing"] for p in entries.glob("*.json")} == {MAX_ONGOING_REQUESTS}
    config = (entries.parent / config_file_name()).read_text()
    assert len(re.findall(rf" namespace \S+ track \S+ maxconn {MAX_ONGOING_REQUESTS}\n", config)) == 2, config

    def marks(name: str) -> list[Path]:
        return list((cluster.base / "work").glob(f"**/{name}"))

    stream = {**body, "stream": True, "delay": 0.1}
    with httpx.Client(base_url=cluster.http, timeout=30, trust_env=False) as client:
        # A client that leaves mid-stream: HAProxy closes the engine's connection, the engine stops writing.
        before = _engine_responses(cluster)
        with client.stream("POST", "/eng/v1/chat/completions", json={**stream, "n": 600, "id": "gone"},
                           headers=auth) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines) == "data: 0"
        cluster.wait_until(lambda: marks("left-gone"), timeout=30, interval=0.2, what="the engine to see the client go")
        assert _engine_responses(cluster) - before == 1  # the engine path's, not the replica's
        # A stream in flight when the service is deleted: Serve drains the replicas (HAProxy reloads without them,
        # its previous process finishes the stream), and each replica waits for its engine's connections to end.
        got: list[str] = []

        def read_stream() -> None:
            with client.stream("POST", "/eng/v1/chat/completions", json={**stream, "n": 40, "id": "kept"},
                               headers=auth) as r:
                got.extend(line for line in r.iter_lines() if line)

        reader = threading.Thread(target=read_stream)
        reader.start()
        cluster.wait_until(lambda: got, timeout=10, interval=0.05, what="the stream's first event")
        cluster.run("delete", "eng", check=True)
        reader.join(60)
    assert got == [f"data: {i}" for i in range(40)]  # every event: the stream outlived HAProxy's reload
    cluster.wait_until(lambda: not our_processes(), timeout=60, interval=0.2, what="no pasta/supervisor left")
    assert list(entries.glob("*.json")) == []
    assert not [n for n in os.listdir("/run/netns") if n.startswith("ray-dstack-SERVE_REPLICA_eng-")]


def test_ray_stop_on_the_node_leaves_no_namespace_behind(cluster, tmp_path):
    """The node's `ray stop` (as an operator runs it, not --force) with namespaced replicas up: their pasta,
    supervisors, services, working directories and connector sockets all go."""
    path = write_service(tmp_path, "stopped", service("stopped", "replicas: 2\n"))
    assert cluster.run("deploy", str(path), timeout=300).returncode == 0
    assert list(our_processes().values()).count("pasta") == 2
    assert len(workdirs(cluster)) == 2
    stop = subprocess.run([str(BIN / "ray"), "stop"], capture_output=True, text=True, env=cluster.env, timeout=120)
    assert stop.returncode == 0, stop.stderr
    cluster.wait_until(lambda: not our_processes(), timeout=30, interval=0.2, what="no pasta/supervisor left")
    cluster.wait_until(lambda: not list((cluster.base / "work").iterdir()), timeout=10, interval=0.2,
                       what="no working directory or socket left")
