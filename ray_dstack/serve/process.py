"""The child process of one replica: the service's commands, from start to cleanup.

The replica starts the commands (one shell, `env` applied, working directory set) under
`ray_dstack.serve.supervise`, streams their output line by line into the replica's log, waits until the
service answers (its port accepts connections, or the readiness probe answers 2xx), and checks that it keeps
answering. Stopping kills the whole process group.
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
from collections.abc import Mapping

import httpx

from ray_dstack.errors import RayDstackError
from ray_dstack.serve.supervise import REPLICA_PID_ENV
from ray_dstack.spec import PORT_ENV_VAR, ProbeSpec

TAIL_LINES = 200


class ServiceProcessError(RayDstackError):
    """The service's commands exited, or never started answering."""


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
        probe: ProbeSpec | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.commands = commands
        self.port = port
        self.env = dict(env)
        self.working_dir = working_dir
        self.logger = logger
        self.probe = probe
        self.host = host
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None
        self._probe_client: httpx.AsyncClient | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    def last_lines(self, n: int = 20) -> str:
        return "\n".join(list(self.tail)[-n:])

    async def start(self) -> None:
        shell = shutil.which("bash") or "/bin/sh"
        env = {**os.environ, **self.env, PORT_ENV_VAR: str(self.port)}
        # `python`/`pip` in the commands mean the Ray node's Python (the one running this replica).
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
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
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ray_dstack.serve.supervise",
            "--",
            shell,
            "-c",
            shell_script(self.commands),
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
        successes = 0
        needed = self.probe.ready_after if self.probe else 1
        interval = min(self.probe.interval_s, 1.0) if self.probe else 0.2
        while True:
            if self._proc.returncode is not None:
                await self._drain()
                raise ServiceProcessError(
                    f"the service's commands exited with code {self._proc.returncode} before it was ready"
                    + self._tail_suffix()
                )
            if await self.answers():
                successes += 1
                if successes >= needed:
                    self.logger.info("service is ready on port %s", self.port)
                    return
            else:
                successes = 0
            if time.monotonic() > deadline:
                what = f"{self.probe.path} did not answer 2xx" if self.probe else f"port {self.port} never opened"
                raise ServiceProcessError(
                    f"the service was not ready after {timeout_s:.0f}s: {what}" + self._tail_suffix()
                )
            try:
                await asyncio.wait_for(asyncio.shield(self._proc.wait()), interval)
            except asyncio.TimeoutError:
                pass

    async def answers(self) -> bool:
        if self.probe is None:
            return await self._port_open()
        if self._probe_client is None:
            self._probe_client = httpx.AsyncClient(timeout=self.probe.timeout_s)
        try:
            resp = await self._probe_client.get(f"http://{self.host}:{self.port}{self.probe.path}")
        except httpx.HTTPError:
            return False
        return 200 <= resp.status_code < 300

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
