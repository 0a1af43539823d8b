"""A replica whose service runs from an `image`: the container (pulled with `registry_auth`, the GPUs Ray
assigned, published on a free loopback port, its `volumes`/`files`/repo bind-mounted from the replica's directory
on the node) runs under the same supervisor as a service's shell (runtime/container_prepare.py builds its
command, runtime/container_run.py removes it whatever ends it).

A runtime failure only a node setting fixes (podman without CAP_SYS_RESOURCE: "error setting rlimit ...
operation not permitted") shows in the replica's error, which `deploy` prints, with the setting to change
(`RAY_DSTACK_CONTAINER_FLAGS` on the nodes): the runtime's own words alone do not say what to do.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from ray_dstack.errors import RayDstackError
from ray_dstack.ports import free_port
from ray_dstack.serve.runtime import container as c
from ray_dstack.serve.runtime import container_prepare, dstack_env, workspace
from ray_dstack.serve.runtime.base import ReplicaRuntime
from ray_dstack.serve.runtime.process import ServiceProcess, ServiceProcessError


def assigned_gpu_ids() -> list[int | str]:
    """The GPUs Ray assigned to this replica; none outside Ray (`ray.get_gpu_ids()` would start a local Ray)."""
    import ray

    return list(ray.get_gpu_ids()) if ray.is_initialized() else []


class ContainerRuntime(ReplicaRuntime):
    kind = "container"
    container: container_prepare.PreparedContainer | None = None
    workspace: Path | None = None

    async def prepare(self) -> None:
        spec = self.spec
        self.port = port = free_port()
        gpu_ids = assigned_gpu_ids()
        ip = dstack_env.node_ip()
        # DSTACK_WORKING_DIR is the container's directory, known after the pull (container_prepare sets it).
        dstack = {**dstack_env.dstack_env(spec.name, gpus=len(gpu_ids), ip=ip, working_dir=None),
                  **dstack_env.cluster_env(spec.dstack_api)}
        spec = spec.model_copy(update={"env": dstack_env.with_dstack_env(spec.env, dstack, router_ip=self.router_ip)})
        try:
            self.workspace = workspace.create(spec.name, self.replica_tag)
            prepared = await asyncio.to_thread(
                container_prepare.prepare, spec, replica_tag=self.replica_tag, host_port=port,
                gpu_ids=gpu_ids, log=self.logger.info, node_address=ip, workspace=self.workspace)
        except RayDstackError as exc:
            raise ServiceProcessError(str(exc)) from exc
        self.container = prepared
        self.logger.info("container %s (%s): %s", prepared.name, prepared.runtime, prepared.run.display())
        # The supervisor removes the replica's directory too when the replica dies without stopping.
        self.process = ServiceProcess(spec.commands, port=port, env=prepared.process_env, working_dir=None,
                                      logger=self.logger, command=prepared.command, cleanup_dir=str(self.workspace))

    def _with_node_hint(self, exc: ServiceProcessError) -> ServiceProcessError:
        hint = c.node_setting_hint(list(self.process.tail)) if self.process is not None else None
        return ServiceProcessError(f"{hint}. {exc}") if hint else exc

    async def ready(self, timeout_s: float) -> None:
        try:
            await super().ready(timeout_s)
        except ServiceProcessError as exc:
            raise self._with_node_hint(exc) from None

    async def check_health(self) -> None:
        try:
            await super().check_health()
        except ServiceProcessError as exc:
            raise self._with_node_hint(exc) from None

    def release(self) -> None:
        if self.container is not None:  # container_run deletes its env file; this covers a start that never got there
            self.container.discard()
        workspace.remove(self.workspace)
        self.workspace = None

    def details(self) -> dict[str, Any]:
        prepared = self.container
        return {
            "container": prepared.name if prepared else None,
            "workspace": str(self.workspace) if self.workspace else None,
            "working_dir": prepared.working_dir if prepared else None,
            "mounts": [c.volume_arg(m) for m in prepared.mounts] if prepared else [],
        }
