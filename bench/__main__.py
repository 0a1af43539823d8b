"""What the gateway costs, side by side with the direct backend and the alternatives.

    python -m bench            # full run (~40 min plus waits for the lock): 5 Serve variants, c = 1,16,64, profiles, llama.cpp
    python -m bench --quick    # ~6 min: ray-dstack's data path only, c = 1,64, short windows, no profiles, no llama
    python -m bench --sweep    # c = 1,2,4,8,16,32,64,128

Paths, all on the same synthetic backend (`bench.synth`: fixed tokens/s per stream, fixed length):
  direct      the backend itself (the limit)
  nginx       nginx `proxy_pass`, buffering off, keep-alive upstream (started here on loopback)
  svc-openai  ray-dstack `format: openai` service: POST /<svc>/v1/chat/completions (proxy → ServiceReplica → child)
  gw-openai   the same service as /v1/chat/completions, routed by model (HAProxy's map → ServiceReplica → child; in the
              variant ray-dstack-gateway: proxy → OpenAIGateway → handle → ServiceReplica → child)
  svc-tgi     ray-dstack `format: tgi` service (OpenAI → TGI adaptation in the replica)
  svc-ns      svc-openai's service with a fixed `--port 8000`: the child runs in a network namespace of its own
              (pasta), the replica connects through sockets the namespace's init hands out (compare with svc-openai);
              in the variant ray-dstack-engine, HAProxy sends its requests into the namespace itself, the replica
              out of the data path (the engine path, ray_dstack/serve/ingress/engine_path.py)
  svc-rl      svc-openai's service with a `rate_limits` entry too high ever to refuse: what checking a limit on
              every request costs (compare with svc-openai)
  hand        a hand-written Ray Serve passthrough (FastAPI ingress + shared httpx; bench/serve_passthrough.py)
and, with --llama (on by default in a full run), the real llama.cpp demo service (SmolLM2-135M) at low concurrency.

A TTFT point (`--ttft-tokens`, default 2) has one client send back-to-back short streams on every path: time to
first token at 1 stream over hundreds of samples, where the c=1 window of full-length streams holds ~5 per pass.

Each point (a concurrency, streaming or not) measures every path in `--passes` windows (default 2), the paths'
order reversed in every other pass, and reports each path over all its windows: a single pass in a fixed order
gave the path measured right after a heavy one (or while the machine drifted) a bias of its own (bench/RESULTS.md).
Points of short requests (non-streaming, the TTFT point) split the same measuring time into `--short-passes`
shorter windows (default 6, 0.5 s warm-up each): a slow spell of the shared machine lasting a few seconds then
falls on a slice of every path's windows, not on one path's whole pass (two passes of one path differed by 1.5x).

Server side (backend, nginx, the whole Ray cluster) is pinned to CPU 0 with taskset and the load generator
(this process) to CPU 1. Every Ray cluster is started by the bench under the machine-wide lock
(/tmp/ray-e2e.lock, taken here: do not wrap the command in `flock`), one variant at a time, and stopped with
`ray stop --force` before the lock is released. Results: <out>/results.json, <out>/results.md, <out>/latency.png.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import loadgen, report, stack

SYNTH_CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"


# svc-rl's limit: one partition (the load generator's address) far above any rate the bench reaches, so every
# request is checked and none is refused (the cost of the check is what svc-rl vs svc-openai measures).
UNREACHABLE_LIMIT = "rate_limits:\n  - {prefix: /, rps: 1000000, burst: 1000000}\n"


def service_yaml(name: str, model: str, fmt: str, *, rate: float, tokens: int, port: str = "$RAY_DSTACK_PORT",
                 rate_limits: str = "", routing: str = "least_connections") -> str:
    """`port`: `$RAY_DSTACK_PORT` (a free port on the node) or a fixed one (`8000`: a network namespace per replica).
    `rate_limits`: YAML appended as is (`UNREACHABLE_LIMIT`). `routing`: the service's `routing` policy."""
    extra = ""
    if fmt == "tgi":
        extra = f'  chat_template: "{SYNTH_CHAT_TEMPLATE}"\n  eos_token: "</s>"\n'
    extra += rate_limits
    return f"""type: service
name: {name}
commands:
  - exec {sys.executable} -m bench.synth --port {port} --rate {rate} --tokens {tokens} --model {model}
working_dir: {stack.REPO}
port: 8000
auth: false
routing: {routing}
probes:
  - type: http
    url: /health
    interval: 1
model:
  name: {model}
  format: {fmt}
{extra}"""


def router_groups_yaml(policy: str, workers: int, worker_command: str) -> str:
    """`groups:` of a service with an SGLang router group (docs/groups.md), SMG's `--policy` and its workers."""
    return f"""groups:
  - name: router
    replicas: 1
    router:
      type: sglang
    commands:
      - pip install --quiet smg
      - METRICS_PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
      - exec smg launch --host 127.0.0.1 --port $RAY_DSTACK_PORT --prometheus-port $METRICS_PORT --policy {policy}
  - name: workers
    replicas: {workers}
    commands:
      - {worker_command}
"""


def router_service_yaml(name: str, model: str, *, rate: float, tokens: int) -> str:
    """The same synthetic backend behind SGLang's router (SMG) in a router group (docs/groups.md): the path a
    dstack 0.21 service with `router: {type: sglang}` takes, one worker."""
    synth = f"exec {sys.executable} -m bench.synth --port $RAY_DSTACK_PORT --rate {rate} --tokens {tokens} --model {model}"
    return f"""type: service
name: {name}
working_dir: {stack.REPO}
port: 8000
{router_groups_yaml("round_robin", 1, synth)}auth: false
probes:
  - type: http
    url: /health
    interval: 1
model:
  name: {model}
  format: openai
"""


# The Serve replica that serves each path (its process title holds `ServeReplica:<app>:`).
PATH_APPS = {"svc-openai": "synth-openai", "gw-openai": "synth-openai", "svc-tgi": "synth-tgi", "svc-ns": "synth-ns",
             "svc-rl": "synth-rl", "svc-router": "synth-router", "hand": "hand"}


def cpu_per_unit(path: str, windows: list[loadgen.Window]) -> dict[str, float | None]:
    """CPU microseconds per token (streams) or per answer (non-streaming), over the windows' whole runs: of the
    path's replica, of HAProxy, and of every process but the load generator ("server"). Unlike tokens/s, these do
    not depend on how busy the machine was."""
    produced = sum(w.produced() for w in windows)
    if not produced:
        return {}
    app = PATH_APPS.get(path)

    def total(match) -> float:
        return sum(sec for w in windows for title, sec in w.cpu_s.items() if title != "all" and match(title))

    out: dict[str, float | None] = {
        "server": round(1e6 * sum(w.cpu_s.get("all", 0.0) for w in windows) / produced, 1),
        "haproxy": round(1e6 * total(lambda t: "haproxy" in t.rsplit("/", 1)[-1]) / produced, 1),
    }
    if app:
        out["replica"] = round(1e6 * total(lambda t: f"ServeReplica:{app}:" in t) / produced, 1)
    return out


# Points whose requests last milliseconds (see the module docstring): measured in `--short-passes` windows.
SHORT_REQUEST_MODES = ("nonstream", "ttft")
SHORT_PASS_WARMUP_S = 0.5


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.runs: list[dict[str, Any]] = []
        self.memory: dict[str, Any] = {}
        self.profiles: dict[str, Any] = {}
        self.timings: dict[str, Any] = {}
        self.notes: list[str] = []

    def log(self, msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # --- measuring ------------------------------------------------------------------------------------

    def window(self, target: loadgen.Target, *, mode: str, c: int, duration: float | None = None,
               open_rate: float | None = None, max_tokens: int | None = None,
               warmup: float | None = None) -> loadgen.Window:
        duration = duration or self.a.duration
        warmup = self.a.warmup if warmup is None else warmup
        stream = mode in ("stream", "ttft")
        mt = max_tokens or (self.a.ttft_tokens if mode == "ttft" else self.a.tokens if stream else self.a.nonstream_tokens)
        before = stack.cpu_ticks()
        if open_rate is not None:
            w = asyncio.run(loadgen.open_loop_window(target, rate=open_rate, duration_s=duration,
                                                     warmup_s=warmup, stream=stream, max_tokens=mt))
        else:
            w = asyncio.run(loadgen.closed_loop_window(target, concurrency=c, duration_s=duration,
                                                       warmup_s=warmup, stream=stream, max_tokens=mt))
        w.cpu_s = stack.cpu_seconds_between(before, stack.cpu_ticks(), exclude={os.getpid()})
        return w

    def summarize(self, variant: str, target: loadgen.Target, mode: str, windows: list[loadgen.Window], *,
                  record: bool = True, open_rate: float | None = None) -> dict[str, Any]:
        counted = "stream" if mode == "ttft" else mode
        res = loadgen.summarize_windows(target.name, windows, mode=counted, loop="open" if open_rate else "closed")
        row = {"variant": variant, **res.to_dict(), "mode": mode}
        if len(windows) > 1:  # each pass on its own, to show the spread the passes average out
            row["passes"] = [
                {k: r[k] for k in ("rps", "tokens_per_s", "ttft_ms")}
                for r in (loadgen.summarize_windows(target.name, [w], mode=counted, loop=row["loop"]).to_dict()
                          for w in windows)]
        row["cpu_us"] = cpu_per_unit(target.name, windows)
        if record:
            self.runs.append(row)
        t = row["ttft_ms"]
        self.log(f"{variant:>14} {target.name:>10} {mode:>9} c={row['concurrency']:<3} req={row['requests']:<5} "
                 f"err={row['errors']:<3} req/s={row['rps']:<7} tok/s={row['tokens_per_s']:<7} "
                 f"TTFT p50/p99={t['p50']}/{t['p99']} E2E p50={row['e2e_ms']['p50']}"
                 + (f" CPU µs/unit {row['cpu_us']}" if row.get("cpu_us") else "")
                 + (f" (passes: tok/s {[p['tokens_per_s'] for p in row['passes']]}, req/s "
                    f"{[p['rps'] for p in row['passes']]})" if "passes" in row else "")
                 + (f"  errors: {row['error_examples']}" if row["errors"] else ""))
        return row

    def measure(self, variant: str, target: loadgen.Target, *, mode: str, c: int, duration: float | None = None,
                record: bool = True, open_rate: float | None = None, max_tokens: int | None = None) -> dict[str, Any]:
        """One window of one path, summarised (and recorded unless `record` is false)."""
        w = self.window(target, mode=mode, c=c, duration=duration, open_rate=open_rate, max_tokens=max_tokens)
        return self.summarize(variant, target, mode, [w], record=record, open_rate=open_rate)

    def point(self, variant: str, targets: dict[str, loadgen.Target], *, mode: str, c: int,
              open_rate: float | None = None) -> None:
        """Every path at one point, in `--passes` passes (`--short-passes` shorter ones for short requests) whose
        order alternates (forward, then backward, ...):
        a path measured right after a heavy one, or while the machine drifts, is not always the same path. Each
        path's figures are over all its windows together."""
        windows: dict[str, list[loadgen.Window]] = {name: [] for name in targets}
        order = list(targets.values())
        passes, duration, warmup = self.a.passes, self.a.duration, None
        if mode in SHORT_REQUEST_MODES and open_rate is None and self.a.short_passes > passes:
            passes = self.a.short_passes
            duration = self.a.duration * self.a.passes / passes
            warmup = min(self.a.warmup, SHORT_PASS_WARMUP_S)
        for n in range(passes):
            for t in (order if n % 2 == 0 else order[::-1]):
                windows[t.name].append(self.window(t, mode=mode, c=c, open_rate=open_rate, duration=duration,
                                                   warmup=warmup))
        for t in order:
            self.summarize(variant, t, mode, windows[t.name], open_rate=open_rate)

    def warm(self, targets: dict[str, loadgen.Target]) -> None:
        for t in targets.values():
            for mode in ("stream", "nonstream"):
                asyncio.run(loadgen.closed_loop(t, concurrency=4, duration_s=0.5, warmup_s=0.0, stream=mode == "stream",
                                                max_tokens=4))

    def run_points(self, variant: str, targets: dict[str, loadgen.Target]) -> None:
        self.warm(targets)
        # Interleave paths at each point, so drift on the shared machine spreads over all of them.
        for c in self.a.concurrency:
            self.point(variant, targets, mode="stream", c=c)
        if self.a.ttft_tokens:
            self.point(variant, targets, mode="ttft", c=1)
        for c in self.a.nonstream_concurrency:
            self.point(variant, targets, mode="nonstream", c=c)
        for rate in self.a.open_loop:
            self.point(variant, targets, mode="stream", c=0, open_rate=rate)

    # --- one Serve variant ----------------------------------------------------------------------------

    def variant(self, variant: str, synth: stack.Synth, nginx: stack.Nginx | None) -> None:
        tmp = self.out / "configs"
        tmp.mkdir(exist_ok=True)
        files = {
            "synth-openai": tmp / "synth-openai.dstack.yml",
            "synth-tgi": tmp / "synth-tgi.dstack.yml",
            "synth-ns": tmp / "synth-ns.dstack.yml",
            "synth-rl": tmp / "synth-rl.dstack.yml",
            "synth-router": tmp / "synth-router.dstack.yml",
        }
        files["synth-router"].write_text(router_service_yaml("synth-router", "synth-router", rate=self.a.rate,
                                                             tokens=self.a.tokens))
        files["synth-openai"].write_text(service_yaml("synth-openai", "synth", "openai", rate=self.a.rate, tokens=self.a.tokens))
        files["synth-tgi"].write_text(service_yaml("synth-tgi", "synth-tgi", "tgi", rate=self.a.rate, tokens=self.a.tokens))
        files["synth-ns"].write_text(service_yaml("synth-ns", "synth-ns", "openai", rate=self.a.rate, tokens=self.a.tokens,
                                                  port="8000"))
        files["synth-rl"].write_text(service_yaml("synth-rl", "synth-rl", "openai", rate=self.a.rate, tokens=self.a.tokens,
                                                  rate_limits=UNREACHABLE_LIMIT))
        with stack.machine_lock(self.a.lock):
            self.log(f"variant {variant}: starting Ray ({stack.VARIANTS[variant] or 'no Serve env vars'})")
            cluster = stack.RayCluster(variant, pin=self.a.pin)
            timings: dict[str, float] = {"ray_start_s": round(cluster.start_s, 1)}
            try:
                for name, path in files.items():
                    timings[f"deploy_{name}_s"] = round(cluster.deploy(path), 1)
                timings["deploy_hand_s"] = round(cluster.deploy_hand(synth.url), 1)
                self.log(f"variant {variant}: deployed {timings}")
                svc_openai = cluster.base_url("synth-openai", "/synth-openai")
                svc_tgi = cluster.base_url("synth-tgi", "/synth-tgi")
                svc_ns = cluster.base_url("synth-ns", "/synth-ns")
                svc_rl = cluster.base_url("synth-rl", "/synth-rl")
                svc_router = cluster.base_url("synth-router", "/synth-router")
                gw = cluster.base_url("ray-dstack-gateway", "/v1")
                hand = cluster.base_url("hand", "/hand")
                targets: dict[str, loadgen.Target] = {}
                if variant == self.a.variants[0] or not self.a.direct_once:
                    targets["direct"] = loadgen.Target("direct", f"{synth.url}/v1/chat/completions", "synth")
                    if nginx is not None:
                        targets["nginx"] = loadgen.Target("nginx", f"{nginx.url}/v1/chat/completions", "synth")
                targets["svc-openai"] = loadgen.Target("svc-openai", f"{svc_openai}/synth-openai/v1/chat/completions", "synth")
                # Right after svc-openai: the two are compared, and points are measured in this order.
                targets["svc-rl"] = loadgen.Target("svc-rl", f"{svc_rl}/synth-rl/v1/chat/completions", "synth-rl")
                targets["gw-openai"] = loadgen.Target("gw-openai", f"{gw}/v1/chat/completions", "synth")
                targets["svc-tgi"] = loadgen.Target("svc-tgi", f"{svc_tgi}/synth-tgi/v1/chat/completions", "synth-tgi")
                targets["svc-ns"] = loadgen.Target("svc-ns", f"{svc_ns}/synth-ns/v1/chat/completions", "synth-ns")
                # Through a router group: /<svc>/v1's path plus SMG's own hop (compare with svc-openai).
                targets["svc-router"] = loadgen.Target("svc-router", f"{svc_router}/synth-router/v1/chat/completions",
                                                       "synth-router")
                targets["hand"] = loadgen.Target("hand", f"{hand}/hand/v1/chat/completions", "synth")
                timings["urls"] = {k: t.url for k, t in targets.items()}  # type: ignore[assignment]
                self.timings[variant] = timings
                mem_before = self.memory_snapshot()
                self.run_points(variant, targets)
                self.memory[variant] = {"after_deploy": mem_before, "after_load": self.memory_snapshot()}
                if self.a.profile:
                    self.profile(variant, targets)
                if self.a.llama and variant == self.a.variants[0]:
                    self.llama(cluster)
            except Exception:
                self.notes.append(f"variant {variant} failed: {traceback.format_exc()[-1500:]}")
                self.log(self.notes[-1])
            finally:
                t0 = time.monotonic()
                cluster.stop()
                self.log(f"variant {variant}: ray stop in {time.monotonic() - t0:.1f}s (lock released)")

    def memory_snapshot(self) -> dict[str, Any]:
        procs = stack.ray_processes()
        pick = {
            "ServiceReplica synth-openai (actor only)": stack.find_pid(procs, "ServeReplica:synth-openai:"),
            "ServiceReplica synth-tgi (actor only)": stack.find_pid(procs, "ServeReplica:synth-tgi:"),
            "OpenAIGateway": stack.find_pid(procs, "ServeReplica:ray-dstack-gateway:"),
            "hand-written Serve replica": stack.find_pid(procs, "ServeReplica:hand:"),
            "Serve ProxyActor": stack.find_pid(procs, "ProxyActor"),
            "Serve controller": stack.find_pid(procs, "ServeController"),
        }
        snap: dict[str, Any] = {k: (stack.rss_mb(pid) if pid else None) for k, pid in pick.items()}
        snap["pids"] = pick
        snap["titles"] = sorted(procs)
        if "haproxy" in procs:
            snap["haproxy (all processes)"] = round(sum(stack.rss_mb(p) for p in procs["haproxy"]), 1)
        sync = round(sum(stack.rss_mb(p) for p in procs.get("v1-map-sync", [])), 1)
        snap["/v1 map sync beside haproxy"] = sync
        gateways = [p for k, pids in procs.items() if "ServeReplica:ray-dstack-gateway:" in k for p in pids]
        if gateways:
            snap["OpenAIGateway"] = round(sum(stack.rss_mb(p) for p in gateways), 1)  # all its replicas
            snap["OpenAIGateway replicas"] = len(gateways)
        r1, r2, g, h = (snap["ServiceReplica synth-openai (actor only)"], snap["ServiceReplica synth-tgi (actor only)"],
                        snap["OpenAIGateway"], snap["hand-written Serve replica"])
        if g is not None:
            g += sync
        if None not in (r1, g, h):
            snap["ray-dstack beyond bare Serve, one openai service + gateway (MB)"] = round(r1 - h + g, 1)
        if None not in (r1, r2, g, h):
            snap["ray-dstack beyond bare Serve, both services + gateway (MB)"] = round((r1 - h) + (r2 - h) + g, 1)
        return snap

    def profile(self, variant: str, targets: dict[str, loadgen.Target]) -> None:
        procs = stack.ray_processes()
        proxy = stack.find_pid(procs, "ProxyActor")
        svc = stack.find_pid(procs, "ServeReplica:synth-openai:")
        gw = stack.find_pid(procs, "ServeReplica:ray-dstack-gateway:")
        tgi = stack.find_pid(procs, "ServeReplica:synth-tgi:")
        hand = stack.find_pid(procs, "ServeReplica:hand:")
        cmax = max(self.a.concurrency)
        ncmax = max(self.a.nonstream_concurrency)
        plan = [("svc-openai", "stream", cmax, {"proxy": proxy, "replica": svc}),
                ("svc-openai", "nonstream", ncmax, {"proxy": proxy, "replica": svc})]
        if variant == self.a.variants[0]:
            plan += [("gw-openai", "stream", cmax, {"proxy": proxy, "gateway": gw, "replica": svc}),
                     ("svc-tgi", "stream", cmax, {"proxy": proxy, "replica": tgi}),
                     ("hand", "nonstream", ncmax, {"proxy": proxy, "replica": hand})]
        dur = int(self.a.profile_s)
        for path, mode, c, pids in plan:
            pids = {k: v for k, v in pids.items() if v}
            tag = f"{variant}-{path}-{mode}-c{c}"
            self.log(f"profiling {tag}: {pids}")
            spy = stack.PySpy(pids, self.out, tag, dur)
            row = self.measure(variant, targets[path], mode=mode, c=c, duration=dur + 1.0, record=False)
            self.profiles[tag] = {"pids": pids, "run_under_profiler": {k: row[k] for k in ("rps", "tokens_per_s", "ttft_ms")},
                                  "profiles": spy.wait()}

    def llama(self, cluster: stack.RayCluster) -> None:
        cfg = stack.REPO / "configs" / "local-chat.dstack.yml"
        token = "bench-llama-token-0123456789"
        self.log("llama.cpp: deploying configs/local-chat.dstack.yml and starting a direct llama.cpp server")
        try:
            t_deploy = cluster.deploy(cfg, "--token", token, timeout=400)
            self.timings.setdefault(cluster.variant, {})["deploy_local_chat_s"] = round(t_deploy, 1)
            direct = stack.Llama(pin=self.a.pin)
        except Exception as exc:  # noqa: BLE001
            self.notes.append(f"llama.cpp part skipped: {exc!r}"[:1500])
            self.log(self.notes[-1])
            return
        try:
            auth = {"authorization": f"Bearer {token}"}
            targets = {
                "llama-direct": loadgen.Target("llama-direct", f"{direct.url}/v1/chat/completions", stack.LLAMA_MODEL),
                "llama-svc": loadgen.Target("llama-svc", f"{cluster.http}/local-chat/v1/chat/completions", stack.LLAMA_MODEL, auth),
                "llama-gw": loadgen.Target("llama-gw", f"{cluster.http}/v1/chat/completions", stack.LLAMA_MODEL, auth),
            }
            for t in targets.values():  # warm the model (first prompt evaluation) on each server
                asyncio.run(loadgen.closed_loop(t, concurrency=1, duration_s=0.5, warmup_s=0, stream=True, max_tokens=4))
            for c in self.a.llama_concurrency:
                for t in targets.values():
                    self.measure(cluster.variant, t, mode="stream", c=c, duration=self.a.llama_duration,
                                 max_tokens=self.a.llama_tokens)
        finally:
            direct.stop()

    # --- the whole run --------------------------------------------------------------------------------

    def run(self) -> int:
        started = time.time()
        synth = stack.Synth(rate=self.a.rate, tokens=self.a.tokens, pin=self.a.pin)
        nginx = None
        try:
            try:
                nginx = stack.Nginx(synth.port, pin=self.a.pin)
            except Exception as exc:  # noqa: BLE001
                self.notes.append(f"nginx path skipped: {exc}")
                self.log(self.notes[-1])
            for variant in self.a.variants:
                self.variant(variant, synth, nginx)
        finally:
            if nginx:
                nginx.stop()
            synth.stop()
        self.write(time.time() - started)
        return 0

    def write(self, elapsed: float) -> None:
        a = self.a
        variants = [v for v in a.variants if any(r["variant"] == v for r in self.runs)]
        cmax = max(a.concurrency)
        ncmax = max(a.nonstream_concurrency)
        ratio_md, ratio_rows = report.ratios(self.runs, variants=variants, concurrency=a.concurrency,
                                             nonstream_c=ncmax, stream_c_max=cmax)
        variant_md = report.variant_table(self.runs, variants=variants, nonstream_c=ncmax, stream_c_max=cmax)
        png = report.plot(self.runs, self.out / "latency.png", variants=variants)
        doc = {
            "command": "python -m bench " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
            "when": dt.datetime.now().isoformat(timespec="seconds"),
            "elapsed_s": round(elapsed, 1),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "pinning": "server side (backend, nginx, Ray) on CPU 0, load generator on CPU 1" if a.pin else "none"},
            "settings": {k: v for k, v in vars(a).items()},
            "runs": self.runs, "ratios": ratio_rows, "memory_mb": self.memory, "profiles": self.profiles,
            "timings": self.timings, "notes": self.notes,
        }
        (self.out / "results.json").write_text(json.dumps(doc, indent=1, default=str))
        md = [f"# bench results ({doc['when']}, {doc['command']}, {doc['elapsed_s']} s)", "",
              f"Machine: {doc['machine']}", "",
              f"Backend: synthetic, {a.tokens} tokens per stream at {a.rate} tokens/s per stream; non-streaming "
              f"answers ({a.nonstream_tokens} tokens) are immediate. Latencies in ms.", "",
              "## All runs", "", report.results_table(self.runs), "",
              "## Ratios vs direct (TTFT added, tokens/s) and vs the hand-written Serve passthrough (non-streaming req/s)",
              "", ratio_md, "",
              "## `/v1` against its goals ([2.4]), same run", "", report.v1_goals(
                  self.runs, variants=variants, stream_c_max=cmax, nonstream_concurrency=a.nonstream_concurrency), "",
              "## CPU per unit of work", "", report.cpu_table(self.runs), "",
              "## Pairs of paths, same run", "", report.pairs(self.runs, variants=variants,
                                                                               concurrency=a.concurrency), "",
              "## Serve options vs the default data path (same run)", "", variant_md, "",
              "## As shipped: ray-dstack vs a hand-written Serve passthrough on Serve's defaults (non-streaming)", "",
              report.as_shipped(self.runs, nonstream_concurrency=a.nonstream_concurrency), "",
              "## Memory (RSS, MB)", "", "```", json.dumps({k: {kk: {x: y for x, y in vv.items() if x not in ("titles", "pids")}
                                                                 for kk, vv in v.items()} for k, v in self.memory.items()}, indent=1), "```", ""]
        if self.profiles:
            md += ["## Profiles (py-spy, share of samples)", ""]
            for tag, p in self.profiles.items():
                md.append(f"### {tag} (under profiler: {p['run_under_profiler']})")
                for who, prof in p["profiles"].items():
                    md.append(f"- **{who}** busy={prof.get('busy_fraction')} buckets={prof.get('buckets_pct')}")
                    for f, pct in (prof.get("top_self") or [])[:8]:
                        md.append(f"    - self {pct}% {f}")
                md.append("")
        if self.notes:
            md += ["## Notes", ""] + [f"- {n}" for n in self.notes]
        (self.out / "results.md").write_text("\n".join(md) + "\n")
        print("\n" + report.results_table(self.runs))
        print("\n" + ratio_md)
        print("\n" + report.v1_goals(self.runs, variants=variants, stream_c_max=cmax,
                                      nonstream_concurrency=a.nonstream_concurrency))
        print("\n" + report.pairs(self.runs, variants=variants, concurrency=a.concurrency))
        print("\n" + variant_md)
        for v, m in self.memory.items():
            print(f"\nmemory [{v}] after load:", {k: x for k, x in m["after_load"].items() if k not in ("titles", "pids")})
        if self.notes:
            print("\nnotes:", *self.notes, sep="\n  ")
        print(f"\nwrote {self.out / 'results.json'}, {self.out / 'results.md'}" + (f", {png}" if png else ""))


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~6 min: ray-dstack variant, c=1,64, 4 s windows, no profiles/llama")
    ap.add_argument("--sweep", action="store_true", help="streaming concurrency 1,2,4,8,16,32,64,128")
    ap.add_argument("--concurrency", type=ints, default=None, help="streaming concurrency levels (default 1,16,64)")
    ap.add_argument("--nonstream-concurrency", type=ints, default=None, help="non-streaming concurrency (default 1,64)")
    ap.add_argument("--open-loop", type=floats, default=[], metavar="RPS,...", help="also run open-loop streams at these rates")
    ap.add_argument("--duration", type=float, default=None, help="measurement window per point, s (default 6; quick 4)")
    ap.add_argument("--passes", type=int, default=2,
                    help="windows per path and point, the paths' order reversed in every other pass (default 2)")
    ap.add_argument("--short-passes", type=int, default=6,
                    help="windows per path at the non-streaming and TTFT points, sharing the time of --passes "
                         "windows (default 6)")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up before each window, s (excluded)")
    ap.add_argument("--variants", default=None, help="Serve variants: " + ",".join(stack.VARIANTS) + " (default all; quick: default)")
    ap.add_argument("--rate", type=float, default=50.0, help="backend tokens/s per stream")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    ap.add_argument("--ttft-tokens", type=int, default=2,
                    help="a TTFT point: one client sending back-to-back streams of this many tokens, so TTFT at 1 "
                         "stream rests on hundreds of samples (a c=1 window of full streams holds ~5); 0: none")
    ap.add_argument("--nonstream-tokens", type=int, default=16, help="tokens per non-streaming answer (immediate)")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None, help="py-spy profiles (default: on unless --quick)")
    ap.add_argument("--profile-s", type=float, default=6.0)
    ap.add_argument("--llama", action=argparse.BooleanOptionalAction, default=None, help="llama.cpp demo-model paths (default: on unless --quick)")
    ap.add_argument("--llama-concurrency", type=ints, default=[1, 2])
    ap.add_argument("--llama-duration", type=float, default=12.0)
    ap.add_argument("--llama-tokens", type=int, default=32)
    ap.add_argument("--direct-once", action=argparse.BooleanOptionalAction, default=True,
                    help="measure direct and nginx only with the first variant (default on)")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True, help="taskset: server CPU 0, load generator CPU 1")
    ap.add_argument("--lock", default="/tmp/ray-e2e.lock", help="machine-wide Ray lock taken around each cluster ('' for none)")
    ap.add_argument("--out", default=None, help="output directory (default bench/results or bench/results-quick)")
    a = ap.parse_args(argv)
    q = a.quick
    if a.concurrency is None:
        a.concurrency = [1, 2, 4, 8, 16, 32, 64, 128] if a.sweep else ([1, 64] if q else [1, 16, 64])
    if a.nonstream_concurrency is None:
        a.nonstream_concurrency = [64] if q else [1, 64]
    a.duration = a.duration or (4.0 if q else 6.0)
    a.variants = (a.variants.split(",") if a.variants else (["ray-dstack"] if q else list(stack.VARIANTS)))
    for v in a.variants:
        if v not in stack.VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(stack.VARIANTS)}")
    a.profile = (not q) if a.profile is None else a.profile
    a.llama = (not q) if a.llama is None else a.llama
    a.out = a.out or str(stack.REPO / "bench" / ("results-quick" if q else "results"))
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pin and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, stack.CLIENT_CPUS)
    try:
        import uvloop  # noqa: F401 - the load generator's own loop cost stays low
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
