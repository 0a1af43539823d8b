"""`ServiceReplica`: the Serve deployment whose every replica runs the service's commands.

The replica is also the HTTP ingress of the service's application, so a request takes the shortest path
Serve allows: Serve's proxy → this replica → the child process on loopback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
import socket
import time
from pathlib import Path

import httpx
from starlette.requests import Request
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from ray_dstack.openai import errors
from ray_dstack.openai.endpoint import GatewayResponse, ModelEndpoint
from ray_dstack.serve.groups.roles import GroupRole, router_allows
from ray_dstack.serve.http import to_starlette
from ray_dstack.serve.ingress import engine_log, engine_path, engine_registration
from ray_dstack.serve.ingress.engine_registration import EngineRegistration, EngineRequests, ineligible
from ray_dstack.serve.ingress.replica_limits import ReplicaLimits
from ray_dstack.serve.runtime import runtime_for
from ray_dstack.serve.scaling.metrics import observed_service_call, record_replica_rps
from ray_dstack.serve.scaling.request_counter import METRIC_ENGINE_IN_FLIGHT, RequestCounter
from ray_dstack.serve.scaling.service_counters import CounterPublisher
from ray_dstack.serve.transport.client import model_server_client
from ray_dstack.serve.transport.coalesce import Coalesced
from ray_dstack.serve.transport.forward import Forwarder, upstream_path
from ray_dstack.spec import SPEC_ENV_VAR, V1_ROUTE_HEADER, ServiceSpec

logger = logging.getLogger("ray.serve")


@dataclass
class ModelServerBackend:
    """A model server this replica relays to: its own, or (groups without a router) another group's replica."""

    client: httpx.AsyncClient
    forwarder: Forwarder
    endpoint: ModelEndpoint | None

    async def aclose(self) -> None:
        await self.client.aclose()


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
    async def __init__(self, service: dict | None, created: int | None = None, members: dict | None = None,
                       env: dict[str, str] | None = None) -> None:
        """`members`: handles of the service's other replica groups (Serve deploys a group's deployment
        with the service's application because the ingress group's replicas are bound to it). `env`: a
        group's replica gets the service's `env` apart from its spec (ray_dstack.spec.SPEC_ENV_VAR)."""
        if service is None:  # a replica group: the spec is in the deployment's options (not for the commands),
            service = {**json.loads(os.environ.pop(SPEC_ENV_VAR)), "env": dict(env or {})}  # the env in args
        self.spec = spec = ServiceSpec.model_validate(service)
        self.started_at = time.time()
        # Requests per second for the `scaling: {metric: rps}` policy (ray_dstack/serve/scaling/autoscaling_policy.py).
        self.requests = RequestCounter(spec.scaling.window_s if spec.scaling else 60.0)
        tag = _replica_tag()
        # How the commands run (process, network namespace or container): ray_dstack/serve/runtime/.
        self.runtime = runtime = runtime_for(spec, replica_tag=tag, logger=logger)
        # Its part in a service with replica groups (a router, or a worker behind one): serve/groups/.
        self.group = group = GroupRole(spec, replica_tag=tag, logger=logger)
        # The engine path (serve/ingress/engine_registration.py): HAProxy sends passthrough requests to the engine.
        self.engine_path_off = ineligible(spec)
        if self.engine_path_off is None and hasattr(runtime, "private_port"):
            runtime.private_port = True
        self.engine: EngineRegistration | None = None
        self.engine_requests: EngineRequests | None = None
        try:
            await group.before_prepare(runtime)
            await runtime.prepare()
            await runtime.start()
            await group.after_start(runtime)  # a router learns its workers before its own probes run
            await runtime.ready(spec.ready_timeout_s)  # not ready, no traffic
            await group.after_ready(runtime, healthy=self._healthy)
        except BaseException:
            await group.aclose()
            await runtime.stop(grace_s=5.0)
            raise
        self.limits = ReplicaLimits(spec, logger)
        self.created = created
        self.own = self._backend(f"http://127.0.0.1:{runtime.port}", network_backend=runtime.network_backend)
        # Groups without a router: the other groups' replicas take this service's traffic too (serve/groups/peers.py).
        self.peers = group.start_peers(self._backend, ModelServerBackend.aclose)
        await self._offer_engine()
        # The other groups scale on the requests this group takes (serve/scaling/service_counters.py).
        self.counters = None
        if spec.group is not None and group.is_ingress and len(spec.group.groups) > 1:
            self.counters = CounterPublisher(self.requests, service=spec.name, replica=tag, logger=logger)
            self.counters.start()

    async def _offer_engine(self) -> None:
        """Registers the engine with this node's HAProxy when the engine path applies (its port is private)."""
        if not getattr(self.runtime, "port_is_private", False):  # only a NamespaceRuntime with its connector
            if self.engine_path_off is None:
                self.engine_path_off = "the namespace connector is not available"
            return
        try:
            server = engine_registration.server_name()
            self.engine = await asyncio.to_thread(
                EngineRegistration.create, self.spec, connector_path=self.runtime.connector.path, port=self.spec.port,
                server=server, directory=engine_registration.haproxy_dir() / engine_path.ENGINE_DIR_NAME,
                # Read once: Serve could change it in place (reconfigure), but the plan always sets the same value.
                max_ongoing=engine_registration.max_ongoing_requests())
        except Exception as exc:  # noqa: BLE001 - the replica path still serves every request
            self.engine_path_off = f"registration failed: {exc}"
            logger.warning("engine path off for this replica: %s", self.engine_path_off)
            return
        log = None
        if engine_path.log_enabled():  # the engine path's requests in the metrics: one replica per node reads them
            log = engine_log.EngineLog(self.engine.directory, engine_log.into_metrics(),
                                       netns=str(Path(engine_path.NETNS_DIR, self.engine.entry.netns)))
        self.engine_requests = EngineRequests(self.requests, server=server, log=log,
                                              admin_socket=engine_registration.haproxy_admin_socket())
        self.engine_requests.start()

    def _backend(self, url: str, network_backend=None) -> ModelServerBackend:
        """One model server's connection pool, for plain forwarding and the OpenAI routes."""
        client = model_server_client(url, self.spec.request_timeout_s, network_backend=network_backend)
        endpoint = None
        if self.spec.model is not None:
            endpoint = ModelEndpoint(self.spec.model, url, timeout=self.spec.request_timeout_s, created=self.created,
                                     client=client)
        return ModelServerBackend(client, Forwarder(client, strip_authorization=self.spec.auth.enabled), endpoint)

    def _choose(self) -> ModelServerBackend:
        return self.own if self.peers is None else self.peers.choose(self.own)

    def _healthy(self) -> bool:
        """Whether a router may send this replica requests (its process runs, its probes have not failed)."""
        process, probes = self.runtime.process, self.runtime.probes
        return (process is not None and process.returncode is None
                and not (probes is not None and probes.health_problem()))

    @observed_service_call  # ray_dstack.serve.scaling.metrics: requests, latency, TTFT, tokens of /<service>/...
    async def __call__(self, request: Request) -> Response:
        refused = self.limits.refuse(request)  # `rate_limits`: before any other work
        if refused is not None:
            return refused
        if not self.spec.auth.accepts(request.headers.get("authorization")):
            return unauthorized()
        path = upstream_path(request)
        if self.group.is_router and not router_allows(path):  # the router's admin API is never public
            return to_starlette(GatewayResponse.of_error(errors.path_not_allowed(path.split("?", 1)[0])))
        # `/v1/...` sent here by HAProxy (serve/haproxy_v1.py), which removes the header from clients' requests.
        via_v1 = V1_ROUTE_HEADER in request.headers and path.startswith("/v1/")
        backend = self._choose()
        if not self.spec.strip_prefix and not via_v1:
            # dstack's `strip_prefix: false`: the service gets the path as sent, `/<service>/...`, unchanged
            # (its OpenAI routes too: only `/v1` by model goes through the model endpoint).
            response = await backend.forwarder.forward(request, request.scope.get("root_path", "") + path)
        elif backend.endpoint is not None and (via_v1 or is_openai_route(path)):
            body = await request.body()
            answer = await backend.endpoint.handle(path, body, request.headers, method=request.method)
            if via_v1 and not answer.is_stream and answer.status != 503 and errors.retryable(answer.status, answer.body):
                # The backend dropped the connection: HAProxy retries a 503 (not a 502) on another replica.
                answer = GatewayResponse.of_error(errors.upstream_unavailable(
                    f"The backend of service {self.spec.name!r} closed the connection; try again."))
            response = to_starlette(answer)
        else:
            response = await backend.forwarder.forward(request, path)
        if isinstance(response, StreamingResponse):
            # What the model server wrote while the relay was busy leaves in one write (transport/coalesce.py).
            response.body_iterator = body = Coalesced(response.body_iterator)
            if response.background is not None:  # the body's closer: the reader task is the one inside the body
                response.background = BackgroundTask(body.aclose)
        self.requests.record(response.status_code)
        return response

    def record_autoscaling_stats(self) -> dict[str, float]:
        # Serve calls this every metrics interval: also the moment to export the RPS `status` shows.
        record_replica_rps(self.spec.name, self.requests.rps())
        stats = self.requests.stats()
        if self.engine_requests is not None:  # requests Serve does not see: for the scale-to-zero guard
            stats[METRIC_ENGINE_IN_FLIGHT] = float(self.engine_requests.in_flight)
        return stats

    async def openai(self, path: str, body: bytes):
        """OpenAI request handed over by the `/v1` gateway (already authorised there).

        Yields a head `{status, headers, stream}` first, then the body in chunks.
        """
        endpoint = self._choose().endpoint
        if endpoint is None:
            resp = GatewayResponse.of_error(errors.not_found(f"service {self.spec.name!r} publishes no model"))
        else:
            resp = await endpoint.handle(path, body, method="POST")
        self.requests.record(resp.status)
        yield {"status": resp.status, "headers": resp.headers, "stream": resp.is_stream}
        if not resp.is_stream:
            yield resp.body
            return
        body = Coalesced(resp.body)  # one handle message per batch the stream's reader has read
        try:
            async for chunk in body:
                yield chunk
        finally:
            await body.aclose()  # closes resp.body too

    async def check_health(self) -> None:
        await self.runtime.check_health()  # the process answers; probes have not failed 3 times in a row

    def replica_info(self) -> dict:
        """Where this replica runs (for `ray-dstack status`)."""
        import ray

        ctx = ray.get_runtime_context()
        return {
            "node_id": ctx.get_node_id(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self.started_at,
            **self.runtime.describe(),
            **self.group.describe(),
            "data_path": "engine" if self.engine is not None else "replica",
            "engine_path_off": self.engine_path_off,
        }

    async def __del__(self) -> None:
        group = getattr(self, "group", None)
        if group is not None:  # first: the router stops sending this replica requests
            await group.aclose()
        engine = getattr(self, "engine", None)
        if engine is not None:  # the next HAProxy reload leaves the engine out; in-flight requests finish first
            await asyncio.to_thread(engine.withdraw)
            # Its own idle connections to the engine (relay and probes) are not HAProxy's requests.
            if getattr(self, "own", None) is not None:
                await self.own.aclose()
            await self.runtime.stop_probes()
            await engine_registration.drain(engine, logger)
        engine_requests = getattr(self, "engine_requests", None)
        if engine_requests is not None:
            await engine_requests.aclose()
        counters = getattr(self, "counters", None)
        if counters is not None:
            await counters.aclose()
        limits = getattr(self, "limits", None)
        if limits is not None:
            await limits.aclose()
        runtime = getattr(self, "runtime", None)
        if runtime is not None:
            await runtime.stop()
        if engine is not None:  # last: a HAProxy still starting from a configuration naming it must find it
            await asyncio.to_thread(engine.release)
        own = getattr(self, "own", None)
        if own is not None:
            await own.aclose()
