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
import re
from dataclasses import dataclass, field, replace
from typing import Any

from ray_dstack.spec import container_command
from ray_dstack import spec as rt
from ray_dstack.config import ConfigError, LoadedService, Problem, ServiceConfig
from ray_dstack.config.units import format_memory
from ray_dstack.plan import defaults
from ray_dstack.plan.gpus import admitted_types
from ray_dstack.plan.traffic import UVICORN_TRUST_NONE, probe_specs, rate_limit_specs, traffic_lines


class PlanError(ConfigError):
    """A valid configuration that cannot be mapped onto Ray (e.g. a GPU spec no known type satisfies)."""


_PORT_RE = re.compile(r"\$\{?" + re.escape(rt.PORT_ENV_VAR) + r"\b")


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

    @property
    def route_prefix(self) -> str:
        return f"/{self.name}"

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
        if registry_auth_key is not None and self.spec.registry_auth is not None:
            # `deploy` put the credentials in Ray's internal KV under this key (never in the Serve config).
            update["registry_auth"] = self.spec.registry_auth.model_copy(update={"kv_key": registry_auth_key})
        if model_settings is not None and self.spec.model is not None:
            update["model"] = self.spec.model.model_copy(update={
                "chat_template": model_settings.chat_template,
                "eos_token": model_settings.eos_token,
                "bos_token": self.spec.model.bos_token or model_settings.bos_token,
            })
        deployment = self.deployment
        if drain_timeout_s is not None:  # `--drain-timeout`: how long a removed replica may finish its requests
            deployment = {**deployment, "graceful_shutdown_timeout_s": drain_timeout_s}
        return replace(self, spec=self.spec.model_copy(update=update), deployment=deployment,
                       created=created if created is not None else self.created)

    def application(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "route_prefix": self.route_prefix,
            "import_path": rt.SERVICE_IMPORT_PATH,
            "runtime_env": {"env_vars": dict(UVICORN_TRUST_NONE)},
            "args": {"service": self.spec.model_dump(mode="json"),
                     **({"created": self.created} if self.created is not None else {})},
            "deployments": [copy.deepcopy(self.deployment)],
        }

    def to_serve_config(self) -> dict[str, Any]:
        """A Serve config file (`serve deploy` input); keeps env values (the replica needs them)."""
        return {"applications": [self.application()]}

    def to_display_dict(self) -> dict[str, Any]:
        """`to_serve_config()` with secret env values replaced by `***`, for printing."""
        data = self.to_serve_config()
        env = data["applications"][0]["args"]["service"]["env"]
        for key in env:
            if is_secret_key(key):
                env[key] = defaults.REDACTED
        return data

    def environment(self) -> dict[str, Any]:
        """Where the commands run on a node: their Python environment and network (for `plan`/`status`)."""
        return environment_of(self.spec)

    def summary_lines(self) -> list[str]:
        """Human summary: GPU types, resource requests, replicas, environment, warnings."""
        opts = self.ray_actor_options
        if self.spec.image is not None:
            how = " (in each replica's container, published on a free loopback port of the node)"
        elif self.spec.port_from_env:
            how = " (from $" + rt.PORT_ENV_VAR + ")"
        elif self.spec.network_namespace:
            how = " (fixed: a network namespace per replica, pasta)"
        else:
            how = " (fixed: 1 replica per node)"
        lines = [f"service {self.name}: route {self.route_prefix}, port {self.spec.port}{how}"]
        env = self.environment()
        if self.spec.image is None:
            lines.append(f"python: {env['python']}, environment {env['env']} on each node")
        gpu = self.config.resources.gpu
        if opts.get("num_gpus"):
            admitted = ", ".join(self.gpu_types) if self.gpu_types else "any"
            lines.append(f"GPU: {opts['num_gpus']:g} per replica ({gpu}), admitted types: {admitted}")
        else:
            lines.append("GPU: none")
        request = [f"num_cpus={opts.get('num_cpus', 0):g}"]
        if "cpu" in self.requirements:  # no `cpu` in the YAML: ray-dstack's small default share (plan/defaults.py)
            request[0] += " (default without `cpu`)"
        if opts.get("memory"):
            request.append(f"memory={format_memory(opts['memory'] / 1024**3)}")
        lines.append("Ray request per replica: " + ", ".join(request))
        if self.requirements:
            lines.append("Not enforced by Ray: " + ", ".join(f"{k} {v}" for k, v in self.requirements.items()))
        if "autoscaling_config" in self.deployment:
            s = self.spec.scaling
            assert s is not None
            lines.append(
                f"replicas: {s.min_replicas}..{s.max_replicas}, autoscaling at {s.target:g} rps per replica "
                f"(window {s.window_s:g}s, up delay {s.scale_up_delay_s:g}s, down delay {s.scale_down_delay_s:g}s)"
            )
        else:
            lines.append(f"replicas: {self.deployment['num_replicas']}")
        lines.extend(container_lines(self.spec, self.container_runtime))
        lines.extend(traffic_lines(self.spec))
        lines.extend(f"warning: {w}" for w in self.warnings)
        return lines


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
    res = config.resources
    errors: list[Problem] = []

    # --- resources
    opts: dict[str, Any] = {}
    requirements: dict[str, str] = {}
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
    if res.shm_size is not None and config.image is None:  # with `image`: the container's --shm-size
        requirements["shm_size"] = format_memory(res.shm_size)
    gpu_types: list[str] | None = None
    if res.gpu is not None and (res.gpu.count.min or 0) > 0:
        opts["num_gpus"] = float(res.gpu.count.min or 0)
        if res.gpu.count.max != res.gpu.count.min:
            warnings.append(f"`resources.gpu` count {res.gpu.count}: each replica requests {res.gpu.count.min} GPU(s)")
        gpu_types = admitted_types(res.gpu)
        if gpu_types is not None:
            if not gpu_types:
                errors.append(Problem("resources.gpu", None, f"No known GPU type satisfies `{res.gpu}`"))
            else:
                value = gpu_types[0] if len(gpu_types) == 1 else "in(" + ",".join(gpu_types) + ")"
                opts["label_selector"] = {defaults.ACCELERATOR_LABEL_KEY: value}
        if res.gpu.vendor and res.gpu.vendor != "nvidia" and gpu_types is None:
            warnings.append(f"`resources.gpu.vendor: {res.gpu.vendor}` is not enforced: any GPU the cluster has may be used")
    if errors:
        raise PlanError(where, errors)

    # --- runtime spec
    commands = list(config.setup) + list(config.commands)
    image = config.image
    # In a container the service has the container's network to itself: the fixed port never collides.
    port_from_env = image is None and any(_PORT_RE.search(line) for line in commands)
    probes = probe_specs(config)
    model = None
    if config.model is not None:
        m = config.model
        model = rt.ModelSpec(
            type=m.type, name=m.name, format=m.format, prefix=m.prefix or "/v1",
            chat_template=m.chat_template, eos_token=m.eos_token,
        )
    scaling = None
    if config.scaling is not None:
        s = config.scaling
        scaling = rt.ScalingSpec(
            metric=s.metric, target=s.target, min_replicas=config.replicas.min or 0,
            max_replicas=config.replicas.max or 1, window_s=float(s.window),
            scale_up_delay_s=float(s.scale_up_delay), scale_down_delay_s=float(s.scale_down_delay),
        )
    namespace = network_namespaces and not port_from_env and image is None
    registry_auth = None
    if config.registry_auth is not None and image is not None:
        # The key is chosen by `deploy` when it stores the password (ServicePlan.finalized).
        registry_auth = rt.RegistryAuthRef(username=config.registry_auth.username, kv_key="<set by deploy>")
    spec = rt.ServiceSpec(
        name=name, commands=commands, env=dict(config.env), working_dir=config.working_dir,
        python=config.python, network_namespace=namespace,
        port=config.port.container_port, port_from_env=port_from_env, probes=probes,
        rate_limits=rate_limit_specs(config), replicas=config.replicas.min or 0,
        auth=rt.AuthSpec(enabled=config.auth, token_sha256=token_sha256 if config.auth else None),
        model=model, scaling=scaling, image=image, entrypoint=config.entrypoint if image else None,
        registry_auth=registry_auth,
        shm_size_bytes=int(res.shm_size * 1024**3) if image and res.shm_size else None,
    )

    # --- deployment
    deployment: dict[str, Any] = {
        "name": rt.REPLICA_DEPLOYMENT_NAME,
        "ray_actor_options": opts,
        "max_ongoing_requests": defaults.MAX_ONGOING_REQUESTS,
        "health_check_period_s": defaults.HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": defaults.HEALTH_CHECK_TIMEOUT_S,
        "graceful_shutdown_timeout_s": defaults.GRACEFUL_SHUTDOWN_TIMEOUT_S,
        "graceful_shutdown_wait_loop_s": defaults.GRACEFUL_SHUTDOWN_WAIT_LOOP_S,
    }
    if not port_from_env and not namespace and image is None:
        # Without a namespace per replica two replicas on one node would both bind `port`.
        deployment["max_replicas_per_node"] = 1
        if (config.replicas.max or 0) > 1:
            warnings.append(
                f"fixed port {config.port.container_port} without network namespaces: at most one replica per "
                f"node. Install pasta (Debian/Ubuntu package `passt`) on the nodes to run several replicas per "
                f"node, or use ${rt.PORT_ENV_VAR} in the commands"
            )
    if scaling is not None:
        deployment["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas,
            "initial_replicas": scaling.min_replicas,
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
                },
            },
        }
    else:
        deployment["num_replicas"] = config.replicas.min

    # --- what this cluster does not honour
    if config.registry_auth is not None and image is None:
        warnings.append("`registry_auth` is ignored: there is no `image` to pull")
    if config.entrypoint is not None and image is None:
        warnings.append("`entrypoint` is ignored: there is no `image` (the commands run on the Ray node)")
    if "home_dir" in config.model_fields_set:
        warnings.append("`home_dir` is not honoured on this cluster")
    if res.shm_size is not None and image is None:
        warnings.append("`resources.shm_size` is not enforced by Ray (the node's /dev/shm is used)")
    if config.port.local_port is not None:
        warnings.append(f"`port` local part {config.port.local_port} is ignored: the service is reached at {'/' + name}")

    return ServicePlan(
        name=name, config=config, spec=spec, ray_actor_options=opts, deployment=deployment,
        gpu_types=gpu_types if "num_gpus" in opts else None, requirements=requirements, warnings=warnings,
        container_runtime=container_runtime,
    )


def config_name(config: ServiceConfig) -> str:
    if config.name:
        return config.name
    from ray_dstack.config import name_from_filename

    return name_from_filename("")
