"""The router group's state as `status` shows it and as `deploy` reports a router that does not answer.

An SGLang router replica logs a line `STATE_LOG_MARKER` + JSON whenever the state of its worker sync changes
(ray_dstack/serve/groups/sglang_sync.py): `{"type": "sglang", "workers": [{"url", "worker_type", "healthy"}],
"last_error": str|null, "adding": [urls]}`. As for the probes (probe_state.py), the state is read from the tail
of the replica's log through the dashboard's log API, never by calling the replica (Serve lets nobody call a
replica whose constructor has not returned, and the router's sync runs from before that). A state pushed out
of the tail, or a router that has not logged one yet, is unknown (None), never a wrong one.

A Dynamo router keeps no worker list of its own (its frontend discovers the workers): its state is its type.
"""

from __future__ import annotations

from typing import Any

from ray_dstack.deploy.dashboard import DashboardClient
from ray_dstack.deploy.probe_state import last_marked, replica_log
from ray_dstack.serve.groups.sglang_sync import STATE_LOG_MARKER

# The router types whose replica logs a state (the others have nothing to read).
LOGGED_TYPES = ("sglang",)


def last_router_state(log_text: str) -> dict[str, Any] | None:
    """The router's state from the last complete marker line of its replica's log, or None."""
    return last_marked(log_text, STATE_LOG_MARKER, dict)


def replica_router_state(client: DashboardClient, replica: dict[str, Any]) -> dict[str, Any] | None:
    text = replica_log(client, replica)
    return None if text is None else last_router_state(text)


def router_replica(replicas: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The router group's replica whose state counts: a running one, else one that is placed (has a log)."""
    placed = [r for r in replicas if r.get("node_id") and r.get("log_file_path")]
    return next((r for r in placed if r.get("state") == "RUNNING"), placed[0] if placed else None)


def router_state(client: DashboardClient, router_type: str | None,
                 replicas: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the replica read, its router state): (None, None) where no replica is placed or the type logs none."""
    if router_type not in LOGGED_TYPES:
        return None, None
    replica = router_replica(replicas)
    if replica is None:
        return None, None
    return replica, replica_router_state(client, replica)


def add_router_states(client: DashboardClient, summary: dict[str, Any]) -> None:
    """Fill `router` of the router group of a status summary (services with a router group only)."""
    for group in summary.get("groups") or []:
        router = group.get("router")
        if router is None:
            continue
        replica, state = router_state(client, router.get("type"), group["replicas"]["items"])
        router["replica_id"] = replica.get("replica_id") if replica else None
        if state is not None:
            router["workers"] = [
                {"url": w.get("url"), "worker_type": w.get("worker_type"), "healthy": w.get("healthy")}
                for w in state.get("workers") or [] if isinstance(w, dict)
            ]
            router["last_error"] = state.get("last_error")
            router["adding"] = list(state.get("adding") or [])


def one_line(text: str) -> str:
    """An error on one line (the router's answer quoted in it may be a multi-line page)."""
    return " ".join(str(text).split())


def progress_line(replica: dict[str, Any] | None, state: dict[str, Any] | None) -> str | None:
    """What `deploy` prints about the router while it waits: its error, or that it answers again (None while
    its state is unknown)."""
    if replica is None or state is None:
        return None
    who = f"router {str(replica.get('replica_id') or '?')[:8]}"
    if state.get("last_error"):
        return f"{who}: {one_line(state['last_error'])}"
    workers = state.get("workers") or []
    return f"{who}: answers GET /workers, lists {len(workers)} worker(s)"
