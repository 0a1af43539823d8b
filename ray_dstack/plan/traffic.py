"""`probes` and `rate_limits` of a configuration → their run-time specs (pure).

The default probe of a model service (dstack ≥0.20.8): a service with `model` and no `probes` key is probed
with a one-token generation, so a server whose port opens while it still loads weights is not ready yet.
- `format: openai`: `POST <prefix>/chat/completions` with `{"model": NAME, "messages": [...], "max_tokens": 1}`.
- `format: tgi`: TGI's own `POST /generate` with `max_new_tokens: 1` — the probe talks to the backend on
  loopback, where the OpenAI routes do not exist (the replica's adapter provides them), and `/generate` is what
  every TGI version serves.
It runs until the replica is ready (`until_ready`), then the replica's health check falls back to "the process
lives and its port accepts connections": a model server saturated by real traffic answers a one-token
request slowly, and failing it then would replace replicas exactly when they are all needed.
`probes: []` turns the default off.
"""

from __future__ import annotations

import json

from ray_dstack import spec as rt
from ray_dstack.config import ServiceConfig

DEFAULT_PROBE_TIMEOUT_S = 10.0
DEFAULT_PROBE_INTERVAL_S = 15.0
JSON_HEADERS = [("Content-Type", "application/json")]


def default_model_probe(model: rt.ModelSpec) -> rt.ProbeSpec:
    if model.format == "tgi":
        path = "/generate"
        body = {"inputs": "hi", "parameters": {"max_new_tokens": 1}}
    else:
        path = model.prefix.rstrip("/") + "/chat/completions"
        body = {"model": model.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    return rt.ProbeSpec(
        path=path, method="post", headers=JSON_HEADERS, body=json.dumps(body),
        interval_s=DEFAULT_PROBE_INTERVAL_S, timeout_s=DEFAULT_PROBE_TIMEOUT_S, ready_after=1, until_ready=True,
    )


def probe_specs(config: ServiceConfig) -> list[rt.ProbeSpec]:
    """The configured probes; a model service that sets no `probes` key gets the default model probe."""
    if "probes" not in config.model_fields_set and config.model is not None:
        m = config.model
        return [default_model_probe(rt.ModelSpec(name=m.name, format=m.format, prefix=m.prefix or "/v1"))]
    return [
        rt.ProbeSpec(
            path=p.url, method=p.method, headers=[(h.name, h.value) for h in p.headers], body=p.body,
            interval_s=float(p.interval), timeout_s=float(p.timeout), ready_after=p.ready_after,
            until_ready=p.until_ready,
        )
        for p in config.probes
    ]


def rate_limit_specs(config: ServiceConfig) -> list[rt.RateLimitSpec]:
    return [
        rt.RateLimitSpec(
            prefix=r.prefix, key=r.key.type,
            header=r.key.header.lower() if r.key.header else None, rps=r.rps, burst=r.burst,
        )
        for r in config.rate_limits
    ]


def traffic_lines(spec: rt.ServiceSpec) -> list[str]:
    """`plan` summary lines: what gates readiness and what is limited."""
    lines = []
    for p in spec.probes:
        lines.append(
            f"probe: {p.method.upper()} {p.path} every {p.interval_s:g}s (timeout {p.timeout_s:g}s), "
            f"ready after {p.ready_after} success(es)" + (", until ready" if p.until_ready else "")
        )
    if not spec.probes:
        lines.append("probe: none (ready once the port accepts connections)")
    for r in spec.rate_limits:
        key = f"header {r.header}" if r.key == "header" else "client address"
        lines.append(f"rate limit: {r.prefix} {r.rps:g} rps, burst {r.burst}, per {key}")
    if spec.model is not None:
        lines.append(f"routing: {routing_description(spec.routing)}")
    return lines


def routing_description(policy: str) -> str:
    """How HAProxy picks a replica for a model service's chat/completions requests (`routing`), in words."""
    if policy == "prefix":
        return ("prefix affinity: chat/completions requests go to the replica that had the same prompt start, "
                "unless it carries 1.5x the mean load; other requests by least connections")
    return "least connections"


# In every application's runtime env: uvicorn (Serve's per-replica HTTP server) believes `X-Forwarded-For`
# from no peer (its default trusts loopback, where Serve's HAProxy connects from and passes a client's own
# header through). The replica honours the header only from `deploy --trusted-proxies`.
UVICORN_TRUST_NONE = {"FORWARDED_ALLOW_IPS": "none"}
