"""The engine path's requests in ray-dstack's metrics, read from HAProxy's log (engine_path.py writes the rules).

A request HAProxy sends straight to an engine never reaches a replica, so no replica can time it. HAProxy logs
each such request at `notice` to a datagram socket beside the node's haproxy.cfg, with an element of its own
in the RFC 5424 structured data: `[ray_dstack@1 service="svc" route="chat/completions" status=200
latency_ms=12]`. Serve's own requests are logged at `info` or `debug` and never reach that socket.

- **One reader per node.** The socket is bound by one of the node's engine replicas at a time: the one holding
  an exclusive `flock` on `engine-log.lock`. The others try again every poll (engine_registration.py's
  EngineRequests), so when the reader stops (or dies: the kernel drops its lock) another binds the socket
  within a second.
- **Best effort, as Serve's own HAProxy metrics** (the same kind of socket): lines sent while no replica reads
  (a second, when the reader changes) are lost, and so are lines sent while the reader's queue is full (the
  kernel queues `net.unix.max_dgram_qlen` datagrams, 10 by default, and HAProxy never waits: it counts them
  in `show info`'s `DroppedLogs`). So the socket is read by a thread of its own, never by the replica's
  event loop; it is created inside the reading replica's engine namespace, whose `max_dgram_qlen` is raised to
  QUEUE_DATAGRAMS (the queue is set when a socket is created, from its network namespace; a path-bound Unix
  socket is reached from any namespace); and `EngineRequests` warns when `DroppedLogs` grows. Autoscaling on
  `rps` does not depend on these lines: it counts HAProxy's responses per engine (engine_registration.py).
- **What is recorded** (serve/scaling/metrics.py, with the same tags as the replica path): the request count by
  status and the latency, from `%ST` and `%Ta` (HAProxy's time from the request's first byte to the answer's
  last; a stream's: to its end). A request the client left before any answer counts as 499. The model tag is
  the one the service's replicas on this node registered (their entries, read by the poll), and a line for a
  service with no entry here is dropped: a process that writes to the socket cannot add series. Time to first
  token and output tokens stay replica-path only.
- **Cost**: one datagram, one regular-expression parse and two Ray metric calls per request, on the reading
  replica's thread.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ray_dstack.serve.ingress import engine_path

log = logging.getLogger(__name__)

LOCK_NAME = "engine-log.lock"
CLIENT_LEFT = 499  # as Serve's own HAProxy metrics and nginx name a request the client left before its answer
_SECTION = re.compile(rb"\[" + re.escape(engine_path.LOG_SD_ID.encode()) + rb" ((?:[^\]\\]|\\.)*)\]")
_KV = re.compile(rb'(\w+)=(?:"((?:[^"\\]|\\.)*)"|(\S+))')
_UNESCAPE = re.compile(rb"\\(.)")
_ROUTES = ("chat/completions", "completions")
_RECV_TIMEOUT_S = 0.5  # how soon the reader thread sees close()
# The namespace's queue limit; what HAProxy's socket may have in flight (its send buffer, ~200 KiB, is charged
# for each datagram until it is read) holds ~160 lines of ~500 bytes: ~0.1 s at 1,300 answers/s.
QUEUE_DATAGRAMS = 4096
_CLONE_NEWNET = 0x40000000


def datagram_socket(netns: str | None = None, queue: int = QUEUE_DATAGRAMS) -> socket.socket:
    """A Unix datagram socket whose queue holds `queue` datagrams: created inside the network namespace bound at
    `netns` (a thread of its own enters it) after raising that namespace's `net.unix.max_dgram_qlen`. Without a
    namespace, or where that fails, the host's queue (10 by default)."""
    if netns is None:
        return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    made: dict[str, object] = {}

    def make() -> None:  # setns() moves this thread only, which ends here
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {netns}")
            finally:
                os.close(fd)
            qlen = Path("/proc/sys/net/unix/max_dgram_qlen")  # this thread's namespace's, opened from it
            if int(qlen.read_text()) < queue:
                qlen.write_text(str(queue))
            made["sock"] = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        except Exception as exc:  # noqa: BLE001 - reported below
            made["error"] = exc

    thread = threading.Thread(target=make, name="ray-dstack-engine-log-socket")
    thread.start()
    thread.join()
    sock = made.get("sock")
    if isinstance(sock, socket.socket):
        return sock
    log.warning("engine path log: a socket with the host's datagram queue (%r)", made.get("error"))
    return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)


@dataclass(frozen=True)
class EngineLogLine:
    """One request HAProxy sent to an engine."""

    service: str
    route: str
    status: int
    latency_s: float


def parse(datagram: bytes) -> EngineLogLine | None:
    """The request in one of HAProxy's RFC 5424 log datagrams, or None when it has no valid engine-path element."""
    section = _SECTION.search(datagram)
    if section is None:
        return None
    fields: dict[bytes, bytes] = {}
    for key, quoted, bare in _KV.findall(section.group(1)):
        fields[key] = _UNESCAPE.sub(rb"\1", quoted) if quoted else bare
    try:
        service = fields[b"service"].decode()
        route = fields[b"route"].decode()
        status = int(fields[b"status"])
        latency_ms = int(fields[b"latency_ms"])
    except (KeyError, ValueError):
        return None
    if not service or route not in _ROUTES:
        return None
    if not 100 <= status <= 599:  # -1: no answer was sent, the client having left first
        status = CLIENT_LEFT
    return EngineLogLine(service, route, status, max(0, latency_ms) / 1000)


class EngineLog:
    """This node's engine-path log socket, read by whichever replica holds its lock, on a thread of its own.

    `record(line, model)` gets each line of a service registered on this node (`refresh()` reads the
    registrations) with the model it registered."""

    def __init__(self, directory: Path, record: Callable[[EngineLogLine, str], None], *,
                 netns: str | None = None) -> None:
        self.directory = directory
        self.netns = netns  # where the socket is created (datagram_socket), e.g. /run/netns/<the engine's>
        self.socket_path = engine_path.log_socket_path(directory)
        self.record = record
        self.models: dict[str, str] = {}  # service → model, of the entries on this node (merged, never dropped)
        self.sock: socket.socket | None = None
        self.inode: int | None = None  # the socket file this reader bound
        self.lock_fd: int | None = None
        self.thread: threading.Thread | None = None

    @property
    def reading(self) -> bool:
        return self.sock is not None

    def refresh(self) -> None:
        """Read this node's registrations: a service's current model replaces the one it had."""
        models = {e.prefix[1:]: e.model for _, e in engine_path.entry_files(self.directory)}
        self.models = {**self.models, **models}

    def lead(self) -> bool:
        """Bind the socket if no other replica on the node reads it (called every poll); True when this one does.
        While it does, each call reads the registrations again (`refresh`)."""
        if self.sock is not None:
            if self._socket_is_ours():
                self.refresh()
                return True
            self.close()  # the path was replaced (the lock file removed under us): the other reader keeps it
        fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        try:
            self.socket_path.unlink(missing_ok=True)  # the last reader's (it died without removing it)
            sock = datagram_socket(self.netns)
            try:
                sock.bind(str(self.socket_path))
                # HAProxy runs as root; writes from other users' processes are refused (root's are filtered by
                # service in _read).
                os.chmod(self.socket_path, 0o600)
                sock.settimeout(_RECV_TIMEOUT_S)
                self.inode = os.stat(self.socket_path).st_ino
            except BaseException:
                sock.close()
                raise
        except BaseException:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
        self.sock, self.lock_fd = sock, fd
        self.refresh()  # before the first line is read
        self.thread = threading.Thread(target=self._read, args=(sock,), name="ray-dstack-engine-log", daemon=True)
        self.thread.start()
        return True

    def _socket_is_ours(self) -> bool:
        try:
            return os.stat(self.socket_path).st_ino == self.inode
        except OSError:
            return False

    def _read(self, sock: socket.socket) -> None:
        while self.sock is sock:
            try:
                datagram = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            line = parse(datagram)
            if line is None:
                continue
            model = self.models.get(line.service)
            if model is None:
                continue  # no replica of that service registered here: not HAProxy's line
            try:
                self.record(line, model)
            except Exception as exc:  # noqa: BLE001 - metrics never fail the replica
                log.debug("engine path log: %r", exc)

    def close(self) -> None:
        """Stop reading: the socket goes first, the lock last, so the next reader binds a free path."""
        sock, self.sock = self.sock, None
        if sock is not None:
            if self._socket_is_ours():
                self.socket_path.unlink(missing_ok=True)
            sock.close()
            if self.thread is not None and self.thread is not threading.current_thread():
                self.thread.join(2 * _RECV_TIMEOUT_S)
            self.thread = None
            self.inode = None
        if self.lock_fd is not None:
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
            os.close(self.lock_fd)
            self.lock_fd = None


def into_metrics() -> Callable[[EngineLogLine, str], None]:
    """What EngineLog does with a line in a replica: ray-dstack's request and latency metrics."""
    from ray_dstack.serve.scaling.metrics import Recorder

    recorder = Recorder()

    def record(line: EngineLogLine, model: str) -> None:
        recorder.answered(line.route, line.status, line.latency_s, service=line.service, model=model)

    return record
