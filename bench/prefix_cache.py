"""Prefix routing against a real engine's prompt cache: least connections vs `routing: prefix` vs SGLang's router.

    python -m bench.prefix_cache [--policies least_connections,prefix,sglang] [--conversations 8] [--turns 5]
                                 [--at-once 4] [--system-words 850] [--distinct 24] [--passes 2] [--out DIR]

Each policy serves the same two replicas' worth of engine: the demo's llama.cpp server (SmolLM2-135M Q4_1, one
thread each) with llama-cpp-python's RAM prompt cache (`--prompt-cache-mb`: the KV state of earlier prompts,
least recently used dropped first; a request starts from its longest cached prefix), so a replica that has seen
a conversation answers its next turn without evaluating the shared part again. Policies, one service each,
deployed fresh (cold caches) and deleted after, one after another on one Ray cluster, `--passes` times (every
other pass in the reverse order; the table gives each policy's medians):

  least_connections  Serve's HAProxy default: the replica with fewer requests in flight
  prefix             `routing: prefix`: HAProxy keys each chat by its system prompt + first user message, sends a
                     new key where least connections would and a known one back to its replica, with a load
                     bound (prefix_affinity.py)
  sglang             a router group ([3.1], docs/groups.md): SGLang's router (`smg --policy cache_aware`) in
                     front of a worker group of two replicas

Workloads, per policy:
- **multi-turn**: `--conversations` conversations, each with its own system prompt of `--system-words` random
  words (~1,000 tokens), `--turns` turns sent in order (each turn carries the whole conversation so far, the
  model's answers included), `--at-once` conversations at a time, `--think-s` between an answer and the next
  turn. Time to first token (first text chunk) of every turn, p50/p95 over all turns and over turns 2+, and the
  wall time of the whole workload. Back to back (`--think-s 0`), least connections tends to send a conversation's
  next turn to the replica it just left (that replica has just become the less busy one), so it gets much of
  prefix routing's effect for free; with users' think time, the other conversations' requests decide.
- **distinct**: `--distinct` requests with no shared prefix (each its own ~150-word prompt), `--at-once` at a
  time: completion tokens/s over the wall time.

Not pinned (the two replicas need both cores); takes the machine-wide lock. Results: <out>/prefix_cache.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench import stack
from bench.__main__ import router_groups_yaml

MODEL = "smollm2-135m"
POLICIES = ("least_connections", "prefix", "sglang")
# Enough for every conversation's newest states on each replica (~30 MB each: KV cache + the last batch's logits at
# --n-batch 128, which also makes saving and loading one ~5x faster than llama-cpp-python's 512: model_server.py).
CACHE_MB = 2048
ENGINE = (f"exec {sys.executable} -m ray_dstack.demo.model_server serve --port $RAY_DSTACK_PORT --alias {MODEL} "
          f"--n-threads 1 --n-ctx 2048 --n-batch 128 --temperature 0 --prompt-cache-mb {CACHE_MB}")
COMMON = f"""working_dir: {stack.REPO}
port: 8000
auth: false
probes:
  - type: http
    url: /health
    interval: 1
    timeout: 5
model:
  name: {MODEL}
  format: openai
"""


def service_yaml(name: str, policy: str) -> str:
    if policy == "sglang":
        return f"""type: service
name: {name}
{router_groups_yaml("cache_aware", 2, ENGINE)}{COMMON}"""
    return f"""type: service
name: {name}
replicas: 2
routing: {policy}
commands:
  - {ENGINE}
{COMMON}"""


WORDS = ("river stone garden engine quiet orange window market silver forest number letter yellow planet coffee "
         "bridge summer winter music paper doctor island mountain pocket signal rabbit candle school butter copper "
         "dragon harbor jacket kitchen ladder marble needle ocean parrot pillow rocket saddle tiger violin wagon "
         "anchor basket castle desert feather guitar hammer insect jungle kettle lemon mirror napkin orbit pencil "
         "puzzle ribbon shadow throne tunnel velvet walnut zipper circle meadow lantern compass blanket cabinet").split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


async def stream_chat(client: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat; returns ms to the first text chunk, ms to the end, the answer and its token count."""
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    text: list[str] = []
    tokens = 0
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{url}: {resp.status_code} {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"].get("completion_tokens", tokens)
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if first is None:
                        first = (time.perf_counter() - t0) * 1000
                    text.append(piece)
    end = (time.perf_counter() - t0) * 1000
    return {"ttft_ms": first if first is not None else end, "total_ms": end, "answer": "".join(text),
            "tokens": tokens}


async def multi_turn(url: str, a: argparse.Namespace, seed: int) -> dict:
    rng = random.Random(seed)
    convs = [{"system": f"You are assistant number {i}. Remember these words: " + words(rng, a.system_words),
              "questions": [f"Question {t + 1}: which word comes after {rng.choice(WORDS)}?" for t in range(a.turns)]}
             for i in range(a.conversations)]
    turns: list[dict] = []
    gate = asyncio.Semaphore(a.at_once)
    async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
        async def converse(i: int, conv: dict) -> None:
            async with gate:
                messages = [{"role": "system", "content": conv["system"]}]
                for t, question in enumerate(conv["questions"]):
                    messages.append({"role": "user", "content": question})
                    got = await stream_chat(client, url, messages, a.max_tokens)
                    messages.append({"role": "assistant", "content": got["answer"]})
                    if a.think_s and t + 1 < len(conv["questions"]):
                        await asyncio.sleep(a.think_s)  # the user reads and types
                    turns.append({"conversation": i, "turn": t + 1, "ttft_ms": got["ttft_ms"],
                                  "total_ms": got["total_ms"], "tokens": got["tokens"]})

        t0 = time.perf_counter()
        await asyncio.gather(*(converse(i, c) for i, c in enumerate(convs)))
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "turns": turns, **ttft_stats(turns)}


def ttft_stats(turns: list[dict]) -> dict:
    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]

    every = [t["ttft_ms"] for t in turns]
    later = [t["ttft_ms"] for t in turns if t["turn"] > 1]
    return {"ttft_p50_ms": statistics.median(every), "ttft_p95_ms": pct(every, 0.95),
            "later_ttft_p50_ms": statistics.median(later) if later else None,
            "later_ttft_p95_ms": pct(later, 0.95) if later else None}


async def distinct(url: str, a: argparse.Namespace, seed: int) -> dict:
    rng = random.Random(seed)
    prompts = [f"Request {i}. " + words(rng, 150) + " Write a short story." for i in range(a.distinct)]
    gate = asyncio.Semaphore(a.at_once)
    results: list[dict] = []
    async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
        async def one(prompt: str) -> None:
            async with gate:
                results.append(await stream_chat(client, url, [{"role": "user", "content": prompt}], a.max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": statistics.median(r["ttft_ms"] for r in results)}


def measure_policy(cluster: stack.RayCluster, tmp: Path, policy: str, a: argparse.Namespace) -> dict:
    """A service of `policy` deployed fresh (cold caches), both workloads, the service deleted."""
    name = f"pc-{policy.replace('_', '-')}"
    yml = tmp / f"{name}.dstack.yml"
    yml.write_text(service_yaml(name, policy))
    deploy_s = cluster.deploy(yml, timeout=600)
    url = f"{cluster.http}/{name}/v1/chat/completions"
    if policy == "prefix":
        wait_prefix_routed(name)
    print(f"{policy}: deployed in {deploy_s:.0f} s", flush=True)
    got = {}
    if a.conversations:
        m = got["multi_turn"] = asyncio.run(multi_turn(url, a, a.seed))
        print(f"{policy}: multi-turn TTFT p50 {m['ttft_p50_ms']:.0f} ms p95 {m['ttft_p95_ms']:.0f} ms, "
              f"turns 2+ p50 {m['later_ttft_p50_ms'] or 0:.0f} ms, wall {m['wall_s']:.1f} s", flush=True)
    if a.distinct:
        got["distinct"] = asyncio.run(distinct(url, a, a.seed + 1))
        print(f"{policy}: distinct {got['distinct']['tokens_per_s']:.1f} tokens/s", flush=True)
    delete(cluster, name)
    return got


def wait_prefix_routed(name: str, timeout: float = 30.0) -> None:
    """Until HAProxy's prefix map names the service: the map sync pushes it within a second or so of the deploy,
    and requests before that are placed by least connections (a head start the measurement should not give)."""
    import glob
    import os

    from ray_dstack.serve.ingress.prefix_affinity import MAP_FILE_NAME
    from ray_dstack.serve.ingress.v1_routes import HAProxyAdmin

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in glob.glob("/tmp/haproxy-serve/*/admin.sock"):
            try:
                mapped = HAProxyAdmin(path, timeout=2).command(
                    f"show map {os.path.join(os.path.dirname(path), MAP_FILE_NAME)}")
            except OSError:
                continue
            if f" {name} " in f" {mapped} ".replace("\n", " "):
                return
        time.sleep(0.2)
    raise RuntimeError(f"HAProxy's prefix map does not name {name} after {timeout:.0f} s")


def delete(cluster: stack.RayCluster, name: str) -> None:
    import subprocess

    subprocess.run([str(stack.BIN / "ray-dstack"), "delete", name, "--address", cluster.address],
                   env=cluster.env, capture_output=True, text=True, timeout=300, cwd=stack.REPO, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--conversations", type=int, default=8, help="0: no multi-turn workload")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--at-once", type=int, default=4)
    ap.add_argument("--system-words", type=int, default=850, help="words in each system prompt (~1.15 tokens each: ~1,000 tokens)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--think-s", type=float, default=0.0,
                    help="seconds between an answer and the conversation's next turn (0: back to back)")
    ap.add_argument("--distinct", type=int, default=24, help="requests of the no-shared-prefix workload (0: none)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--passes", type=int, default=2, help="each policy this many times, every other pass reversed")
    ap.add_argument("--lock", default="/tmp/ray-e2e.lock", help="machine-wide lock held while Ray runs")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    policies = [p for p in a.policies.split(",") if p]
    unknown = set(policies) - set(POLICIES)
    if unknown:
        ap.error(f"--policies: unknown {sorted(unknown)}; expected some of {', '.join(POLICIES)}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-prefix-cache-"))
    result: dict = {"command": "python -m bench.prefix_cache " + " ".join(sys.argv[1:]),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "policies": {}}
    with stack.machine_lock(a.lock):
        cluster = stack.RayCluster("ray-dstack", pin=False)
        try:
            for n in range(a.passes):
                # Every other pass in the reverse order: a machine that drifts over the run favours no policy.
                for policy in policies if n % 2 == 0 else policies[::-1]:
                    got = measure_policy(cluster, tmp, policy, a)
                    result["policies"].setdefault(policy, []).append(got)
        finally:
            cluster.stop()
    print_table(result, a)
    out = Path(a.out) if a.out else tmp
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefix_cache.json").write_text(json.dumps(result, indent=1))
    print(f"\nresults: {out / 'prefix_cache.json'}")


def print_table(result: dict, a: argparse.Namespace) -> None:
    """Each policy's medians over its passes; ratios against least connections' medians."""
    def med(runs: list[dict], part: str, key: str) -> float | None:
        values = [r[part][key] for r in runs if part in r and r[part].get(key) is not None]
        return statistics.median(values) if values else None

    got = result["policies"]
    base = got.get("least_connections")
    print(f"\nmedians over {a.passes} pass(es)")
    print("| policy | TTFT p50 | TTFT p95 | turns 2+ TTFT p50 | multi-turn wall | wall vs least_connections | "
          "TTFT p50 vs least_connections | distinct tokens/s (vs least_connections) |")
    print("|---|---|---|---|---|---|---|---|")
    for policy, runs in got.items():
        p50, p95 = med(runs, "multi_turn", "ttft_p50_ms"), med(runs, "multi_turn", "ttft_p95_ms")
        later, wall = med(runs, "multi_turn", "later_ttft_p50_ms"), med(runs, "multi_turn", "wall_s")
        tps = med(runs, "distinct", "tokens_per_s")
        b_p50 = med(base, "multi_turn", "ttft_p50_ms") if base else None
        b_wall = med(base, "multi_turn", "wall_s") if base else None
        b_tps = med(base, "distinct", "tokens_per_s") if base else None

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.0f} ms"

        dist = "-" if tps is None else f"{tps:.1f}" + (f" ({tps / b_tps:.2f}x)" if b_tps else "")
        print(f"| {policy} | {ms(p50)} | {ms(p95)} | {ms(later)} | {'-' if wall is None else f'{wall:.1f} s'} | "
              f"{f'{b_wall / wall:.2f}x less' if b_wall and wall else '-'} | "
              f"{f'{b_p50 / p50:.2f}x lower' if b_p50 and p50 else '-'} | {dist} |")


if __name__ == "__main__":
    main()
