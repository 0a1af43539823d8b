"""dstack's `docker: true` for a process replica: its commands get a working Docker daemon.

dstack runs such a job in its `dstackai/dind` image with a Docker daemon of the job's own (and forbids `image`
with it), so here it is a *process* replica (runtime/host.py) whose commands find:
- `DOCKER_HOST=unix://...`: the node's Docker socket (/var/run/docker.sock) when it answers `/_ping`, else a
  Docker-compatible daemon of the replica's own: `podman system service` on a socket in the replica's
  directory, in a libpod namespace of its own, under the supervisor so it dies with the replica and removes
  the containers the commands started (runtime/docker_daemon.py);
- a `docker` command: the node's when it has one, else a shim running `podman --remote --url $DOCKER_HOST`
  (podman's API only: the shim is offered where the daemon is podman);
- the node's container flags (`RAY_DSTACK_CONTAINER_FLAGS`: `--runtime`, `--ulimit`, `--cgroups`,
  `--pids-limit`) as that daemon's defaults for every container it runs, in a containers.conf that starts
  from the node's own.

The daemon is started from the calling thread, which must live as long as the replica (the replica's event
loop: a parent-death signal binds the supervisor to the thread that started it), hence `async`.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_dstack.errors import RayDstackError
from ray_dstack.serve.runtime import container as c
from ray_dstack.serve.runtime.supervise import REPLICA_PID_ENV

NODE_SOCKET = Path("/var/run/docker.sock")
STATE_DIR = ".ray-dstack-docker"  # in the replica's directory: the socket, the shim, the daemon's config and log
MAX_SOCKET_PATH = 107  # sockaddr_un.sun_path, less the terminating NUL
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
# containers.conf files podman reads when CONTAINERS_CONF is unset (containers/common, podman 4): the daemon's
# own file replaces them all, so it starts from their merged content.
SYSTEM_CONFS = ("/usr/share/containers/containers.conf", "/etc/containers/containers.conf")
SYSTEM_CONF_DIR = "/etc/containers/containers.conf.d"
INSTALL_HINT = "install podman (Debian/Ubuntu: `apt-get install podman runc`) or Docker on it"


class DockerAccessError(RayDstackError):
    """The replica's commands cannot be given a Docker daemon on this node."""


@dataclass
class DockerAccess:
    """What the commands of a `docker: true` replica get, and what to stop when the replica stops."""

    docker_host: str  # `unix:///...`
    source: str  # "node" (the node's daemon) or "podman" (the replica's own)
    bin_dir: Path | None = None  # holds the `docker` shim: first on the commands' PATH
    process: subprocess.Popen | None = None
    owned_dirs: list[Path] = field(default_factory=list)  # removed by close()
    log_path: Path | None = None

    @property
    def env(self) -> dict[str, str]:
        return {"DOCKER_HOST": self.docker_host}

    def path(self, path: str) -> str:
        """The commands' PATH with the shim's directory first (unchanged when the node has `docker`)."""
        return path if self.bin_dir is None else os.pathsep.join(p for p in (str(self.bin_dir), path) if p)

    def close(self) -> None:
        """Stop the replica's daemon and remove the containers the commands started through it (idempotent)."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # the supervisor's anchor: its guard takes the daemon's group down
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for directory in self.owned_dirs:
            shutil.rmtree(directory, ignore_errors=True)
        self.owned_dirs = []


def ping(socket_path: str | Path, timeout_s: float = 2.0) -> dict[str, str] | None:
    """`GET /_ping` on a Docker API socket: the response headers when it answers 200 OK, else None."""
    conn = _UnixHTTPConnection(str(socket_path), timeout_s)
    try:
        conn.request("GET", "/_ping")
        response = conn.getresponse()
        response.read()
        return {k.lower(): v for k, v in response.getheaders()} if response.status == 200 else None
    except OSError:
        return None
    finally:
        conn.close()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


# --- the daemon's containers.conf ------------------------------------------------------------------------


def conf_from_flags(flags: Sequence[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The containers.conf settings that make the node's `run` flags every container's defaults, and the
    flags that have no such setting (not applied to the commands' containers)."""
    conf: dict[str, dict[str, Any]] = {}
    ignored: list[str] = []
    words = list(flags)
    i = 0
    while i < len(words):
        word = words[i]
        name, eq, value = word.partition("=")
        if not eq and name in ("--runtime", "--ulimit", "--cgroups", "--pids-limit") and i + 1 < len(words):
            value, i = words[i + 1], i + 1
        if name == "--runtime":
            conf.setdefault("engine", {})["runtime"] = value
        elif name == "--ulimit":
            conf.setdefault("containers", {}).setdefault("default_ulimits", []).append(value)
        elif name == "--cgroups":
            conf.setdefault("containers", {})["cgroups"] = value
        elif name == "--pids-limit" and re.fullmatch(r"-?\d+", value):
            conf.setdefault("containers", {})["pids_limit"] = int(value)
        else:
            ignored.append(word)
        i += 1
    return conf, ignored


def system_conf(log: Callable[[str], None], files: Sequence[str] | None = None) -> dict[str, Any]:
    """The node's containers.conf files merged in podman's order (later files win, table by table)."""
    if files is None:
        drop_ins = sorted(str(p) for p in Path(SYSTEM_CONF_DIR).glob("*.conf")) if os.path.isdir(SYSTEM_CONF_DIR) else []
        files = [*SYSTEM_CONFS, *drop_ins]
    merged: dict[str, Any] = {}
    for path in files:
        try:
            with open(path, "rb") as fh:
                _merge(merged, tomllib.load(fh))
        except FileNotFoundError:
            continue
        except (OSError, tomllib.TOMLDecodeError) as exc:
            log(f"docker: true: {path} not used for the replica's daemon: {exc}")
    return merged


def _merge(into: dict[str, Any], other: Mapping[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


def to_toml(data: Mapping[str, Any]) -> str:
    """TOML for containers.conf's shapes: tables of strings, numbers, booleans and lists of them."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a TOML basic string
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, Mapping):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"no TOML for {type(v).__name__}")

    def table(prefix: str, d: Mapping[str, Any], out: list[str]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, Mapping)}
        if prefix:
            out.append(f"[{prefix}]")
        out.extend(f"{json.dumps(k)} = {value(v)}" for k, v in scalars.items())
        for k, v in d.items():
            if isinstance(v, Mapping):
                table(f"{prefix}.{json.dumps(k)}" if prefix else json.dumps(k), v, out)

    out: list[str] = []
    table("", data, out)
    return "\n".join(out) + "\n"


def write_conf(path: Path, flags: Sequence[str], log: Callable[[str], None]) -> bool:
    """The daemon's containers.conf (the node's, with the node's `run` flags as defaults); False when the flags
    change nothing (the daemon then reads the node's files itself)."""
    conf, ignored = conf_from_flags(flags)
    if ignored:
        log(f"docker: true: {c.FLAGS_ENV} words {ignored} have no containers.conf setting: the containers the "
            "commands start through docker do not get them")
    if not conf:
        return False
    merged = system_conf(log)
    _merge(merged, conf)
    path.write_text(to_toml(merged))
    return True


# --- giving the commands a daemon ------------------------------------------------------------------------


def _state_dir(workspace: Path) -> tuple[Path, bool]:
    """The daemon's directory, and whether it lies outside the workspace (a socket path must fit sun_path)."""
    state = workspace / STATE_DIR
    if len(os.fsencode(str(state / "docker.sock"))) <= MAX_SOCKET_PATH:
        state.mkdir(parents=True, exist_ok=True)
        return state, False
    return Path(tempfile.mkdtemp(prefix="ray-dstack-docker-")), True


def _write_shim(bin_dir: Path, podman: str, docker_host: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "docker"
    shim.write_text(f'#!/bin/sh\nexec {_sh_quote(podman)} --remote --url "${{DOCKER_HOST:-{docker_host}}}" "$@"\n')
    shim.chmod(0o755)


def _sh_quote(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"


def namespace_for(workspace: Path) -> str:
    """The replica's libpod namespace: named after its directory (unique per replica on the node)."""
    return "ray-dstack-" + re.sub(r"[^A-Za-z0-9_.-]", "_", workspace.name)


async def docker_access(workspace: Path, log: Callable[[str], None], *, commands_path: str | None = None,
                        node_socket: Path = NODE_SOCKET, which=shutil.which,
                        environ: Mapping[str, str] | None = None) -> DockerAccess:
    """A Docker daemon for the commands of the replica whose directory is `workspace` (see the module's
    docstring). `commands_path`: the PATH the commands get (decides whether they need the shim). Raises
    DockerAccessError when the node has neither a Docker daemon nor podman."""
    environ = os.environ if environ is None else environ
    commands_path = environ.get("PATH", "") if commands_path is None else commands_path
    has_docker_cli = which("docker", path=commands_path) is not None
    podman = which("podman")
    headers = await asyncio.to_thread(ping, node_socket)
    if headers is not None:
        access = DockerAccess(docker_host=f"unix://{node_socket}", source="node")
        # podman's shim speaks podman's own API: only where the node's socket is podman's.
        if not has_docker_cli and podman and "libpod-api-version" in headers:
            state, outside = _state_dir(workspace)
            access.bin_dir = state / "bin"
            access.owned_dirs = [state] if outside else []
            _write_shim(access.bin_dir, podman, access.docker_host)
        elif not has_docker_cli:
            log("docker: true: the node's Docker daemon answers but the node has no `docker` command for the commands")
        log(f"docker: true: the commands use the node's Docker daemon at {node_socket}")
        return access
    if not podman:
        raise DockerAccessError(
            f"`docker: true`: node {socket.gethostname()} has no Docker daemon answering at {node_socket} and no "
            f"podman to run one for the replica: {INSTALL_HINT}")
    state, outside = _state_dir(workspace)
    sock = state / "docker.sock"
    access = DockerAccess(docker_host=f"unix://{sock}", source="podman", owned_dirs=[state] if outside else [],
                          log_path=state / "daemon.log")
    env = {**environ, REPLICA_PID_ENV: str(os.getpid())}
    if write_conf(state / "containers.conf", c.extra_flags(environ), log):
        env["CONTAINERS_CONF"] = str(state / "containers.conf")
    namespace = namespace_for(workspace)
    cleanup = ["--cleanup", str(state)] if outside else []
    with open(access.log_path, "ab") as out:
        access.process = subprocess.Popen(
            [sys.executable, "-m", "ray_dstack.serve.runtime.supervise", *cleanup, "--",
             sys.executable, "-m", "ray_dstack.serve.runtime.docker_daemon", "--podman", podman,
             "--namespace", namespace, "--socket", str(sock)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        await _wait_answering(access, sock)
    except BaseException:
        access.close()
        raise
    if not has_docker_cli:
        access.bin_dir = state / "bin"
        _write_shim(access.bin_dir, podman, access.docker_host)
    log(f"docker: true: the replica's own Docker daemon (podman, namespace {namespace}) at {sock}"
        + ("" if has_docker_cli else f"; `docker` runs podman --remote ({access.bin_dir})"))
    return access


async def _wait_answering(access: DockerAccess, sock: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        proc = access.process
        assert proc is not None
        if proc.poll() is not None:
            raise DockerAccessError(f"`docker: true`: the replica's Docker daemon (podman system service) exited "
                                    f"with code {proc.returncode}{_log_tail(access.log_path)}")
        if sock.exists() and await asyncio.to_thread(ping, sock, 1.0) is not None:
            return
        if time.monotonic() > deadline:
            raise DockerAccessError(f"`docker: true`: the replica's Docker daemon did not answer at {sock} within "
                                    f"{START_TIMEOUT_S:.0f}s{_log_tail(access.log_path)}")
        await asyncio.sleep(0.1)  # between polls of the two conditions above


def _log_tail(path: Path | None, lines: int = 10) -> str:
    try:
        text = path.read_text(errors="replace").strip() if path else ""
    except OSError:
        text = ""
    return "; its output:\n" + "\n".join(text.splitlines()[-lines:]) if text else ""
