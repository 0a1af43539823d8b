"""Watching a deploy until every replica is ready, or until it is clear it cannot become ready."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray_dstack.deploy import apps, router_state
from ray_dstack.deploy.dashboard import DashboardClient
from ray_dstack.deploy.probe_state import why_not_ready
from ray_dstack.spec import REPLICA_DEPLOYMENT_NAME

UNSCHEDULABLE_MARKERS = ("to be scheduled", "Resources required for each replica")
ERROR_MARKER = "ServiceProcessError: "
FAILED_STATES = ("UNHEALTHY", "DEPLOY_FAILED")
# How often `deploy` reads the router replica's log for its state while it waits (a log tail per read).
ROUTER_CHECK_S = 3.0


@dataclass
class RolloutResult:
    ok: bool
    reason: str = ""
    app: dict[str, Any] = field(default_factory=dict)


def _deployment(app: dict[str, Any]) -> dict[str, Any]:
    return (app.get("deployments") or {}).get(REPLICA_DEPLOYMENT_NAME) or {}


@dataclass
class _Group:
    """One deployment of a service's application: the only one (`name` None) of a service without groups,
    else a replica group's (`role`, `router`: its GroupSpec's)."""

    name: str | None
    deployment_name: str
    deployment: dict[str, Any]
    role: str | None = None
    router: str | None = None

    @property
    def label(self) -> str:
        """How a reason names the group (nothing for a service without groups)."""
        return f"group {self.name}: " if self.name is not None else ""

    @property
    def replicas(self) -> list[dict[str, Any]]:
        return self.deployment.get("replicas") or []


def _groups(app: dict[str, Any]) -> list[_Group]:
    """The app's deployments, one per replica group in file order (the specs of the deployed config)."""
    deployments = app.get("deployments") or {}
    specs = apps.group_specs(app.get("deployed_app_config"))
    if not specs:
        return [_Group(None, REPLICA_DEPLOYMENT_NAME, _deployment(app))]
    return [_Group(g.name, g.deployment, deployments.get(g.deployment) or {}, g.role, g.router)
            for g in (s.group for s in specs) if g is not None]


def progress_line(app: dict[str, Any]) -> str:
    """`RUNNING: 2/2 replicas running (...)`; with groups `DEPLOYING: router 1/1, workers 0/2 replicas running
    (router: ...; workers: ...)`, every group's replicas counted."""
    groups = _groups(app)

    def states(group: _Group) -> str:
        return ", ".join(f"{r.get('replica_id', '?')[:8]} {r.get('state')}" for r in group.replicas) or "none yet"

    def count(group: _Group) -> str:
        running = sum(r.get("state") == "RUNNING" for r in group.replicas)
        return f"{running}/{group.deployment.get('target_num_replicas', '?')}"

    if groups[0].name is None:
        return f"{app.get('status')}: {count(groups[0])} replicas running ({states(groups[0])})"
    return (f"{app.get('status')}: {', '.join(f'{g.name} {count(g)}' for g in groups)} replicas running "
            f"({'; '.join(f'{g.name}: {states(g)}' for g in groups)})")


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


def _own_error(message: str) -> str | None:
    """Our replica's own error (ServiceProcessError) in a deployment's message, or None."""
    if ERROR_MARKER in message:
        return message[message.rindex(ERROR_MARKER) + len(ERROR_MARKER):].strip()
    return None


def failure_reason(app: dict[str, Any]) -> str:
    """The most specific reason Serve gives: our replica's own error over Serve's summary. With groups: from
    the group whose deployment failed, named (`group workers: the service's commands exited with code 7`)."""
    groups = _groups(app)
    for group in groups:
        own = _own_error(group.deployment.get("message") or "")
        if own:
            return group.label + own
    failed = [g for g in groups if g.deployment.get("status") in FAILED_STATES] + groups
    for group in failed:
        if group.deployment.get("message"):
            return group.label + group.deployment["message"].strip()
    return (app.get("message") or "").strip()


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


def placement_problems(app: dict[str, Any], deployments: list[dict[str, Any]], nodes: list[dict[str, Any]]) -> str | None:
    """Why no node could host a replica of a deployment that has none running yet, for each such deployment of
    the app (`deployments`: the application config's, with their `ray_actor_options`); with groups, each
    problem names its group."""
    by_deployment = {g.deployment_name: g for g in _groups(app)}
    problems = []
    for deployment in deployments:
        group = by_deployment.get(deployment.get("name") or REPLICA_DEPLOYMENT_NAME)
        if group is not None and (any(r.get("state") == "RUNNING" for r in group.replicas)
                                  or group.deployment.get("target_num_replicas") == 0):
            continue  # one runs already, or none is wanted now (a group autoscaled to zero)
        problem = placement_problem(deployment.get("ray_actor_options") or {}, nodes)
        if problem:
            problems.append((group.label if group is not None else "") + problem)
    return "; ".join(problems) or None


class _RouterWatch:
    """The router group's state while `deploy` waits: a line whenever its error changes (a router that does
    not answer GET /workers is never silent), read from the router replica's log every ROUTER_CHECK_S."""

    def __init__(self, client: DashboardClient) -> None:
        self.client = client
        self.next_check = 0.0
        self.error: str | None = None  # the router's last error, as last read

    def lines(self, groups: list[_Group]) -> list[str]:
        router = next((g for g in groups if g.role == "router"), None)
        if router is None or time.monotonic() < self.next_check:
            return []
        replica, state = router_state.router_state(self.client, router.router, router.replicas)
        if replica is not None:  # a log was read: not again before ROUTER_CHECK_S
            self.next_check = time.monotonic() + ROUTER_CHECK_S
        if state is None:
            return []
        error = state.get("last_error") or None
        if error == self.error:
            return []
        self.error = error
        line = router_state.progress_line(replica, state)
        return [line] if line else []


def wait_for_service(
    client: DashboardClient,
    name: str,
    *,
    timeout_s: float,
    on_progress: Callable[[str], None],
    poll_s: float = 1.0,
    previous_deployed_time: float | None = None,
    ray_actor_options: dict[str, Any] | None = None,
    deployments: list[dict[str, Any]] | None = None,
    fail_if_unplaceable: bool = True,
    unplaceable_after_s: float = 30.0,
    more_progress: Callable[[], list[str]] | None = None,
) -> RolloutResult:
    """`previous_deployed_time`: the app's `last_deployed_time_s` before this deploy (a redeploy is
    watched only once Serve has taken the new config). `deployments`: the application config's deployments
    (every replica group's), whose `ray_actor_options` some node must be able to host; `ray_actor_options`: the
    same for the one deployment of a service without groups. `more_progress`: lines to print on each poll besides
    the replicas' states (an image pull's progress, ray_dstack/deploy/pull_watch.py)."""
    if deployments is None and ray_actor_options is not None:
        deployments = [{"name": REPLICA_DEPLOYMENT_NAME, "ray_actor_options": ray_actor_options}]
    started = time.monotonic()
    deadline = started + timeout_s
    last_line = ""
    pending_placement: str | None = None
    router = _RouterWatch(client)
    while True:
        details = client.serve_details()
        for extra in more_progress() if more_progress else ():
            on_progress(extra)
        app = (details.get("applications") or {}).get(name)
        if app is not None and app.get("last_deployed_time_s") != previous_deployed_time:
            status = app.get("status")
            groups = _groups(app)
            line = progress_line(app)
            if line != last_line:
                on_progress(line)
                last_line = line
            for extra in router.lines(groups):
                on_progress(extra)
            if status == "RUNNING" and all(g.deployment.get("status") == "HEALTHY" for g in groups):
                return RolloutResult(True, app=app)
            if status in FAILED_STATES:
                return RolloutResult(False, reason=failure_reason(app) or status, app=app)
            unschedulable = _unschedulable(app, groups)
            if unschedulable:
                return RolloutResult(False, reason=_unschedulable_reason(unschedulable, client.nodes()), app=app)
            # A replica no node can host may leave Serve silent (with a label selector even the app's
            # build task waits for a matching node), so check the nodes ourselves.
            if deployments and time.monotonic() - started > unplaceable_after_s and not all(
                any(r.get("state") == "RUNNING" for r in g.replicas) for g in groups
            ):
                problem = placement_problems(app, deployments, client.nodes())
                if problem and fail_if_unplaceable:
                    return RolloutResult(False, reason=problem, app=app)
                if problem and problem != pending_placement:
                    on_progress(f"waiting for the autoscaler to add a node: {problem}")
                pending_placement = problem
        if time.monotonic() > deadline:
            what = pending_placement or _timeout_reason(client, app or {})
            return RolloutResult(False, reason=f"not ready after {timeout_s:.0f}s: {what}", app=app or {})
        time.sleep(poll_s)


def _unschedulable(app: dict[str, Any], groups: list[_Group]) -> str | None:
    """Serve's message that a replica cannot be scheduled (a group's named), or None."""
    app_message = app.get("message") or ""
    for group in groups:
        message = app_message or group.deployment.get("message") or ""
        if any(marker in message for marker in UNSCHEDULABLE_MARKERS):
            return message if app_message else group.label + message
    return None


def _timeout_reason(client: DashboardClient, app: dict[str, Any]) -> str:
    """Why the replicas are not ready when `--timeout` runs out: a replica's own error from an earlier try,
    else the probes' last answers from the replicas still starting (the replica's own ready timeout counts
    from its start, later than the deploy's, so it usually has not failed yet) and the router's error, else
    Serve's message. With groups, each reason names its group."""
    groups = _groups(app)
    for group in groups:
        own = _own_error(group.deployment.get("message") or "")
        if own:
            return group.label + own
    reasons = []
    for group in groups:
        why = why_not_ready(client, group.replicas)
        if why:
            reasons.append(group.label + why)
        if group.role == "router":
            replica, state = router_state.router_state(client, group.router, group.replicas)
            if state is not None and state.get("last_error"):
                reasons.append(group.label + (router_state.progress_line(replica, state) or ""))
    return " | ".join(reasons) or app.get("message") or "the replicas did not become ready"
