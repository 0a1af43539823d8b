"""What a service replica does for `rate_limits` and `probes` (the glue between ServiceReplica and the pure
`rate_limit` / `probes` modules).

Client address: Serve's uvicorn would rewrite the peer from `X-Forwarded-For` for any loopback peer (uvicorn's
default `FORWARDED_ALLOW_IPS`), and Serve's HAProxy connects from loopback and passes a client's own
`X-Forwarded-For` through unchanged, so any client could pick its partition. The plan sets
`FORWARDED_ALLOW_IPS` (plan.traffic.UVICORN_TRUST_NONE) in the applications' runtime env so uvicorn believes no one, and
the header is honoured here only from the operator's `deploy --trusted-proxies`.

Share: each replica enforces 1/N of every limit, N = the replicas running (from Serve's status, every
SHARE_REFRESH_S; the deploy-time count until then). See ray_dstack.serve.rate_limit for the tolerance.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
from starlette.requests import Request
from starlette.responses import Response

from ray_dstack.openai import errors
from ray_dstack.serve.forward import path_below_root
from ray_dstack.serve.probes import ProbeError, ProbeRunner
from ray_dstack.serve.process import ServiceProcess, ServiceProcessError
from ray_dstack.serve.rate_limit import RateLimiter, TrustedProxies, Verdict
from ray_dstack.serve.transport import plain_transport
from ray_dstack.spec import REPLICA_DEPLOYMENT_NAME, ServiceSpec


def probe_client(process: ServiceProcess) -> httpx.AsyncClient:
    """The probes' own client to the service (the same way in as its traffic: into its namespace if any)."""
    return httpx.AsyncClient(transport=plain_transport(httpx.Limits(), process.network_backend), trust_env=False)


SHARE_REFRESH_S = 5.0


def too_many_requests(verdict: Verdict) -> Response:
    """429 with an OpenAI-shaped body and `Retry-After` (whole seconds, at least 1)."""
    exc = errors.OpenAIError(
        429, f"Rate limit exceeded for {verdict.rule.prefix} ({verdict.rule.rps:g} requests per second"
        f"{f', burst {verdict.rule.burst}' if verdict.rule.burst else ''}); retry after "
        f"{verdict.retry_after_header}s.", errors.RATE_LIMIT, None, "rate_limit_exceeded")
    return Response(exc.to_json_bytes(), status_code=429, media_type="application/json",
                    headers={"Retry-After": verdict.retry_after_header})


def client_address(request: Request, trusted: TrustedProxies) -> str | None:
    peer = request.client.host if request.client else None
    if not trusted:
        return peer
    return trusted.client_address(peer, request.headers.get("x-forwarded-for"))


class ReplicaTraffic:
    def __init__(self, spec: ServiceSpec, probes: ProbeRunner | None, logger: logging.Logger) -> None:
        self.spec = spec
        self.logger = logger
        self.probes = probes
        self.limiter = RateLimiter(spec.rate_limits, share=1.0 / max(1, spec.replicas))
        self.trusted = TrustedProxies(spec.trusted_proxies)
        self._share_task: asyncio.Task | None = None
        if self.limiter:
            self._share_task = asyncio.create_task(self._follow_replica_count())

    @classmethod
    async def ready(cls, spec: ServiceSpec, port: int, process: ServiceProcess, logger: logging.Logger,
                    timeout_s: float) -> ReplicaTraffic:
        """Wait until every probe passes (the constructor is still running: Serve sends no traffic yet)."""
        runner = None
        if spec.probes:
            runner = ProbeRunner(spec.probes, f"http://127.0.0.1:{port}", logger=logger,
                                 client=probe_client(process))

            def exited() -> str | None:
                code = process.returncode
                return None if code is None else (
                    f"the service's commands exited with code {code} before its probes passed"
                    + process._tail_suffix())

            started = time.monotonic()
            try:
                await runner.wait_ready(max(1.0, timeout_s), exited=exited)
            except ProbeError as exc:
                await runner.aclose()
                raise ServiceProcessError(f"the service was not ready: {exc}") from None
            logger.info("probes passed in %.1fs: %s", time.monotonic() - started,
                        ", ".join(s.describe() for s in runner.states))
            runner.start()
        return cls(spec, runner, logger)

    def refuse(self, request: Request) -> Response | None:
        """A 429 when a rate limit refuses the request; None (the common case, in microseconds) otherwise."""
        if not self.limiter:
            return None
        verdict = self.limiter.check(path_below_root(request.scope), request.headers,
                                     client_address(request, self.trusted))
        return None if verdict is None else too_many_requests(verdict)

    def check_health(self) -> None:
        problem = self.probes.health_problem() if self.probes else None
        if problem:
            raise ServiceProcessError(problem)

    def probe_states(self) -> list[dict]:
        return self.probes.as_dicts() if self.probes else []

    async def _follow_replica_count(self) -> None:
        from ray import serve

        while True:
            await asyncio.sleep(SHARE_REFRESH_S)
            try:
                status = await asyncio.to_thread(serve.status)
                app = status.applications.get(self.spec.name)
                dep = app.deployments.get(REPLICA_DEPLOYMENT_NAME) if app else None
                running = sum(n for state, n in (dep.replica_states if dep else {}).items()
                              if str(getattr(state, "value", state)) == "RUNNING")
                if running >= 1 and abs(self.limiter.share - 1.0 / running) > 1e-9:
                    self.logger.info("rate limits: %d replicas share them", running)
                    self.limiter.set_share(1.0 / running)
            except Exception as exc:  # noqa: BLE001 - keep the last share; try again later
                self.logger.debug("rate limits: replica count unavailable: %r", exc)

    async def aclose(self) -> None:
        if self._share_task is not None:
            self._share_task.cancel()
        if self.probes is not None:
            await self.probes.aclose()
