"""A replica whose commands run as a child process on the node, as in a dstack container without an image: a
working directory of its own (runtime/workspace.py), the service's own Python environment (runtime/python_env.py)
and, for a fixed `port`, a network namespace of its own (runtime/netns.py, reached through
transport/netns_connect.py).
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

from ray_dstack.errors import RayDstackError
from ray_dstack.ports import free_port, port_in_use
from ray_dstack.serve.runtime import dstack_env, netns, python_env, workspace
from ray_dstack.serve.runtime.base import ReplicaRuntime
from ray_dstack.serve.runtime.process import ServiceProcess, ServiceProcessError
from ray_dstack.serve.transport.netns_connect import NamespaceConnector, connector_for
from ray_dstack.spec import PORT_ENV_VAR


class ProcessRuntime(ReplicaRuntime):
    """In the node's network: on a free port ($RAY_DSTACK_PORT in the commands) or the service's fixed one."""

    kind = "process"
    python_env: python_env.PythonEnv | None = None
    workspace: Path | None = None

    def _network(self) -> tuple[int, int, list[str] | None, bool]:
        """(port the replica reaches, port the service listens on, argv prefix of a namespace, own /proc)."""
        spec = self.spec
        if spec.port_from_env:
            port = free_port()
            return port, port, None, False
        if port_in_use(spec.port):
            raise ServiceProcessError(
                f"port {spec.port} is already in use on node {socket.gethostname()}: another replica, another "
                f"service or Serve's own HTTP port holds it. Use ${PORT_ENV_VAR} in the commands so each "
                "replica gets a free port, or change `port`."
            )
        return spec.port, spec.port, None, False

    def _connector(self, workspace_dir: Path) -> NamespaceConnector | None:
        return None

    async def prepare(self) -> None:
        spec = self.spec
        self.port, service_port, namespace, own_proc = self._network()
        try:
            self.workspace = workspace.create(spec.name, self.replica_tag)
            connector = self._connector(self.workspace)
            cwd = workspace.working_dir(self.workspace, spec.working_dir)
            # Blocking (a lock another replica may hold while it creates the env, a subprocess): off the loop.
            self.python_env = env = await asyncio.to_thread(python_env.acquire, spec.name, spec.python,
                                                            self.logger.info)
        except RayDstackError as exc:
            raise ServiceProcessError(str(exc)) from exc
        self.logger.info("Python %s environment %s %s in %.2fs", env.version, env.path,
                         "created" if env.created else "reused", env.seconds)
        dstack = dstack_env.dstack_env(spec.name, gpus=dstack_env.assigned_gpus(), ip=dstack_env.node_ip(),
                                       working_dir=str(cwd))
        self.process = ServiceProcess(
            spec.commands,
            port=self.port,
            env=env.apply(dstack_env.with_dstack_env(spec.env, dstack, router_ip=self.router_ip)),
            working_dir=str(cwd),
            logger=self.logger,
            path=str(env.bin_dir) + os.pathsep + spec.env.get("PATH", os.environ.get("PATH", "")),
            namespace=namespace,
            service_port=service_port,
            cleanup_dir=str(self.workspace),
            connector=connector,
            own_proc=own_proc,
        )

    def release(self) -> None:
        if self.python_env is not None:
            self.python_env.release()
            self.python_env = None
        workspace.remove(self.workspace)
        self.workspace = None

    def details(self) -> dict[str, Any]:
        return {
            "python": self.python_env.version if self.python_env else None,
            "python_env": str(self.python_env.path) if self.python_env else None,
            "workspace": str(self.workspace) if self.workspace else None,
        }


class NamespaceRuntime(ProcessRuntime):
    """A fixed `port` in a network namespace of the replica's own (pasta), so replicas share a node."""

    kind = "network namespace"

    def _network(self) -> tuple[int, int, list[str] | None, bool]:
        pasta = netns.pasta_path()
        if pasta is None:
            raise ServiceProcessError(
                f"node {socket.gethostname()} cannot give this replica a network namespace for its fixed port "
                f"{self.spec.port}: {netns.INSTALL_HINT} on it, or redeploy with ${netns.NETNS_ENV}=off "
                "(one replica per node)"
            )
        port = free_port()
        own_proc = netns.own_proc()  # one answer for pasta's command line and the supervisor's
        node_address = dstack_env.node_ip() if self.spec.reached_from_other_nodes else None
        return port, self.spec.port, netns.pasta_argv(pasta, port, self.spec.port, private_mounts=own_proc,
                                                      node_address=node_address), own_proc

    def _connector(self, workspace_dir: Path) -> NamespaceConnector | None:
        return connector_for(workspace_dir, self.spec.port, self.logger.warning)
