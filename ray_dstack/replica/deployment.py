"""`ServiceReplica`: the Serve deployment whose every replica runs the service's commands.

The replica is also the HTTP ingress of the service's application, so a request takes the shortest path
Serve allows: Serve's proxy → this replica → the child process on loopback.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ray_dstack.replica.forward import Forwarder, make_client, upstream_path
from ray_dstack.replica.process import ServiceProcess, ServiceProcessError, free_port, port_in_use
from ray_dstack.spec import PORT_ENV_VAR, ServiceSpec

logger = logging.getLogger("ray.serve")


def unauthorized() -> Response:
    return JSONResponse(
        {
            "error": {
                "message": "Missing or invalid token: send `Authorization: Bearer <token>`",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        },
        status_code=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


class ServiceReplica:
    async def __init__(self, service: dict) -> None:
        self.spec = spec = ServiceSpec.model_validate(service)
        self.started_at = time.time()
        if spec.port_from_env:
            port = free_port()
        else:
            port = spec.port
            if port_in_use(port):
                raise ServiceProcessError(
                    f"port {port} is already in use on node {socket.gethostname()}: another replica, another "
                    f"service or Serve's own HTTP port holds it. Use ${PORT_ENV_VAR} in the commands so each "
                    "replica gets a free port, or change `port`."
                )
        self.port = port
        self.process = ServiceProcess(
            spec.commands,
            port=port,
            env=spec.env,
            working_dir=spec.working_dir,
            logger=logger,
            probe=spec.probe,
        )
        await self.process.start()
        try:
            await self.process.wait_ready(spec.ready_timeout_s)
        except BaseException:
            await self.process.stop(grace_s=5.0)
            raise
        self.client = make_client(f"http://127.0.0.1:{port}", spec.request_timeout_s)
        self.forwarder = Forwarder(self.client, strip_authorization=spec.auth.enabled)

    async def __call__(self, request: Request) -> Response:
        if not self.spec.auth.accepts(request.headers.get("authorization")):
            return unauthorized()
        return await self.forwarder.forward(request, upstream_path(request))

    async def check_health(self) -> None:
        await self.process.check_health()

    def replica_info(self) -> dict:
        """Where this replica runs (for `ray-dstack status`)."""
        import ray

        ctx = ray.get_runtime_context()
        return {
            "node_id": ctx.get_node_id(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "child_pid": self.process.pid,
            "port": self.port,
            "started_at": self.started_at,
        }

    async def __del__(self) -> None:
        process = getattr(self, "process", None)
        if process is not None:
            await process.stop()
        client = getattr(self, "client", None)
        if client is not None:
            await client.aclose()
