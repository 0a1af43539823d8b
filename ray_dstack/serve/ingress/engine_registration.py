"""A replica's side of the engine path (engine_path.py): it offers its engine to its node's HAProxy and counts
the requests HAProxy sends there.

- **Which replicas** (`ineligible`): `$RAY_DSTACK_ENGINE_PATH=on` on the node (off by default until the path
  keeps every behaviour the replica path has: see bench/RESULTS.md, [3.3]), a `format: openai` model, a fixed
  `port` in a network namespace of the replica's own with the namespace connector, the prefix stripped, no
  `rate_limits` (the replica keeps them) and no replica groups, and root (HAProxy enters the namespace).
- **Its port stays private.** Such a replica's pasta maps no host port (runtime/host.py `private_port`): the
  replica itself reaches the engine through the namespace connector, HAProxy through the namespace.
- **Registration**: once the engine is ready, the namespace is bound at /run/netns/<name> (`ip netns attach`)
  and an entry (engine_path.Entry: the server name Serve gives this replica in HAProxy, the route, the token's
  SHA-256, the namespace and port) is written to the directory beside Serve's haproxy.cfg, before Serve lists
  the replica; Serve's next reload of HAProxy reads it (haproxy_v1.prepare). Closing removes both. Entries and
  namespaces of replicas that died without closing are collected at the next registration on the machine.
- **Counting** (`EngineRequests`): HAProxy's counters of this replica's engine server (its responses, `show
  stat`) go into the replica's RequestCounter every second, so `scaling: {metric: rps}` counts both paths.
  A reload starts HAProxy's counters again from zero: a drop is read as a new process. The same poll lets one
  replica per node read the engine path's log into the request metrics (engine_log.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import subprocess
import time
from pathlib import Path

from ray_dstack.serve.ingress import engine_path
from ray_dstack.serve.ingress.engine_log import EngineLog
from ray_dstack.serve.ingress.haproxy_v1 import config_file_name, config_lock, write_atomically
from ray_dstack.serve.ingress.v1_routes import HAProxyAdmin, info_number, info_pid
from ray_dstack.serve.scaling.request_counter import RequestCounter
from ray_dstack.spec import ServiceSpec

ENGINE_PATH_ENV = "RAY_DSTACK_ENGINE_PATH"
NETNS_PREFIX = "ray-dstack-"  # the namespace create() binds: this + the replica's server name (Serve's)
REPLICA_NETNS_PREFIX = NETNS_PREFIX + "SERVE_REPLICA"  # ... whose names begin so: Serve's replica actors' names
POLL_S = 1.0
RESPONSE_FIELDS = ("hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx", "hrsp_5xx", "hrsp_other")


def enabled() -> bool:
    value = (os.environ.get(ENGINE_PATH_ENV) or "off").strip().lower()
    return value == "on"


def ineligible(spec: ServiceSpec) -> str | None:
    """Why this service's replicas keep every request (None: their engines take the engine path)."""
    if not enabled():
        return f"${ENGINE_PATH_ENV} is not `on` on this node"
    if spec.model is None or spec.model.format != "openai":
        return "only a `format: openai` model is passed through as it is"
    if spec.image is not None or not spec.network_namespace or spec.port_from_env:
        return "the engine has no network namespace of its own (a fixed `port` without an image)"
    if not spec.strip_prefix:
        return "`strip_prefix: false`"
    if spec.rate_limits:
        return "`rate_limits` are kept by the replica"
    if spec.group is not None and len(spec.group.groups) > 1:
        return "replica groups"
    if spec.auth.enabled and spec.auth.token_sha256 is None:
        return "auth without a token"
    if os.geteuid() != 0:
        return "HAProxy enters network namespaces as root only"
    return None


def haproxy_dir(node_id: str | None = None) -> Path:
    """Where Serve writes this node's haproxy.cfg (engine entries go beside it): Serve scopes it by node id."""
    from ray.serve._private.constants import RAY_SERVE_HAPROXY_CONFIG_FILE_LOC

    return Path(RAY_SERVE_HAPROXY_CONFIG_FILE_LOC).parent / (node_id or _node_id())


def haproxy_admin_socket(node_id: str | None = None) -> str:
    from ray.serve._private.constants import RAY_SERVE_HAPROXY_SOCKET_PATH

    path = Path(RAY_SERVE_HAPROXY_SOCKET_PATH)
    return str(path.parent / (node_id or _node_id()) / path.name)


def max_ongoing_requests() -> int | None:
    """This replica's `max_ongoing_requests` as Serve runs it (None outside a replica): the engine path's limit."""
    from ray import serve

    try:
        value = serve.get_replica_context()._deployment_config.max_ongoing_requests
    except Exception:  # noqa: BLE001 - not in a replica, or Serve's context changed shape: no limit written
        return None
    return value if type(value) is int and value > 0 else None


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def server_name() -> str:
    """The name Serve gives this replica's server in HAProxy's configuration."""
    import ray
    from ray.serve._private.haproxy import HAProxyManager

    return HAProxyManager.get_safe_name(ray.get_runtime_context().get_actor_name() or "")


def peer_pid(unix_socket: str) -> int:
    """The pid (in this pid namespace) of the process listening on `unix_socket`: the namespace's init."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(unix_socket)
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int.from_bytes(creds[:4], "little")


class EngineRegistration:
    """This replica's engine in its node's engine directory, and its namespace at /run/netns/<name>.

    Stopping is in two steps: `withdraw()` first (the entry goes, under the lock Serve's configuration is
    rewritten under, so no later reload lists the engine), `release()` last, once the engine has stopped: a
    HAProxy started from a configuration that still names the namespace must find it (it refuses the whole
    configuration otherwise)."""

    def __init__(self, entry: engine_path.Entry, directory: Path, pid: int) -> None:
        self.entry = entry
        self.directory = directory
        self.path = engine_path.entry_path(directory, entry.server)
        self.pid = pid  # a process inside the namespace (its init), for its TCP table

    @classmethod
    def create(cls, spec: ServiceSpec, *, connector_path: str, port: int, server: str,
               directory: Path, max_ongoing: int | None = None) -> "EngineRegistration":
        assert spec.model is not None, "checked by ineligible()"
        netns = NETNS_PREFIX + server
        pid = peer_pid(connector_path)
        directory.mkdir(parents=True, exist_ok=True)
        collect_stale(directory)
        collect_orphaned_namespaces()
        subprocess.run(["ip", "netns", "delete", netns], capture_output=True, timeout=30)  # a dead replica's
        out = subprocess.run(["ip", "netns", "attach", netns, str(pid)], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise OSError(f"ip netns attach {netns} {pid}: {out.stderr.strip()}")
        prefix = spec.model.prefix.strip("/")  # as OpenAIPassthrough reads it
        entry = engine_path.Entry(server=server, prefix=f"/{spec.name}", model=spec.model.name,
                                  token_sha256=spec.auth.token_sha256 if spec.auth.enabled else None,
                                  upstream_prefix=f"/{prefix}" if prefix else "", netns=netns, port=port,
                                  timeout_s=max(1, math.ceil(spec.request_timeout_s)), max_ongoing=max_ongoing)
        registration = cls(entry, directory, pid)
        try:
            write_atomically(str(registration.path), entry.to_json())
        except OSError:
            registration.release()
            raise
        return registration

    def withdraw(self) -> None:
        with config_lock(_config_path(self.directory)):
            self.path.unlink(missing_ok=True)

    def release(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.entry.netns], capture_output=True, timeout=30)


def _config_path(directory: Path) -> Path:
    """Serve's haproxy.cfg beside the engine directory `directory`."""
    return directory.parent / config_file_name()


def collect_stale(directory: Path) -> list[str]:
    """Remove the entries (and namespace bindings) of replicas that died without closing theirs (SIGKILL, a
    node's `ray stop`): their namespace has no process left and the current configuration no longer names it.
    Returns the namespaces removed."""
    removed = []
    with config_lock(_config_path(directory)):
        try:
            config = _config_path(directory).read_text()
        except OSError:
            config = ""
        for path, entry in engine_path.entry_files(directory):
            if f" namespace {entry.netns} " in config:
                continue
            if _has_processes(entry.netns):
                continue  # alive
            subprocess.run(["ip", "netns", "delete", entry.netns], capture_output=True, timeout=30)
            path.unlink(missing_ok=True)
            removed.append(entry.netns)
    return removed


def collect_orphaned_namespaces(netns_dir: str = engine_path.NETNS_DIR) -> list[str]:
    """Unbind the engine namespaces of replicas that died with their node's Ray (`ray stop` kills replicas before
    they release theirs, and the next Ray on the machine has another node id, so collect_stale never reads their
    entries): no process left in them, and no running HAProxy's configuration names them. Returns them."""
    try:
        names = sorted(n for n in os.listdir(netns_dir) if n.startswith(REPLICA_NETNS_PREFIX))
    except OSError:
        return []
    if not names:
        return []
    configs = _running_haproxy_configs()
    removed = []
    for name in names:
        if f" namespace {name} " in configs or f" namespace {name}\n" in configs:
            continue
        if _has_processes(name) is not False:
            continue  # alive (or unknown: kept)
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)
        removed.append(name)
    return removed


def _has_processes(netns: str) -> bool | None:
    """Whether a process is in the namespace bound at /run/netns/<netns> (None: `ip netns pids` failed)."""
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=30)
    return bool(pids.stdout.strip()) if pids.returncode == 0 else None


def _running_haproxy_configs() -> str:
    """The configuration files (`-f`) of every haproxy process on the machine, concatenated."""
    texts = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv[0].endswith(b"haproxy"):
            continue
        for flag, value in zip(argv, argv[1:]):
            if flag == b"-f":
                try:
                    texts.append(Path(os.fsdecode(value)).read_text())
                except OSError:
                    pass
    return "\n".join(texts)


DRAIN_MAX_S = 60.0
DRAIN_POLL_S = 0.2
_ESTABLISHED = "01"


def established(tcp_table: str, port: int) -> int:
    """Established connections to local `port` in a /proc/<pid>/net/tcp{,6} table."""
    count = 0
    for line in tcp_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == _ESTABLISHED and fields[1].rsplit(":", 1)[-1] == f"{port:04X}":
            count += 1
    return count


def connections_to_engine(registration: EngineRegistration) -> int:
    total = 0
    for table in ("tcp", "tcp6"):
        try:
            total += established(Path(f"/proc/{registration.pid}/net/{table}").read_text(), registration.entry.port)
        except OSError:
            pass
    return total


async def drain(registration: EngineRegistration, logger: logging.Logger, *, max_s: float = DRAIN_MAX_S) -> None:
    """Wait (at most `max_s`) until no connection reaches the engine: HAProxy processes from before Serve's
    reload finish their requests on it, and close their idle ones when they exit. Connections the replica
    itself holds are closed by then (it has no request left)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_s
    while (left := connections_to_engine(registration)) and loop.time() < deadline:
        await asyncio.sleep(DRAIN_POLL_S)
    if left:
        logger.warning("engine path: %d connection(s) still open on the engine after %.0fs; stopping it", left, max_s)


def _stat_rows(stat_csv: str, backend_suffix: str) -> list[dict[str, str]]:
    """The rows of the backends named `*<backend_suffix>` in `show stat` CSV, as {field: value}."""
    lines = stat_csv.strip().splitlines()
    if not lines or not lines[0].startswith("# "):
        return []
    header = lines[0][2:].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    return [r for r in rows if len(r) == len(header) and r.get("pxname", "").endswith(backend_suffix)]


def _number(row: dict[str, str], field: str) -> int:
    return int(row.get(field) or 0)


def _server_row(rows: list[dict[str, str]], server: str) -> dict[str, str] | None:
    """`server`'s row: the last of that name, since the engine backends come after Serve's (same server names)."""
    return next((r for r in reversed(rows) if r.get("svname") == server), None)


def _responses(rows: list[dict[str, str]], server: str) -> int | None:
    row = _server_row(rows, server)
    if row is None or not all(f in row for f in RESPONSE_FIELDS):
        return None
    return sum(_number(row, f) for f in RESPONSE_FIELDS)


def _in_flight(rows: list[dict[str, str]], server: str) -> int | None:
    mine = _server_row(rows, server)
    if mine is None or "scur" not in mine:
        return None
    queued = sum(_number(r, "qcur") for r in rows if r["pxname"] == mine["pxname"] and r["svname"] == "BACKEND")
    return _number(mine, "scur") + _number(mine, "qcur") + queued


def engine_responses(stat_csv: str, backend_suffix: str, server: str) -> int | None:
    """Responses HAProxy counted for `server` in the engine backend (`show stat` CSV), or None when absent."""
    return _responses(_stat_rows(stat_csv, backend_suffix), server)


def engine_in_flight(stat_csv: str, backend_suffix: str, server: str) -> int | None:
    """Requests HAProxy is sending to `server`'s engine now (`scur`), or queueing for it or for its backend
    (`qcur`: beyond `maxconn`), or None when the server is absent. Every engine of a backend reports the
    backend's queue: the scale-to-zero guard asks only whether any request is left. Only the newest HAProxy
    process answers: requests an older one (before a reload) still serves are not counted."""
    return _in_flight(_stat_rows(stat_csv, backend_suffix), server)


class EngineRequests:
    """Folds HAProxy's count of this engine's responses into the replica's RequestCounter every POLL_S. Each
    HAProxy process counts from zero: a reading from another process (its pid) counts whole. The same poll
    keeps the node's engine-path log read by one replica (engine_log.py)."""

    DROPPED_WARNING_S = 60.0

    def __init__(self, counter: RequestCounter, *, server: str, admin_socket: str,
                 log: EngineLog | None = None) -> None:
        self.counter = counter
        self.server = server
        self.admin = HAProxyAdmin(admin_socket)
        self.log = log
        self.last: tuple[int, int] | None = None  # (pid, count)
        self.in_flight = 0  # the engine path's requests at this engine at the last reading (autoscaling's guard)
        self.dropped: tuple[int, int] | None = None  # (pid, HAProxy's DroppedLogs) already reported
        self.dropped_now: tuple[int, int] | None = None
        self.dropped_at = -math.inf
        self.log_failure: str | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    def step(self, reading: tuple[int, int] | None) -> int:
        """Requests to add for a reading (pid, count); None: no reading."""
        if reading is None:
            return 0
        pid, seen = reading
        if self.last is None or self.last[0] != pid:
            added = seen
        else:
            added = max(0, seen - self.last[1])
        self.last = reading
        return added

    def read(self) -> tuple[int, int] | None:
        """(HAProxy's pid, this engine's responses), both from one connection, so from one process."""
        try:
            text = self.admin.command("show info;show stat")
        except OSError:
            self.in_flight = 0  # no HAProxy answering: nothing of it in flight that could be kept
            return None
        pid = info_pid(text)
        dropped = info_number(text, "DroppedLogs")
        self.dropped_now = (pid, dropped) if pid is not None and dropped is not None else None
        stat = text[text.find("# pxname"):] if "# pxname" in text else ""
        rows = _stat_rows(stat, engine_path.ENGINE_BACKEND_SUFFIX)  # parsed once for both readings
        count = _responses(rows, self.server)
        self.in_flight = _in_flight(rows, self.server) or 0
        return None if pid is None or count is None else (pid, count)

    def poll_log(self) -> None:
        """Read the node's engine-path log if no other replica does; as its reader, warn when HAProxy drops lines."""
        if self.log is None:
            return
        try:
            if not self.log.lead():  # as the reader, it also reads the registrations again
                return
        except Exception as exc:  # noqa: BLE001 - the requests are served; only their metrics are missed
            if self.log_failure != repr(exc):
                self.log_failure = repr(exc)
                logging.getLogger(__name__).warning("engine path log not read (retried every %.0fs): %r",
                                                    POLL_S, exc)
            return
        self.log_failure = None
        self._warn_dropped()

    def _warn_dropped(self) -> None:
        now = self.dropped_now
        if now is None:
            return
        if self.dropped is None:
            self.dropped = now  # what HAProxy dropped before this replica read the log is not this reader's
            return
        if self.dropped[0] != now[0]:
            self.dropped = (now[0], 0)  # a new HAProxy process counts from zero
        grown = now[1] - self.dropped[1]
        if grown > 0 and time.monotonic() - self.dropped_at >= self.DROPPED_WARNING_S:
            logging.getLogger(__name__).warning(
                "HAProxy dropped %d log line(s) (its DroppedLogs): the engine path's request metrics and Serve's "
                "own HAProxy metrics undercount; a log reader fell behind (net.unix.max_dgram_qlen)", grown)
            self.dropped, self.dropped_at = now, time.monotonic()

    async def _run(self) -> None:
        while True:
            await asyncio.to_thread(self.poll_log)
            await asyncio.sleep(POLL_S)
            self.counter.record_many(self.step(await asyncio.to_thread(self.read)))

    async def aclose(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None
        if self.log is not None:
            await asyncio.to_thread(self.log.close)
        self.counter.record_many(self.step(await asyncio.to_thread(self.read)))
