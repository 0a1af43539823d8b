"""Each replica's probe state as `status` shows it and as `deploy` reports a probe that never passed.

The replica logs a line `STATE_LOG_MARKER` + JSON whenever a probe's readiness or last answer changes
(ray_dstack/serve/runtime/probes.py). This module reads the last such line from the tail of each replica's log through
the dashboard's log API. Why the log and not a call to the replica: while the probes have not passed, the
replica's constructor is still running, and Serve lets nobody call a replica before its constructor returns;
the log file exists (and Serve's details name it) from the moment the replica's actor is placed.

A service that prints more than LOG_LINES lines after the last change pushes the line out of reach: the state
is then unknown (None), never a wrong one.
"""

from __future__ import annotations

import json
from typing import Any

from ray_dstack.deploy.dashboard import ClusterError, DashboardClient
from ray_dstack.serve.runtime.probes import STATE_LOG_MARKER

LOG_LINES = 5000


def last_marked(log_text: str, marker: str, kind: type) -> Any:
    """The JSON after the last `marker` line of a log that parses as a `kind` (list, dict), or None.

    A line cut by the tail (or anything else that does not parse) is skipped for the one before it."""
    at = log_text.rfind(marker)
    while at >= 0:
        line = log_text[at + len(marker):].split("\n", 1)[0].strip()
        try:
            state = json.loads(line)
        except ValueError:
            state = None
        if isinstance(state, kind):
            return state
        at = log_text.rfind(marker, 0, at)
    return None


def last_state(log_text: str) -> list[dict[str, Any]] | None:
    """The probes' state from the last marker line of a replica's log, or None when there is none."""
    return last_marked(log_text, STATE_LOG_MARKER, list)


def replica_log(client: DashboardClient, replica: dict[str, Any], lines: int = LOG_LINES) -> str | None:
    """The tail of a replica's log (a replica item of `service_summary`, or Serve's replica details); None
    when it is not placed yet (no log) or its node's log cannot be read."""
    node_id, log_file = replica.get("node_id"), replica.get("log_file_path")
    if not node_id or not log_file:
        return None
    try:
        return client.log(node_id=node_id, filename=log_file, lines=lines)
    except ClusterError:
        return None  # the node is gone or its log is unreadable: unknown


def replica_state(client: DashboardClient, replica: dict[str, Any]) -> list[dict[str, Any]] | None:
    """One replica's probe state (a replica item of `service_summary`, or Serve's replica details)."""
    text = replica_log(client, replica)
    return None if text is None else last_state(text)


def add_probe_states(client: DashboardClient, summary: dict[str, Any]) -> None:
    """Fill `probes` of each replica of a service summary whose service has probes."""
    if not summary.get("probes"):
        return
    for item in summary["replicas"]["items"]:
        item["probes"] = replica_state(client, item)


def pending_answers(states: list[dict[str, Any]]) -> str:
    """`GET /fail last answered HTTP 503: still warming up` for each probe that is not ready."""
    return "; ".join(f"{p.get('probe')} last answered {p.get('last')}" for p in states if not p.get("ready"))


def why_not_ready(client: DashboardClient, replicas: list[dict[str, Any]]) -> str | None:
    """The probes' last answers of the replicas that are not running yet (deduplicated), or None."""
    answers: list[str] = []
    for replica in replicas:
        if replica.get("state") == "RUNNING":
            continue
        states = replica_state(client, replica)
        text = pending_answers(states) if states else ""
        if text and text not in answers:
            answers.append(text)
    return "probes not passing: " + " | ".join(answers) if answers else None
