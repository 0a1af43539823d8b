"""The child process of one replica: the service's commands, from start to cleanup.

The replica starts the commands (one shell, `env` applied, working directory set, the service's Python
environment first on PATH, optionally inside pasta's namespaces) under `ray_dstack.serve.runtime.supervise`, streams
their output line by line into the replica's log, waits until the service answers (its port accepts
connections or, behind pasta or a published container port, answers HTTP), and checks that it keeps
answering. dstack's `probes` run after that, in ray_dstack.serve.runtime.base. Stopping kills the whole
process group.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence

import httpx

from ray_dstack.errors import RayDstackError
from ray_dstack.serve.transport.netns_connect import NamespaceBackend, NamespaceConnector
from ray_dstack.serve.runtime.supervise import REPLICA_PID_ENV
from ray_dstack.spec import PORT_ENV_VAR

TAIL_LINES = 200


class ServiceProcessError(RayDstackError):
    """The service's commands exited, or never started answering."""


def default_shell() -> str:
    """dstack's shell without an image: /bin/bash, or /bin/sh where bash is missing."""
    if os.access("/bin/bash", os.X_OK):
        return "/bin/bash"
    return shutil.which("bash") or "/bin/sh"


def shell_script(commands: list[str]) -> str:
    # `set -e`: a failing line stops the service, as on dstack.
    return "set -e\n" + "\n".join(commands) + "\n"


class ServiceProcess:
    def __init__(
        self,
        commands: list[str],
        *,
        port: int,
        env: Mapping[str, str],
        working_dir: str | None,
        logger: logging.Logger,
        host: str = "127.0.0.1",
        path: str | None = None,
        namespace: list[str] | None = None,
        service_port: int | None = None,
        cleanup_dir: str | None = None,
        command: list[str] | None = None,
        connector: NamespaceConnector | None = None,
        own_proc: bool = False,
        shell: str | None = None,
        wrapper: Sequence[str] = (),
        init_user: str | None = None,
        extra_cleanup: Sequence[str] = (),
    ) -> None:
        """`port`: where the service is reached from the replica; `service_port`: the port it listens on
        inside (differs behind pasta: `namespace` is pasta's argv prefix). `path`: PATH of the commands.
        `cleanup_dir`: removed by the supervisor once the commands are gone. `command`: an argv run under the
        supervisor instead of the shell (a container: ray_dstack/serve/runtime/container_prepare.py). `connector`: the
        namespace's init hands out connections to the service (ray_dstack/serve/transport/netns_connect.py); readiness
        is then its port accepting inside the namespace. `own_proc`: `namespace` runs pasta in a private mount
        namespace, where the supervisor mounts the PID namespace's own /proc (ray_dstack/serve/runtime/netns.py).
        `shell`: runs the commands (default: default_shell()). `wrapper`: an argv prefix the command runs under
        when there is no `namespace` (a mount namespace and runtime/enter.py). `init_user`: `UID:GID[:G,...]` the
        namespace's init runs the commands as (the supervisor gives pasta's user namespace an identity map for
        it). `extra_cleanup`: more paths the supervisor removes."""
        self.command = command
        self.commands = commands
        self.port = port
        self.service_port = service_port or port
        self.env = dict(env)
        self.working_dir = working_dir
        self.path = path
        self.namespace = namespace
        self.cleanup_dir = cleanup_dir
        self.extra_cleanup = list(extra_cleanup)
        self.shell = shell
        self.wrapper = list(wrapper)
        self.init_user = init_user if namespace is not None else None
        self.connector = connector if namespace is not None else None
        self.own_proc = own_proc and namespace is not None
        # pasta accepts on the host port before the service listens inside: only an HTTP answer counts.
        # A published container port too (docker-proxy accepts before the container listens).
        self.http_ready = (namespace is not None and self.connector is None) or command is not None
        self.logger = logger
        self.host = host
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None
        self._probe_client: httpx.AsyncClient | None = None

    @property
    def network_backend(self) -> NamespaceBackend | None:
        """How a client reaches the service when not by host and port (into its namespace); None: plainly."""
        return NamespaceBackend(self.connector) if self.connector is not None else None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    def last_lines(self, n: int = 20) -> str:
        return "\n".join(list(self.tail)[-n:])

    async def start(self) -> None:
        shell = self.shell or default_shell()
        env = {**os.environ, **self.env, PORT_ENV_VAR: str(self.service_port)}
        if self.path is not None:  # the service's Python environment (ray_dstack/serve/runtime/python_env.py)
            env["PATH"] = self.path
        env[REPLICA_PID_ENV] = str(os.getpid())
        # Ray sets these for its workers; the service must not inherit them (it is not a Ray worker).
        for key in list(env):
            if key.startswith("RAY_RAYLET_") or key in {"RAY_JOB_ID", "RAY_CLIENT_MODE"}:
                env.pop(key, None)
        cwd = self.working_dir
        if cwd:
            cwd = os.path.expanduser(cwd)
            if not os.path.isdir(cwd):
                raise ServiceProcessError(f"working_dir {self.working_dir!r} does not exist on this node")
        supervise = [sys.executable, "-m", "ray_dstack.serve.runtime.supervise"]
        command = self.command or [shell, "-c", shell_script(self.commands)]
        cleanup = ["--cleanup", self.cleanup_dir] if self.cleanup_dir else []
        for path in self.extra_cleanup:
            cleanup += ["--cleanup", path]
        if self.namespace is not None:
            init = [*supervise, "--init"]
            if self.own_proc:
                init.append("--own-proc")
                cleanup.append("--namespace-proc")
            if self.connector is not None:
                init += ["--connector", self.connector.path]
                cleanup += ["--cleanup", self.connector.path]
            if self.init_user is not None:
                init += ["--user", self.init_user]
                cleanup.append("--map-ids")
            command = [*self.namespace, *init, "--", *command]
        else:
            command = [*self.wrapper, *command]
        self._proc = await asyncio.create_subprocess_exec(
            *supervise,
            *cleanup,
            "--",
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=cwd,
            limit=1 << 20,
        )
        self._reader = asyncio.create_task(self._pump_output())
        self.logger.info("service commands started (pid %s, port %s)", self._proc.pid, self.port)

    async def _pump_output(self) -> None:
        assert self._proc and self._proc.stdout
        while True:
            try:
                line = await self._proc.stdout.readline()
            except ValueError:  # a line over the limit: read what is there
                line = await self._proc.stdout.read(1 << 16)
            if not line:
                break
            text = line.decode(errors="replace").rstrip("\n")
            self.tail.append(text)
            self.logger.info("[service] %s", text)

    async def wait_ready(self, timeout_s: float) -> None:
        """Return once the service answers; raise ServiceProcessError if it exits or the time runs out."""
        assert self._proc
        deadline = time.monotonic() + timeout_s
        interval = 0.2
        while True:
            if self._proc.returncode is not None:
                await self._drain()
                raise ServiceProcessError(
                    f"the service's commands exited with code {self._proc.returncode} before it was ready"
                    + self._tail_suffix()
                )
            if await self.answers():
                self.logger.info("service is ready on port %s", self.port)
                return
            if time.monotonic() > deadline:
                raise ServiceProcessError(
                    f"the service was not ready after {timeout_s:.0f}s: port {self.port} never opened"
                    + self._tail_suffix()
                )
            try:
                await asyncio.wait_for(asyncio.shield(self._proc.wait()), interval)
            except asyncio.TimeoutError:
                pass

    async def answers(self) -> bool:
        """The port takes connections (any HTTP answer where a proxy accepts before the service listens)."""
        if self.connector is not None:
            return await self.connector.accepts()
        return await (self._http_answers() if self.http_ready else self._port_open())

    async def _http_answers(self) -> bool:
        if self._probe_client is None:
            self._probe_client = httpx.AsyncClient(timeout=5.0)
        try:
            await self._probe_client.get(f"http://{self.host}:{self.port}/")
        except httpx.HTTPError:
            return False
        return True

    async def _port_open(self) -> bool:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 2.0)
        except (OSError, asyncio.TimeoutError):
            return False
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return True

    async def check_health(self) -> None:
        """Raise if the child exited or stopped answering (Serve then replaces the replica)."""
        if self._proc is None:
            raise ServiceProcessError("the service process was never started")
        if self._proc.returncode is not None:
            raise ServiceProcessError(
                f"the service's commands exited with code {self._proc.returncode}" + self._tail_suffix()
            )
        if not await self.answers():
            raise ServiceProcessError(f"the service stopped answering on port {self.port}")

    async def stop(self, grace_s: float = 10.0) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            try:
                proc.send_signal(signal.SIGTERM)  # the supervisor takes the whole group down
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        await self._drain()
        if self._probe_client is not None:
            await self._probe_client.aclose()
        self.logger.info("service commands stopped (exit code %s)", proc.returncode)

    async def _drain(self) -> None:
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, 2.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._reader.cancel()

    def _tail_suffix(self) -> str:
        tail = self.last_lines()
        return f"; last output:\n{tail}" if tail else "; it printed nothing"
