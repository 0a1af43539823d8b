"""One replica's runtime: how it runs the service's commands, behind the one interface the replica calls.

    prepare()       the node-side work before anything runs (working directory, Python environment, network
                    namespace, image pull); blocking steps run off the event loop. Sets `port` and `process`.
    start()         the service's process under the supervisor (ray_dstack/serve/runtime/supervise.py).
    ready(t)        the service answers on its port, then every dstack probe passes (runtime/probes.py).
    check_health()  the process still runs and answers, and the probes have not failed 3 times in a row.
    stop()          probes, process and everything prepare() made on the node, in that order; safe at any stage.
    describe()      what `ray-dstack status` shows of this replica's runtime.

Each kind (runtime/host.py: a child process, in the node's network or a namespace of its own;
runtime/container_runtime.py: an `image`) implements prepare(), release() and the extra lines of describe().
A field that changes how commands run is added once per runtime, never to the replica.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import httpx

from ray_dstack.serve.runtime.probes import ProbeError, ProbeRunner
from ray_dstack.serve.runtime.process import ServiceProcess, ServiceProcessError
from ray_dstack.serve.transport.client import plain_transport
from ray_dstack.serve.transport.netns_connect import NamespaceBackend
from ray_dstack.spec import ServiceSpec


def probe_client(process: ServiceProcess) -> httpx.AsyncClient:
    """The probes' own client to the service (the same way in as its traffic: into its namespace if any)."""
    return httpx.AsyncClient(transport=plain_transport(httpx.Limits(), process.network_backend), trust_env=False)


class ReplicaRuntime(ABC):
    kind: ClassVar[str]

    def __init__(self, spec: ServiceSpec, *, replica_tag: str, logger: logging.Logger) -> None:
        self.spec = spec
        self.replica_tag = replica_tag  # unique within the deployment: names the replica's files and container
        self.logger = logger
        self.created_at = time.time()
        self.port: int | None = None  # where the replica reaches the service on the node
        self.process: ServiceProcess | None = None
        self.probes: ProbeRunner | None = None
        # A Dynamo worker's router address ($DSTACK_ROUTER_INTERNAL_IP), set by the replica before prepare().
        self.router_ip: str | None = None

    @abstractmethod
    async def prepare(self) -> None:
        """Everything the node needs before the service starts; sets `port` and `process`. Raises
        ServiceProcessError with what is missing."""

    def release(self) -> None:
        """Give back what prepare() made on the node (idempotent; the supervisor's cleanup covers a crash)."""

    def details(self) -> dict[str, Any]:
        """This kind's own lines in describe()."""
        return {}

    @property
    def network_backend(self) -> NamespaceBackend | None:
        """How a client reaches the service when not plainly by host and port (into its namespace)."""
        return self.process.network_backend if self.process is not None else None

    async def start(self) -> None:
        assert self.process is not None, "prepare() first"
        await self.process.start()

    async def ready(self, timeout_s: float) -> None:
        """Return once the service answers and its probes pass (Serve sends no traffic until the replica's
        constructor returns). The probes get what is left of `timeout_s` since this runtime was created."""
        process = self.process
        assert process is not None
        await process.wait_ready(timeout_s)
        if not self.spec.probes:
            return
        self.probes = runner = ProbeRunner(self.spec.probes, f"http://127.0.0.1:{self.port}", logger=self.logger,
                                           client=probe_client(process))

        def exited() -> str | None:
            code = process.returncode
            return None if code is None else (
                f"the service's commands exited with code {code} before its probes passed" + process._tail_suffix())

        started = time.monotonic()
        try:
            await runner.wait_ready(max(1.0, timeout_s - (time.time() - self.created_at)), exited=exited)
        except ProbeError as exc:
            raise ServiceProcessError(f"the service was not ready: {exc}") from None
        self.logger.info("probes passed in %.1fs: %s", time.monotonic() - started,
                         ", ".join(s.describe() for s in runner.states))
        runner.start()

    async def check_health(self) -> None:
        """Raise ServiceProcessError when Serve should replace this replica."""
        if self.process is None:
            raise ServiceProcessError("the service process was never started")
        await self.process.check_health()
        problem = self.probes.health_problem() if self.probes else None
        if problem:
            raise ServiceProcessError(problem)

    async def stop_probes(self) -> None:
        """Stop probing (and close the probes' connections to the service)."""
        if self.probes is not None:
            await self.probes.aclose()
            self.probes = None

    async def stop(self, grace_s: float = 10.0) -> None:
        await self.stop_probes()
        if self.process is not None:
            await self.process.stop(grace_s=grace_s)
        self.release()

    def describe(self) -> dict[str, Any]:
        return {
            "runtime": self.kind,
            "child_pid": self.process.pid if self.process else None,
            "port": self.port,
            "probes": self.probes.as_dicts() if self.probes else [],
            "network_namespace": self.spec.network_namespace and not self.spec.port_from_env,
            "python": None,
            "python_env": None,
            "workspace": None,
            "container": None,
            **self.details(),
        }
