"""Async httpx load generator for OpenAI `chat/completions`, streaming and not, closed- or open-loop.

Closed loop: `concurrency` workers each send their next request as soon as the previous one ends.
Open loop: requests start at Poisson-distributed times at `rate` per second, however many are in flight.

Measured per request: time to first token (TTFT: the first SSE event carrying text), the gaps between
token events (inter-token latency, ITL), end-to-end latency; tokens are SSE events with text (streams)
or `usage.completion_tokens` (non-streaming). Statistics cover requests *started* in the measurement
window (after `warmup_s`); throughput counts tokens and completions that *arrive* in it.

Clients: every request in flight has an httpx client of its own, holding one connection, as every user of a
service has. One shared client with a connection per request in flight costs the load generator O(connections)
per request: httpcore's pool checks every connection (`has_expired`, `is_idle`, a socket poll through anyio's
attribute lookup) each time it assigns one. At 64 non-streaming clients that was ~6 ms of CPU per request, so
its core, not the server, set the req/s at c=64 (bench/RESULTS.md, History: "the load generator was the ceiling").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
import time
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any

import httpx


@dataclass
class Target:
    name: str
    url: str  # the full chat/completions URL
    model: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Sample:
    start: float
    end: float = 0.0
    ok: bool = False
    status: int = 0
    ttft: float | None = None
    token_times: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str = ""


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _has_text(event: dict[str, Any]) -> bool:
    for choice in event.get("choices") or ():
        delta = choice.get("delta")
        if isinstance(delta, dict) and delta.get("content"):
            return True
        if choice.get("text"):
            return True
    return False


async def one_request(client: httpx.AsyncClient, target: Target, *, stream: bool, max_tokens: int,
                      prompt: str) -> Sample:
    body = {"model": target.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": stream, "temperature": 0}
    s = Sample(start=time.perf_counter())
    try:
        request = client.build_request("POST", target.url, content=json.dumps(body).encode(),
                                       headers={"content-type": "application/json", **target.headers})
        response = await client.send(request, stream=True)
        s.status = response.status_code
        try:
            if response.status_code != 200:
                s.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return s
            if not stream:
                payload = json.loads(await response.aread())
                s.tokens = int(((payload.get("usage") or {}).get("completion_tokens")) or 0)
                s.ok = bool(payload.get("choices"))
                if not s.ok:
                    s.error = "no choices"
                return s
            buf = b""
            done = False
            async for chunk in response.aiter_raw():
                now = time.perf_counter()
                buf += chunk
                while True:
                    cut = buf.find(b"\n\n")
                    if cut < 0:
                        break
                    raw, buf = buf[:cut], buf[cut + 2:]
                    for line in raw.split(b"\n"):
                        if not line.startswith(b"data:"):
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            done = True
                            continue
                        try:
                            event = json.loads(data)
                        except ValueError:
                            continue
                        if "error" in event:
                            s.error = f"stream error: {str(event['error'])[:200]}"
                        elif _has_text(event):
                            if s.ttft is None:
                                s.ttft = now - s.start
                            s.token_times.append(now)
            s.tokens = len(s.token_times)
            s.ok = done and not s.error and s.tokens > 0
            if not s.ok and not s.error:
                s.error = "stream ended without [DONE]" if not done else "no tokens"
        finally:
            await response.aclose()
    except Exception as exc:  # noqa: BLE001 - every failure is a counted error
        s.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        s.end = time.perf_counter()
    return s


@dataclass
class Result:
    path: str
    mode: str  # "stream" or "nonstream"
    loop: str  # "closed" or "open"
    concurrency: int  # closed loop: workers; open loop: peak in flight
    offered_rps: float | None
    window_s: float
    requests: int
    errors: int
    error_examples: list[str]
    rps: float
    tokens_per_s: float
    ttft_ms: dict[str, float | None]
    itl_ms: dict[str, float | None]
    e2e_ms: dict[str, float | None]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stats_ms(values: list[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        v = percentile(values, q)
        out[name] = None if v is None else round(v * 1000.0, 3)
    out["mean"] = round(sum(values) / len(values) * 1000.0, 3) if values else None
    return out


@dataclass
class Window:
    """One measurement: every sample taken, and the window [t0, t1) whose samples count."""

    samples: list[Sample]
    t0: float
    t1: float
    concurrency: int
    offered: float | None = None
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per process title, over the whole run

    def produced(self) -> int:
        """Tokens (streams) or answers (non-streaming) over the whole run, warm-up included, as `cpu_s` is."""
        return sum(len(s.token_times) for s in self.samples) or sum(1 for s in self.samples if s.ok)


def summarize_windows(path: str, windows: list[Window], *, mode: str, loop: str) -> Result:
    """One result from several windows of the same point (the bench's passes): rates over their total length,
    percentiles over all their samples."""
    measured: list[Sample] = []
    completed_in_window = 0
    tokens = 0
    for w in windows:
        measured += [s for s in w.samples if w.t0 <= s.start < w.t1]
        completed_in_window += sum(1 for s in w.samples if s.ok and w.t0 <= s.end < w.t1)
        if mode == "stream":
            tokens += sum(1 for s in w.samples for t in s.token_times if w.t0 <= t < w.t1)
        else:
            tokens += sum(s.tokens for s in w.samples if s.ok and w.t0 <= s.end < w.t1)
    ok = [s for s in measured if s.ok]
    errors = [s for s in measured if not s.ok]
    window = max(sum(w.t1 - w.t0 for w in windows), 1e-9)
    itl: list[float] = []
    for s in ok:
        itl.extend(b - a for a, b in zip(s.token_times, s.token_times[1:]))
    examples = sorted({s.error for s in errors})[:3]
    return Result(
        path=path, mode=mode, loop=loop, concurrency=max(w.concurrency for w in windows),
        offered_rps=windows[0].offered, window_s=round(window, 3),
        requests=len(measured), errors=len(errors), error_examples=examples,
        rps=round(completed_in_window / window, 2), tokens_per_s=round(tokens / window, 1),
        ttft_ms=_stats_ms([s.ttft for s in ok if s.ttft is not None]) if mode == "stream" else _stats_ms([]),
        itl_ms=_stats_ms(itl), e2e_ms=_stats_ms([s.end - s.start for s in ok]),
    )


@cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def make_client() -> httpx.AsyncClient:
    """A client for one request at a time (see the module docstring). They share one TLS context: httpx would
    otherwise build one per client, loading the CA bundle (~20 ms of CPU each)."""
    return httpx.AsyncClient(
        verify=_tls_context(),
        timeout=httpx.Timeout(120.0, connect=30.0, pool=120.0),
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        trust_env=False,
    )


class Clients(contextlib.AbstractAsyncContextManager):
    """Clients for requests started at any time: each request takes an idle one (its connection kept alive) or a
    new one, and gives it back when it ends."""

    def __init__(self) -> None:
        self._idle: list[httpx.AsyncClient] = []
        self._all: list[httpx.AsyncClient] = []

    async def request(self, target: Target, *, stream: bool, max_tokens: int, prompt: str) -> Sample:
        if self._idle:
            client = self._idle.pop()
        else:
            client = make_client()
            self._all.append(client)
        try:
            return await one_request(client, target, stream=stream, max_tokens=max_tokens, prompt=prompt)
        finally:
            self._idle.append(client)

    async def __aexit__(self, *exc_info) -> None:
        await asyncio.gather(*(c.aclose() for c in self._all), return_exceptions=True)


async def closed_loop(target: Target, *, concurrency: int, duration_s: float, warmup_s: float, stream: bool,
                      max_tokens: int, prompt: str = "Say something.") -> Result:
    w = await closed_loop_window(target, concurrency=concurrency, duration_s=duration_s, warmup_s=warmup_s,
                                 stream=stream, max_tokens=max_tokens, prompt=prompt)
    return summarize_windows(target.name, [w], mode="stream" if stream else "nonstream", loop="closed")


async def closed_loop_window(target: Target, *, concurrency: int, duration_s: float, warmup_s: float, stream: bool,
                             max_tokens: int, prompt: str = "Say something.") -> Window:
    """`concurrency` workers, each sending its next request when its last one ended."""
    samples: list[Sample] = []
    start = time.perf_counter()
    stop_at = start + warmup_s + duration_s

    async def worker(i: int) -> None:
        async with make_client() as client:
            # Spread the first requests over a short time so streams do not all tick in lock-step.
            await asyncio.sleep(random.random() * min(0.2, warmup_s))
            while time.perf_counter() < stop_at:
                samples.append(await one_request(client, target, stream=stream, max_tokens=max_tokens, prompt=prompt))

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return Window(samples, start + warmup_s, stop_at, concurrency)


async def open_loop(target: Target, *, rate: float, duration_s: float, warmup_s: float, stream: bool,
                    max_tokens: int, prompt: str = "Say something.", max_in_flight: int = 1024) -> Result:
    w = await open_loop_window(target, rate=rate, duration_s=duration_s, warmup_s=warmup_s, stream=stream,
                               max_tokens=max_tokens, prompt=prompt, max_in_flight=max_in_flight)
    return summarize_windows(target.name, [w], mode="stream" if stream else "nonstream", loop="open")


async def open_loop_window(target: Target, *, rate: float, duration_s: float, warmup_s: float, stream: bool,
                           max_tokens: int, prompt: str = "Say something.", max_in_flight: int = 1024) -> Window:
    """Requests arriving at `rate` per second (Poisson), whatever the answers take."""
    samples: list[Sample] = []
    tasks: set[asyncio.Task] = set()
    peak = 0
    async with Clients() as clients:
        start = time.perf_counter()
        stop_at = start + warmup_s + duration_s
        next_at = start
        rng = random.Random(1)
        while True:
            next_at += rng.expovariate(rate)
            if next_at >= stop_at:
                break
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(tasks) >= max_in_flight:
                samples.append(Sample(start=time.perf_counter(), end=time.perf_counter(), error="client: too many in flight"))
                continue
            task = asyncio.create_task(clients.request(target, stream=stream, max_tokens=max_tokens, prompt=prompt))
            tasks.add(task)
            task.add_done_callback(lambda t: (tasks.discard(t), samples.append(t.result())))
            peak = max(peak, len(tasks))
        if tasks:
            await asyncio.gather(*list(tasks), return_exceptions=True)
    return Window(samples, start + warmup_s, stop_at, peak, rate)
