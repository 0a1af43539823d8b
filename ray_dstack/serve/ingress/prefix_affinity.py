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
- **The replica**: a consistent-hash ring over the service's replicas (`balance hash`, `hash-type consistent`)
  in a backend of its own (`<backend>--prefix`) whose servers track Serve's (health, drain and removal follow
  Serve's). Each server's place on the ring comes from its `id`, which `server_ids` derives from the replica's
  name (Serve names servers after replica actors): Serve's reloads, which rewrite the server list in another
  order, move no prefix, every node's HAProxy has the same ring, and a replica that joins or leaves moves only
  its own share of prefixes.
- **Bounded load**: `hash-balance-factor` (BALANCE_FACTOR %): a replica already serving more than that share
  of the mean is passed over for the next one on the ring, so one hot prefix cannot pile onto one replica. The
  load is what this HAProxy process has in flight on the service's ring: not the replica's other requests, nor
  other nodes'. Each of HAProxy's threads checks the bound alone, so a burst can pass it by a request per thread.
- **What keeps least-connections**: requests without a key (other routes, `GET`s, a prompt that is not text or
  is empty, a first message that does not fit in HAProxy's buffer, a body slower than BODY_WAIT_S, a route
  prefix of more than one path segment) go to Serve's own backend, as before. A body larger than the buffer is
  keyed by what the buffer holds, its first message included.
- **Which services**: the map `MAP_FILE_NAME` (first path segment → Serve's backend), kept equal to the
  published routing table by v1_routes.py's map sync without a reload, names the backends whose policy is
  `prefix`: switching a service's policy takes effect on every node within a second of its deploy.
- **Not here (yet)**: the engine path (engine_path.py, opt-in) sends its requests to its node's engines by
  least-connections; its rules come first, so a service on the engine path keeps that. Serve reads only its own
  backends' counters (haproxy.py `get_all_stats`), so a node whose proxy Serve drains does not wait for the
  ring's requests in flight (as for the engine path's backends); nor does Serve's ongoing-requests gauge count
  them (ray-dstack's replicas count their own).
- **Why not Serve's own**: Serve's ingress request router (HAProxy mode) asks a Python deployment over HTTP for
  every request: the extra hop [3.4] rules out. Serve's HTTP prefix-aware routers do not apply in HAProxy mode.

This module is pure and imports nothing but the standard library and serve_haproxy_config.py: the HAProxy wrapper
(haproxy_v1.py) runs it on every reload.
"""

from __future__ import annotations

import hashlib
import re

from ray_dstack.serve.ingress.serve_haproxy_config import Server, backend_prefixes, backend_servers, sectioned

MARKER = "# ray-dstack: prefix affinity"
BACKEND_SUFFIX = "--prefix"
MAP_FILE_NAME = "ray-dstack-prefix.map"
POLICY = "prefix"  # the `routing` policy these rules serve; the other, `least_connections`, is Serve's own
KEY_VAR = "txn.ray_dstack_prefix_key"
BACKEND_VAR = "txn.ray_dstack_prefix_backend"
_ROLE_VAR = "txn.ray_dstack_prefix_role"
_SECOND_VAR = "txn.ray_dstack_prefix_second"
KEY_BYTES = 1024  # the leading bytes of each keyed part: a shared ~250-token start is one prefix
BALANCE_FACTOR = 150  # % of the mean load a replica may carry before its prefixes spill to the next replica
BODY_WAIT_S = 10  # as haproxy_v1.BODY_WAIT_S: a slower body goes to Serve's backend
# HAProxy places a server on its consistent ring by hashing `id * 4096 + n` in 32 bits: ids below 2**20 keep
# those points distinct between servers.
ID_SPACE = 2**20 - 1
_PLAIN = re.compile(r"[A-Za-z0-9._-]+")
_USE_BACKEND = re.compile(r"^\s+use_backend (\S+) if is_(\S+)\s*$")
_OBSERVE = re.compile(r"observe layer[47]( error-limit \d+)?( on-error [a-z-]+)?")


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
    """Serve's application backends that can have a ring: name → their servers, in the file's order. Those with a
    `use_backend <name> if is_<name>` rule in the frontend (neither `default_backend` nor ours), a route prefix of
    one path segment (the map's key) and health-checked servers (a ring's servers track them)."""
    used = {m.group(1) for line in config.split("\n") if (m := _USE_BACKEND.match(line)) and m.group(1) == m.group(2)}
    one_segment = {b for prefix, b in backend_prefixes(config).items() if _PLAIN.fullmatch(prefix[1:])
                   and prefix.startswith("/")}
    return {b: servers for b, servers in backend_servers(config).items()
            if b in used & one_segment and _PLAIN.fullmatch(b) and all(s.checked for s in servers)}


def backend_section(backend: str, servers: list[Server]) -> list[str]:
    """`<backend>--prefix`: Serve's servers of `backend` on a consistent ring, each tracking its original."""
    ids = server_ids([s.name for s in servers])
    lines = [
        f"backend {backend}{BACKEND_SUFFIX}",
        f"    {MARKER}: {backend}'s replicas by the prompt's leading content",
        f"    balance hash var({KEY_VAR})",
        "    hash-type consistent",
        f"    hash-balance-factor {BALANCE_FACTOR}",
        "    http-reuse always",
    ]
    for s in servers:
        # Serve's fast mark-down (`observe layer4 error-limit N on-error mark-down`): connection errors of the
        # ring's own traffic count too, not only the health checks.
        observe = _OBSERVE.search(s.options)
        lines.append(f"    server {s.name} {s.address} track {backend}/{s.name} id {ids[s.name]}"
                     f"{' ' + observe.group(0) if observe else ''}{' backup' if s.backup else ''}")
    return lines


def inject(config: str, map_path: str) -> str:
    """Serve's configuration with the key rules before the frontend's first `use_backend`, a rule before each
    application's own `use_backend` sending its keyed requests to its ring (when the map names it), and the
    rings at the end. Unchanged when the frontend has no such rule or the rules are already in."""
    backends = _backends(config)
    if not backends or MARKER in config or not _PLAIN.fullmatch(map_path.replace("/", "")):
        return config
    out: list[str] = []
    added = False
    for section, line in sectioned(config):
        if section == "frontend http_frontend":
            if not added and line.strip().startswith("use_backend "):
                out += frontend_rules(map_path)
                added = True
            m = _USE_BACKEND.match(line)
            if m and m.group(1) == m.group(2) and m.group(1) in backends:
                b = m.group(1)
                # Right before Serve's own rule: a longer prefix's application, whose rules come first, keeps
                # its requests.
                out.append(f"    use_backend {b}{BACKEND_SUFFIX} if is_{b} {{ var({BACKEND_VAR}) -m str {b} }}"
                           f" {{ var({KEY_VAR}) -m found }}")
        out.append(line)
    if not added:
        return config
    sections = [line for b, servers in backends.items() for line in backend_section(b, servers)]
    return "\n".join(out).rstrip("\n") + "\n" + "\n".join(sections) + "\n"


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
