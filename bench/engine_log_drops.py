"""The engine path's log (ray_dstack/serve/ingress/engine_log.py), side by side with no log, outside Ray.

Ray's haproxy with the engine path, `bench.synth` inside a network namespace of its own, the log's reader in
this process (its thread, as in a replica), `ab -k` (apache2-utils) as the client; haproxy and the engine on
CPU 1, `ab` on CPU 0. Per round and per mode, in turn:

- non-streaming: N chats at concurrency C; the lines the reader got against N, and HAProxy's DroppedLogs;
- streaming: S streams of 512 tokens at 1,000 tokens/s, C at a time; HAProxy's CPU per token.

Modes: `netns` (the reader's socket made in the engine's namespace, its queue raised, as replicas make it),
`host` (made in the host's namespace: `net.unix.max_dgram_qlen`, 10 by default) and `off` (no log). As root:

    python -m bench.engine_log_drops [--answers 20000] [--streams 256] [--concurrency 64] [--rounds 2]

(bench/RESULTS.md, step 10)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ray_dstack.serve.ingress import engine_path, haproxy_v1, v1_routes
from ray_dstack.serve.ingress.engine_log import EngineLog
from ray_dstack.serve.ingress.engine_path import EngineRoute, EngineServer

REPO = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"
TOKENS = 512
PREAMBLE = """\
global
    stats socket {socket} mode 666 level admin
defaults
    mode http
    option httplog
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend http_frontend
    bind 127.0.0.1:{port}
    acl is_svc path_beg /svc/
    acl is_svc path /svc
    use_backend svc if is_svc
backend svc
    server a 127.0.0.1:1
"""


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ab(port: int, body: Path, n: int, c: int, *, keep_alive: bool = True) -> int:
    """Sends n requests; returns how many failed or were not 2xx. (ab reads a chunked body only when the
    connection closes: streams go without keep-alive, as HTTP/1.0, which HAProxy answers unchunked.)"""
    out = subprocess.run(["taskset", "-c", "0", "ab", *(["-k"] if keep_alive else []), "-q", "-c", str(c), "-n", str(n), "-p", str(body),
                          "-T", "application/json", "-H", f"Authorization: Bearer {TOKEN}",
                          f"http://127.0.0.1:{port}/svc/v1/chat/completions"], capture_output=True, text=True)
    if "Complete requests" not in out.stdout:
        raise RuntimeError(f"ab: {out.stderr.strip()[-300:]}")
    text = out.stdout
    bad = sum(int(line.split(":")[1].split()[0]) for line in text.splitlines()
              if line.startswith(("Failed requests:", "Non-2xx responses:")))
    # ab takes a body of another length than the first one's for a failure: every stream's differs (its ids).
    length = re.search(r"\(Connect: \d+, Receive: \d+, Length: (\d+)", text)
    return bad - (int(length.group(1)) if length else 0)


def run_mode(mode: str, tmp: Path, ns: str, args) -> dict:
    entries = tmp / mode / engine_path.ENGINE_DIR_NAME
    entries.mkdir(parents=True)
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    entry = engine_path.Entry(server="a", prefix="/svc", model="synth", token_sha256=digest, upstream_prefix="/v1",
                              netns=ns, port=8000)
    engine_path.entry_path(entries, "a").write_text(entry.to_json())
    route = EngineRoute(backend="svc", prefix="/svc", model="synth", token_sha256=digest,
                        servers=(EngineServer("a", ns, 8000),))
    port = 18080
    admin_path = tmp / mode / "admin.sock"
    log_socket = None if mode == "off" else str(engine_path.log_socket_path(entries))
    config = engine_path.inject(PREAMBLE.format(socket=admin_path, port=port), [route], log_socket=log_socket)
    (tmp / mode / "haproxy.cfg").write_text(config.replace(" track svc/a", ""))
    cfg = str(tmp / mode / "haproxy.cfg")
    hap = subprocess.Popen(["taskset", "-c", "1", haproxy_v1.real_binary(), "-db", "-f", cfg],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    admin = v1_routes.HAProxyAdmin(str(admin_path))
    while not admin_path.exists() or admin.pid() != hap.pid:
        time.sleep(0.05)
    lines = [0]
    reader = None
    if mode != "off":
        reader = EngineLog(entries, lambda line, model: lines.__setitem__(0, lines[0] + 1),
                           netns=f"/run/netns/{ns}" if mode == "netns" else None)
        assert reader.lead()
    try:
        plain, stream = tmp / "plain.json", tmp / "stream.json"
        chat = {"model": "synth", "messages": [{"role": "user", "content": "hi"}]}
        plain.write_text(json.dumps({**chat, "max_tokens": 16}))
        stream.write_text(json.dumps({**chat, "max_tokens": TOKENS, "stream": True}))
        failed = ab(port, plain, args.answers, args.concurrency)
        settled = time.monotonic() + 5  # the reader catches up with its queue
        while reader is not None and lines[0] < args.answers and time.monotonic() < settled:
            time.sleep(0.05)
        read = lines[0]
        dropped = next((line.split()[1] for line in admin.command("show info").splitlines()
                        if line.startswith("DroppedLogs:")), "?")
        before = cpu_s(hap.pid)
        started = time.monotonic()
        failed_streams = ab(port, stream, args.streams, args.concurrency, keep_alive=False)
        took = time.monotonic() - started
        per_token_us = (cpu_s(hap.pid) - before) / (args.streams * TOKENS) * 1e6
    finally:
        if reader is not None:
            reader.close()
        hap.terminate()
        hap.wait(10)
    return {"lines": read if reader is not None else None, "dropped": dropped, "haproxy_us_per_token": per_token_us,
            "tokens_per_s": args.streams * TOKENS / took, "failed": failed + failed_streams}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.engine_log_drops", description=__doc__.split("\n\n")[0])
    ap.add_argument("--answers", type=int, default=20000)
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default="off,netns,host")
    args = ap.parse_args()
    ns = f"rdx-bench-log-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
    engine = subprocess.Popen(["taskset", "-c", "1", "ip", "netns", "exec", ns, sys.executable, "-m", "bench.synth",
                               "--port", "8000", "--rate", "1000", "--tokens", str(TOKENS), "--model", "synth"],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = time.monotonic() + 30
        probe = ["ip", "netns", "exec", ns, sys.executable, "-c",
                 "import socket; socket.create_connection(('127.0.0.1', 8000), 1)"]
        while subprocess.run(probe, capture_output=True).returncode != 0:
            assert time.monotonic() < ready, "bench.synth did not start"
            time.sleep(0.1)
        for r in range(args.rounds):
            for mode in args.modes.split(","):
                with tempfile.TemporaryDirectory() as tmp:
                    got = run_mode(mode, Path(tmp), ns, args)
                read = got["lines"]
                lines = "-" if read is None else f"{read}/{args.answers} ({read / args.answers:.3f})"
                print(f"round {r + 1} {mode:5}: lines read {lines}, DroppedLogs {got['dropped']}; streaming "
                      f"{got['tokens_per_s']:,.0f} tokens/s, HAProxy {got['haproxy_us_per_token']:.2f} µs per token; "
                      f"failed or not 2xx: {got['failed']}", flush=True)
    finally:
        engine.terminate()
        engine.wait(10)
        subprocess.run(["ip", "netns", "delete", ns])


if __name__ == "__main__":
    main()
