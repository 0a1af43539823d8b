"""A replica whose service runs from an `image`: the container (pulled with `registry_auth`, the GPUs Ray
assigned, published on a free loopback port) runs under the same supervisor as a service's shell
(runtime/container_prepare.py builds its command, runtime/container_run.py removes it whatever ends it)."""

from __future__ import annotations

import asyncio
from typing import Any

from ray_dstack.errors import RayDstackError
from ray_dstack.ports import free_port
from ray_dstack.serve.runtime import container_prepare, dstack_env
from ray_dstack.serve.runtime.base import ReplicaRuntime
from ray_dstack.serve.runtime.process import ServiceProcess, ServiceProcessError


class ContainerRuntime(ReplicaRuntime):
    kind = "container"
    container: container_prepare.PreparedContainer | None = None

    async def prepare(self) -> None:
        import ray

        spec = self.spec
        self.port = port = free_port()
        gpu_ids = ray.get_gpu_ids()
        ip = dstack_env.node_ip()
        dstack = dstack_env.dstack_env(spec.name, gpus=len(gpu_ids), ip=ip, working_dir=spec.working_dir)
        spec = spec.model_copy(update={"env": dstack_env.with_dstack_env(spec.env, dstack, router_ip=self.router_ip)})
        try:
            prepared = await asyncio.to_thread(
                container_prepare.prepare, spec, replica_tag=self.replica_tag, host_port=port,
                gpu_ids=gpu_ids, log=self.logger.info, node_address=ip)
        except RayDstackError as exc:
            raise ServiceProcessError(str(exc)) from exc
        self.container = prepared
        self.logger.info("container %s (%s): %s", prepared.name, prepared.runtime, prepared.run.display())
        self.process = ServiceProcess(spec.commands, port=port, env=prepared.process_env, working_dir=None,
                                      logger=self.logger, command=prepared.command)

    def release(self) -> None:
        if self.container is not None:  # container_run deletes its env file; this covers a start that never got there
            self.container.discard()

    def details(self) -> dict[str, Any]:
        return {"container": self.container.name if self.container else None}
