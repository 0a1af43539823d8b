"""`rate_limits` on a model's `/v1` requests in the gateway: which rule covers `/v1/<route>`, the 429, partitions
by client and trusted proxies, the 1/N share, and state kept across a reconfigure that did not change them."""

from __future__ import annotations

import asyncio
import json

from starlette.requests import Request

from ray_dstack.serve.ingress.gateway import OpenAIGateway
from ray_dstack.serve.ingress.gateway_traffic import GatewayLimits


def route(app: str, *limits: dict, trusted: list[str] | None = None) -> dict:
    return {"app": app, "format": "openai", "auth": {"enabled": False}, "created": 0,
            "rate_limits": list(limits), "trusted_proxies": trusted or []}


def request(path: str = "/v1/chat/completions", body: dict | None = None, client: str = "10.0.0.1",
            headers: dict[str, str] | None = None) -> Request:
    raw = json.dumps(body or {"model": "m1", "messages": []}).encode()
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": (client, 1234), "server": ("127.0.0.1", 8100), "scheme": "http",
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    return Request(scope, receive)


def codes(limits: GatewayLimits, n: int, **kw) -> list[int]:
    return [getattr(limits.refuse("svc", "chat/completions", request(**kw)), "status_code", 200) for _ in range(n)]


def test_a_root_or_v1_prefix_covers_the_model_requests_another_does_not():
    for prefix, limited in (("/", True), ("/v1", True), ("/v1/chat", True), ("/api", False),
                            ("/v1/completions", False)):
        limits = GatewayLimits()
        limits.configure({"m1": route("svc", {"prefix": prefix, "rps": 0.01, "burst": 1})}, replicas=1)
        assert codes(limits, 3) == ([200, 200, 429] if limited else [200] * 3), prefix


def test_partitions_by_client_and_x_forwarded_for_only_from_trusted_proxies():
    limits = GatewayLimits()
    limits.configure({"m1": route("svc", {"prefix": "/", "rps": 0.01})}, replicas=1)
    assert codes(limits, 2, client="10.0.0.1") == [200, 429]
    assert codes(limits, 1, client="10.0.0.2") == [200]
    assert codes(limits, 1, client="10.0.0.1", headers={"X-Forwarded-For": "1.2.3.4"}) == [429]  # not believed
    trusting = GatewayLimits()
    trusting.configure({"m1": route("svc", {"prefix": "/", "rps": 0.01}, trusted=["10.0.0.0/8"])}, replicas=1)
    assert codes(trusting, 2, headers={"X-Forwarded-For": "1.2.3.4"}) == [200, 429]
    assert codes(trusting, 1, headers={"X-Forwarded-For": "5.6.7.8"}) == [200]


def test_each_gateway_replica_enforces_its_share_and_a_reconfigure_keeps_the_state():
    limits = GatewayLimits()
    table = {"m1": route("svc", {"prefix": "/", "rps": 0.01, "burst": 3})}
    limits.configure(table, replicas=1)
    assert codes(limits, 5) == [200] * 4 + [429]
    limits.configure({**table, "m2": route("other")}, replicas=1)  # another service deployed
    assert codes(limits, 1) == [429]  # no fresh burst
    halved = GatewayLimits()
    halved.configure(table, replicas=2)  # burst 3 * 1/2 = 1.5: two at once
    assert codes(halved, 3) == [200, 200, 429]


def test_the_gateway_answers_429_with_an_openai_body_and_retry_after_before_the_token():
    gateway = OpenAIGateway({"m1": {**route("svc", {"prefix": "/v1", "rps": 0.01}),
                                    "auth": {"enabled": True, "token_sha256": "ab" * 32}}})
    first = asyncio.run(gateway(request()))
    assert first.status_code == 401  # within the limit: the token is checked next
    refused = asyncio.run(gateway(request()))
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    error = json.loads(refused.body)["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    models = asyncio.run(gateway(request("/v1/models")))
    assert models.status_code != 429  # no model named: not a model request
