"""`ServiceReplica`: the Serve deployment whose every replica runs the service's commands.

The replica is also the HTTP ingress of the service's application, so a request takes the shortest path
Serve allows: Serve's proxy → this replica → the child process on loopback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from starlette.requests import Request
from starlette.responses import Response

from ray_dstack.errors import RayDstackError
from ray_dstack.openai import errors
from ray_dstack.openai.endpoint import GatewayResponse, ModelEndpoint
from ray_dstack.ports import free_port, port_in_use
from ray_dstack.serve import (
    container_replica,
    netns,
    netns_connect,
    python_env,
    workspace,
)
from ray_dstack.serve.forward import Forwarder, upstream_path
from ray_dstack.serve.http import to_starlette
from ray_dstack.serve.ingress_traffic import ReplicaTraffic
from ray_dstack.serve.metrics import observed_service_call, record_replica_rps
from ray_dstack.serve.process import ServiceProcess, ServiceProcessError
from ray_dstack.serve.request_counter import RequestCounter
from ray_dstack.serve.transport import model_server_client
from ray_dstack.spec import PORT_ENV_VAR, V1_ROUTE_HEADER, ServiceSpec

logger = logging.getLogger("ray.serve")


def unauthorized() -> Response:
    response = to_starlette(GatewayResponse.of_error(errors.unauthorized()))
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


OPENAI_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models"})


def is_openai_route(path: str) -> bool:
    return path.split("?", 1)[0].rstrip("/") in OPENAI_ROUTES


def _replica_tag() -> str:
    """This replica's id in Serve (unique within the deployment), for its working directory's name."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (RayServeException): the process is unique enough
        return f"pid{os.getpid()}"


class ServiceReplica:
    async def __init__(self, service: dict, created: int | None = None) -> None:
        self.spec = spec = ServiceSpec.model_validate(service)
        self.started_at = time.time()
        # Requests per second for the `scaling: {metric: rps}` policy (see ray_dstack.serve.autoscaling_policy).
        self.requests = RequestCounter(spec.scaling.window_s if spec.scaling else 60.0)
        self.python_env: python_env.PythonEnv | None = None
        self.workspace = None
        try:
            await self._start(spec)
        except BaseException:
            self._release()
            raise
        port = self.port
        self.client = model_server_client(f"http://127.0.0.1:{port}", spec.request_timeout_s,
                                          network_backend=self.process.network_backend)
        self.forwarder = Forwarder(self.client, strip_authorization=spec.auth.enabled)
        self.endpoint = None
        if spec.model is not None:
            # One connection pool to the child for plain forwarding and the OpenAI routes.
            self.endpoint = ModelEndpoint(
                spec.model, f"http://127.0.0.1:{port}", timeout=spec.request_timeout_s, created=created,
                client=self.client,
            )

    async def _start(self, spec: ServiceSpec) -> None:
        if spec.image is not None:
            await self._run(spec, await self._container_process(spec))
            return
        node = socket.gethostname()
        namespace, own_proc = None, False
        if spec.port_from_env:
            port = service_port = free_port()
        elif spec.network_namespace:
            pasta = netns.pasta_path()
            if pasta is None:
                raise ServiceProcessError(
                    f"node {node} cannot give this replica a network namespace for its fixed port "
                    f"{spec.port}: {netns.INSTALL_HINT} on it, or redeploy with ${netns.NETNS_ENV}=off "
                    "(one replica per node)"
                )
            port, service_port = free_port(), spec.port
            own_proc = netns.own_proc()  # one answer for pasta's command line and the supervisor's
            namespace = netns.pasta_argv(pasta, port, spec.port, private_mounts=own_proc)
        else:
            port = service_port = spec.port
            if port_in_use(port):
                raise ServiceProcessError(
                    f"port {port} is already in use on node {node}: another replica, another "
                    f"service or Serve's own HTTP port holds it. Use ${PORT_ENV_VAR} in the commands so each "
                    "replica gets a free port, or change `port`."
                )
        self.port = port
        connector = None
        try:
            self.workspace = workspace.create(spec.name, _replica_tag())
            if namespace is not None:
                connector = netns_connect.connector_for(self.workspace, spec.port, logger.warning)
            cwd = workspace.working_dir(self.workspace, spec.working_dir)
            # Blocking (a lock another replica may hold while it creates the env, a subprocess): off the loop.
            self.python_env = env = await asyncio.to_thread(python_env.acquire, spec.name, spec.python, logger.info)
        except RayDstackError as exc:
            raise ServiceProcessError(str(exc)) from exc
        logger.info("Python %s environment %s %s in %.2fs", env.version, env.path,
                    "created" if env.created else "reused", env.seconds)
        await self._run(spec, ServiceProcess(
            spec.commands,
            port=port,
            env=env.apply(spec.env),
            working_dir=str(cwd),
            logger=logger,
            path=str(env.bin_dir) + os.pathsep + spec.env.get("PATH", os.environ.get("PATH", "")),
            namespace=namespace,
            service_port=service_port,
            cleanup_dir=str(self.workspace),
            connector=connector,
            own_proc=own_proc,
        ))

    async def _container_process(self, spec: ServiceSpec) -> ServiceProcess:
        """`image`: the replica owns a container (pulled with `registry_auth`, the GPUs Ray assigned) run under
        the same supervisor as a service's shell; its port is published on a free loopback port."""
        import ray

        self.port = port = free_port()
        try:
            prepared = await asyncio.to_thread(
                container_replica.prepare, spec, replica_tag=_replica_tag(), host_port=port,
                gpu_ids=ray.get_gpu_ids(), log=logger.info)
        except RayDstackError as exc:
            raise ServiceProcessError(str(exc)) from exc
        self.container = prepared
        logger.info("container %s (%s): %s", prepared.name, prepared.runtime, prepared.run.display())
        return ServiceProcess(spec.commands, port=port, env=prepared.process_env, working_dir=None, logger=logger,
                              command=prepared.command)

    async def _run(self, spec: ServiceSpec, process: ServiceProcess) -> None:
        self.process = process
        await self.process.start()
        try:
            await self.process.wait_ready(spec.ready_timeout_s)
            # Probes and rate limits (ray_dstack.serve.ingress_traffic): not ready, no traffic.
            self.traffic = await ReplicaTraffic.ready(
                spec, self.port, self.process, logger, spec.ready_timeout_s - (time.time() - self.started_at))
        except BaseException:
            await self.process.stop(grace_s=5.0)
            raise

    def _release(self) -> None:
        container = getattr(self, "container", None)
        if container is not None:  # container_run deletes its env file; this covers a start that never got there
            container.discard()
        if self.python_env is not None:
            self.python_env.release()
            self.python_env = None
        workspace.remove(self.workspace)
        self.workspace = None

    @observed_service_call  # ray_dstack.serve.metrics: requests, latency, TTFT, tokens of /<service>/...
    async def __call__(self, request: Request) -> Response:
        refused = self.traffic.refuse(request)  # `rate_limits`: before any other work
        if refused is not None:
            return refused
        if not self.spec.auth.accepts(request.headers.get("authorization")):
            return unauthorized()
        path = upstream_path(request)
        # `/v1/...` sent here by HAProxy (serve/haproxy_v1.py), which removes the header from clients' requests.
        via_v1 = V1_ROUTE_HEADER in request.headers and path.startswith("/v1/")
        if self.endpoint is not None and (via_v1 or is_openai_route(path)):
            body = await request.body()
            answer = await self.endpoint.handle(path, body, request.headers, method=request.method)
            if via_v1 and not answer.is_stream and answer.status != 503 and errors.retryable(answer.status, answer.body):
                # The backend dropped the connection: HAProxy retries a 503 (not a 502) on another replica.
                answer = GatewayResponse.of_error(errors.upstream_unavailable(
                    f"The backend of service {self.spec.name!r} closed the connection; try again."))
            response = to_starlette(answer)
        else:
            response = await self.forwarder.forward(request, path)
        self.requests.record(response.status_code)
        return response

    def record_autoscaling_stats(self) -> dict[str, float]:
        # Serve calls this every metrics interval: also the moment to export the RPS `status` shows.
        record_replica_rps(self.spec.name, self.requests.rps())
        return self.requests.stats()

    async def openai(self, path: str, body: bytes):
        """OpenAI request handed over by the `/v1` gateway (already authorised there).

        Yields a head `{status, headers, stream}` first, then the body in chunks.
        """
        if self.endpoint is None:
            resp = GatewayResponse.of_error(errors.not_found(f"service {self.spec.name!r} publishes no model"))
        else:
            resp = await self.endpoint.handle(path, body, method="POST")
        self.requests.record(resp.status)
        yield {"status": resp.status, "headers": resp.headers, "stream": resp.is_stream}
        if not resp.is_stream:
            yield resp.body
            return
        try:
            async for chunk in resp.body:
                yield chunk
        finally:
            await resp.aclose()

    async def check_health(self) -> None:
        await self.process.check_health()
        self.traffic.check_health()  # probes failing 3 times in a row

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
            "probes": self.traffic.probe_states(),
            "python": self.python_env.version if self.python_env else None,
            "python_env": str(self.python_env.path) if self.python_env else None,
            "network_namespace": self.spec.network_namespace and not self.spec.port_from_env,
            "workspace": str(self.workspace) if self.workspace else None,
            "container": self.container.name if getattr(self, "container", None) else None,
        }

    async def __del__(self) -> None:
        traffic = getattr(self, "traffic", None)
        if traffic is not None:
            await traffic.aclose()
        process = getattr(self, "process", None)
        if process is not None:
            await process.stop()
        if hasattr(self, "python_env"):
            self._release()
        client = getattr(self, "client", None)
        if client is not None:
            await client.aclose()
