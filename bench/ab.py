"""Interleaved A/B of two ray-dstack service paths, for differences smaller than the bench's run-to-run drift.

    python -m bench.ab [--b svc-ns|svc-rl|gw-openai|svc-prefix] [--rounds 8] [--requests 400] [--streams 12] [--concurrency 64]
                       [--window 6] [--out DIR]

`python -m bench` measures its paths one after another, so a machine whose load drifts over the run (other
jobs, Ray's own background work on the server core) moves one path against the other by more than the
0.2 ms a target may allow. Here one Ray cluster serves both services (A, `svc-openai`: `$RAY_DSTACK_PORT`;
B, `--b`: `svc-ns`, a fixed `--port 8000` in a network namespace of its own, `svc-rl`, a rate limit that never
refuses, `gw-openai`, A's own service called through `/v1/chat/completions`, or `svc-prefix`, `routing: prefix`:
HAProxy keys each chat by its prompt and sends it back to the replica its key went to last), and each round measures A then B then
B then A with the same sequential client (non-streaming requests: end-to-end latency; streams: time to first
token) and with `--concurrency` streams at once (tokens/s, 64 tokens at 50 tokens/s each, as in the bench), so
drift cancels out of the per-round differences. Reported: each path's median over all rounds, and
the median of the per-round differences (B − A, or B / A for tokens/s) with its spread.

Server side pinned to CPU 0, this process to CPU 1, as in `python -m bench`; takes the machine-wide lock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench import loadgen, stack
from bench.__main__ import UNREACHABLE_LIMIT, service_yaml

A = "svc-openai"
# path -> (service name, port, rate_limits YAML, routing)
PATHS = {
    "svc-openai": ("synth-openai", "$RAY_DSTACK_PORT", "", "least_connections"),
    "svc-ns": ("synth-ns", "8000", "", "least_connections"),
    "svc-rl": ("synth-rl", "$RAY_DSTACK_PORT", UNREACHABLE_LIMIT, "least_connections"),
    "gw-openai": ("synth-openai", "$RAY_DSTACK_PORT", "", "least_connections"),  # A's service, through `/v1`
    "svc-prefix": ("synth-prefix", "$RAY_DSTACK_PORT", "", "prefix"),
}
VIA_V1 = {"gw-openai"}


def chat(client: httpx.Client, url: str, model: str, *, stream: bool) -> float:
    """One request; returns ms to the first body byte of a stream, or to the whole answer."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": stream}
    t0 = time.perf_counter()
    if not stream:
        resp = client.post(url, json=body)
        resp.raise_for_status()
        return (time.perf_counter() - t0) * 1000
    with client.stream("POST", url, json=body) as resp:
        resp.raise_for_status()
        first = None
        for _ in resp.iter_raw():
            if first is None:
                first = (time.perf_counter() - t0) * 1000
    return first


def measure(client: httpx.Client, url: str, model: str, n: int, *, stream: bool) -> float:
    return statistics.median(chat(client, url, model, stream=stream) for _ in range(n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--b", default="svc-ns", choices=[p for p in PATHS if p != A], help="the path compared with svc-openai")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--requests", type=int, default=400, help="non-streaming requests per path per half-round")
    ap.add_argument("--streams", type=int, default=12, help="streams per path per half-round (TTFT)")
    ap.add_argument("--concurrency", type=int, default=64, help="streams at once for the tokens/s measurement")
    ap.add_argument("--window", type=float, default=6.0, help="seconds per tokens/s measurement (after 1 s warm-up)")
    ap.add_argument("--lock", default="/tmp/ray-e2e.lock", help="machine-wide lock held while Ray runs")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {1})
    tmp = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    urls = {}
    result: dict = {"command": "python -m bench.ab " + " ".join(f"--{k} {v}" for k, v in vars(a).items() if k in ("b", "rounds", "requests", "streams", "concurrency", "window")),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with stack.machine_lock(a.lock):
        cluster = stack.RayCluster("ray-dstack", pin=True)
        try:
            deployed = set()
            for path in (A, a.b):
                name, port, limits, routing = PATHS[path]
                if name not in deployed:
                    yml = tmp / f"{name}.dstack.yml"
                    yml.write_text(service_yaml(name, name, "openai", rate=50.0, tokens=64, port=port,
                                                rate_limits=limits, routing=routing))
                    cluster.deploy(yml)
                    deployed.add(name)
                route = "" if path in VIA_V1 else f"/{name}"
                urls[path] = (f"{cluster.http}{route}/v1/chat/completions", name)
            rounds = []
            with httpx.Client(timeout=30, trust_env=False) as client:
                for path, (url, model) in urls.items():  # warm both: connections, JIT-free caches
                    measure(client, url, model, 50, stream=False)
                for r in range(a.rounds):
                    order = [A, a.b, a.b, A]
                    got: dict[str, dict[str, list[float]]] = {p: {"e2e": [], "ttft": [], "tok_s": []} for p in (A, a.b)}
                    for path in order:
                        url, model = urls[path]
                        got[path]["e2e"].append(measure(client, url, model, a.requests // 2, stream=False))
                        got[path]["ttft"].append(measure(client, url, model, max(1, a.streams // 2), stream=True))
                        load = asyncio.run(loadgen.closed_loop(
                            loadgen.Target(path, url, model), concurrency=a.concurrency, duration_s=a.window,
                            warmup_s=1.0, stream=True, max_tokens=64))
                        got[path]["tok_s"].append(load.tokens_per_s)
                    row = {p: {k: statistics.mean(v) for k, v in m.items()} for p, m in got.items()}
                    rounds.append(row)
                    print(f"round {r + 1}: " + ", ".join(
                        f"{p} e2e {row[p]['e2e']:.3f} ttft {row[p]['ttft']:.3f} tok/s {row[p]['tok_s']:.0f}"
                        for p in (A, a.b)), flush=True)
        finally:
            cluster.stop()
    summary = {}
    for metric in ("e2e", "ttft", "tok_s"):
        if metric == "tok_s":
            diffs = [r[a.b][metric] / r[A][metric] for r in rounds]
        else:
            diffs = [r[a.b][metric] - r[A][metric] for r in rounds]
        summary[metric] = {
            A: statistics.median(r[A][metric] for r in rounds),
            a.b: statistics.median(r[a.b][metric] for r in rounds),
            "diff_median": statistics.median(diffs),
            "diff_min": min(diffs),
            "diff_max": max(diffs),
        }
    result.update(rounds=rounds, summary=summary)
    print(f"\n| metric | {A} | {a.b} | {a.b} vs {A}, median of rounds [min, max] |")
    print("|---|---|---|---|")
    for metric, label in (("e2e", "non-streaming request, end to end, ms p50"),
                          ("ttft", "stream, time to first token, ms p50"),
                          ("tok_s", f"tokens/s at {a.concurrency} streams")):
        s = summary[metric]
        if metric == "tok_s":
            print(f"| {label} | {s[A]:.0f} | {s[a.b]:.0f} | "
                  f"{s['diff_median']:.3f}x [{s['diff_min']:.3f}, {s['diff_max']:.3f}] |")
        else:
            print(f"| {label} | {s[A]:.3f} | {s[a.b]:.3f} | "
                  f"{s['diff_median']:+.3f} [{s['diff_min']:+.3f}, {s['diff_max']:+.3f}] |")
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "ab.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
