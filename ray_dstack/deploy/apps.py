"""Pure functions over Serve's application details: merging a deploy into the whole set, the gateway's
routing table, and the summaries that `status`/`list` print.

Serve's REST API replaces the whole set of applications on every PUT, so a deploy reads the running set,
changes only its own application (and the gateway that routes to models), and writes everything back.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from prometheus_client.parser import text_string_to_metric_families

from ray_dstack.errors import RayDstackError, UsageError
from ray_dstack.plan.plan import environment_of
from ray_dstack.plan.traffic import UVICORN_TRUST_NONE
from ray_dstack.spec import (
    GATEWAY_APP_NAME,
    application_specs,
    GATEWAY_APP_ROUTE_PREFIX,
    GATEWAY_DEPLOYMENT_NAME,
    GATEWAY_IMPORT_PATH,
    GATEWAY_ROUTE_PREFIX,
    REPLICA_DEPLOYMENT_NAME,
    SERVICE_IMPORT_PATH,
    ServiceSpec,
)

OUR_IMPORT_PATHS = {SERVICE_IMPORT_PATH, GATEWAY_IMPORT_PATH}
# Replicas of the `/v1` gateway: each enforces 1/GATEWAY_REPLICAS of every service's `rate_limits`.
GATEWAY_REPLICAS = 2
DEFAULT_HTTP_PORT = 8100


def app_configs(details: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """Every application's deployed config by name (None for apps deployed imperatively with serve.run)."""
    return {
        name: app.get("deployed_app_config")
        for name, app in (details.get("applications") or {}).items()
        if app.get("status") != "DELETING"
    }


def is_service(app_config: dict[str, Any] | None) -> bool:
    return bool(app_config) and app_config.get("import_path") == SERVICE_IMPORT_PATH


def policy_lifetime(app_config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The `lifetime` kwargs (`schedule`, `max_duration`) of a service's autoscaling policy (the ingress
    deployment's first; every group of a service carries the same)."""
    deployments = sorted((app_config or {}).get("deployments") or [],
                         key=lambda d: d.get("name") != REPLICA_DEPLOYMENT_NAME)
    for deployment in deployments:
        policy = (deployment.get("autoscaling_config") or {}).get("policy") or {}
        lifetime = (policy.get("policy_kwargs") or {}).get("lifetime")
        if isinstance(lifetime, dict):
            return lifetime
    return None


def lifetime_start(app_config: dict[str, Any] | None, now: float) -> float:
    """What a (re)deployed service's `schedule`/`max_duration` count from: the running service's own start while it
    is on (a redeploy changes it in place, as dstack updates an active run), else `now` (a new service, or one
    `max_duration` stopped, starts afresh, as dstack's next `apply` submits a new run)."""
    from ray_dstack.serve.scaling.autoscaling_policy import active_window

    lifetime = policy_lifetime(app_config)
    if lifetime is None or lifetime.get("deployed_at") is None:
        return now
    active, _ = active_window(lifetime, now)
    return float(lifetime["deployed_at"]) if active else now


def created_time(app_config: dict[str, Any] | None) -> int | None:
    """The `created` time a running service was first deployed with (kept across redeploys), if any."""
    if not is_service(app_config):
        return None
    created = (app_config.get("args") or {}).get("created")
    return int(created) if created else None


def service_spec(app_config: dict[str, Any]) -> ServiceSpec:
    """The spec of the group that takes the service's traffic (the only one without groups)."""
    return ServiceSpec.model_validate(application_specs(app_config)[0])


def group_specs(app_config: dict[str, Any] | None) -> list[ServiceSpec]:
    """The replica groups' specs of a service with `groups`, in file order (each from its deployment's
    options: ray_dstack.spec.application_specs); [] for a service without groups."""
    if not is_service(app_config):
        return []
    specs = [ServiceSpec.model_validate(s) for s in application_specs(app_config)]
    main = specs[0]
    if main.group is None:
        return []
    order = {name: i for i, name in enumerate(main.group.groups)}
    return sorted(specs, key=lambda s: order.get(s.group.name if s.group else "", len(order)))


def router_of(specs: list[ServiceSpec]) -> tuple[str, str] | None:
    """(router group's name, router type) of a service's group specs, or None without a router group."""
    for spec in specs:
        if spec.group is not None and spec.group.role == "router":
            return spec.group.name, spec.group.router or "sglang"
    return None


def check_router_unchanged(name: str, running: dict[str, Any] | None, new: list[ServiceSpec]) -> None:
    """dstack's rule for a redeploy (spec §1.4): adding or removing the router group, moving the router to
    another group or changing its `type` is not an in-place update. `running`: the running app's config (None,
    or not a service: a first deploy, nothing to compare); `new`: the plan's group specs ([] without groups)."""
    if not is_service(running):
        return
    old_router, new_router = router_of(group_specs(running)), router_of(new)
    if old_router == new_router:
        if old_router is not None and old_router[1] == "dynamo":
            _check_dynamo_router_unchanged(name, group_specs(running), new)
        return
    if old_router is None:
        what = f"adds the {new_router[1]} router group {new_router[0]!r}"
    elif new_router is None:
        what = f"removes the {old_router[1]} router group {old_router[0]!r}"
    elif old_router[0] != new_router[0]:
        what = f"moves the router from group {old_router[0]!r} to group {new_router[0]!r}"
    else:
        what = f"router group {old_router[0]!r}, type {old_router[1]} → {new_router[1]}"
    raise UsageError(
        f"the router group of service {name!r} cannot change in place ({what}): delete the service "
        f"(`ray-dstack delete {name}`) and deploy it again"
    )


# What a user changes in a router group's replica spec (the rest is set by `deploy` or is the group's count).
_ROUTER_FIELDS = ("commands", "image", "python", "entrypoint", "env", "port", "port_from_env", "probes",
                  "working_dir", "model", "rate_limits")


def _check_dynamo_router_unchanged(name: str, old: list[ServiceSpec], new: list[ServiceSpec]) -> None:
    """dstack refuses any in-place change to a Dynamo router group (spec §1.7): its workers hold the router's
    address and registered with its etcd, so a new router would be empty and they would not know it."""
    def router_fields(specs: list[ServiceSpec]) -> dict[str, Any]:
        spec = next(s for s in specs if s.group is not None and s.group.role == "router")
        return spec.model_dump(mode="json", include=set(_ROUTER_FIELDS))

    before, after = router_fields(old), router_fields(new)
    changed = sorted(k for k in _ROUTER_FIELDS if before.get(k) != after.get(k))
    if changed:
        raise UsageError(
            f"the Dynamo router group of service {name!r} cannot change in place (changed: {', '.join(changed)}; "
            f"its workers hold its address and registered with it): delete the service (`ray-dstack delete "
            f"{name}`) and deploy it again")


def check_can_write(details: dict[str, Any], name: str) -> None:
    configs = app_configs(details)
    imperative = [n for n, cfg in configs.items() if cfg is None]
    if imperative:
        raise RayDstackError(
            "this cluster runs Serve applications deployed from Python with serve.run "
            f"({', '.join(sorted(imperative))}); Serve cannot mix them with config-file deploys. "
            "Delete them first or use a separate cluster."
        )
    existing = configs.get(name)
    if name == GATEWAY_APP_NAME or (existing is not None and existing.get("import_path") not in OUR_IMPORT_PATHS):
        raise UsageError(
            f"name {name!r} is already taken by a Serve application that ray-dstack did not deploy "
            f"(import_path {existing.get('import_path') if existing else GATEWAY_IMPORT_PATH}); pick another "
            "with --name"
        )


def gateway_routes(services: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Model name → the service that serves it, with what the gateway needs to authorise and adapt."""
    routes: dict[str, Any] = {}
    for name, cfg in sorted(services.items()):
        spec = service_spec(cfg)
        if spec.model is None:
            continue
        if spec.model.name in routes:
            raise UsageError(
                f"model.name {spec.model.name!r} is already served by service {routes[spec.model.name]['app']!r}; "
                "two services cannot publish the same model name"
            )
        routes[spec.model.name] = {
            "app": name,
            # Where HAProxy sends the model's `/v1` requests (serve/haproxy_v1.py): the service's own route.
            "route_prefix": cfg.get("route_prefix") or f"/{name}",
            "format": spec.model.format,
            "auth": spec.auth.model_dump(mode="json"),
            "created": int(cfg.get("args", {}).get("created", 0)),
            "request_timeout_s": spec.request_timeout_s,  # bounds the gateway's retries of one request
            # `rate_limits` hold for the model's `/v1` requests too, checked as the service's path `/v1/<route>`
            # (serve/ingress/gateway_traffic.py); whose X-Forwarded-For to believe comes with them.
            "rate_limits": [r.model_dump(mode="json") for r in spec.rate_limits],
            "trusted_proxies": list(spec.trusted_proxies),
            "routing": spec.routing,  # HAProxy's choice of replica (serve/ingress/prefix_affinity.py)
        }
    return routes


def gateway_app(routes: dict[str, Any], route_prefix: str = GATEWAY_APP_ROUTE_PREFIX) -> dict[str, Any]:
    return {
        "name": GATEWAY_APP_NAME,
        # The ingress root: the gateway answers `/health` and `/v1/...`; `/<service>` prefixes are longer.
        "route_prefix": route_prefix,
        "import_path": GATEWAY_IMPORT_PATH,
        # uvicorn believes no one's X-Forwarded-For, as in the services' applications (plan/traffic.py).
        "runtime_env": {"env_vars": dict(UVICORN_TRUST_NONE)},
        "args": {},
        "deployments": [
            {
                "name": GATEWAY_DEPLOYMENT_NAME,
                "num_replicas": GATEWAY_REPLICAS,
                "max_ongoing_requests": 1024,
                "ray_actor_options": {"num_cpus": 0},
                "user_config": {"routes": routes, "replicas": GATEWAY_REPLICAS},
            }
        ],
    }


def merged_config(
    details: dict[str, Any],
    *,
    put: dict[str, Any] | None = None,
    remove: str | None = None,
    http_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole Serve config after adding/replacing `put` and/or removing `remove`."""
    configs = {n: c for n, c in app_configs(details).items() if c is not None and n != GATEWAY_APP_NAME}
    if remove is not None:
        configs.pop(remove, None)
    if put is not None:
        configs[put["name"]] = put
    services = {n: c for n, c in configs.items() if is_service(c)}
    routes = gateway_routes(services)
    applications = [configs[n] for n in sorted(configs)]
    if services:
        # Deployed with the first service (even one without a model) so `GET /health` answers; mounted at
        # `/v1` instead of the root when an application ray-dstack did not deploy already owns "/".
        root_taken = any(c.get("route_prefix") == GATEWAY_APP_ROUTE_PREFIX for c in configs.values())
        applications.append(gateway_app(routes, GATEWAY_ROUTE_PREFIX if root_taken else GATEWAY_APP_ROUTE_PREFIX))
    running_http = details.get("http_options") or {}
    http = {"host": running_http.get("host"), "port": running_http.get("port")}
    if not http["port"]:
        http = dict(http_options or {"host": "0.0.0.0", "port": DEFAULT_HTTP_PORT})
    config: dict[str, Any] = {
        "proxy_location": details.get("proxy_location") or "EveryNode",
        "http_options": http,
        "logging_config": {"enable_access_log": False},
        "applications": applications,
    }
    return config


def http_base_url(details: dict[str, Any], dashboard_address: str) -> str:
    http = details.get("http_options") or {}
    host = http.get("host") or "127.0.0.1"
    port = http.get("port") or DEFAULT_HTTP_PORT
    if host in ("0.0.0.0", "::", ""):
        host = urlparse(dashboard_address).hostname or "127.0.0.1"
    return f"http://{host}:{port}"


def node_accelerator_type(node: dict[str, Any] | None) -> str | None:
    """A node's GPU type: its `ray.io/accelerator-type` label, else its `accelerator_type:<T>` resource."""
    if not node:
        return None
    labels = node.get("labels") or {}
    resources = node.get("resources_total") or {}
    return labels.get("ray.io/accelerator-type") or next(
        (k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")), None
    )


def _replica_items(
    deployment: dict[str, Any], nodes: dict[str, dict[str, Any]] | None, group: str | None = None
) -> list[dict[str, Any]]:
    return [
        {
            "replica_id": r.get("replica_id"),
            "state": r.get("state"),
            "node_id": r.get("node_id"),
            "node_ip": r.get("node_ip"),
            "pid": r.get("pid"),
            "log_file_path": r.get("log_file_path"),
            **_node_info(r.get("node_id"), nodes),
            **({"group": group} if group is not None else {}),
        }
        for r in deployment.get("replicas") or []
    ]


def _replicas(deployment: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, Any]:
    running = sum(r.get("state") == "RUNNING" for r in items)
    return {"running": running, "target": deployment.get("target_num_replicas", 0), "items": items}


def _scaling(spec: ServiceSpec, deployment: dict[str, Any]) -> dict[str, Any] | None:
    if spec.scaling is None:
        return None
    return {
        "min": spec.scaling.min_replicas,
        "max": spec.scaling.max_replicas,
        "target_rps": spec.scaling.target,
        "desired": deployment.get("target_num_replicas"),
        "measured_rps": None,  # filled by `with_measured_rps` (needs the nodes' metrics endpoints)
    }


def group_summary(
    spec: ServiceSpec, deployments: dict[str, Any], nodes: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """One replica group of a service with `groups`: its deployment's replicas, its scaling, and for the
    router group a `router` whose state deploy/router_state.py fills from the router replica's log."""
    group = spec.group
    assert group is not None
    deployment = deployments.get(group.deployment) or {}
    summary: dict[str, Any] = {
        "name": group.name,
        "role": group.role,
        "deployment": group.deployment,
        "status": deployment.get("status"),
        "message": deployment.get("message") or "",
        "replicas": _replicas(deployment, _replica_items(deployment, nodes, group.name)),
    }
    scaling = _scaling(spec, deployment)
    if scaling is not None:
        summary["scaling"] = scaling
    if group.role == "router":
        summary["router"] = {"type": group.router, "replica_id": None, "workers": None, "last_error": None,
                             "adding": None}
    return summary


def service_summary(
    name: str, app: dict[str, Any], base_url: str, nodes: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """`nodes`: the dashboard's nodes by node_id (optional): adds each replica's node GPU type and count.

    A service with `groups` has `groups` besides (one group_summary each, in file order); its `replicas` then
    count every group's replicas (each item names its `group`), and `scaling` is per group."""
    cfg = app.get("deployed_app_config") or {}
    spec = service_spec(cfg) if is_service(cfg) else None
    deployments = app.get("deployments") or {}
    deployment = deployments.get(REPLICA_DEPLOYMENT_NAME, {})
    groups = [group_summary(s, deployments, nodes) for s in group_specs(cfg)]
    if groups:
        items = [item for g in groups for item in g["replicas"]["items"]]
        replicas = {"running": sum(g["replicas"]["running"] for g in groups),
                    "target": sum(g["replicas"]["target"] or 0 for g in groups), "items": items}
        message = next((f"group {g['name']}: {g['message']}" for g in groups if g["message"]), "")
    else:
        replicas = _replicas(deployment, _replica_items(deployment, nodes))
        message = deployment.get("message") or ""
    route = app.get("route_prefix") or cfg.get("route_prefix") or f"/{name}"
    summary: dict[str, Any] = {
        "name": name,
        "status": app.get("status"),
        "message": app.get("message") or message,
        "url": base_url + (route if route != "/" else ""),
        "replicas": replicas,
        "model": None,
        "auth": spec.auth.enabled if spec else None,
        "environment": environment_of(spec) if spec else None,
        # The probes every replica must pass; each replica's state is added by deploy/probe_state.py.
        "probes": [f"{p.method.upper()} {p.path}" for p in spec.probes] if spec else None,
    }
    if spec and spec.model:
        summary["model"] = {
            "name": spec.model.name,
            "format": spec.model.format,
            "openai_base_url": base_url + GATEWAY_ROUTE_PREFIX,
            "routing": spec.routing,
        }
    if groups:
        summary["groups"] = groups
    elif spec and spec.scaling:
        summary["scaling"] = _scaling(spec, deployment)
    return summary


def _node_info(node_id: str | None, nodes: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    if nodes is None:
        return {}
    node = nodes.get(node_id or "")
    gpus = ((node or {}).get("resources_total") or {}).get("GPU")
    return {"node_accelerator_type": node_accelerator_type(node), "node_gpus": gpus}


REPLICA_RPS_METRIC = "ray_dstack_replica_rps"


def measured_rps(metrics_texts: list[str], service: str, replica_ids: set[str]) -> float | None:
    """The service's RPS: the sum of its running replicas' `ray_dstack_replica_rps` gauges, read from each node's
    Prometheus text with prometheus_client's parser.

    Only replicas that run now count: a stopped replica's last value may linger in the exporter. A text the
    parser rejects (a node answering something else than its exporter) counts as no samples."""
    found, total = False, 0.0
    for text in metrics_texts:
        try:
            samples = [s for family in text_string_to_metric_families(text) for s in family.samples
                       if s.name == REPLICA_RPS_METRIC]
        except ValueError:
            continue
        for sample in samples:
            if sample.labels.get("service") != service or sample.labels.get("replica") not in replica_ids:
                continue
            found = True
            total += sample.value
    return total if found else None


def service_summaries(
    details: dict[str, Any], dashboard_address: str, nodes: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    base = http_base_url(details, dashboard_address)
    by_id = None if nodes is None else {n.get("node_id"): n for n in nodes}
    return [
        service_summary(name, app, base, by_id)
        for name, app in sorted((details.get("applications") or {}).items())
        if is_service(app.get("deployed_app_config"))
    ]


def with_measured_rps(summaries: list[dict[str, Any]], metrics_texts: list[str]) -> None:
    """Fill `measured_rps` of each `scaling`: the service's RPS over its running replicas; with groups, every
    autoscaling group's is the service's (dstack scales every group on the service's request rate, which the
    ingress group's replicas count: the other groups take no request from Serve)."""
    for summary in summaries:
        groups = summary.get("groups") or []
        counted = next((g for g in groups if g["deployment"] == REPLICA_DEPLOYMENT_NAME), summary)
        if not any("scaling" in part for part in [summary, *groups]):
            continue
        running = {r["replica_id"] for r in counted["replicas"]["items"] if r.get("state") == "RUNNING"}
        rps = measured_rps(metrics_texts, summary["name"], running)
        for part in [summary, *groups]:
            if "scaling" in part:
                part["scaling"]["measured_rps"] = rps


def autoscales(summary: dict[str, Any]) -> bool:
    """Whether the service, or one of its groups, autoscales (its RPS is worth measuring)."""
    return "scaling" in summary or any("scaling" in g for g in summary.get("groups", []))
