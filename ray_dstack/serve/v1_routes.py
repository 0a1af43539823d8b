"""The model → service table of `/v1`, from the gateway to every node's HAProxy (ray_dstack/serve/haproxy_v1.py).

The gateway deployment receives the routing table with every `deploy`/`delete` (its user_config) and publishes
the part HAProxy needs, `{model: "/<service route prefix>"}`, as one JSON value in Ray's internal KV
(`publish`). Beside each node's haproxy runs `python -m ray_dstack.serve.v1_routes` (started by the wrapper,
ended with it): it reads that value once a second and, when it changed, replaces the map in the running
haproxy through its admin socket in one transaction (`prepare map` / `add map` / `commit map`: no reload, no
request sees half a map) and rewrites the map file, which the next haproxy of the node loads at start.

A model missing from the map is always correct, only slower: its requests keep their path and the gateway
routes them. So names HAProxy's map syntax cannot carry (spaces, control characters) are left out, and a
table that could not be read changes nothing. The window after a deploy is covered too: a request rewritten
to a service whose route HAProxy does not know yet reaches the gateway (mounted at "/"), which reads the
original path from the `x-ray-dstack-v1` header.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray_dstack.serve.container import KV_NAMESPACE

log = logging.getLogger("ray.serve")

KV_KEY = b"v1-routes"
POLL_S = 1.0
ADMIN_TIMEOUT_S = 5.0
_SAFE = re.compile(r"[A-Za-z0-9._:/@+=-]+")


def map_table(routes: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The gateway's routing table → what HAProxy's map holds: model → the service's route prefix."""
    table: dict[str, str] = {}
    for model, route in routes.items():
        prefix = route.get("route_prefix") or f"/{route.get('app', '')}"
        if _SAFE.fullmatch(model) and _SAFE.fullmatch(prefix) and prefix.startswith("/") and prefix != "/":
            table[model] = prefix.rstrip("/")
    return table


def encode(table: dict[str, str]) -> bytes:
    return json.dumps(table, sort_keys=True, separators=(",", ":")).encode()


def decode(value: bytes | None) -> dict[str, str] | None:
    """The published table, or None when there is none or it is not one (then nothing changes)."""
    if not value:
        return None
    try:
        table = json.loads(value)
    except ValueError:
        return None
    if not isinstance(table, dict):
        return None
    return {k: v for k, v in table.items() if isinstance(k, str) and isinstance(v, str)
            and _SAFE.fullmatch(k) and _SAFE.fullmatch(v) and v.startswith("/")}


def publish(routes: dict[str, dict[str, Any]]) -> None:
    """In a gateway replica: make `routes` the table every node's HAProxy routes `/v1` by (best effort)."""
    try:
        import ray
        from ray.experimental import internal_kv

        if not ray.is_initialized():
            return  # not in a Ray worker (unit tests)
        internal_kv._internal_kv_put(KV_KEY, encode(map_table(routes)), overwrite=True, namespace=KV_NAMESPACE)
    except Exception as exc:  # noqa: BLE001 - /v1 keeps working through the gateway
        log.warning("gateway: could not publish the /v1 routing table for HAProxy: %r", exc)


class HAProxyAdmin:
    """Commands on HAProxy's admin socket, one connection per command (its non-interactive mode)."""

    def __init__(self, path: str, timeout: float = ADMIN_TIMEOUT_S) -> None:
        self.path = path
        self.timeout = timeout

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def pid(self) -> int | None:
        """The pid of the haproxy answering on the socket (during a reload, the old one until the new takes over)."""
        found = re.search(r"^Pid: (\d+)", self.command("show info"), re.MULTILINE)
        return int(found.group(1)) if found else None

    def replace_map(self, map_path: str, table: dict[str, str]) -> None:
        """The map's whole content becomes `table`, atomically (HAProxy ≥ 2.4's versioned map updates)."""
        answer = self.command(f"prepare map {map_path}")
        found = re.search(r"New version created: (\d+)", answer)
        if not found:
            raise RuntimeError(f"prepare map: {answer.strip()!r}")
        version = found.group(1)
        for model, prefix in sorted(table.items()):
            answer = self.command(f"add map @{version} {map_path} {model} {prefix}")
            if answer.strip():
                raise RuntimeError(f"add map {model}: {answer.strip()!r}")
        answer = self.command(f"commit map @{version} {map_path}")
        if answer.strip():
            raise RuntimeError(f"commit map: {answer.strip()!r}")


def write_map_file(map_path: str, table: dict[str, str]) -> None:
    text = "".join(f"{model} {prefix}\n" for model, prefix in sorted(table.items()))
    directory = os.path.dirname(map_path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".ray-dstack-v1.", dir=directory)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, map_path)


class MapSync:
    """Keeps one haproxy's map equal to the published table; `step` is one poll."""

    def __init__(self, read_table: Callable[[], dict[str, str] | None], admin: HAProxyAdmin, map_path: str,
                 haproxy_pid: int) -> None:
        self.read_table = read_table
        self.admin = admin
        self.map_path = map_path
        self.haproxy_pid = haproxy_pid
        self.pushed: dict[str, str] | None = None

    def step(self) -> bool:
        """Push the table if it changed since the last push; True when haproxy's map is now the table."""
        table = self.read_table()
        if table is None:
            return self.pushed is not None
        if table == self.pushed:
            return True
        # Only this process's own haproxy: during a reload the socket may still be answered by the old one.
        if self.admin.pid() != self.haproxy_pid:
            return False
        self.admin.replace_map(self.map_path, table)
        write_map_file(self.map_path, table)
        if self.pushed is not None or table:
            log.info("ray-dstack: /v1 map of haproxy %d: %d models", self.haproxy_pid, len(table))
        self.pushed = table
        return True


def gcs_address() -> str:
    """This node's cluster: `$RAY_ADDRESS` when it is host:port, else the file `ray start` writes on every node."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and "://" not in env and env != "auto":
        return env
    return Path("/tmp/ray/ray_current_cluster").read_text().strip()


def kv_reader(address: str) -> Callable[[], dict[str, str] | None]:
    from ray._raylet import GcsClient

    gcs = GcsClient(address=address)

    def read() -> dict[str, str] | None:
        try:
            return decode(gcs.internal_kv_get(KV_KEY, KV_NAMESPACE, timeout=5))
        except Exception as exc:  # noqa: BLE001 - the GCS restarting: keep the map, try again
            log.debug("v1 routes: %r", exc)
            return None

    return read


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ray_dstack.serve.v1_routes")
    parser.add_argument("--socket", required=True, help="haproxy's admin socket")
    parser.add_argument("--map", required=True, help="the map file the rules name")
    parser.add_argument("--haproxy-pid", type=int, required=True, help="the haproxy this process serves")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        read_table = kv_reader(gcs_address())
    except Exception as exc:  # noqa: BLE001 - no cluster here: the map file haproxy loaded stays as it is
        log.warning("ray-dstack: /v1 map of haproxy %d not kept current (no Ray cluster found: %r)",
                    args.haproxy_pid, exc)
        sys.exit(1)
    sync = MapSync(read_table, HAProxyAdmin(args.socket), args.map, args.haproxy_pid)
    errors = 0
    while os.getppid() == args.haproxy_pid:  # ends with its haproxy (also PR_SET_PDEATHSIG)
        try:
            sync.step()
            errors = 0
        except (OSError, RuntimeError) as exc:  # the socket not up yet, or haproxy going away
            errors += 1
            if errors in (1, 30):
                log.warning("ray-dstack: /v1 map of haproxy %d not updated: %r", args.haproxy_pid, exc)
        time.sleep(POLL_S)  # the KV has no change notification: poll it


if __name__ == "__main__":
    run()
