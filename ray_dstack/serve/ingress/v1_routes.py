"""The model → service table of `/v1`, from the gateway to every node's HAProxy (ray_dstack/serve/ingress/haproxy_v1.py).

The gateway deployment receives the routing table with every `deploy`/`delete` (its user_config) and publishes
the part HAProxy needs, `{model: [route prefix, application]}`, as one JSON value in Ray's internal KV
(`publish`). Beside each node's haproxy runs `python -m ray_dstack.serve.ingress.v1_routes` (started by the wrapper,
ended with it, or once a reload's newer haproxy owns the admin socket): it reads that value once a second and,
when the map changes, replaces the map in the running haproxy through its admin socket in one transaction
(`prepare map` / `add map` / `commit map`: no reload, no request sees half a map).

A haproxy's map holds only the models whose service has its backend in that haproxy's configuration, under the
same application name (`routable`): a service still deploying, one deleted, or a prefix taken over by another
application is left out. A model missing from the map is always correct, only slower: its requests keep their
path and the gateway routes them. So names HAProxy's map syntax cannot carry (spaces, control characters) are
left out too, and a table that could not be read changes nothing. The last table read is kept in a file beside
the map, from which the wrapper builds the map the node's next haproxy starts with.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray_dstack.spec import KV_NAMESPACE
from ray_dstack.serve.ingress.haproxy_v1 import (
    SAFE_NAME,
    admin_command,
    TABLE_FILE_NAME,
    decode_table,
    encode_table,
    read_prefix_tables,
    routable,
    routing_policies,
    write_atomically,
)
from ray_dstack.serve.ingress import prefix_affinity

log = logging.getLogger("ray.serve")

KV_KEY = b"v1-routes"
POLL_S = 1.0
RESTORE_WAIT_S = 10.0  # how long the map sync waits, polling fast, for its haproxy to answer before restoring
ADMIN_TIMEOUT_S = 5.0


def map_table(routes: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """The gateway's routing table → what HAProxy's maps are made from: model → [route prefix, application], and
    the service's `routing` policy third when it is not Serve's own least-connections (prefix_affinity.py)."""
    table: dict[str, list[str]] = {}
    for model, route in routes.items():
        app = str(route.get("app", ""))
        prefix = (route.get("route_prefix") or f"/{app}").rstrip("/")
        if SAFE_NAME.fullmatch(model) and SAFE_NAME.fullmatch(prefix) and prefix.startswith("/") and app:
            table[model] = [prefix, app]
            if route.get("routing") == prefix_affinity.POLICY:
                table[model].append(prefix_affinity.POLICY)
    return table


def publish(routes: dict[str, dict[str, Any]]) -> None:
    """In a gateway replica: make `routes` the table every node's HAProxy routes `/v1` by (best effort)."""
    try:
        import ray
        from ray.experimental import internal_kv

        if not ray.is_initialized():
            return  # not in a Ray worker (unit tests)
        internal_kv._internal_kv_put(KV_KEY, encode_table(map_table(routes)), overwrite=True, namespace=KV_NAMESPACE)
    except Exception as exc:  # noqa: BLE001 - /v1 keeps working through the gateway
        log.warning("gateway: could not publish the /v1 routing table for HAProxy: %r", exc)


def info_number(show_info: str, field: str) -> int | None:
    """A numeric field (`Pid`, `DroppedLogs`, ...) of an answer to `show info`."""
    found = re.search(rf"^{re.escape(field)}: (\d+)", show_info, re.MULTILINE)
    return int(found.group(1)) if found else None


def info_pid(show_info: str) -> int | None:
    """The `Pid:` line of an answer to `show info`."""
    return info_number(show_info, "Pid")


class HAProxyAdmin:
    """Commands on HAProxy's admin socket, one connection per command (its non-interactive mode)."""

    def __init__(self, path: str, timeout: float = ADMIN_TIMEOUT_S) -> None:
        self.path = path
        self.timeout = timeout

    def command(self, line: str) -> str:
        return admin_command(self.path, line, self.timeout)

    def pid(self) -> int | None:
        """The pid of the haproxy answering on the socket (during a reload, the old one until the new takes over)."""
        return info_pid(self.command("show info"))

    def replace_map(self, map_path: str, entries: dict[str, str]) -> None:
        """The map's whole content becomes `entries`, atomically (HAProxy ≥ 2.4's versioned map updates)."""
        answer = self.command(f"prepare map {map_path}")
        found = re.search(r"New version created: (\d+)", answer)
        if not found:
            raise RuntimeError(f"prepare map: {answer.strip()!r}")
        version = found.group(1)
        for model, prefix in sorted(entries.items()):
            answer = self.command(f"add map @{version} {map_path} {model} {prefix}")
            if answer.strip():
                raise RuntimeError(f"add map {model}: {answer.strip()!r}")
        answer = self.command(f"commit map @{version} {map_path}")
        if answer.strip():
            raise RuntimeError(f"commit map: {answer.strip()!r}")


class Superseded(Exception):
    """Another haproxy answers on the socket this process's haproxy owned: a reload replaced it for good."""


class MapSync:
    """Keeps one haproxy's map equal to the published table, limited to the services that haproxy has a backend
    for (`routes`: route prefix → application, from its configuration); `step` is one poll."""

    def __init__(self, read_table: Callable[[], dict[str, list[str]] | None], admin: HAProxyAdmin, map_path: str,
                 haproxy_pid: int, routes: dict[str, str], backends: dict[str, str] | None = None) -> None:
        """`backends`: route prefix → backend, when the configuration has prefix_affinity.py's rules (their map,
        beside `map_path`, is then kept too)."""
        self.read_table = read_table
        self.admin = admin
        self.map_path = map_path
        self.table_path = os.path.join(os.path.dirname(map_path), TABLE_FILE_NAME)
        self.haproxy_pid = haproxy_pid
        self.routes = routes
        self.owned = False
        self.pushed: dict[str, str] | None = None
        self.saved: dict[str, list[str]] | None = None
        self.backends = backends or {}
        self.prefix_map_path = os.path.join(os.path.dirname(map_path), prefix_affinity.MAP_FILE_NAME)
        self.prefix_pushed: dict[str, str] | None = None
        self.tables_path = os.path.join(os.path.dirname(map_path), prefix_affinity.table_state_file(haproxy_pid))
        self.tables_restored = not self.backends

    def step(self) -> bool:
        """Push the map if it changed since the last push; True when haproxy's map is now the table's. Raises
        Superseded once a newer haproxy answers on the socket this one owned."""
        pid = self.admin.pid()
        if pid != self.haproxy_pid:
            if self.owned:
                raise Superseded(f"haproxy {pid} answers on {self.admin.path}")
            return False  # during a reload the socket is the old haproxy's until this one takes over
        self.owned = True
        if not self.tables_restored:
            self.restore_prefix_tables()
        table = self.read_table()
        if table is None:
            return self.pushed is not None
        if table != self.saved:  # the next haproxy of this node starts with this table (haproxy_v1.prepare)
            write_atomically(self.table_path, encode_table(table))
            self.saved = table
        entries = routable(table, self.routes)
        if entries != self.pushed:
            self.admin.replace_map(self.map_path, entries)
            if self.pushed is not None or entries:
                log.info("ray-dstack: /v1 map of haproxy %d: %d models", self.haproxy_pid, len(entries))
            self.pushed = entries
        if self.backends:
            affinity = prefix_affinity.map_entries(routing_policies(table, self.routes), self.backends)
            if affinity != self.prefix_pushed:
                self.admin.replace_map(self.prefix_map_path, affinity)
                log.info("ray-dstack: prefix affinity in haproxy %d for %s", self.haproxy_pid,
                         ", ".join(sorted(affinity.values())) or "no service")
                self.prefix_pushed = affinity
        return True

    def restore_prefix_tables(self) -> None:
        """The prefix tables the previous haproxy had (haproxy_v1.save_prefix_tables), into this one, once."""
        ours = set(self.backends.values())  # each backend holds its own table
        restored = 0
        for table, rows in read_prefix_tables(self.tables_path).items():
            if table not in ours:
                continue
            # Not over a key this haproxy placed already: its newest cache is there.
            placed = prefix_affinity.table_rows(self.admin.command(f"show table {table}"))
            rows = {k: v for k, v in rows.items() if k not in placed}
            for line in prefix_affinity.set_table_commands(table, rows):
                answer = self.admin.command(line)
                if answer.strip():  # not worth holding the maps back for: these prefixes are placed again
                    log.warning("ray-dstack: set table %s in haproxy %d: %s", table, self.haproxy_pid,
                                answer.strip()[:200])
                    break
            else:
                restored += len(rows)
        if restored:
            log.info("ray-dstack: %d prefixes of the last haproxy restored in haproxy %d", restored, self.haproxy_pid)
        self.tables_restored = True  # once: an OSError (haproxy going away) before this line tries again
        with contextlib.suppress(OSError):
            os.unlink(self.tables_path)

    def restore_when_owned(self, timeout: float = RESTORE_WAIT_S) -> None:
        """Restore the tables as soon as this haproxy answers (before anything slower, such as connecting to the
        cluster): until then it places every prefix afresh."""
        deadline = time.monotonic() + timeout
        while not self.tables_restored and time.monotonic() < deadline:
            try:
                if self.admin.pid() == self.haproxy_pid:
                    self.owned = True
                    self.restore_prefix_tables()
                    return
            except OSError:
                pass  # its socket not bound yet
            time.sleep(0.05)


def gcs_address() -> str:
    """This node's cluster: `$RAY_ADDRESS` when it is host:port, else the file `ray start` writes on every node."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and "://" not in env and env != "auto":
        return env
    return Path("/tmp/ray/ray_current_cluster").read_text().strip()


def kv_reader(address: str) -> Callable[[], dict[str, list[str]] | None]:
    from ray._raylet import GcsClient

    gcs = GcsClient(address=address)

    def read() -> dict[str, list[str]] | None:
        try:
            return decode_table(gcs.internal_kv_get(KV_KEY, KV_NAMESPACE, timeout=5))
        except Exception as exc:  # noqa: BLE001 - the GCS restarting: keep the map, try again
            log.debug("v1 routes: %r", exc)
            return None

    return read


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ray_dstack.serve.ingress.v1_routes")
    parser.add_argument("--socket", required=True, help="haproxy's admin socket")
    parser.add_argument("--map", required=True, help="the map file the rules name")
    parser.add_argument("--haproxy-pid", type=int, required=True, help="the haproxy this process serves")
    parser.add_argument("--routes", required=True, help="JSON: route prefix → application, of that haproxy")
    parser.add_argument("--backends", default="{}",
                        help="JSON: route prefix → backend, when that haproxy has the prefix-affinity rules")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    sync = MapSync(lambda: None, HAProxyAdmin(args.socket), args.map, args.haproxy_pid, json.loads(args.routes),
                   json.loads(args.backends))
    sync.restore_when_owned()
    try:
        sync.read_table = kv_reader(gcs_address())
    except Exception as exc:  # noqa: BLE001 - no cluster here: the map haproxy loaded stays as it is
        log.warning("ray-dstack: /v1 map of haproxy %d not kept current (no Ray cluster found: %r)",
                    args.haproxy_pid, exc)
        sys.exit(1)
    errors = 0
    while os.getppid() == args.haproxy_pid:  # ends with its haproxy (also PR_SET_PDEATHSIG)
        try:
            sync.step()
            errors = 0
        except Superseded:
            return  # a reload's newer haproxy (and its own sync) took over
        except (OSError, RuntimeError) as exc:  # the socket not up yet, or haproxy going away
            errors += 1
            if errors in (1, 30):
                log.warning("ray-dstack: /v1 map of haproxy %d not updated: %r", args.haproxy_pid, exc)
        time.sleep(POLL_S)  # the KV has no change notification: poll it


if __name__ == "__main__":
    run()
