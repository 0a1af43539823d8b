"""The replica's client alone: CPU per streamed chunk with httpcore's anyio backend vs `LoopBackend`, side by side.

    python -m bench.client_read [--rounds 3] [--streams 64] [--seconds 6]

The synthetic backend (`bench.synth`, 200 tokens/s per stream, 64 tokens) runs on CPU 0, this process on CPU 1:
`--streams` concurrent streams through `upstream_client` (the replica's sharded pools), first with httpcore's
anyio backend, then with `LoopBackend` (ray_dstack/serve/transport/loop_stream.py), for `--rounds` rounds on uvloop (Serve's
loop). Printed: this process's CPU time per received chunk for each, and their ratio per round. No Ray involved,
so no lock is taken.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import httpx
import uvloop
from httpcore._backends.anyio import AnyIOBackend

from bench import stack
from ray_dstack.serve.transport.loop_stream import LoopBackend
from ray_dstack.serve.transport.client import upstream_client

BODY = b'{"model":"synth","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":64}'


async def stream_for(url: str, backend, streams: int, seconds: float) -> tuple[int, float]:
    """(chunks received, CPU seconds of this process) over `seconds` of `streams` closed-loop streams."""
    client = upstream_client(base_url=url, timeout=httpx.Timeout(30.0), max_connections=None, max_keepalive=512)
    for pool in client._transport.pools:
        pool._pool._network_backend = backend
    chunks = 0
    stop = time.monotonic() + seconds

    async def one() -> None:
        nonlocal chunks
        while time.monotonic() < stop:
            request = client.build_request("POST", "/v1/chat/completions", content=BODY,
                                           headers={"content-type": "application/json"})
            response = await client.send(request, stream=True)
            async for _ in response.aiter_raw():
                chunks += 1
            await response.aclose()

    cpu = time.process_time()
    await asyncio.gather(*(one() for _ in range(streams)))
    cpu = time.process_time() - cpu
    await client.aclose()
    return chunks, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=6.0)
    a = ap.parse_args()
    synth = stack.Synth(rate=200.0, tokens=64, pin=True)
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, stack.CLIENT_CPUS)
    try:
        ratios = []
        for n in range(1, a.rounds + 1):
            per_chunk = {}
            for name, backend in (("anyio", AnyIOBackend()), ("LoopBackend", LoopBackend())):
                chunks, cpu = uvloop.run(stream_for(synth.url, backend, a.streams, a.seconds))
                per_chunk[name] = 1e6 * cpu / max(chunks, 1)
                print(f"round {n}: {name:11} {chunks} chunks, {cpu:.2f} s CPU, {per_chunk[name]:.1f} µs/chunk", flush=True)
            ratios.append(per_chunk["LoopBackend"] / per_chunk["anyio"])
        print(f"LoopBackend vs anyio, CPU per chunk: median {statistics.median(ratios):.2f}× "
              f"[{min(ratios):.2f}, {max(ratios):.2f}] over {a.rounds} rounds")
    finally:
        synth.stop()


if __name__ == "__main__":
    main()
