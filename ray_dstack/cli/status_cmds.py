"""`status`, `list`, `logs`: what runs on a Ray cluster, through its dashboard API (registered by
service_cmds.py, between `deploy` and `delete`).

A service with replica groups (dstack 0.21's `groups`) is shown group by group: each group's deployment,
replicas and scaling, and for the router group what the router lists (read from its replica's log,
ray_dstack/deploy/router_state.py). A service without groups shows what it always showed.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from typing import Any

from ray_dstack.cli import output
from ray_dstack.deploy import apps
from ray_dstack.deploy.dashboard import ClusterError
from ray_dstack.deploy.local import connect
from ray_dstack.deploy.probe_state import add_probe_states
from ray_dstack.deploy.router_state import add_router_states, one_line
from ray_dstack.errors import RayDstackError, UsageError
from ray_dstack.plan.traffic import routing_description
from ray_dstack.spec import REPLICA_DEPLOYMENT_NAME

# --- status / list ------------------------------------------------------------------------------------


def _summaries(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    client, _ = connect(args.address, start_if_missing=False)
    with client:
        details = client.serve_details()
        try:  # which GPU type each replica's node has; status still works without it
            nodes = client.nodes()
        except ClusterError:
            nodes = None
        summaries = apps.service_summaries(details, client.address, nodes)
        configs = apps.app_configs(details)
        now = time.time()
        for summary in summaries:  # `schedule`/`max_duration`: when it runs, from its policy's kwargs
            lifetime = lifetime_summary(configs.get(summary["name"]), now)
            if lifetime is not None:
                summary["lifetime"] = lifetime
        for summary in summaries:  # each replica's probes, from its log (ray_dstack/deploy/probe_state.py)
            add_probe_states(client, summary)
            add_router_states(client, summary)  # the router group's worker list (deploy/router_state.py)
        if any(apps.autoscales(s) for s in summaries):
            apps.with_measured_rps(summaries, [client.scrape(t) for t in client.metrics_targets()])
        return summaries, client.address


def cmd_status(args: argparse.Namespace) -> int:
    summaries, _ = _summaries(args)
    if args.name:
        match = [s for s in summaries if s["name"] == args.name]
        if not match:
            raise RayDstackError(f"no service named {args.name!r} on this cluster")
        summaries = match
    if args.json:
        output.print_json(summaries[0] if args.name else summaries)
        return 0
    if not summaries:
        output.out.print("No services deployed.")
        return 0
    for s in summaries:
        print_summary(s, detailed=True)
    return 0


def replicas_text(s: dict[str, Any]) -> str:
    """`2/2`; with groups `3/3 (router 1/1, workers 2/2)`."""
    total = f"{s['replicas']['running']}/{s['replicas']['target']}"
    groups = s.get("groups")
    if not groups:
        return total
    each = ", ".join(f"{g['name']} {g['replicas']['running']}/{g['replicas']['target']}" for g in groups)
    return f"{total} ({each})"


def cmd_list(args: argparse.Namespace) -> int:
    summaries, _ = _summaries(args)
    if args.json:
        output.print_json(summaries)
        return 0
    from rich.table import Table

    table = Table("NAME", "STATUS", "REPLICAS", "MODEL", "URL")
    for s in summaries:
        model = f"{s['model']['name']} ({s['model']['format']})" if s.get("model") else "-"
        table.add_row(s["name"], s["status"], replicas_text(s), model, s["url"])
    output.out.print(table)
    return 0


def print_summary(s: dict[str, Any], *, detailed: bool) -> None:
    con = output.out
    con.print(f"[bold]{s['name']}[/bold]  {s['status']}  {replicas_text(s)} replicas")
    con.print(f"  url: {s['url']}/", markup=False)
    if s.get("model"):
        m = s["model"]
        con.print(f"  model: {m['name']} ({m['format']}) at {m['openai_base_url']}", markup=False)
        con.print(f"  routing: {routing_description(m.get('routing') or 'least_connections')}", markup=False)
    if s.get("scaling"):
        con.print(f"  scaling: {scaling_line(s['scaling'])}", markup=False)
    if s.get("environment"):
        env = s["environment"]
        net = ", a network namespace per replica" if env.get("network_namespace") else ""
        con.print(f"  python: {env['python']} (environment {env['env']} on each node{net})", markup=False)
    if s.get("lifetime"):
        con.print(f"  {lifetime_line(s['lifetime'])}", markup=False)
    if s.get("message"):
        con.print(f"  message: {s['message']}", markup=False)
    if s.get("groups"):
        for group in s["groups"]:
            for line in group_lines(group, probes=bool(s.get("probes")), detailed=detailed):
                con.print("  " + line, markup=False)
    elif detailed:
        for line in replica_lines(s["replicas"]["items"], probes=bool(s.get("probes"))):
            con.print("  " + line, markup=False)


def _utc(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def lifetime_summary(app_config: dict[str, Any] | None, now: float) -> dict[str, Any] | None:
    """When a service with `schedule`/`max_duration` runs, as its policy decides it (the same pure function):
    `state` `scheduled` (not started yet), `running` or `stopped` (by max_duration), with UTC times."""
    from ray_dstack.serve.scaling.autoscaling_policy import next_fire, lifetime_window

    lifetime = apps.policy_lifetime(app_config)
    if lifetime is None:
        return None
    start, end, following = lifetime_window(lifetime, now)
    state = "scheduled" if start is None else "running" if end is None or now < end else "stopped"
    crons = list(lifetime.get("crons") or [])
    if state == "running" and end is not None and crons:
        following = next_fire(crons, end)  # where it will start again after this window
    return {
        "state": state,
        "crons": crons,
        "max_duration_s": lifetime.get("max_duration_s"),
        "started_at": _utc(start),
        "stops_at": _utc(end) if state == "running" else None,
        "stopped_at": _utc(end) if state == "stopped" else None,
        "next_start": _utc(following),
    }


def lifetime_line(lt: dict[str, Any]) -> str:
    """`scheduled: starts at …` / `running since …, max_duration stops it at …` / `stopped by max_duration at …,
    next start …` (times in UTC)."""
    def text(iso: str | None) -> str:
        return iso.replace("T", " ").replace("Z", " UTC") if iso else "never"

    if lt["state"] == "scheduled":
        line = f"scheduled: starts at {text(lt['next_start'])}"
    elif lt["state"] == "running":
        line = f"running since {text(lt['started_at'])}"
        if lt.get("stops_at"):
            line += f", max_duration stops it at {text(lt['stops_at'])}"
            if lt["crons"]:
                line += f", next start {text(lt['next_start'])}"
    else:
        line = f"stopped by max_duration at {text(lt['stopped_at'])}"
        line += f", next start {text(lt['next_start'])}" if lt["crons"] else " (no schedule: it stays at 0 replicas)"
    return line + (f" (schedule: {', '.join(lt['crons'])})" if lt["crons"] else "")


def scaling_line(sc: dict[str, Any]) -> str:
    rps = "n/a" if sc.get("measured_rps") is None else f"{sc['measured_rps']:.2f}"
    return (f"{sc['min']}..{sc['max']} replicas, target {sc['target_rps']:g} rps; "
            f"measured {rps} rps, desired {sc.get('desired')}")


def replica_lines(items: list[dict[str, Any]], *, probes: bool) -> list[str]:
    lines = []
    for r in items:
        gpu = f", {r['node_accelerator_type']}" if r.get("node_accelerator_type") else ""
        lines.append(f"replica {r['replica_id']}: {r['state']} on node {r['node_ip']} ({r['node_id']}{gpu})")
        if probes:
            lines.append(f"  probes: {probe_line(r.get('probes'))}")
    return lines


def group_lines(g: dict[str, Any], *, probes: bool, detailed: bool) -> list[str]:
    """A replica group: `group workers (worker; deployment ServiceReplica-workers): 2/2 replicas`, then its
    scaling, message, router state and replicas, indented."""
    router = g.get("router")
    role = f"{g['role']}, {router['type']}" if router and router.get("type") else g["role"]
    lines = [f"group {g['name']} ({role}; deployment {g['deployment']}): "
             f"{g['replicas']['running']}/{g['replicas']['target']} replicas"]
    if g.get("scaling"):
        lines.append(f"  scaling: {scaling_line(g['scaling'])}")
    if g.get("message"):
        lines.append(f"  message: {g['message']}")
    if router is not None:
        lines.extend("  " + line for line in router_lines(router))
    if detailed:
        lines.extend("  " + line for line in replica_lines(g["replicas"]["items"], probes=probes))
    return lines


def router_lines(router: dict[str, Any]) -> list[str]:
    """`router: lists 2 worker(s): http://10.0.0.2:40001 (regular, healthy), ...` and its last error."""
    if router.get("type") != "sglang":
        return [f"router: {router.get('type')} (its frontend discovers the workers; ray-dstack keeps no list)"]
    if router.get("workers") is None:
        where = "replica" if router.get("replica_id") else "group (no replica placed yet)"
        return [f"router: state unknown (no router state in the router {where}'s log yet)"]
    workers, error = router["workers"], router.get("last_error")
    listed = ", ".join(f"{w.get('url')} ({w.get('worker_type') or '?'}, {_health(w.get('healthy'))})"
                       for w in workers)
    lines = []
    if not error:
        lines.append(f"router: lists {len(workers)} worker(s)" + (f": {listed}" if listed else ""))
    elif workers:  # what it listed when it last answered
        lines.append(f"router: listed {len(workers)} worker(s) when it last answered: {listed}")
    if router.get("adding"):
        lines.append(f"router: adding {', '.join(router['adding'])}")
    if error:
        lines.append(f"router error: {one_line(error)}")
    return lines


def _health(healthy: bool | None) -> str:
    return "healthy" if healthy else "not healthy" if healthy is False else "health unknown"


def probe_line(states: list[dict[str, Any]] | None) -> str:
    """`✓ GET /health (HTTP 200); × POST /ready (HTTP 503: loading)`, as dstack's `ps --verbose` marks them."""
    if states is None:
        return "unknown (no probe state in the replica's log yet)"
    return "; ".join(f"{'✓' if p.get('ready') else '×'} {p.get('probe')} ({p.get('last')})" for p in states)


# --- logs ---------------------------------------------------------------------------------------------


def log_replicas(name: str, app: dict[str, Any], *, group: str | None, replica: str | None) -> list[dict[str, Any]]:
    """The replicas whose logs `logs` prints: the ingress deployment's (a service without groups: its only
    one), or `group`'s; `replica` (an id prefix) is looked for in every group unless `group` is given."""
    summary = apps.service_summary(name, app, "")
    groups = summary.get("groups") or []
    if group is not None:
        if not groups:
            raise UsageError(f"service {name!r} has no replica groups (--group {group})")
        match = [g for g in groups if g["name"] == group]
        if not match:
            raise UsageError(f"service {name!r} has no replica group {group!r}; its groups: "
                             + ", ".join(g["name"] for g in groups))
        items = match[0]["replicas"]["items"]
    elif groups and not replica:
        items = next(g for g in groups if g["deployment"] == REPLICA_DEPLOYMENT_NAME)["replicas"]["items"]
    else:
        items = summary["replicas"]["items"]
    replicas = [r for r in items if r.get("node_id") and r.get("log_file_path")]
    if replica:
        replicas = [r for r in replicas if r["replica_id"].startswith(replica)]
    if not replicas:
        which = f"group {group!r} of service {name!r}" if group else f"service {name!r}"
        raise RayDstackError(f"{which} has no replica with logs yet")
    return replicas


def cmd_logs(args: argparse.Namespace) -> int:
    client, _ = connect(args.address, start_if_missing=False)
    with client:
        details = client.serve_details()
        app = (details.get("applications") or {}).get(args.name)
        if app is None or not apps.is_service(app.get("deployed_app_config")):
            raise RayDstackError(f"no service named {args.name!r} on this cluster")
        replicas = log_replicas(args.name, app, group=args.group, replica=args.replica)
        if args.follow:
            r = replicas[0]
            for chunk in client.follow_log(node_id=r["node_id"], filename=r["log_file_path"], lines=args.lines):
                sys.stdout.write(chunk)
                sys.stdout.flush()
            return 0
        for r in replicas:
            text = client.log(node_id=r["node_id"], filename=r["log_file_path"], lines=args.lines)
            if len(replicas) > 1:
                group = f" (group {r['group']})" if r.get("group") else ""
                sys.stdout.write(f"==> replica {r['replica_id']}{group} on {r['node_ip']} <==\n")
            sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    return 0


# --- registration -------------------------------------------------------------------------------------


def register_status(sub: argparse._SubParsersAction, address) -> None:
    """`status` and `list`; `address(parser)` adds --address."""
    p = sub.add_parser("status", help="show a service (or all) with replicas and where they run "
                       "(a service with replica groups: each group, and what its router lists)")
    p.add_argument("name", nargs="?")
    address(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("list", help="list services")
    address(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)


def register_logs(sub: argparse._SubParsersAction, address) -> None:
    p = sub.add_parser("logs", help="print a service's logs (its commands' output and the replica's); "
                       "--group picks a replica group")
    p.add_argument("name")
    address(p)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("--group", metavar="NAME",
                   help="a service with replica groups: the logs of this group's replicas (default: the group "
                   "that takes the service's traffic, the router group if there is one, else the first)")
    p.add_argument("--replica", help="only the replica whose id starts with this (in any group unless --group)")
    p.add_argument("-n", "--lines", type=int, default=1000, help="lines from the end of each log")
    p.set_defaults(func=cmd_logs)
