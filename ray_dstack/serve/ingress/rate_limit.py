"""`rate_limits` at the ingress: nginx's `limit_req zone rate=R burst=B nodelay`, which dstack's gateway uses.

Algorithm: GCRA (the generic cell rate algorithm), which is what nginx's leaky bucket with `nodelay` amounts to.
Each partition keeps one number, its theoretical arrival time `tat`. With emission interval T = 1/R and
tolerance τ = B·T, a request at `now` is served when `max(tat, now) − now ≤ τ` and then moves `tat` on by T;
otherwise it is refused, and `Retry-After` is the time until it would be served. So: B+1 requests at once, then
one every T; `rps` below 1 works the same (0.5 → one request per 2 s).

Matching: a request is limited by the rule whose `prefix` (a plain string prefix of the path relative to the
service's route, as an nginx `location`) is the longest one that matches; a path no prefix matches is not limited.
Partitions: the client's address (`ip_address`) or a header's value (`header`; requests without it share one
partition).

Cluster-wide limits: every ingress process (each replica of the service, and the `/v1` gateway) enforces the
limit for `share` of the traffic: R·share per second and B·share of burst. With N processes, share = 1/N, so
while the load balancer spreads a client's requests evenly the service as a whole serves R per second, and an
initial burst can reach B + N requests, N − 1 more than nginx's B + 1 (each process serves ⌊B/N⌋ + 1 at once).
A client whose requests all land on one process gets R/N. See docs/traffic.md.

Cost: one dict lookup and a few float operations per request (bench: tests/serve/ingress/test_rate_limit.py).
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from ray_dstack.spec import RateLimitSpec

# Partitions whose `tat` has passed carry no state (a fresh partition behaves the same): they are swept once
# the table grows past this size, so memory follows the number of clients active within the last T·(B+1).
SWEEP_AT = 10_000


@dataclass(frozen=True)
class Verdict:
    """Refusal: which rule refused the request and how long until it would be served."""

    rule: RateLimitSpec
    retry_after_s: float

    @property
    def retry_after_header(self) -> str:
        """`Retry-After` in whole seconds, at least 1 (HTTP allows only integers)."""
        return str(max(1, math.ceil(self.retry_after_s)))


class _Rule:
    __slots__ = ("spec", "interval", "tolerance", "tat")

    def __init__(self, spec: RateLimitSpec, share: float) -> None:
        self.spec = spec
        self.interval = 1.0 / (spec.rps * share)
        self.tolerance = spec.burst * share * self.interval
        self.tat: dict[str, float] = {}


class RateLimiter:
    """The rules of one service in one ingress process. Not thread-safe: one event loop uses it."""

    def __init__(self, rules: Iterable[RateLimitSpec], *, share: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._specs = list(rules)
        self._rules: list[_Rule] = []
        self.set_share(share)

    def set_share(self, share: float) -> None:
        """The fraction of the service's traffic this process limits (1/N with N ingress processes); partitions
        keep their state, so a change of N never lets a burst through."""
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self.share = share
        old = {id(r.spec): r.tat for r in self._rules}
        # Longest prefix first: the first rule that matches a path is the one that applies.
        self._rules = sorted((_Rule(s, share) for s in self._specs), key=lambda r: len(r.spec.prefix), reverse=True)
        for rule in self._rules:
            rule.tat = old.get(id(rule.spec), rule.tat)

    def __bool__(self) -> bool:
        return bool(self._rules)

    def rule_for(self, path: str) -> _Rule | None:
        for rule in self._rules:
            if path.startswith(rule.spec.prefix):
                return rule
        return None

    def check(self, path: str, headers: Mapping[str, str], client: str | None) -> Verdict | None:
        """None when the request may go on; a `Verdict` when it must get 429. `path` is relative to the
        service's route; `headers` a case-insensitive mapping (Starlette's) or one with lower-case keys."""
        rule = self.rule_for(path)
        if rule is None:
            return None
        spec = rule.spec
        key = (headers.get(spec.header) or "") if spec.header is not None else (client or "")
        now = self.clock()
        table = rule.tat
        tat = table.get(key, now)
        if tat < now:
            tat = now
        wait = tat - now - rule.tolerance
        if wait > 1e-9:
            return Verdict(spec, wait)
        table[key] = tat + rule.interval
        if len(table) > SWEEP_AT:
            self._sweep(table, now)
        return None

    @staticmethod
    def _sweep(table: dict[str, float], now: float) -> None:
        for key in [k for k, t in table.items() if t <= now]:
            del table[key]

    def partitions(self) -> int:
        return sum(len(r.tat) for r in self._rules)


class TrustedProxies:
    """Addresses/networks whose `X-Forwarded-For` is believed. Anyone else's header is ignored: the client
    address is then the TCP peer itself, so a client cannot choose its own partition."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.networks = [ipaddress.ip_network(e.strip(), strict=False) for e in entries if e.strip()]

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    def client_address(self, peer: str | None, forwarded_for: str | None) -> str | None:
        """The first address, from the right, of `X-Forwarded-For` + peer that is not a trusted proxy."""
        if not self.networks or peer is None or not forwarded_for or not self.trusts(peer):
            return peer
        hops = [h.strip() for h in forwarded_for.split(",")]
        for hop in reversed(hops):
            if hop and not self.trusts(hop):
                return hop
        return hops[0] or peer


def parse_trusted_proxies(text: str | None) -> list[str]:
    """`10.0.0.0/8, 192.168.1.5` → the entries; raises ValueError naming a bad one."""
    entries = [e.strip() for e in (text or "").split(",") if e.strip()]
    for entry in entries:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(f"not an IP address or network: {entry!r}") from None
    return entries
