"""Prefix affinity: HAProxy sends a conversation back to the replica that holds its prompt's prefix.

LLM engines keep the KV cache of recent prompts (vLLM's prefix caching, SGLang's radix cache, llama.cpp's prompt
reuse), so a conversation's next turn is faster on the replica that served its last one. Serve's template
balances every backend by `leastconn`; for a model service with `routing: prefix` ([3.4]) HAProxy itself picks
the replica from the prompt's leading content, with no router to run and no extra hop:

- **The key** (frontend rules, `KEY_VAR`): for `POST .../v1/chat/completions`, the first message's content,
  and when that message is the `system` (or `developer`) prompt, the first one after it too, each cut to its
  first KEY_BYTES bytes; for `POST .../v1/completions`, the `prompt`'s first KEY_BYTES bytes. Read with
  `json_query` from the buffered body, so key order, whitespace and other fields (`max_tokens`, `stream`, ...)
  do not change it, and every turn of a conversation has the key of its first turn. A text part list
  (`content: [{"type": "text", ...}]`) keys by its first part's text.
- **The replica** (rules in Serve's own backend of the application, `backend_rules`): a table (HAProxy stick
  table, `TABLE_*`) remembers which replica each key went to last. A known key goes back to that replica
  (`use-server`); a new one goes where Serve's `balance leastconn` sends it, and the table then names that
  replica. So conversations are spread as evenly as least connections would spread them and each stays where
  its cache is. The table names replicas by server `id`, which `server_ids` derives from the replica's name and
  the rules add to Serve's server lines: an entry keeps meaning the same replica across Serve's reloads, which
  rewrite the server list in another order. Staying in Serve's backend, these requests are Serve's: its health
  checks, retries, timeouts, the counters its proxy drain waits on and its ongoing-requests gauge all see them.
- **Bounded load**: a known key's replica is passed over while it carries its share of the requests in flight
  on this backend times BALANCE_FACTOR % (`ceil(in flight * 1.5 / replicas)`): the request goes to the least
  busy replica instead, and the key follows it (its newest cache is there now). So one hot prefix cannot pile
  onto one replica. The load is what this HAProxy process has in flight on the backend (keyed or not): not the
  replica's other requests, nor other nodes'. Each of HAProxy's threads checks the bound alone, so a burst can
  pass it by a request per thread.
- **Replicas that go**: a replica that is down, in maintenance or removed is passed over and its keys are placed
  again by least connections (`moved`); the other replicas keep theirs. A new replica gets new keys (and spilled
  ones), none taken from the others.
- **Reloads**: Serve reloads HAProxy whenever a replica comes or goes, and a new process starts with an empty
  table; the wrapper saves the old one's table and the map sync writes it into the new one as soon as that one
  answers (`table_state_file`, below). Keys first seen in between (~0.1 s) are placed by least connections.
- **Errors**: a replica that answers 5xx is not remembered for the key, so a conversation does not stick to a
  replica whose engine died while Serve has not replaced it yet.
- **Nodes**: each node's HAProxy has a table of its own. A conversation whose turns enter through different
  nodes may be placed on a different replica by each (a stateless hash would agree across nodes; measured, its
  uneven placement of few conversations cost more than that: bench/RESULTS.md "Prefix routing on a real engine").
- **Metrics**: each routed request carries ROUTED_HEADER to its replica, which counts it by outcome
  (serve/scaling/metrics.py `prefix_routed`): `affinity`, `spilled` (its replica was over the bound), `moved`,
  `new`. Clients' own header is removed; the replica does not pass it on.
- **What keeps least-connections**: requests without a key (other routes, `GET`s, a prompt that is not text or
  is empty, a first message that does not fit in HAProxy's buffer, a body slower than BODY_WAIT_S, a route
  prefix of more than one path segment) are left to Serve's least connections, as before. A body larger than the buffer is
  keyed by what the buffer holds, its first message included.
- **Which services**: the map `MAP_FILE_NAME` (first path segment → Serve's backend), kept equal to the
  published routing table by v1_routes.py's map sync without a reload, names the backends whose policy is
  `prefix`: switching a service's policy takes effect on every node within a second of its deploy.
- **Not here (yet)**: the engine path (engine_path.py, opt-in) sends its requests to its node's engines by
  least-connections; its rules come first, so a service on the engine path keeps that.
- **Why not Serve's own**: Serve's ingress request router (HAProxy mode) asks a Python deployment over HTTP for
  every request: the extra hop [3.4] rules out. Serve's HTTP prefix-aware routers do not apply in HAProxy mode.

This module is pure and imports nothing but the standard library, ray_dstack.spec and serve_haproxy_config.py: the
HAProxy wrapper (haproxy_v1.py) runs it on every reload.
"""

from __future__ import annotations

import hashlib
import re

from ray_dstack.spec import PREFIX_ROUTE_HEADER
from ray_dstack.serve.ingress.serve_haproxy_config import (
    Server,
    backend_prefixes,
    backend_servers,
    section_backend,
    sectioned,
    server_of,
)

MARKER = "# ray-dstack: prefix affinity"
MAP_FILE_NAME = "ray-dstack-prefix.map"
POLICY = "prefix"  # the `routing` policy these rules serve; the other, `least_connections`, is Serve's own
KEY_VAR = "txn.ray_dstack_prefix_key"
BACKEND_VAR = "txn.ray_dstack_prefix_backend"
_ROLE_VAR = "txn.ray_dstack_prefix_role"
OWNER_VAR = "txn.ray_dstack_prefix_owner"  # the `id` of the replica the prefix went to last (0: none known)
BOUND_VAR = "txn.ray_dstack_prefix_bound"
_DIV_VAR = "txn.ray_dstack_prefix_div"
# The table: the prompt key's SHA-1 (hex: the admin socket's `set table` takes no binary keys) → the `id` of the
# replica it last went to. An engine's prefix cache holds minutes of prompts, so half an hour covers it; an
# entry is ~100 bytes, so a full table is ~10 MB per service and node (the least recently seen go first).
TABLE_KEY_LEN = 40
TABLE_ENTRIES = "100k"
TABLE_EXPIRE = "30m"
ROUTED_HEADER = PREFIX_ROUTE_HEADER  # set on every request routed by prefix (clients' own is removed)
_SECOND_VAR = "txn.ray_dstack_prefix_second"
KEY_BYTES = 1024  # the leading bytes of each keyed part: a shared ~250-token start is one prefix
BALANCE_FACTOR = 150  # % of the mean load a replica may carry before its prefixes spill to the least busy one
BODY_WAIT_S = 10  # as haproxy_v1.BODY_WAIT_S: a slower body goes to Serve's backend
# Server ids: HAProxy takes up to 2**31 - 1; these stay in 20 bits (ids written into the tables are checked
# against it).
ID_SPACE = 2**20 - 1
_PLAIN = re.compile(r"[A-Za-z0-9._-]+")
_USE_BACKEND = re.compile(r"^\s+use_backend (\S+) if is_(\S+)\s*$")


def server_ids(names: list[str]) -> dict[str, int]:
    """A stable `id` per server name, unique within `names`: the same name gets the same id in every
    configuration (the one after a collision only while the name it collided with is listed too)."""
    ids: dict[str, int] = {}
    taken: set[int] = set()
    for name in sorted(set(names)):
        value = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % ID_SPACE + 1
        while value in taken:
            value = value % ID_SPACE + 1
        taken.add(value)
        ids[name] = value
    return ids


def frontend_rules(map_path: str) -> list[str]:
    """Lines for Serve's `frontend http_frontend` before its first `use_backend` (after haproxy_v1.py's `/v1`
    rewrite, so a request by model is keyed as one to its service's path)."""
    chat = "{ path_end /v1/chat/completions }"
    return [
        f"    {MARKER} (ray_dstack/serve/ingress/prefix_affinity.py)",
        f"    http-request set-var({BACKEND_VAR}) path,field(2,/),map({map_path}) if METH_POST"
        " { path_end /v1/chat/completions /v1/completions }",
        "    acl ray_dstack_prefix_routed var(" + BACKEND_VAR + ") -m found",
        f"    http-request wait-for-body time {BODY_WAIT_S}s if ray_dstack_prefix_routed",
        f"    http-request set-var({KEY_VAR}) req.body,json_query('$.messages[0].content'),bytes(0,{KEY_BYTES})"
        f" if ray_dstack_prefix_routed {chat}",
        f"    http-request set-var({KEY_VAR}) req.body,json_query('$.messages[0].content[0].text'),"
        f"bytes(0,{KEY_BYTES}) if ray_dstack_prefix_routed {chat} !{{ var({KEY_VAR}) -m found }}",
        f"    http-request set-var({_ROLE_VAR}) req.body,json_query('$.messages[0].role')"
        f" if ray_dstack_prefix_routed {chat}",
        f"    http-request set-var({_SECOND_VAR}) req.body,json_query('$.messages[1].content'),bytes(0,{KEY_BYTES})"
        f" if ray_dstack_prefix_routed {chat} {{ var({_ROLE_VAR}) -m str system developer }}",
        f"    http-request set-var({_SECOND_VAR}) req.body,json_query('$.messages[1].content[0].text'),"
        f"bytes(0,{KEY_BYTES}) if ray_dstack_prefix_routed {chat} {{ var({_ROLE_VAR}) -m str system developer }}"
        f" !{{ var({_SECOND_VAR}) -m found }}",
        f"    http-request set-var({KEY_VAR}) var({KEY_VAR}),concat(\\x1f,{_SECOND_VAR})"
        f" if {{ var({KEY_VAR}) -m found }} {{ var({_SECOND_VAR}) -m found }}",
        f"    http-request set-var({KEY_VAR}) req.body,json_query('$.prompt'),bytes(0,{KEY_BYTES})"
        " if ray_dstack_prefix_routed { path_end /v1/completions }",
        # An empty prompt is no prefix: it keeps least connections rather than piling onto one replica.
        f"    http-request unset-var({KEY_VAR}) if {{ var({KEY_VAR}) -m len 0 }}",
    ]


def _backends(config: str) -> dict[str, list[Server]]:
    """Serve's application backends that get the rules: name → their servers, in the file's order. Those with a
    `use_backend <name> if is_<name>` rule in the frontend (neither `default_backend` nor ours), a route prefix of
    one path segment (the map's key) and health-checked servers (`srv_is_up` must mean something)."""
    used = {m.group(1) for line in config.split("\n") if (m := _USE_BACKEND.match(line)) and m.group(1) == m.group(2)}
    one_segment = {b for prefix, b in backend_prefixes(config).items() if _PLAIN.fullmatch(prefix[1:])
                   and prefix.startswith("/")}
    return {b: servers for b, servers in backend_servers(config).items()
            if b in used & one_segment and _PLAIN.fullmatch(b) and all(s.checked for s in servers)}


def affinity_backends(config: str) -> list[str]:
    """Serve's backends in `config` that get the prefix rules when they are added."""
    return list(_backends(config))


def backend_rules(backend: str, servers: list[Server], ids: dict[str, int]) -> list[str]:
    """Lines for Serve's `backend <backend>`, right after its header: its table of the replica each prefix went to
    last (`TABLE_*`), for the requests the frontend keyed for it. A prefix goes back to its replica unless that one
    is down or carries its share of the requests in flight times BALANCE_FACTOR %; a new one (or one passed over)
    goes where Serve's `balance leastconn` sends it, and the table then names that replica. ROUTED_HEADER tells the
    replica which (metrics). Requests without a key are untouched: Serve's least connections. `ids`: `server_ids`
    of the servers."""
    keyed = f"ray_dstack_prefix_keyed {{ var({BACKEND_VAR}) -m str {backend} }}"
    lines = [
        f"    {MARKER}: the replica by the prompt's leading content (ray_dstack/serve/ingress/prefix_affinity.py)",
        f"    stick-table type string len {TABLE_KEY_LEN} size {TABLE_ENTRIES} expire {TABLE_EXPIRE} store gpt0",
        f"    acl ray_dstack_prefix_keyed var({KEY_VAR}) -m found",
        f"    http-request track-sc2 var({KEY_VAR}),sha1,hex if {keyed}",  # upper-case hex
        f"    http-request set-var({OWNER_VAR}) sc2_get_gpt0 if {keyed}",
        # ceil(requests in flight here, this one included, * BALANCE_FACTOR / 100 / usable replicas)
        f"    http-request set-var({_DIV_VAR}) nbsrv({backend}),mul(100) if {keyed}",
        f"    http-request set-var({BOUND_VAR}) be_conn({backend}),mul({BALANCE_FACTOR}),add({_DIV_VAR}),sub(1),"
        f"div({_DIV_VAR}) if {keyed}",
        f"    http-request set-header {ROUTED_HEADER} new if {keyed}",
        f"    http-request set-header {ROUTED_HEADER} moved if {keyed} {{ var({OWNER_VAR}) -m int gt 0 }}",
    ]
    rules = []
    for n, s in enumerate(x for x in servers if not x.backup):
        owner, usable, fits = f"ray_dstack_owner_{n}", f"ray_dstack_up_{n}", f"ray_dstack_fits_{n}"
        # An operator's `state drain` is not seen (Serve never drains a server: it reloads without it).
        lines += [f"    acl {owner} var({OWNER_VAR}) -m int {ids[s.name]}",
                  f"    acl {usable} srv_is_up({backend}/{s.name})",
                  f"    acl {fits} srv_conn({backend}/{s.name}),sub({BOUND_VAR}) lt 0",
                  f"    http-request set-header {ROUTED_HEADER} spilled if {keyed} {owner} {usable} !{fits}",
                  f"    http-request set-header {ROUTED_HEADER} affinity if {keyed} {owner} {usable} {fits}"]
        rules.append(f"    use-server {s.name} if {keyed} {owner} {usable} {fits}")
    # A replica that answered 5xx (its engine gone, say) is not remembered: the next turn is placed again.
    return [*lines, *rules, f"    http-response sc-set-gpt0(2) srv_id if {keyed} !{{ status ge 500 }}",
            f"    http-response sc-set-gpt0(2) 0 if {keyed} {{ status ge 500 }}"]


def inject(config: str, map_path: str) -> str:
    """Serve's configuration with the key rules before the frontend's first `use_backend`, and in each
    application's backend the table rules (`backend_rules`) and a stable `id` on each server (`server_ids`: the
    table names replicas by it). Unchanged when the frontend has no `use_backend` or the rules are already in."""
    backends = _backends(config)
    if not backends or MARKER in config or not _PLAIN.fullmatch(map_path.replace("/", "")):
        return config
    ids = {b: server_ids([s.name for s in servers]) for b, servers in backends.items()}
    out: list[str] = []
    added = False
    for section, line in sectioned(config):
        backend = section_backend(section)
        backend = backend if backend in backends else None
        if section == "frontend http_frontend" and not added and line.strip().startswith("use_backend "):
            out += frontend_rules(map_path)
            added = True
        if backend is not None and (server := server_of(line)) is not None and " id " not in line:
            line = f"{line.rstrip()} id {ids[backend][server.name]}"
        out.append(line)
        if backend is not None and line.strip() == section:
            out += backend_rules(backend, backends[backend], ids[backend])
    return "\n".join(out) if added else config


def map_text(entries: dict[str, str]) -> str:
    return "".join(f"{segment} {backend}\n" for segment, backend in sorted(entries.items()))


def map_entries(policies: dict[str, str], backends: dict[str, str]) -> dict[str, str]:
    """The map's content: route prefix's first segment → backend, for the applications whose policy is `prefix`
    (`policies`: route prefix → policy) and whose backend is in this configuration (`backends`: route prefix →
    backend). A prefix of more than one segment is left out: its requests keep least-connections."""
    out = {}
    for prefix, policy in policies.items():
        segment = prefix[1:]
        if policy == POLICY and prefix.startswith("/") and _PLAIN.fullmatch(segment) and prefix in backends:
            out[segment] = backends[prefix]
    return out


# --- the tables across reloads ----------------------------------------------------------------------------
# Serve reloads HAProxy whenever a replica comes or goes; a new process starts with empty tables. So the wrapper
# (haproxy_v1.prepare, in the process that becomes the new haproxy) saves the running process's tables (`show
# table`) beside the config, in a file named after its own pid, just before the reload, and the new process's map
# sync (v1_routes) writes them into it (`set table`, only keys it has not placed itself) as soon as it answers, then
# removes the file. A reload that comes before that restore merges the file it finds into its own, so back-to-back
# reloads lose nothing; prefixes first routed in the ~0.1 s between are placed by least connections. A replica that is gone
# keeps no requests: its `id` matches no server, so its prefixes are `moved` on their next request.
TABLE_STATE_PREFIX = "ray-dstack-prefix-tables."  # + the pid of the haproxy that is to restore it + ".json"
TABLE_STATE_MAX_AGE_S = 30 * 60  # TABLE_EXPIRE: an older file's entries would have expired in its haproxy
_TABLE_ROW = re.compile(r"^0x[0-9a-f]+: key=([0-9A-Fa-f]{%d}) .*\bgpt0=(\d+)" % TABLE_KEY_LEN)
_SET_BATCH = 64  # `set table` commands per admin-socket command line (`;`-separated; HAProxy reads ~16 KB)


def table_state_file(haproxy_pid: int) -> str:
    return f"{TABLE_STATE_PREFIX}{haproxy_pid}.json"


def table_rows(show_table: str) -> dict[str, int]:
    """`show table <name>`'s answer → key → replica `id`, for the entries that name one."""
    rows = {}
    for line in show_table.splitlines():
        m = _TABLE_ROW.match(line)
        if m and int(m.group(2)) > 0:
            rows[m.group(1).upper()] = int(m.group(2))
    return rows


def set_table_commands(table: str, rows: dict[str, int]) -> list[str]:
    """Admin-socket command lines that write `rows` into `table`, a batch per line."""
    commands = [f"set table {table} key {key} data.gpt0 {sid}" for key, sid in sorted(rows.items())
                if re.fullmatch(r"[0-9A-F]{%d}" % TABLE_KEY_LEN, key) and 0 < sid <= ID_SPACE]
    return ["; ".join(commands[i:i + _SET_BATCH]) for i in range(0, len(commands), _SET_BATCH)]
