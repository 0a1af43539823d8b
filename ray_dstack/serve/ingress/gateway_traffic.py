"""`rate_limits` for a model's `/v1` requests, in the gateway (the glue between OpenAIGateway and rate_limit.py).

Which rule applies: a `/v1/<route>` request for a service's model is checked as the path `/v1/<route>` relative
to the service's route, the path the same request has when sent to the service itself (`/<service>/v1/<route>`).
So a limit with prefix `/` or `/v1` (or `/v1/chat`) covers the model's `/v1` requests; one with prefix `/api`
does not.

Budgets: the gateway keeps one limiter per service, apart from the service's replicas' limiters; each gateway
replica enforces 1/N of every limit (N = the gateway's replicas, from its user_config). A client therefore
gets the rate through `/v1` and, separately, the rate through the service's own route (docs/traffic.md).
Client address: the TCP peer, or X-Forwarded-For only from the service's `deploy --trusted-proxies`.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ray_dstack.serve.ingress.replica_limits import client_address, too_many_requests
from ray_dstack.serve.ingress.rate_limit import RateLimiter, TrustedProxies
from ray_dstack.spec import GATEWAY_ROUTE_PREFIX, RateLimitSpec


class _ServiceLimits:
    def __init__(self, rules: list[RateLimitSpec], trusted: list[str], share: float) -> None:
        self.key = (tuple(rules), tuple(trusted))
        self.limiter = RateLimiter(rules, share=share)
        self.trusted = TrustedProxies(trusted)


class GatewayLimits:
    """Every service's `rate_limits` as the gateway enforces them, by service application name."""

    def __init__(self) -> None:
        self._by_app: dict[str, _ServiceLimits] = {}

    def configure(self, routes: dict[str, dict[str, Any]], replicas: int) -> None:
        """From the routing table; a service whose limits did not change keeps its partitions' state, so a
        deploy of another service never hands anyone a fresh burst."""
        share = 1.0 / max(1, int(replicas))
        fresh: dict[str, _ServiceLimits] = {}
        for route in routes.values():
            rules = [RateLimitSpec.model_validate(r) for r in route.get("rate_limits") or []]
            if not rules:
                continue
            trusted = list(route.get("trusted_proxies") or [])
            old = self._by_app.get(route["app"])
            if old is not None and old.key == (tuple(rules), tuple(trusted)):
                if old.limiter.share != share:
                    old.limiter.set_share(share)
                fresh[route["app"]] = old
            else:
                fresh[route["app"]] = _ServiceLimits(rules, trusted, share)
        self._by_app = fresh

    def refuse(self, app: str, route: str, request: Request) -> Response | None:
        """A 429 when a limit of `app` refuses this `/v1/<route>` request; None otherwise (no limits: one dict
        lookup)."""
        limits = self._by_app.get(app)
        if limits is None:
            return None
        verdict = limits.limiter.check(f"{GATEWAY_ROUTE_PREFIX}/{route}", request.headers,
                                       client_address(request, limits.trusted))
        return None if verdict is None else too_many_requests(verdict)
