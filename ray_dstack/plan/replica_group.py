"""One replica group → its Serve deployment: Ray resources, replicas or autoscaling, runtime and commands.

A service without `groups` is one group (`0`, from the top-level fields) and plans exactly as before groups
existed. With groups (dstack 0.21), each group is a deployment of the service's one Serve application; the
service-wide fields (`port`, `env`, `probes`, `auth`, `rate_limits`, `model`, ...) are the same in all of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ray_dstack import spec as rt
from ray_dstack.config import Problem, ReplicaGroup, ResourcesSpec, ServiceConfig
from ray_dstack.config.units import format_memory
from ray_dstack.plan import defaults
from ray_dstack.plan.gpus import admitted_types

_PORT_RE = re.compile(r"\$\{?" + re.escape(rt.PORT_ENV_VAR) + r"\b")


@dataclass
class GroupPlan:
    """How one replica group runs: its replica spec, Ray resources and Serve deployment options."""

    name: str
    spec: rt.ServiceSpec
    ray_actor_options: dict[str, Any]
    deployment: dict[str, Any]
    gpu_types: list[str] | None  # accelerator types admitted; None = any GPU (or no GPU requested)
    requirements: dict[str, str]  # advisory / not enforced by Ray, for display
    role: str = "replica"  # "replica" (no groups), "router", "worker", "member"

    @property
    def deployment_name(self) -> str:
        return self.deployment["name"]


@dataclass
class ResourceRequest:
    options: dict[str, Any]
    requirements: dict[str, str]
    gpu_types: list[str] | None
    warnings: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def resource_request(res: ResourcesSpec, *, has_image: bool, path: str = "resources") -> ResourceRequest:
    """Ray's request for one replica with `res`; what Ray does not enforce goes to `requirements`."""
    opts: dict[str, Any] = {}
    requirements: dict[str, str] = {}
    warnings: list[str] = []
    problems: list[Problem] = []
    if "cpu" in res.model_fields_set:
        opts["num_cpus"] = float(res.cpu.min or 0)
    else:
        opts["num_cpus"] = defaults.DEFAULT_NUM_CPUS
        requirements["cpu"] = f"{res.cpu} (dstack default)"
    if "memory" in res.model_fields_set:
        if res.memory.min:
            opts["memory"] = int(res.memory.min * 1024**3)
    else:
        if defaults.DEFAULT_MEMORY_BYTES:
            opts["memory"] = defaults.DEFAULT_MEMORY_BYTES
        requirements["memory"] = f"{res.memory} (dstack default)"
    requirements["disk"] = str(res.disk.size) + ("" if "disk" in res.model_fields_set else " (dstack default)")
    if res.shm_size is not None and not has_image:  # with `image`: the container's --shm-size
        requirements["shm_size"] = format_memory(res.shm_size)
    gpu_types: list[str] | None = None
    if res.gpu is not None and (res.gpu.count.min or 0) > 0:
        opts["num_gpus"] = float(res.gpu.count.min or 0)
        if res.gpu.count.max != res.gpu.count.min:
            warnings.append(f"`{path}.gpu` count {res.gpu.count}: each replica requests {res.gpu.count.min} GPU(s)")
        gpu_types = admitted_types(res.gpu)
        if gpu_types is not None:
            if not gpu_types:
                problems.append(Problem(f"{path}.gpu", None, f"No known GPU type satisfies `{res.gpu}`"))
            else:
                value = gpu_types[0] if len(gpu_types) == 1 else "in(" + ",".join(gpu_types) + ")"
                opts["label_selector"] = {defaults.ACCELERATOR_LABEL_KEY: value}
        if res.gpu.vendor and res.gpu.vendor != "nvidia" and gpu_types is None:
            warnings.append(f"`{path}.gpu.vendor: {res.gpu.vendor}` is not enforced: any GPU the cluster has may be used")
    return ResourceRequest(opts, requirements, gpu_types if "num_gpus" in opts else None, warnings, problems)


def scaling_spec(group: ReplicaGroup) -> rt.ScalingSpec | None:
    if group.scaling is None:
        return None
    s = group.scaling
    return rt.ScalingSpec(
        metric=s.metric, target=s.target, min_replicas=group.replicas.min or 0,
        max_replicas=group.replicas.max or 1, window_s=float(s.window),
        scale_up_delay_s=float(s.scale_up_delay), scale_down_delay_s=float(s.scale_down_delay),
    )


def uses_port_env(commands: list[str]) -> bool:
    return any(_PORT_RE.search(line) for line in commands)


def group_spec(config: ServiceConfig, index: int, *, ingress_index: int) -> rt.GroupSpec | None:
    """The group part of a replica's spec (None for a service without `groups`)."""
    if config.groups is None:
        return None
    groups = config.replica_groups
    group = groups[index]
    router = config.router_group
    if group.router is not None:
        role = "router"
    elif router is not None:
        role = "worker"
    else:
        role = "member"
    assert group.name is not None
    return rt.GroupSpec(
        name=group.name, deployment=rt.group_deployment_name(group.name, ingress=index == ingress_index),
        role=role, router=router.router.type if router is not None and router.router is not None else None,
        groups=[g.name or str(i) for i, g in enumerate(groups)],
    )


def deployment_options(
    name: str, opts: dict[str, Any], scaling: rt.ScalingSpec | None, replicas: int, *, one_per_node: bool,
    service_counters_of: str | None = None, stop_timeout_s: float = defaults.GRACEFUL_SHUTDOWN_TIMEOUT_S,
    lifetime: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`service_counters_of`: a group that takes no request from Serve scales on this service's counters.
    `lifetime` (`schedule`, `max_duration`): the policy keeps the group at 0 replicas outside its windows, so
    Serve's own minimum is 0 and the group's count (or minimum) travels to the policy."""
    deployment: dict[str, Any] = {
        "name": name,
        "ray_actor_options": opts,
        "max_ongoing_requests": defaults.MAX_ONGOING_REQUESTS,
        "health_check_period_s": defaults.HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": defaults.HEALTH_CHECK_TIMEOUT_S,
        "graceful_shutdown_timeout_s": stop_timeout_s,
        "graceful_shutdown_wait_loop_s": defaults.GRACEFUL_SHUTDOWN_WAIT_LOOP_S,
    }
    if one_per_node:
        # Without a namespace per replica two replicas on one node would both bind `port`.
        deployment["max_replicas_per_node"] = 1
    if scaling is None and lifetime is not None:  # a fixed count, on only inside the windows
        scaling = rt.ScalingSpec(target=1.0, min_replicas=replicas, max_replicas=max(replicas, 1))
        fixed: dict[str, Any] = {"fixed_replicas": replicas}
    else:
        fixed = {}
    if scaling is not None:
        scheduled = lifetime is not None and bool(lifetime.get("crons"))
        deployment["autoscaling_config"] = {
            "min_replicas": 0 if lifetime is not None else scaling.min_replicas,
            "initial_replicas": 0 if scheduled else scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "upscale_delay_s": defaults.SERVE_UPSCALE_DELAY_S,
            "downscale_delay_s": defaults.SERVE_DOWNSCALE_DELAY_S,
            "downscale_to_zero_delay_s": defaults.SERVE_DOWNSCALE_TO_ZERO_DELAY_S,
            "metrics_interval_s": defaults.METRICS_INTERVAL_S,
            "look_back_period_s": defaults.LOOK_BACK_PERIOD_S,
            "policy": {
                "policy_function": defaults.AUTOSCALING_POLICY,
                "policy_kwargs": {
                    "target_rps": scaling.target,
                    "window_s": scaling.window_s,
                    "scale_up_delay_s": scaling.scale_up_delay_s,
                    "scale_down_delay_s": scaling.scale_down_delay_s,
                    **({"service_counters_prefix": f"{rt.SERVICE_COUNTERS_PREFIX}{service_counters_of}/",
                        "kv_namespace": rt.KV_NAMESPACE.decode()} if service_counters_of else {}),
                    **fixed,
                    **({"lifetime": lifetime, "min_replicas": scaling.min_replicas} if lifetime is not None else {}),
                },
            },
        }
    else:
        deployment["num_replicas"] = replicas
    return deployment


def ingress_index(config: ServiceConfig) -> int:
    """The group whose replicas take the service's traffic: the router group, else the first group that
    always has a replica (a group at 0 could not take the requests that the other groups are ready to
    serve), else the first."""
    groups = config.replica_groups
    for index, group in enumerate(groups):
        if group.router is not None:
            return index
    return next((index for index, group in enumerate(groups) if (group.replicas.min or 0) >= 1), 0)
