"""What a service replica does for `rate_limits` (the glue between ServiceReplica and the pure `rate_limit`
module; dstack's `probes` belong to the replica's runtime: ray_dstack/serve/runtime/base.py).

Client address: Serve's uvicorn would rewrite the peer from `X-Forwarded-For` for any loopback peer (uvicorn's
default `FORWARDED_ALLOW_IPS`), and Serve's HAProxy connects from loopback and passes a client's own
`X-Forwarded-For` through unchanged, so any client could pick its partition. The plan sets
`FORWARDED_ALLOW_IPS` (plan.traffic.UVICORN_TRUST_NONE) in the applications' runtime env so uvicorn believes no one, and
the header is honoured here only from the operator's `deploy --trusted-proxies`.

Share: each replica enforces 1/N of every limit, N = the replicas running (from Serve's status, every
SHARE_REFRESH_S; the deploy-time count until then). See ray_dstack.serve.ingress.rate_limit for the tolerance.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.requests import Request
from starlette.responses import Response

from ray_dstack.openai import errors
from ray_dstack.serve.transport.forward import path_below_root
from ray_dstack.serve.ingress.rate_limit import RateLimiter, TrustedProxies, Verdict
from ray_dstack.spec import REPLICA_DEPLOYMENT_NAME, ServiceSpec


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


class ReplicaLimits:
    """`rate_limits` in one service replica: this replica's share of every limit, checked per request."""

    def __init__(self, spec: ServiceSpec, logger: logging.Logger) -> None:
        self.spec = spec
        self.logger = logger
        self.limiter = RateLimiter(spec.rate_limits, share=1.0 / max(1, spec.replicas))
        self.trusted = TrustedProxies(spec.trusted_proxies)
        self._share_task: asyncio.Task | None = None
        if self.limiter:
            self._share_task = asyncio.create_task(self._follow_replica_count())

    def refuse(self, request: Request) -> Response | None:
        """A 429 when a rate limit refuses the request; None (the common case, in microseconds) otherwise."""
        if not self.limiter:
            return None
        verdict = self.limiter.check(path_below_root(request.scope), request.headers,
                                     client_address(request, self.trusted))
        return None if verdict is None else too_many_requests(verdict)

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
