"""The engine path: HAProxy sends a passthrough request straight to the engine, with no Python in between.

[3.3]'s second design (bench/RESULTS.md, "Relay tokens at engine speed"). A `format: openai` service's replica
relays most requests untouched: it checks the token, checks `model`, removes `Authorization`, strips the route
prefix, and copies bytes both ways. For those requests the replica's Python (Serve's uvicorn, its direct-ingress
wrapper, the relay) costs ~1.1 ms of CPU per answer, where HAProxy alone costs ~0.05 (measured: bench/RESULTS.md).
So this module writes HAProxy rules that send exactly those requests to the engine itself:

- **Only what the replica would pass through unchanged** takes the engine path: `POST` to the service's
  `/v1/chat/completions` or `/v1/completions` (or `/v1/...` by model, rewritten by haproxy_v1.py before these
  rules), one `Authorization` header, `Bearer ` + a token whose SHA-256 is the service's (HAProxy's `sha2`
  converter: the token itself is in no configuration), and a body whose `model` is the service's model.
  Everything else (a wrong or missing token, another model, `GET /v1/models`, a body too large to buffer, a
  route with a longer prefix under this one, a query string, a body without Content-Length or larger than
  HAProxy's buffer, a second `model` key or a key spelled with escaped letters, a token with bytes outside
  printable ASCII) goes to Serve's backend as before, and the replica gives the answer it gives today. The
  rules only ever *narrow* what skips the replica: where HAProxy cannot decide as the replica would, the
  request takes the replica path.
- **What differs, knowingly**: a body that is not valid JSON but whose `model` HAProxy's `json_query` reads
  reaches the engine, which answers its own 400 (the replica answers an OpenAI-shaped 400); an engine's error
  body is relayed as the engine wrote it (its status mapped as the replica maps it: 5xx but 503 → 502); a
  stream the engine cuts ends without the replica's closing error event; response headers are the engine's.
  The engine gets the request headers the replica forwards (`FORWARDED_HEADERS`), `Accept-Encoding:
  identity`, never `Authorization`.
- **The token cannot be added at run time.** Serve opens HAProxy's admin socket to every user (mode 666), and
  its runtime API can add patterns to any ACL: a configuration with the engine path sets it to 600.
- **The engine backend follows Serve's.** One `server` per engine, named as Serve names the replica that owns
  it, with `track <backend>/<server>`: a replica Serve's health check marks down, or one drained or removed,
  takes its engine out with it.
- **The engine's port is reachable from nowhere but HAProxy.** The engine listens inside its replica's own
  network namespace, which has no port mapped to the host: HAProxy connects inside it (`server ... namespace
  <name>`, the namespace bound at /run/netns/<name>), as root. A process on the node cannot reach the engine
  around the token check.
- **A node's HAProxy reaches only its own node's engines.** With `share = (local, total)` below `1`, that
  fraction of the eligible requests takes the engine path (`rand`) and the rest goes to the service's replicas
  on other nodes (a backend of their servers, tracking Serve's, the token left for them to check), so every
  replica keeps its share.
- **Metrics**: the engine backend logs each of its requests at `notice` (Serve logs its own at `info`, health
  checks at `debug`), with the service, route, status and time in a structured-data element of its own
  (`[ray_dstack@1 ...]`, appended to Serve's `log-format-sd`), to a datagram socket beside haproxy.cfg that
  only `notice` reaches; one replica on the node reads it into ray-dstack's request and latency metrics
  (engine_log.py). A frontend whose `log-format-sd` cannot be extended gets no such log (Serve's line stays),
  and neither does a node with `$RAY_DSTACK_ENGINE_PATH_LOG=off`.
- **Back-pressure as Serve's**: an engine gets at most its replica's `max_ongoing_requests` of the engine path's
  requests at once from one HAProxy process (`maxconn`); the rest wait in HAProxy's queue (another engine of
  the service on this node takes them if it has room) for up to the request timeout, as they would wait in the
  replica. Not counted in that limit: the few requests the replica still relays (`GET /v1/models`, the ones the
  rules cannot vouch for) and those an older HAProxy process still serves after a reload. Queued requests whose
  engines all go down wait out the queue timeout and get 503 (on the replica path they would fail at once).
- **Autoscaling**: the RPS window counts HAProxy's responses of each engine (engine_registration.py, 4xx
  included where the replica leaves out 401/403/404), and the scale-to-zero guard its requests in flight or
  queued (`scur` + `qcur`, reported by the replica with its counters, a few seconds late; the newest HAProxy
  process's only, so a stream an older process still serves after a reload is not seen).
- **Not in HAProxy (yet), so measured on the replica path only**: time to first token, output tokens and the
  in-flight streams gauge (HAProxy's log has no time to the first body byte, and counting SSE events is
  per-chunk work).

This module is pure and imports nothing but the standard library and serve_haproxy_config.py: the HAProxy wrapper
(haproxy_v1.py) runs it on every reload.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from collections.abc import Iterator
from pathlib import Path

from ray_dstack.serve.ingress.serve_haproxy_config import backend_prefixes, backend_servers, sectioned

MARKER = "# ray-dstack: the engine path"
ENGINE_BACKEND_SUFFIX = "--engine"
REMOTE_BACKEND_SUFFIX = "--remote"
ROUTES = ("/v1/chat/completions", "/v1/completions")
TOKEN_VAR = "txn.ray_dstack_token"
LENGTH_VAR = "txn.ray_dstack_length"
BODY_WAIT_S = 10  # as haproxy_v1.BODY_WAIT_S: a slower body takes the replica path
# The engine path's log (engine_log.py reads it): HAProxy logs the engine backend's requests at LOG_LEVEL, and
# the log target below takes nothing less severe, so Serve's own requests (logged at `info`) never reach it.
LOG_SD_ID = "ray_dstack@1"
LOG_LEVEL = "notice"
# Beside Serve's haproxy.cfg (as its admin socket), not in the engine directory: a Unix socket's path has at
# most UNIX_PATH_MAX bytes, and Serve's node directories already take 76 (`/tmp/haproxy-serve/<node id>/`).
LOG_SOCKET_NAME = "ray-dstack-log.sock"
UNIX_PATH_MAX = 107
LOG_ENV = "RAY_DSTACK_ENGINE_PATH_LOG"  # `off` on the nodes: no log, so no metrics of the engine path's requests
SERVICE_VAR = "txn.ray_dstack_log_service"
ROUTE_VAR = "txn.ray_dstack_log_route"  # not haproxy_v1's txn.ray_dstack_route (a `/v1` request's prefix)
LOG_SD = f"[{LOG_SD_ID} service=%[var({SERVICE_VAR})] route=%[var({ROUTE_VAR})] status=%ST latency_ms=%Ta]"
# What HAProxy's configuration syntax carries with no quoting: application names, prefixes, namespaces.
_PLAIN = re.compile(r"[A-Za-z0-9._/-]+")
# A model name inside double quotes: no quote, backslash, `%`, `#`, control or non-ASCII character.
_QUOTABLE = re.compile(r"[\x20-\x7e]+")
_UNQUOTABLE = set('"\\%#$\'{}')
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ADDRESS = re.compile(r"[0-9A-Za-z.:\[\]-]+:[0-9]+")


@dataclass(frozen=True)
class EngineServer:
    """One replica's engine, as this node's HAProxy reaches it."""

    name: str  # the replica's server name in Serve's backend (tracked, and named so in HAProxy's stats)
    netns: str  # the network namespace's name under /run/netns
    port: int  # the engine's port inside that namespace
    # Serve's `max_ongoing_requests` of the replica: HAProxy sends the engine at most this many requests at once
    # and queues the rest (None: no limit, an entry written before the limit was).
    max_ongoing: int | None = None


@dataclass(frozen=True)
class EngineRoute:
    """A service whose eligible requests skip its replicas, on one node's HAProxy."""

    backend: str  # Serve's backend for the application (its `is_<backend>` ACL, its servers)
    prefix: str  # the application's route prefix, `/svc`
    model: str  # the `model` a request must name
    token_sha256: str | None  # the service token's SHA-256 (hex); None: the service has `auth: false`
    servers: tuple[EngineServer, ...]  # this node's engines of the service
    upstream_prefix: str = "/v1"  # where the engine serves its OpenAI routes (`model.prefix`)
    share: tuple[int, int] = (1, 1)  # (this node's replicas, all replicas): the part that takes the engine path
    timeout_s: int = 600  # how long the engine may take to answer (`request_timeout_s`, as the replica's reads)
    # The service's replicas on other nodes (Serve's server name, address): the rest of the eligible requests go
    # to them through a backend of their own, so that every replica takes its share (Serve's backend would
    # give this node's replicas part of the rest too).
    remote: tuple[tuple[str, str], ...] = ()
    shadowed_by: tuple[str, ...] = ()  # backends whose prefix lies under this one's: their requests are theirs

    @property
    def engine_backend(self) -> str:
        return self.backend + ENGINE_BACKEND_SUFFIX

    @property
    def remote_backend(self) -> str:
        return self.backend + REMOTE_BACKEND_SUFFIX

    def problem(self) -> str | None:
        """Why these rules cannot be written for this route (it then keeps the replica path), or None."""
        for what, value in (("backend", self.backend), ("prefix", self.prefix),
                            *(("backend", b) for b in self.shadowed_by)):
            if not _PLAIN.fullmatch(value):
                return f"{what} {value!r} has characters the rules do not quote"
        if not self.prefix.startswith("/") or self.prefix == "/" or self.prefix.endswith("/"):
            return f"prefix {self.prefix!r} is not `/<name>`"
        if self.upstream_prefix and not (_PLAIN.fullmatch(self.upstream_prefix) and self.upstream_prefix[0] == "/"
                                         and self.upstream_prefix[-1] != "/"):
            return f"model prefix {self.upstream_prefix!r} is not `/<path>` (normalized) or empty"
        if not 0 < self.timeout_s < 10**7:
            return f"timeout {self.timeout_s!r} is not a number of seconds"
        if not _QUOTABLE.fullmatch(self.model) or _UNQUOTABLE & set(self.model):
            return f"model {self.model!r} has characters the rules do not quote"
        if self.token_sha256 is not None and not _SHA256.fullmatch(self.token_sha256):
            return "the token digest is not a SHA-256 in lower-case hex"
        if not self.servers:
            return "no engine on this node"
        for server in self.servers:
            if not (_PLAIN.fullmatch(server.name) and _PLAIN.fullmatch(server.netns) and 0 < server.port < 65536
                    and (server.max_ongoing is None or 0 < server.max_ongoing < 10**6)):
                return f"engine server {server!r} cannot be written"
        for name, address in self.remote:
            if not (_PLAIN.fullmatch(name) and _ADDRESS.fullmatch(address)):
                return f"remote server {name!r} {address!r} cannot be written"
        local, total = self.share
        if not 0 < local <= total:
            return f"share {self.share!r} is not (local, total) with 0 < local <= total"
        return None


def log_enabled() -> bool:
    return (os.environ.get(LOG_ENV) or "on").strip().lower() != "off"


def frontend_rules(routes: list[EngineRoute]) -> list[str]:
    """Lines for Serve's `frontend http_frontend`, before its first `use_backend` (Serve's `is_<backend>` ACLs
    are declared above that line), for routes without a `problem()`. Each condition narrows: a request any of
    them cannot vouch for goes to Serve's backend, where the replica decides as it always has."""
    lines = [
        f"    {MARKER} (ray_dstack/serve/ingress/engine_path.py)",
        "    acl ray_dstack_one_auth req.fhdr_cnt(authorization) eq 1",
        "    acl ray_dstack_bearer req.fhdr(authorization) -m beg -i \"bearer \"",
        # The token as sent after "Bearer ": printable ASCII only, nothing trimmed, so that the bytes hashed here
        # are the ones the replica hashes (it strips spaces and reads the header as latin-1).
        "    acl ray_dstack_plain_token req.fhdr(authorization),bytes(7) -m reg '^[!-~]+$'",
        f"    http-request set-var({TOKEN_VAR}) req.fhdr(authorization),bytes(7),sha2(256),hex,lower"
        " if ray_dstack_one_auth ray_dstack_bearer ray_dstack_plain_token",
        # The whole body is buffered (a Content-Length body no larger than the buffer), so `model` is read
        # from all of it: one `model` key (a second one, which the replica's parser would take, or a key
        # spelled with escaped letters, sends the request to the replica) whose value is a string.
        f"    http-request set-var({LENGTH_VAR}) req.fhdr(content-length) if {{ req.fhdr_cnt(content-length) eq 1 }}",
        f"    acl ray_dstack_whole_body req.body_len,sub({LENGTH_VAR}) eq 0",
        "    acl ray_dstack_model_string req.body -m reg '\"model\"\\s*:\\s*\"'",
        "    acl ray_dstack_two_models req.body -m reg '(?s)\"model\"\\s*:.*\"model\"\\s*:'",
        "    acl ray_dstack_escaped_letter req.body -m reg -i '\\\\u00(4[1-9a-f]|5[0-9a]|6[1-9a-f]|7[0-9a])'",
        "    acl ray_dstack_body_ok req.fhdr_cnt(content-length) eq 1",
    ]
    body_ok = ("ray_dstack_body_ok ray_dstack_whole_body ray_dstack_model_string !ray_dstack_two_models"
               " !ray_dstack_escaped_letter")
    for i, route in enumerate(routes):
        acl = f"ray_dstack_engine_{i}"
        paths = " ".join(route.prefix + r for r in ROUTES)
        lines.append(f"    acl {acl} path {paths}")
        lines.append(f"    http-request wait-for-body time {BODY_WAIT_S}s if {acl} METH_POST")
        conditions = [f"is_{route.backend}", acl, "METH_POST", "!{ query -m found }", body_ok,
                      f"{{ req.body,json_query('$.model') -m str -- \"{route.model}\" }}"]
        if route.token_sha256 is not None:
            conditions.append(f"{{ var({TOKEN_VAR}) -m str {route.token_sha256} }}")
        conditions += [f"!is_{b}" for b in route.shadowed_by]
        local, total = route.share
        share = [f"{{ rand({total}) lt {local} }}"] if local < total else []
        lines.append(f"    use_backend {route.engine_backend} if {' '.join(conditions)}"
                     f" {{ nbsrv({route.engine_backend}) gt 0 }} {' '.join(share)}".rstrip())
        if route.remote:  # the rest of the eligible requests: the other nodes' replicas, through their replicas
            lines.append(f"    use_backend {route.remote_backend} if {' '.join(conditions)}"
                         f" {{ nbsrv({route.remote_backend}) gt 0 }}")
    return lines


# What the replica forwards to the engine (ray_dstack/openai/passthrough.py `_FORWARDED_HEADERS`), plus the
# framing HAProxy needs; every other request header stays out, as on the replica path.
FORWARDED_HEADERS = ("content-type", "content-length", "host", "accept", "user-agent", "x-request-id",
                     "openai-organization", "openai-project")


def backend_sections(routes: list[EngineRoute], *, logged: bool = False) -> list[str]:
    """One backend per route without a `problem()`: its engines, tracking Serve's servers of the same name (and
    one of the service's replicas on other nodes, if any). The engines get no header beyond
    FORWARDED_HEADERS: not `Authorization`, not the header haproxy_v1.py's `/v1` rewrite adds. `logged`: the
    requests are logged at LOG_LEVEL with the variables LOG_SD reads."""
    lines: list[str] = []
    keep = "|".join(FORWARDED_HEADERS)
    for route in routes:
        lines += [
            f"backend {route.engine_backend}",
            f"    {MARKER}: {route.backend}'s engines on this node",
            "    balance leastconn",
            "    http-reuse always",
            f"    timeout server {route.timeout_s}s",
            # Requests beyond an engine's `maxconn` wait here, as they wait in the replica for a slot under Serve's
            # max_ongoing_requests, and for as long as the replica would let them (then 503).
            f"    timeout queue {route.timeout_s}s",
        ]
        if logged:
            lines += [
                f"    http-request set-log-level {LOG_LEVEL}",
                f"    http-request set-var({SERVICE_VAR}) str({route.prefix[1:]})",
                f"    http-request set-var({ROUTE_VAR}) str(completions)",
                f"    http-request set-var({ROUTE_VAR}) str(chat/completions) if {{ path -m end /chat/completions }}",
            ]
        lines += [
            f"    http-request del-header '^(?!({keep})$)' -m reg",
            "    http-request set-header accept-encoding identity",  # the bytes relayed are the engine's own
            f"    http-request set-path %[path,regsub(^{route.prefix.replace('.', '[.]')}/v1/,{route.upstream_prefix}/)]",
            # OpenAI answers every request with an `x-request-id`, as the replica does (openai/endpoint.py).
            "    http-response set-header x-request-id req_%[uuid,regsub(-,,g)] if !{ res.hdr_cnt(x-request-id) gt 0 }",
            # As the replica (openai/errors.py from_upstream_status): the engine's failure is a 502, 503 stays.
            "    http-response set-status 502 if { status ge 500 } !{ status 503 }",
            "    http-response set-header cache-control no-cache if { res.hdr(content-type) -m beg text/event-stream }",
            "    http-response set-header x-accel-buffering no if { res.hdr(content-type) -m beg text/event-stream }",
            "    http-error status 503 content-type application/json string"
            f" '{UNAVAILABLE_JSON}'",
        ]
        lines += [f"    server {s.name} 127.0.0.1:{s.port} namespace {s.netns} track {route.backend}/{s.name}"
                  + (f" maxconn {s.max_ongoing}" if s.max_ongoing is not None else "")
                  for s in route.servers]
        if route.remote:
            lines += [f"backend {route.remote_backend}",
                      f"    {MARKER}: {route.backend}'s replicas on other nodes",
                      "    balance leastconn",
                      "    http-reuse always"]
            lines += [f"    server {name} {address} track {route.backend}/{name}" for name, address in route.remote]
    return lines


# What the replica answers when its engine cannot be reached (openai/errors.py upstream_unavailable).
UNAVAILABLE_JSON = ('{"error": {"message": "The model backend is unavailable.", "type": "upstream_error", '
                    '"param": null, "code": "upstream_unavailable"}}')


def inject(config: str, routes: list[EngineRoute], log_socket: str | None = None) -> str:
    """Serve's configuration (haproxy_v1's rules already in it, or not) with the engine path added: the rules
    before the frontend's first `use_backend`, the backends at the end. Unchanged without a route the rules can
    be written for (routes with a `problem()` keep the replica path). With `log_socket`, the engine backends'
    requests are logged there (LOG_SD, appended to the frontend's structured data, Serve's included)."""
    routes = [r for r in routes if r.problem() is None]
    if not routes or MARKER in config:
        return config
    logged = (log_socket is not None and _PLAIN.fullmatch(log_socket) is not None
              and len(log_socket.encode()) <= UNIX_PATH_MAX and _extensible_sd(config))
    rules = frontend_rules(routes)
    if logged:
        rules.append(f"    log {log_socket} len 8192 format rfc5424 local1 {LOG_LEVEL}")
    out: list[str] = []
    added = sd_added = False
    for section, line in sectioned(config):
        if section == "frontend http_frontend":
            if logged and _SD_LINE.match(line):  # Serve's per-request metrics line: one more element
                line = line.rstrip()[:-1] + LOG_SD + '"'
                sd_added = True
            if not added and line.strip().startswith("use_backend "):
                out += rules
                added = True
        out.append(line)
    if not added:
        return config  # not the shape these rules are written for: every request keeps the replica path
    if logged and not sd_added:
        out.insert(out.index(rules[-1]) + 1, f'    log-format-sd "%{{+Q,+E}}o {LOG_SD}"')
    # Serve opens its admin socket to every user (mode 666), and the runtime API can add patterns to any ACL,
    # the token's included: with the engine path in the configuration, only HAProxy's own user may use it.
    text = _ADMIN_SOCKET_MODE.sub(r"\g<1>600", "\n".join(out).rstrip("\n"))
    return text + "\n" + "\n".join(backend_sections(routes, logged=logged)) + "\n"


_SD_LINE = re.compile(r'^\s+log-format-sd ".*"\s*$')


def _extensible_sd(config: str) -> bool:
    """Whether `frontend http_frontend` has at most one `log-format-sd`, in the quoted shape `inject` extends (a
    second one would replace Serve's, whose element Serve's metrics read)."""
    found = [line for section, line in sectioned(config)
             if section == "frontend http_frontend" and line.split(None, 1)[:1] == ["log-format-sd"]]
    return not found or (len(found) == 1 and _SD_LINE.match(found[0]) is not None)


_ADMIN_SOCKET_MODE = re.compile(r"^(\s*stats socket \S+.*?\bmode )[0-7]+\b", re.MULTILINE)


# --- what the replicas on this node register, and the routes it gives in one configuration -----------------

ENGINE_DIR_NAME = "ray-dstack-engines"  # beside Serve's haproxy.cfg: one file per local engine
NETNS_DIR = "/run/netns"


@dataclass(frozen=True)
class Entry:
    """What a replica on this node writes for the wrapper (engine_registration.py): its engine and its route."""

    server: str
    prefix: str
    model: str
    token_sha256: str | None
    upstream_prefix: str
    netns: str
    port: int
    timeout_s: int = 600
    max_ongoing: int | None = None  # the replica's `max_ongoing_requests` (Serve's deployment config)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Entry | None":
        try:
            data = json.loads(text)
            entry = cls(**{f: data[f] for f in cls.__dataclass_fields__ if f in data})
        except (ValueError, TypeError, KeyError):
            return None
        types_ok = all(isinstance(getattr(entry, f), str) for f in ("server", "prefix", "model", "upstream_prefix",
                                                                    "netns"))
        ok = (types_ok and isinstance(entry.port, int) and isinstance(entry.timeout_s, int)
              and isinstance(entry.token_sha256, (str, type(None)))
              and (entry.max_ongoing is None or (type(entry.max_ongoing) is int and entry.max_ongoing > 0)))
        return entry if ok else None


def log_socket_path(directory: str | Path) -> Path:
    """The engine path's log socket for the engine directory `directory` (beside Serve's haproxy.cfg)."""
    return Path(directory).parent / LOG_SOCKET_NAME


def entry_path(directory: str | Path, server: str) -> Path:
    return Path(directory) / f"{server}.json"


def entry_files(directory: str | Path) -> Iterator[tuple[Path, Entry]]:
    """Every readable entry under `directory`, with its file."""
    for path in sorted(Path(directory).glob("*.json")):
        try:
            entry = Entry.from_json(path.read_text())
        except OSError:
            continue
        if entry is not None:
            yield path, entry


def read_entries(directory: str | Path) -> list[Entry]:
    """The entries under `directory` whose namespace still exists (a replica that died leaves its file)."""
    return [entry for _, entry in entry_files(directory) if Path(NETNS_DIR, entry.netns).exists()]


def routes_for(config: str, entries: list[Entry]) -> list[EngineRoute]:
    """The engine routes of this node's entries in Serve's configuration: an entry counts when its server is in
    the backend whose exact-path ACL is the entry's prefix (a replica Serve no longer lists, or another
    application at that prefix now, gets nothing)."""
    by_prefix = backend_prefixes(config)
    # backend → its replicas' server names → addresses, in the file's order (Serve's fallback to its proxy, a
    # `backup` server, is not a replica)
    servers = {b: {s.name: s.address for s in listed if not s.backup}
               for b, listed in backend_servers(config).items()}
    routes = []
    for prefix, group in _group(entries).items():
        b = by_prefix.get(prefix)
        if b is None or not servers.get(b):
            continue
        local = [e for e in group if e.server in servers[b]]
        if not local:
            continue
        first = local[0]
        if any((e.model, e.token_sha256, e.upstream_prefix, e.timeout_s)
               != (first.model, first.token_sha256, first.upstream_prefix, first.timeout_s) for e in local):
            continue  # replicas of two versions of the service during a rollout: the replicas decide
        shadowed = tuple(sorted(o for p, o in by_prefix.items() if o != b and p.startswith(prefix + "/")))
        routes.append(EngineRoute(
            backend=b, prefix=prefix, model=first.model, token_sha256=first.token_sha256,
            servers=tuple(EngineServer(e.server, e.netns, e.port, e.max_ongoing) for e in local),
            upstream_prefix=first.upstream_prefix, share=(len(local), len(servers[b])), shadowed_by=shadowed,
            timeout_s=first.timeout_s,
            remote=tuple((n, a) for n, a in servers[b].items() if n not in {e.server for e in local})))
    return routes


def _group(entries: list[Entry]) -> dict[str, list[Entry]]:
    out: dict[str, list[Entry]] = {}
    for entry in entries:
        out.setdefault(entry.prefix, []).append(entry)
    return out
