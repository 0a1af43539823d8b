"""`ServiceConfig` → `ServicePlan` → Serve config dict. Pure functions: no cluster needed.

GPU placement: GPU names/memory become a hard `label_selector` on the node label
`ray.io/accelerator-type` (value `in(A10G,L4)` when a spec admits several types). Verified on Ray 2.60
(tests/plan/test_plan_label_selector.py, a real local `ray.init(labels=...)`): an actor whose selector matches
the node's label runs; one whose `in(...)` list does not contain the node's label stays pending — the
selector is a strict constraint, not a preference. `accelerator_type` in `ray_actor_options` cannot
express "A10G or L4", so it is not used.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from typing import Any

from ray_dstack.spec import container_command
from ray_dstack import spec as rt
from ray_dstack.config import ConfigError, LoadedService, Problem, ServiceConfig
from ray_dstack.config.units import format_memory
from ray_dstack.plan import container_fields, defaults, replica_group
from ray_dstack.plan.replica_group import GroupPlan
from ray_dstack.plan.traffic import UVICORN_TRUST_NONE, probe_specs, rate_limit_specs, traffic_lines


class PlanError(ConfigError):
    """A valid configuration that cannot be mapped onto Ray (e.g. a GPU spec no known type satisfies)."""


def is_secret_key(key: str) -> bool:
    upper = key.upper()
    return any(marker in upper for marker in defaults.SECRET_ENV_KEY_MARKERS)


@dataclass
class ServicePlan:
    """How one service runs on Ray: the replica spec, the Serve deployment options and the advisories."""

    name: str
    config: ServiceConfig
    spec: rt.ServiceSpec
    ray_actor_options: dict[str, Any]
    deployment: dict[str, Any]
    gpu_types: list[str] | None  # accelerator types admitted; None = any GPU (or no GPU requested)
    requirements: dict[str, str]  # advisory / not enforced by Ray, for display
    warnings: list[str] = field(default_factory=list)
    created: int | None = None  # the model's `created` time in /v1/models: first deploy, kept on redeploys
    container_runtime: str = "podman"  # whose `run` command the plan shows for `image` (the nodes choose their own)
    # dstack 0.21's replica groups, in file order, the ingress group among them (its spec, options and
    # deployment are also the fields above); empty for a service without `groups`.
    groups: list[GroupPlan] = field(default_factory=list)

    @property
    def route_prefix(self) -> str:
        return f"/{self.name}"

    @property
    def specs(self) -> list[rt.ServiceSpec]:
        """Every group's replica spec (the one spec of a service without groups)."""
        return [g.spec for g in self.groups] or [self.spec]

    @property
    def registry_auth(self) -> rt.RegistryAuthRef | None:
        """`registry_auth` of the groups that pull an `image` (any group may have one, the router need not)."""
        return next((s.registry_auth for s in self.specs if s.registry_auth is not None), None)

    @property
    def pulls_images(self) -> bool:
        return any(s.image for s in self.specs)

    def finalized(
        self,
        *,
        token_sha256: str | None,
        created: int | None = None,
        request_timeout_s: float | None = None,
        model_settings: rt.ModelSettings | None = None,
        drain_timeout_s: float | None = None,
        ready_timeout_s: float | None = None,
        trusted_proxies: list[str] | None = None,
        registry_auth_key: str | None = None,
        uploads: list[rt.UploadSpec] | None = None,
        deployed_at: float | None = None,
    ) -> ServicePlan:
        """This plan with what `deploy` learns only once it has read the cluster and the Hub: the token's
        digest (a redeploy keeps the running one), the creation time to keep, `--request-timeout`, `--drain-timeout`, and a tgi
        model's chat template and special tokens. The Serve config comes from the result, never patched."""
        enabled = self.spec.auth.enabled
        update: dict[str, Any] = {
            "auth": rt.AuthSpec(enabled=enabled, token_sha256=token_sha256 if enabled else None)}
        if request_timeout_s is not None:
            update["request_timeout_s"] = request_timeout_s
        if ready_timeout_s is not None:  # `deploy --timeout`: a probe that never passes fails within it
            update["ready_timeout_s"] = ready_timeout_s
        if trusted_proxies is not None:  # `deploy --trusted-proxies`: whose X-Forwarded-For rate limits believe
            update["trusted_proxies"] = list(trusted_proxies)
        if uploads is not None:  # `files` and a local `repos` entry, packed and uploaded by `deploy`
            update["uploads"] = list(uploads)
        if registry_auth_key is not None and self.registry_auth is not None:
            # `deploy` put the credentials in Ray's internal KV under this key (never in the Serve config).
            update["registry_auth"] = self.registry_auth.model_copy(update={"kv_key": registry_auth_key})
        if model_settings is not None and self.spec.model is not None:
            update["model"] = self.spec.model.model_copy(update={
                "chat_template": model_settings.chat_template,
                "eos_token": model_settings.eos_token,
                "bos_token": self.spec.model.bos_token or model_settings.bos_token,
            })
        def finish(group_spec: rt.ServiceSpec, deployment: dict[str, Any]) -> tuple[rt.ServiceSpec, dict[str, Any]]:
            own = dict(update)
            if "registry_auth" in own and group_spec.registry_auth is None:
                del own["registry_auth"]  # a group without an image pulls nothing
            if drain_timeout_s is not None:  # `--drain-timeout`: how long a removed replica may finish its requests
                deployment = {**deployment, "graceful_shutdown_timeout_s": drain_timeout_s}
            # `schedule`/`max_duration` count from `deployed_at` (deploy: the running service's start while it is
            # on, else now), else from the first deploy.
            deployment = _with_deployed_at(deployment, deployed_at if deployed_at is not None
                                           else created if created is not None else self.created)
            return group_spec.model_copy(update=own), deployment

        spec, deployment = finish(self.spec, self.deployment)
        groups = []
        for group in self.groups:
            group_spec, group_deployment = finish(group.spec, group.deployment)
            groups.append(replace(group, spec=group_spec, deployment=group_deployment))
        return replace(self, spec=spec, deployment=deployment, groups=groups,
                       created=created if created is not None else self.created)

    def application(self) -> dict[str, Any]:
        created = {"created": self.created} if self.created is not None else {}
        app: dict[str, Any] = {
            "name": self.name,
            "route_prefix": self.route_prefix,
            "import_path": rt.SERVICE_IMPORT_PATH,
            "runtime_env": {"env_vars": dict(UVICORN_TRUST_NONE)},
        }
        if not self.groups:
            return {**app, "args": {"service": _spec_args(self.spec), **created},
                    "deployments": [copy.deepcopy(self.deployment)]}
        # Each group's spec in its own deployment's options (rt.SPEC_ENV_VAR): a redeploy that changes one
        # group restarts that group only. `args` names the groups and holds `env`, which every group shares
        # (a change rolls them all, as it should): Ray logs a runtime_env and puts it on a command line, so
        # env values (secrets) never go there.
        deployments = []
        for group in self.groups:
            deployment = copy.deepcopy(group.deployment)
            options = deployment.setdefault("ray_actor_options", {})
            spec = {**_spec_args(group.spec), "env": {}}
            options["runtime_env"] = {"env_vars": {rt.SPEC_ENV_VAR: json.dumps(spec, sort_keys=True)}}
            deployments.append(deployment)
        groups = [{"group": g.name, "deployment": g.deployment_name} for g in self.groups]
        return {**app, "args": {"groups": groups, "env": dict(self.spec.env), **created}, "deployments": deployments}

    def to_serve_config(self) -> dict[str, Any]:
        """A Serve config file (`serve deploy` input); keeps env values (the replica needs them)."""
        return {"applications": [self.application()]}

    def to_display_dict(self) -> dict[str, Any]:
        """`to_serve_config()` with secret env values replaced by `***`, for printing."""
        data = self.to_serve_config()
        app = data["applications"][0]

        def redact(service: dict[str, Any]) -> dict[str, Any]:
            env = service["env"]
            for key in env:
                if is_secret_key(key):
                    env[key] = defaults.REDACTED
            return service

        redact(app["args"]["service"] if "service" in app["args"] else app["args"])  # groups: `env` is in args
        return data

    def environment(self) -> dict[str, Any]:
        """Where the commands run on a node: their Python environment and network (for `plan`/`status`)."""
        return environment_of(self.spec)

    def summary_lines(self) -> list[str]:
        """Human summary: GPU types, resource requests, replicas, environment, warnings."""
        if not self.groups:
            lines = [f"service {self.name}: route {self.route_prefix}, port {self.spec.port}{_port_how(self.spec)}"]
            lines.extend(self._group_lines(self.spec, self.ray_actor_options, self.deployment, self.gpu_types,
                                           self.requirements, str(self.config.resources.gpu)))
        else:
            router = next((g for g in self.groups if g.role == "router"), None)
            how = (f"all traffic to the {router.spec.group.router} router group {router.name!r}, which routes it "
                   "over the other groups" if router is not None and router.spec.group is not None
                   else "every group's replicas take traffic")
            lines = [f"service {self.name}: route {self.route_prefix}, port {self.spec.port}, "
                     f"{len(self.groups)} replica groups: {how}"]
            for index, group in enumerate(self.groups):
                gpu = self.config.replica_groups[index].resources.gpu
                lines.append(f"group {group.name} ({group.role}, deployment {group.deployment_name}): "
                             f"port {group.spec.port}{_port_how(group.spec)}")
                lines.extend("  " + line for line in self._group_lines(
                    group.spec, group.ray_actor_options, group.deployment, group.gpu_types, group.requirements,
                    str(gpu)))
        lines.extend(traffic_lines(self.spec))
        lines.extend(f"warning: {w}" for w in self.warnings)
        return lines

    def _group_lines(self, spec: rt.ServiceSpec, opts: dict[str, Any], deployment: dict[str, Any],
                     gpu_types: list[str] | None, requirements: dict[str, str], gpu: str) -> list[str]:
        lines = []
        env = environment_of(spec)
        if spec.image is None:
            lines.append(f"python: {env['python']}, environment {env['env']} on each node")
        if opts.get("num_gpus"):
            admitted = ", ".join(gpu_types) if gpu_types else "any"
            lines.append(f"GPU: {opts['num_gpus']:g} per replica ({gpu}), admitted types: {admitted}")
        else:
            lines.append("GPU: none")
        request = [f"num_cpus={opts.get('num_cpus', 0):g}"]
        if "cpu" in requirements:  # no `cpu` in the YAML: ray-dstack's small default share (plan/defaults.py)
            request[0] += " (default without `cpu`)"
        if opts.get("memory"):
            request.append(f"memory={format_memory(opts['memory'] / 1024**3)}")
        lines.append("Ray request per replica: " + ", ".join(request))
        if requirements:
            lines.append("Not enforced by Ray: " + ", ".join(f"{k} {v}" for k, v in requirements.items()))
        if spec.scaling is not None:
            s = spec.scaling
            lines.append(
                f"replicas: {s.min_replicas}..{s.max_replicas}, autoscaling at {s.target:g} rps per replica "
                f"(window {s.window_s:g}s, up delay {s.scale_up_delay_s:g}s, down delay {s.scale_down_delay_s:g}s)"
            )
        else:
            count = deployment.get("num_replicas")
            if count is None:  # a fixed count kept at 0 outside `schedule`/`max_duration` windows by the policy
                count = deployment["autoscaling_config"]["policy"]["policy_kwargs"]["fixed_replicas"]
            lines.append(f"replicas: {count}")
        if spec.group is not None and spec.group.role == "worker":
            lines.append(f"reached only through the {spec.group.router} router"
                         + (", which is told this group's ready replicas (POST/DELETE /workers)"
                            if spec.group.router == "sglang" else "; each replica gets $DSTACK_ROUTER_INTERNAL_IP"))
        lines.extend(container_lines(spec, self.container_runtime))
        lines.extend(container_fields.lines(spec))
        return lines


def _with_deployed_at(deployment: dict[str, Any], created: float | None) -> dict[str, Any]:
    """The policy's `lifetime` with the time `schedule`/`max_duration` count from."""
    kwargs = ((deployment.get("autoscaling_config") or {}).get("policy") or {}).get("policy_kwargs") or {}
    if "lifetime" not in kwargs or created is None:
        return deployment
    deployment = copy.deepcopy(deployment)
    deployment["autoscaling_config"]["policy"]["policy_kwargs"]["lifetime"]["deployed_at"] = float(created)
    return deployment


def _spec_args(spec: rt.ServiceSpec) -> dict[str, Any]:
    """A replica spec as the Serve config carries it. A service without groups has no `group` key: its args stay
    what they were before groups existed, so upgrading ray-dstack does not restart running services."""
    unused = {name for name in rt.OPTIONAL_SPEC_FIELDS
              if getattr(spec, name) == rt.ServiceSpec.model_fields[name].get_default(call_default_factory=True)}
    return spec.model_dump(mode="json", exclude=unused | ({"group"} if spec.group is None else set()))


def _port_how(spec: rt.ServiceSpec) -> str:
    if spec.image is not None:
        return " (in each replica's container, published on a free loopback port of the node)"
    if spec.port_from_env:
        return " (from $" + rt.PORT_ENV_VAR + ")"
    if spec.network_namespace:
        return " (fixed: a network namespace per replica, pasta)"
    return " (fixed: 1 replica per node)"


def container_lines(spec: rt.ServiceSpec, runtime: str = "podman") -> list[str]:
    """`image`: the command each replica runs with `runtime` (podman or docker: the GPU flags differ)."""
    if spec.image is None:
        return []
    lines = [f"container per replica: {container_command.display(spec, runtime)}"]
    if spec.registry_auth is not None:
        lines.append(f"registry_auth: user {spec.registry_auth.username}, password {defaults.REDACTED} "
                     "(handed to the replicas through Ray's internal KV, used for that pull only)")
    return lines


def environment_of(spec: rt.ServiceSpec) -> dict[str, Any]:
    version = spec.python or "<node's>"
    return {
        "python": spec.python or "the node's version",
        "env": f"$RAY_DSTACK_ENV_ROOT/{rt.env_dir_name(spec.name, version)}",
        "network_namespace": spec.network_namespace,
    }


def build_plan(
    source: LoadedService | ServiceConfig, *, token_sha256: str | None = None, network_namespaces: bool = False,
    container_runtime: str = "podman",
) -> ServicePlan:
    """Map a validated configuration onto Ray Serve. Raises `PlanError` for what Ray cannot run.

    `network_namespaces`: whether the nodes give each replica of a fixed-port service a network namespace
    (pasta). The plan stays pure: the CLI decides (ray_dstack.serve.runtime.netns.available(), i.e.
    $RAY_DSTACK_NETWORK_NAMESPACES or pasta on the deploying machine's PATH). Without them a fixed port means
    one replica per node.

    `container_runtime`: "podman" or "docker", whose `run` command the plan shows for `image` (the CLI passes
    what $RAY_DSTACK_CONTAINER_RUNTIME names where it runs; each node still detects its own)."""
    if container_runtime not in container_command.RUNTIMES:
        raise ValueError(f"container_runtime must be one of {container_command.RUNTIMES}, got {container_runtime!r}")
    if isinstance(source, LoadedService):
        config, warnings = source.config, list(source.warnings)
        where = source.path.name if source.path else (config.name or "<config>")
    else:
        config, warnings, where = source, [], config_name(source)
    name = config_name(config)
    errors: list[Problem] = []
    ingress = replica_group.ingress_index(config)
    groups: list[GroupPlan] = []
    for index, group in enumerate(config.replica_groups):
        planned = _plan_group(config, name, index, ingress=ingress, token_sha256=token_sha256,
                              network_namespaces=network_namespaces, warnings=warnings, errors=errors)
        if planned is not None:
            groups.append(planned)
    if errors:
        raise PlanError(where, errors)

    # --- what this cluster does not honour
    images = [g.spec.image for g in groups if g.spec.image]
    if config.registry_auth is not None and not images:
        warnings.append("`registry_auth` is ignored: there is no `image` to pull")
    if config.entrypoint is not None and not images:
        warnings.append("`entrypoint` is ignored: there is no `image` (the commands run on the Ray node)")
    if "home_dir" in config.model_fields_set:
        warnings.append("`home_dir` is not honoured on this cluster")
    if config.port.local_port is not None:
        warnings.append(f"`port` local part {config.port.local_port} is ignored: the service is reached at {'/' + name}")

    main = groups[ingress]
    return ServicePlan(
        name=name, config=config, spec=main.spec, ray_actor_options=main.ray_actor_options,
        deployment=main.deployment, gpu_types=main.gpu_types, requirements=main.requirements, warnings=warnings,
        container_runtime=container_runtime, groups=groups if config.groups is not None else [],
    )


def _plan_group(
    config: ServiceConfig, name: str, index: int, *, ingress: int, token_sha256: str | None,
    network_namespaces: bool, warnings: list[str], errors: list[Problem],
) -> GroupPlan | None:
    group = config.replica_groups[index]
    grouped = config.groups is not None
    image = group.image if group.image is not None else config.image
    python = group.python if group.python is not None else config.python
    res = group.resources
    request = replica_group.resource_request(
        res, has_image=image is not None,
        path=config.group_path(index, "resources") if grouped else "resources")
    errors.extend(request.problems)
    warnings.extend(request.warnings)
    if request.problems:
        return None

    # --- runtime spec
    commands = list(group.commands) if grouped else list(config.setup) + list(config.commands)
    # In a container the service has the container's network to itself: the fixed port never collides.
    port_from_env = image is None and replica_group.uses_port_env(commands)
    group_part = replica_group.group_spec(config, index, ingress_index=ingress)
    # A router runs in its node's network, never in a namespace of its own: an SGLang router reaches its
    # workers at the node's addresses (a namespace's loopback is not the node's), and a Dynamo router's other
    # ports (etcd, NATS) must be reachable by the workers at the node's address.
    router = group_part is not None and group_part.role == "router"
    namespace = network_namespaces and not port_from_env and image is None and not router
    model = None
    if config.model is not None:
        m = config.model
        model = rt.ModelSpec(
            type=m.type, name=m.name, format=m.format, prefix=m.prefix or "/v1",
            chat_template=m.chat_template, eos_token=m.eos_token,
        )
    scaling = replica_group.scaling_spec(group)
    registry_auth = None
    if config.registry_auth is not None and image is not None:
        # The key is chosen by `deploy` when it stores the password (ServicePlan.finalized).
        registry_auth = rt.RegistryAuthRef(username=config.registry_auth.username, kv_key="<set by deploy>")
    spec = rt.ServiceSpec(
        name=name, commands=commands, env=dict(config.env), working_dir=config.working_dir,
        python=python, network_namespace=namespace,
        port=config.port.container_port, port_from_env=port_from_env, probes=probe_specs(config),
        rate_limits=rate_limit_specs(config),
        routing=defaults.routing(config.routing, model=config.model is not None, rate_limits=bool(config.rate_limits),
                                 router=any(g.router is not None for g in config.groups or [])),
        # Each replica of the ingress group enforces 1/N of `rate_limits`; the other groups take no traffic
        # from Serve, and a count that is not in their spec lets Serve scale them without restarting them.
        replicas=group.replicas.min or 0 if index == ingress else 1,
        auth=rt.AuthSpec(enabled=config.auth, token_sha256=token_sha256 if config.auth else None),
        model=model, scaling=scaling, image=image, entrypoint=config.entrypoint if image else None,
        registry_auth=registry_auth,
        shm_size_bytes=int(res.shm_size * 1024**3) if image and res.shm_size else None,
        group=group_part,
        **container_fields.spec_fields(
            config, privileged=bool(group.privileged if group.privileged is not None else config.privileged),
            docker=bool(group.docker if group.docker is not None else config.docker)),
    )

    if router and group_part is not None and group_part.router == "sglang" and image is None and any(
            "0.0.0.0" in line or "--host ::" in line for line in commands):
        warnings.append(
            f"the SGLang router of group {group.name!r} listens on every address of its node: its admin API "
            "(`POST/DELETE /workers`) is then open to the node's network without a token. `--host 127.0.0.1` is "
            "enough: ray-dstack reaches the router on loopback, and the router connects out to its workers")

    # --- deployment
    one_per_node = not port_from_env and not namespace and image is None
    if one_per_node and (group.replicas.max or 0) > 1:
        warnings.append(
            f"fixed port {config.port.container_port} without network namespaces: at most one replica per "
            f"node{' of group ' + repr(group.name) if grouped else ''}. Install pasta (Debian/Ubuntu package "
            f"`passt`) on the nodes to run several replicas per node, or use ${rt.PORT_ENV_VAR} in the commands"
        )
    deployment_name = group_part.deployment if group_part is not None else rt.REPLICA_DEPLOYMENT_NAME
    deployment = replica_group.deployment_options(
        deployment_name, request.options, scaling, group.replicas.min or 0, one_per_node=one_per_node,
        # dstack scales every group on the service's request rate; only the ingress group sees requests.
        service_counters_of=name if grouped and index != ingress else None,
        stop_timeout_s=container_fields.stop_timeout_s(config),
        lifetime=container_fields.lifetime(spec, deployed_at=None))
    if res.shm_size is not None and image is None:
        warnings.append("`resources.shm_size` is not enforced by Ray (the node's /dev/shm is used)")
    return GroupPlan(
        name=group.name or str(index), spec=spec, ray_actor_options=request.options, deployment=deployment,
        gpu_types=request.gpu_types, requirements=request.requirements,
        role=group_part.role if group_part is not None else "replica",
    )


def config_name(config: ServiceConfig) -> str:
    if config.name:
        return config.name
    from ray_dstack.config import name_from_filename

    return name_from_filename("")
