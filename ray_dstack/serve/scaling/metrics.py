"""Per-service request metrics through Ray's metrics API (`ray.util.metrics`).

They are exported with Ray's and Serve's own metrics in Prometheus text format at every node's metrics export
port (`ray start --metrics-export-port`, shown as `metrics_export_port` in the dashboard's node info), with a
`ray_` prefix added by Ray:

| exported name | type | tags |
|---|---|---|
| `ray_dstack_requests_total` | counter | service, model, route, status |
| `ray_dstack_request_latency_s` | histogram | service, model, route, status |
| `ray_dstack_time_to_first_token_s` | histogram (streams) | service, model, route |
| `ray_dstack_output_tokens_total` | counter | service, model, route |
| `ray_dstack_output_tokens_per_s` | histogram (streams) | service, model, route |
| `ray_dstack_inflight_streams` | gauge | service, model, route, replica |
| `ray_dstack_gateway_retries_total` | counter | service, reason (`replica_unavailable`, `backend_unavailable`) |

`ray_dstack_gateway_retries_total` counts the gateway's own retries; a `/v1` request HAProxy routed is retried by
HAProxy, which counts it in its stats (`show stat` on the node's admin socket, `/tmp/haproxy-serve/*/admin.sock`:
`wretr` of the backend `http-<service>`; per haproxy process, so from 0 after each of Serve's reloads).

Where a request is counted: a request to `/<service>/...`, and a `/v1` request HAProxy sent to the model's
service (ray_dstack/serve/ingress/haproxy_v1.py), once at the service's replica, or, when HAProxy sent it
straight to the engine (the engine path), once from HAProxy's log line (ray_dstack/serve/ingress/engine_log.py:
requests and latency only, the latency from HAProxy's first byte of the request, so with its upload); a `/v1`
request the gateway routes once at the gateway (its own 4xx included, with `service`/`model` empty when the model is unknown). Either way
a model's `/v1` requests carry the same service, model and route tags. `route` is `chat/completions`, `completions`, `models` or `other` (so tags stay bounded).
A request routed by prefix (`routing: prefix`, ray_dstack/serve/ingress/prefix_affinity.py) is also counted by
how HAProxy chose the replica (`prefix_routed`: affinity, spilled, moved, new), from the header HAProxy sets.

Cost per request: a few Ray metric calls at the end of the request. Per streamed chunk: one `bytes.count`
for the SSE `data:` events and an integer add; nothing is parsed. Output tokens of a stream are its SSE events
less `[DONE]` and a leading role-only event (servers send one token per event; a final finish-only event still
counts, so short streams read one high); of a non-streamed answer, `usage.completion_tokens` found with one
byte-regex. Time to first token is the time to the first body chunk of the stream. Outside Ray (unit tests)
recording is a no-op, and a failure to record never fails a request.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray_dstack.serve.transport.forward import path_below_root
from ray_dstack.spec import PREFIX_ROUTE_HEADER, PREFIX_ROUTE_OUTCOMES

log = logging.getLogger(__name__)

PREFIX = "dstack_"  # Ray prepends `ray_` on export
LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]
TTFT_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
TOKENS_PER_S_BOUNDARIES = [1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 350, 500, 1000, 2000]

KNOWN_ROUTES = ("chat/completions", "completions", "models")
OTHER_ROUTE = "other"
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_DATA = b"data:"
_DONE = b"[DONE]"
_ROLE = b'"role"'

now = time.perf_counter
REPLICA_RPS = "replica_rps"  # exported as ray_dstack_replica_rps; `ray-dstack status` sums it per service


def record_replica_rps(service: str, rps: float) -> None:
    m = instruments()
    if m is None:
        return
    try:
        m.replica_rps.set(rps, tags={"service": service, "replica": _replica_id()})
    except Exception:  # noqa: BLE001 - metrics never fail the replica
        pass


def record_gateway_retry(service: str, reason: str) -> None:
    m = instruments()
    if m is None:
        return
    try:
        m.gateway_retries.inc(1, tags={"service": service, "reason": reason})
    except Exception:  # noqa: BLE001 - metrics never fail the gateway
        pass


def route_tag(path: str) -> str:
    """`/v1/chat/completions?x` → `chat/completions`; anything not an OpenAI route → `other`."""
    p = path.split("?", 1)[0].strip("/")
    p = p.removeprefix("v1/")
    return p if p in KNOWN_ROUTES else OTHER_ROUTE


class _Instruments:
    """The process's Ray metric objects (created once, on first use inside a Ray worker)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        base = ("service", "model", "route")
        self.requests = Counter(PREFIX + "requests", "Requests answered, by HTTP status", tag_keys=base + ("status",))
        self.latency = Histogram(
            PREFIX + "request_latency_s", "Request latency in seconds, to the end of the body (streams: to the end)",
            boundaries=LATENCY_BOUNDARIES, tag_keys=base + ("status",))
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_s", "Streams: seconds from the request to the first streamed chunk",
            boundaries=TTFT_BOUNDARIES, tag_keys=base)
        self.tokens = Counter(PREFIX + "output_tokens", "Output tokens (streams: SSE events)", tag_keys=base)
        self.tokens_per_s = Histogram(
            PREFIX + "output_tokens_per_s", "Streams: output tokens per second after the first token",
            boundaries=TOKENS_PER_S_BOUNDARIES, tag_keys=base)
        self.inflight = Gauge(PREFIX + "inflight_streams", "Streams being sent now", tag_keys=base + ("replica",))
        self.gateway_retries = Counter(
            PREFIX + "gateway_retries", "/v1 requests retried on another replica before their first byte",
            tag_keys=("service", "reason"))
        self.prefix_routed = Counter(
            PREFIX + "prefix_routed", "Requests HAProxy routed by prefix (`routing: prefix`), by how it chose this "
            "replica: affinity (the prefix's own), spilled (its own carried too much), moved (its own is down or "
            "gone), new (none known)", tag_keys=("service", "model", "replica", "outcome"))
        self.replica_rps = Gauge(
            PREFIX + REPLICA_RPS, "Requests per second a replica served over its scaling window",
            tag_keys=("service", "replica"))


_instruments: _Instruments | None = None
_unavailable = False


def instruments() -> _Instruments | None:
    global _instruments, _unavailable
    if _instruments is not None or _unavailable:
        return _instruments
    try:
        import ray

        if not ray.is_initialized():
            return None  # not in a Ray worker (yet): try again later
        _instruments = _Instruments()
    except Exception as exc:  # noqa: BLE001 - metrics are optional
        log.warning("ray-dstack metrics disabled: %r", exc)
        _unavailable = True
    return _instruments


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not in a Serve replica
        return ""


class Recorder:
    """Records one service's (or the gateway's) requests; tag dicts are built once and reused."""

    def __init__(self, service: str = "", model: str = "") -> None:
        self.service = service
        self.model = model or ""
        self._tags: dict[tuple[str, str, str, str], dict[str, str]] = {}
        self._replica: str | None = None
        self._inflight: dict[tuple[str, str, str], int] = {}
        self._prefix_tags: dict[str, dict[str, str]] = {}  # outcome → tags (PREFIX_ROUTE_OUTCOMES: bounded)

    def _tag(self, service: str, model: str, route: str, status: str = "") -> dict[str, str]:
        key = (service, model, route, status)
        tags = self._tags.get(key)
        if tags is None:
            tags = {"service": service, "model": model, "route": route}
            if status:
                tags["status"] = status
            if len(self._tags) < 4096:  # bounded: services × models × routes × statuses
                self._tags[key] = tags
        return tags

    def _count(self, m: _Instruments, service: str, model: str, route: str, status: int, latency_s: float) -> None:
        tags = self._tag(service, model, route, str(status))
        m.requests.inc(1, tags)
        m.latency.observe(latency_s, tags)

    def prefix_routed(self, outcome: str) -> None:
        """A request HAProxy's prefix rules sent here (`outcome`: one of PREFIX_ROUTE_OUTCOMES)."""
        m = instruments()
        if m is None:
            return
        tags = self._prefix_tags.get(outcome)
        if tags is None:
            if self._replica is None:
                self._replica = _replica_id()
            tags = self._prefix_tags[outcome] = {"service": self.service, "model": self.model,
                                                 "replica": self._replica, "outcome": outcome}
        m.prefix_routed.inc(1, tags)

    def answered(self, route: str, status: int, latency_s: float, *, service: str, model: str) -> None:
        """A request another process timed (HAProxy, for the engine path): count it and its latency."""
        m = instruments()
        if m is None:
            return
        try:
            self._count(m, service, model, route, status, latency_s)
        except Exception as exc:  # noqa: BLE001
            log.debug("metrics: %r", exc)

    def finish(self, route: str, status: int, start: float, *, service: str | None = None, model: str | None = None,
               body: bytes | None = None) -> None:
        """A non-streamed answer: count it, its latency, and its `usage.completion_tokens` if any."""
        m = instruments()
        if m is None:
            return
        service = self.service if service is None else service
        model = self.model if model is None else model
        try:
            self._count(m, service, model, route, status, now() - start)
            if body and status < 300 and route != "models":
                found = _COMPLETION_TOKENS.search(body)
                if found:
                    m.tokens.inc(int(found.group(1)), self._tag(service, model, route))
        except Exception as exc:  # noqa: BLE001
            log.debug("metrics: %r", exc)

    def _set_inflight(self, m: _Instruments, service: str, model: str, route: str, delta: int) -> None:
        key = (service, model, route)
        value = self._inflight.get(key, 0) + delta
        self._inflight[key] = value
        if self._replica is None:
            self._replica = _replica_id()
        m.inflight.set(value, {"service": service, "model": model, "route": route, "replica": self._replica})

    async def stream(self, body: AsyncIterator[bytes], route: str, status: int, start: float, *,
                     service: str | None = None, model: str | None = None, sse: bool = True) -> AsyncIterator[bytes]:
        """Relay `body` unchanged and record the request when it ends (however it ends)."""
        m = instruments()
        service = self.service if service is None else service
        model = self.model if model is None else model
        if m is not None and sse:
            try:
                self._set_inflight(m, service, model, route, +1)
            except Exception:  # noqa: BLE001
                pass
        events = 0
        first_at = 0.0
        first = b""
        last = b""
        try:
            async for chunk in body:
                if not first_at:
                    first_at = now()
                    first = chunk
                if sse:
                    events += chunk.count(_DATA)
                    last = chunk
                yield chunk
        finally:
            closer = getattr(body, "aclose", None)
            if closer is not None:
                try:
                    await closer()
                except Exception:  # noqa: BLE001
                    pass
            if m is not None:
                self._stream_done(m, service, model, route, status, start, sse, events, first_at, first, last)

    def _stream_done(self, m: _Instruments, service: str, model: str, route: str, status: int, start: float,
                     sse: bool, events: int, first_at: float, first: bytes, last: bytes) -> None:
        end = now()
        try:
            self._count(m, service, model, route, status, end - start)
            if not sse:
                return
            self._set_inflight(m, service, model, route, -1)
            base = self._tag(service, model, route)
            if first_at:
                m.ttft.observe(first_at - start, base)
            if _DONE in last[-32:]:
                events -= 1
            head = first.split(b"\n\n", 1)[0]  # the first event (once per stream)
            if _ROLE in head and (b'"content"' not in head or b'"content": ""' in head or b'"content":""' in head):
                events -= 1  # a role-only opening event carries no token
            if events > 0 and status < 300:
                m.tokens.inc(events, base)
                if events > 1 and end > first_at:
                    m.tokens_per_s.observe((events - 1) / (end - first_at), base)
        except Exception as exc:  # noqa: BLE001
            log.debug("metrics: %r", exc)


def is_sse(content_type: str | None) -> bool:
    return bool(content_type) and content_type.startswith("text/event-stream")


def observe_response(recorder: Recorder, response: Any, route: str, start: float, *,
                     service: str | None = None, model: str | None = None) -> Any:
    """Record a Starlette response: a streaming one when its body ends, any other one now."""
    body_iterator = getattr(response, "body_iterator", None)
    if body_iterator is not None:
        sse = is_sse(response.headers.get("content-type"))
        response.body_iterator = recorder.stream(
            body_iterator, route, response.status_code, start, service=service, model=model, sse=sse)
    else:
        recorder.finish(route, response.status_code, start, service=service, model=model,
                        body=getattr(response, "body", None))
    return response


def _observed(observe: Callable[[Any, Any, Any, float], Any]) -> Callable[[Callable], Callable]:
    """Decorator factory for an ingress `__call__`: times the call, then `observe(self, request, response,
    start)` records it and returns the response to send. A failure to record never fails the request."""

    def decorator(method: Callable) -> Callable:
        @functools.wraps(method)
        async def wrapper(self, request, *args, **kwargs):
            start = now()
            response = await method(self, request, *args, **kwargs)
            try:
                return observe(self, request, response, start)
            except Exception as exc:  # noqa: BLE001
                log.debug("metrics: %r", exc)
                return response

        return wrapper

    return decorator


def _observe_service(replica, request, response, start: float):
    recorder = replica.__dict__.get("_metrics")
    if recorder is None:
        spec = replica.spec
        recorder = replica._metrics = Recorder(spec.name, spec.model.name if spec.model else "")
    route = route_tag(path_below_root(request.scope)) if recorder.model else OTHER_ROUTE
    outcome = request.headers.get(PREFIX_ROUTE_HEADER)
    if outcome is not None and outcome in PREFIX_ROUTE_OUTCOMES and recorder.model:
        recorder.prefix_routed(outcome)
    return observe_response(recorder, response, route, start)


# Request-scope key where the gateway leaves the model it routed to (None: unknown model).
GATEWAY_MODEL_KEY = "ray_dstack.model"
# ... and the request's `/v1` path (serve/gateway.py `v1_path`: not the URL's for a request HAProxy rewrote).
GATEWAY_PATH_KEY = "ray_dstack.v1_path"


def _observe_gateway(gateway, request, response, start: float):
    recorder = gateway.__dict__.get("_metrics")
    if recorder is None:
        recorder = gateway._metrics = Recorder()
    model = request.scope.get(GATEWAY_MODEL_KEY)
    target = gateway._routes.get(model) if model else None
    if target is None:
        service, model = "", ""  # unknown model: never a client-chosen tag value
    else:
        service = target.get("app", "")
    path = request.scope.get(GATEWAY_PATH_KEY) or request.url.path
    return observe_response(recorder, response, route_tag(path), start, service=service, model=model)


# `ServiceReplica.__call__`: every request made to `/<service>/...`.
observed_service_call = _observed(_observe_service)
# `OpenAIGateway.__call__`: every `/v1` request, tagged with the target service.
observed_gateway_call = _observed(_observe_gateway)
