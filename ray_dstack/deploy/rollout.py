"""Watching a deploy until every replica is ready, or until it is clear it cannot become ready."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray_dstack.deploy.dashboard import DashboardClient
from ray_dstack.deploy.probe_state import why_not_ready
from ray_dstack.spec import REPLICA_DEPLOYMENT_NAME

UNSCHEDULABLE_MARKERS = ("to be scheduled", "Resources required for each replica")


@dataclass
class RolloutResult:
    ok: bool
    reason: str = ""
    app: dict[str, Any] = field(default_factory=dict)


def _deployment(app: dict[str, Any]) -> dict[str, Any]:
    return (app.get("deployments") or {}).get(REPLICA_DEPLOYMENT_NAME) or {}


def _unschedulable_reason(message: str, nodes: list[dict[str, Any]]) -> str:
    return f"{message.strip()}\nNodes in the cluster: {describe_nodes(nodes)}"


def describe_nodes(nodes: list[dict[str, Any]]) -> str:
    if not nodes:
        return "none"
    parts = []
    for node in nodes:
        if node.get("state") not in (None, "ALIVE"):
            continue
        resources = node.get("resources_total") or {}
        labels = node.get("labels") or {}
        accel = labels.get("ray.io/accelerator-type") or next(
            (k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")), None
        )
        gpus = resources.get("GPU", 0)
        kind = f"{int(gpus)}x {accel or 'GPU'}" if gpus else "no GPU"
        parts.append(f"{node.get('node_ip', '?')} ({kind}, {resources.get('CPU', 0):g} CPU)")
    return "; ".join(parts) or "none alive"


def failure_reason(app: dict[str, Any]) -> str:
    """The most specific reason Serve gives: our replica's own error over Serve's summary."""
    dep_message = _deployment(app).get("message") or ""
    marker = "ServiceProcessError: "
    if marker in dep_message:
        return dep_message[dep_message.rindex(marker) + len(marker) :].strip()
    return (dep_message or app.get("message") or "").strip()


def _selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    for key, expr in selector.items():
        value = labels.get(key)
        expr = expr.strip()
        if expr.startswith("!in(") and expr.endswith(")"):
            if value in {v.strip() for v in expr[4:-1].split(",")}:
                return False
        elif expr.startswith("in(") and expr.endswith(")"):
            if value not in {v.strip() for v in expr[3:-1].split(",")}:
                return False
        elif expr.startswith("!"):
            if value == expr[1:]:
                return False
        elif value != expr:
            return False
    return True


def placement_problem(ray_actor_options: dict[str, Any], nodes: list[dict[str, Any]]) -> str | None:
    """Why no alive node could ever host one replica (None if some node could)."""
    need_gpus = float(ray_actor_options.get("num_gpus") or 0)
    need_cpus = float(ray_actor_options.get("num_cpus") or 0)
    need_mem = float(ray_actor_options.get("memory") or 0)
    selector = ray_actor_options.get("label_selector") or {}
    alive = [n for n in nodes if n.get("state") in (None, "ALIVE")]
    for node in alive:
        res = node.get("resources_total") or {}
        if (
            res.get("GPU", 0) >= need_gpus
            and res.get("CPU", 0) >= need_cpus
            and res.get("memory", float("inf")) >= need_mem
            and _selector_matches(selector, node.get("labels") or {})
        ):
            return None
    wants = []
    if need_gpus:
        types = ""
        for expr in selector.values():
            types = expr[3:-1].replace(",", " or ") if expr.startswith("in(") else expr
        wants.append(f"{need_gpus:g} GPU" + (f" of type {types}" if types else ""))
    wants.append(f"{need_cpus:g} CPU")
    if need_mem:
        wants.append(f"{need_mem / 1024**3:.1f} GiB memory")
    return (
        f"no node can host a replica: each needs {', '.join(wants)}. "
        f"Nodes in the cluster: {describe_nodes(nodes)}"
    )


def wait_for_service(
    client: DashboardClient,
    name: str,
    *,
    timeout_s: float,
    on_progress: Callable[[str], None],
    poll_s: float = 1.0,
    previous_deployed_time: float | None = None,
    ray_actor_options: dict[str, Any] | None = None,
    fail_if_unplaceable: bool = True,
    unplaceable_after_s: float = 30.0,
    more_progress: Callable[[], list[str]] | None = None,
) -> RolloutResult:
    """`previous_deployed_time`: the app's `last_deployed_time_s` before this deploy (a redeploy is
    watched only once Serve has taken the new config). `more_progress`: lines to print on each poll besides
    the replicas' states (an image pull's progress, ray_dstack/deploy/pull_watch.py)."""
    started = time.monotonic()
    deadline = started + timeout_s
    last_line = ""
    pending_placement: str | None = None
    while True:
        details = client.serve_details()
        for extra in more_progress() if more_progress else ():
            on_progress(extra)
        app = (details.get("applications") or {}).get(name)
        if app is not None and app.get("last_deployed_time_s") != previous_deployed_time:
            status = app.get("status")
            dep = _deployment(app)
            replicas = dep.get("replicas") or []
            states = ", ".join(f"{r.get('replica_id', '?')[:8]} {r.get('state')}" for r in replicas) or "none yet"
            line = (
                f"{status}: {sum(r.get('state') == 'RUNNING' for r in replicas)}/"
                f"{dep.get('target_num_replicas', '?')} replicas running ({states})"
            )
            if line != last_line:
                on_progress(line)
                last_line = line
            message = app.get("message") or dep.get("message") or ""
            if status == "RUNNING" and dep.get("status") == "HEALTHY":
                return RolloutResult(True, app=app)
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                return RolloutResult(False, reason=failure_reason(app) or status, app=app)
            if any(marker in message for marker in UNSCHEDULABLE_MARKERS):
                return RolloutResult(False, reason=_unschedulable_reason(message, client.nodes()), app=app)
            # A replica no node can host may leave Serve silent (with a label selector even the app's
            # build task waits for a matching node), so check the nodes ourselves.
            if (
                ray_actor_options is not None
                and time.monotonic() - started > unplaceable_after_s
                and not any(r.get("state") == "RUNNING" for r in replicas)
            ):
                problem = placement_problem(ray_actor_options, client.nodes())
                if problem and fail_if_unplaceable:
                    return RolloutResult(False, reason=problem, app=app)
                if problem and problem != pending_placement:
                    on_progress(f"waiting for the autoscaler to add a node: {problem}")
                pending_placement = problem
        if time.monotonic() > deadline:
            what = pending_placement or _timeout_reason(client, app or {})
            return RolloutResult(False, reason=f"not ready after {timeout_s:.0f}s: {what}", app=app or {})
        time.sleep(poll_s)


def _timeout_reason(client: DashboardClient, app: dict[str, Any]) -> str:
    """Why the replicas are not ready when `--timeout` runs out: a replica's own error from an earlier try,
    else the probes' last answers from the replicas still starting (the replica's own ready timeout counts
    from its start, later than the deploy's, so it usually has not failed yet), else Serve's message."""
    message = _deployment(app).get("message") or ""
    if "ServiceProcessError: " in message:
        return failure_reason(app)
    return (why_not_ready(client, _deployment(app).get("replicas") or [])
            or app.get("message") or "the replicas did not become ready")
