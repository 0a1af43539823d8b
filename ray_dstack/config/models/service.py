"""The `service` configuration (after dstack's `core/models/configurations.py`).

Shorthand is expanded in `field_validator(mode="before")`; cross-field rules live in `model_validator`s.
Replica groups (`groups:`, or 0.21.2's `replicas: [...]`) are in `groups.py`; `replica_groups` is the
normalized view (one group named `0` for a service without groups).
Env placeholders (`env: [HF_TOKEN]`) are resolved from the validation context
(`{"env_overrides": {...}, "environ": {...}}`), overrides first.
"""

from __future__ import annotations

import re
import shlex
from typing import Any, Callable, Literal, Optional, Union

from pydantic import Field, PrivateAttr, SecretStr, ValidationInfo, field_validator, model_validator

from ray_dstack.config.models.common import CoreModel, IntRange
from ray_dstack.config.models.container import (
    FileMapping,
    Mount,
    RepoConfig,
    check_shell,
    check_user,
    parse_off_duration,
)
from ray_dstack.config.models.endpoint import ModelConfig, PortMapping
from ray_dstack.config.models.groups import (
    DEFAULT_GROUP_NAME,
    ReplicaGroup,
    check_service_groups,
    name_groups,
    normalize_groups_input,
)
from ray_dstack.config.models.resources import ResourcesSpec
from ray_dstack.config.models.scaling import ScalingConfig
from ray_dstack.config.models.schedule import ScheduleConfig
from ray_dstack.config.models.traffic import ProbeConfig, RateLimit, check_rate_limits
from ray_dstack.config.models.validation import (
    PROBLEM_SEP,
    PYTHON_VERSIONS,
    at,
    check_image_ref,
    parse_lines,
    parse_python_version,
)

__all__ = [  # the models moved to their own modules are still importable from here
    "IGNORED_FIELDS", "PROBLEM_SEP", "PYTHON_VERSIONS", "ModelConfig", "PortMapping", "RegistryAuth",
    "ReplicaGroup", "ScalingConfig", "ServiceConfig", "at", "ignored_warning",
]

ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,40}$")

# dstack fields that only make sense on dstack's own backends: accepted, reported as ignored on Ray.
IGNORED_FIELDS: dict[str, str] = {
    "backends": "Backends to provision on",
    "regions": "Regions to provision in",
    "availability_zones": "Availability zones to provision in",
    "instance_types": "Cloud instance types to use",
    "reservation": "Capacity reservation to use",
    "spot_policy": "`spot`, `on-demand` or `auto`",
    "retry": "Retry policy for failed provisioning/runs",
    "max_price": "Maximum hourly price",
    "creation_policy": "`reuse` or `reuse-or-create` fleets",
    "idle_duration": "Idle time before an instance is terminated",
    "termination_policy": "What to do with idle instances",
    "termination_idle_time": "Idle time before an instance is terminated",
    "fleets": "Fleets to run on",
    "tags": "Cloud resource tags",
    "utilization_policy": "Minimum GPU utilization policy",
    "gateway": "dstack gateway to publish through",
    "https": "Serve over HTTPS through the gateway",
    "nvcc": "Install the CUDA compiler",
    "priority": "Run priority",
}

GROUP_RESOURCES_IGNORED = (
    "top-level `resources` is ignored when `replicas`/`groups` lists groups: each group has its own"
)

_PLACEHOLDER = object()
_INTERPOLATION_RE = re.compile(r"\$\{\{\s*env\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")

class RegistryAuth(CoreModel):
    """Credentials for a private `image`."""

    username: str = Field(description="Registry user name")
    password: SecretStr = Field(description="Registry password or token (never printed)")


class ServiceConfig(CoreModel):
    """A dstack `service` configuration."""

    type: Literal["service"] = Field(description="Configuration type; must be `service`")
    name: Optional[str] = Field(None, description="Service name; default: derived from the file name")
    image: Optional[str] = Field(
        None, description="Container image each replica runs in (podman/docker on the node; excludes `python`)"
    )
    python: Optional[str] = Field(None, description="Python version, `3.8`…`3.13` (mutually exclusive with `image`)")
    entrypoint: Optional[str] = Field(
        None, description="Replaces the image's entrypoint (shell words); `commands` become its arguments"
    )
    home_dir: str = Field("/root", description="Deprecated in dstack (no effect); not honoured on Ray")
    working_dir: Optional[str] = Field(
        None, description="Working directory of the commands: absolute, or relative to the replica's own directory "
        "(a container: to `/`); default: the replica's own directory (a container: the image's WORKDIR)")
    setup: list[str] = Field(default_factory=list, description="Shell lines run before `commands` (legacy)")
    commands: list[str] = Field(default_factory=list, description="Shell lines run in order in one shell")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment: a mapping, or a list of `K=V`; a bare `K` is taken from the deploying user's environment",
    )
    registry_auth: Optional[RegistryAuth] = Field(
        None, description="Credentials for a private `image`, used for that pull only (never a node-wide login)"
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Resources per replica")
    port: PortMapping = Field(description="Port the service listens on: 8000, \"8000\" or \"80:8000\"")
    auth: bool = Field(True, description="Require `Authorization: Bearer <token>`")
    replicas: IntRange = Field(
        default_factory=lambda: IntRange(min=1, max=1),
        description="Replica count or range `min..max`; a list means `groups` (dstack 0.21.2's spelling)",
    )
    groups: Optional[list[ReplicaGroup]] = Field(
        None,
        description="Replica groups, each with its own count, scaling, resources and commands; excludes "
        "`replicas`, top-level `scaling` and `commands`",
    )
    scaling: Optional[ScalingConfig] = Field(None, description="Autoscaling (needs `replicas` as a range)")
    model: Optional[ModelConfig] = Field(None, description="The model served (chat), for the OpenAI endpoint")
    probes: list[ProbeConfig] = Field(
        default_factory=list,
        description="HTTP probes, all must pass; a `model` service without `probes` gets a one-token chat probe, "
        "`probes: []` turns it off",
    )
    rate_limits: list[RateLimit] = Field(default_factory=list, description="Per-client request rate limits")
    routing: Optional[Literal["least_connections", "prefix"]] = Field(
        None,
        description="ray-dstack's own (dstack has no such field): how the ingress picks a replica for the model's "
        "chat/completions requests. `least_connections`: the least busy one; `prefix`: the one the same prompt start "
        "went to before (its KV cache holds it), passed over while it carries 1.5x the mean of the requests in "
        "flight. Default: `prefix` for a `model` service without `rate_limits` or a `router` group, else "
        "`least_connections`",
    )

    # dstack's container and service fields, honoured on Ray (ray_dstack/plan/container_fields.py).
    volumes: list[Mount] = Field(
        default_factory=list,
        description="`/node/path:/path` (a node directory) or `name:/path` (a named volume: a directory under the "
        "cluster's volume root), mounted for the commands")
    files: list[FileMapping] = Field(
        default_factory=list,
        description="`local[:path]`: uploaded through Ray's package store at deploy, copied into every replica")
    repos: list[RepoConfig] = Field(
        default_factory=list, description="At most one: a local directory (uploaded) or a git URL (cloned by each replica)")
    single_branch: Optional[bool] = Field(None, description="Clone only the checked-out branch (default: yes)")
    user: Optional[str] = Field(None, description="`name_or_uid[:group_or_gid]` the commands run as")
    shell: Optional[str] = Field(
        None, description="`sh`, `bash` or an absolute path; default /bin/bash (/bin/sh with `image`)")
    privileged: bool = Field(False, description="Run the container privileged (replicas with `image`)")
    docker: Optional[bool] = Field(
        None, description="The commands get a working Docker daemon (excludes `image`, `python`, `nvcc`)")
    dstack: bool = Field(
        False, description="The commands are told the Ray cluster's address (no credentials: pass them in `env`)")
    strip_prefix: bool = Field(True, description="`false`: the service sees the full `/<service>/...` path")
    stop_duration: Union[Literal["off"], int, None] = Field(
        None, description="How long a stopping replica may finish its requests (`off`: no limit; default 5m)")
    schedule: Optional[ScheduleConfig] = Field(
        None, description="`{cron: ...}` (UTC; day-of-week 0 = Monday): the service starts with 0 replicas and "
        "scales up at the next cron time; never stopped by it")
    max_duration: Union[Literal["off"], int, None] = Field(
        None, description="The service stops this long after it started (with `schedule`: until the next start)")

    # dstack-backend-only fields (see IGNORED_FIELDS).
    backends: Any = Field(None, description=IGNORED_FIELDS["backends"] + " (ignored on Ray)")
    regions: Any = Field(None, description=IGNORED_FIELDS["regions"] + " (ignored on Ray)")
    availability_zones: Any = Field(None, description=IGNORED_FIELDS["availability_zones"] + " (ignored on Ray)")
    instance_types: Any = Field(None, description=IGNORED_FIELDS["instance_types"] + " (ignored on Ray)")
    reservation: Any = Field(None, description=IGNORED_FIELDS["reservation"] + " (ignored on Ray)")
    spot_policy: Any = Field(None, description=IGNORED_FIELDS["spot_policy"] + " (ignored on Ray)")
    retry: Any = Field(None, description=IGNORED_FIELDS["retry"] + " (ignored on Ray)")
    max_price: Any = Field(None, description=IGNORED_FIELDS["max_price"] + " (ignored on Ray)")
    creation_policy: Any = Field(None, description=IGNORED_FIELDS["creation_policy"] + " (ignored on Ray)")
    idle_duration: Any = Field(None, description=IGNORED_FIELDS["idle_duration"] + " (ignored on Ray)")
    termination_policy: Any = Field(None, description=IGNORED_FIELDS["termination_policy"] + " (ignored on Ray)")
    termination_idle_time: Any = Field(None, description=IGNORED_FIELDS["termination_idle_time"] + " (ignored on Ray)")
    fleets: Any = Field(None, description=IGNORED_FIELDS["fleets"] + " (ignored on Ray)")
    tags: Any = Field(None, description=IGNORED_FIELDS["tags"] + " (ignored on Ray)")
    utilization_policy: Any = Field(None, description=IGNORED_FIELDS["utilization_policy"] + " (ignored on Ray)")
    gateway: Any = Field(None, description=IGNORED_FIELDS["gateway"] + " (ignored on Ray)")
    https: Any = Field(None, description=IGNORED_FIELDS["https"] + " (ignored on Ray)")
    nvcc: Any = Field(None, description=IGNORED_FIELDS["nvcc"] + " (ignored on Ray)")
    priority: Any = Field(None, description=IGNORED_FIELDS["priority"] + " (ignored on Ray)")

    # The key the file listed the groups under: `groups`, or `replicas` (0.21.2); None without groups.
    _groups_key: Optional[str] = PrivateAttr(None)

    @model_validator(mode="wrap")
    @classmethod
    def _legacy_groups(cls, data: Any, handler: Callable[[Any], "ServiceConfig"]) -> "ServiceConfig":
        data, key = normalize_groups_input(data)
        config = handler(data)
        if key is not None:
            config._groups_key = key
        return config

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not NAME_RE.match(value):
            raise ValueError(
                f"Invalid name `{value}`: use lowercase letters, digits and `-`, starting with a letter (max 41)"
            )
        return value

    @field_validator("replicas")
    @classmethod
    def _replicas_min(cls, value: IntRange) -> IntRange:
        if value.min is None:  # `..3` means `0..3`
            value.min = 0
        return value

    @field_validator("groups")
    @classmethod
    def _name_groups(cls, value: Optional[list[ReplicaGroup]]) -> Optional[list[ReplicaGroup]]:
        problems = name_groups(value) if value is not None else []
        if problems:
            raise ValueError(PROBLEM_SEP.join(problems))
        return value

    @field_validator("probes", "rate_limits", "volumes", "files", "repos", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator("rate_limits")
    @classmethod
    def _check_rate_limits(cls, value: list[RateLimit]) -> list[RateLimit]:
        problems = check_rate_limits(value)
        if problems:
            raise ValueError(PROBLEM_SEP.join(problems))
        return value

    @field_validator("image")
    @classmethod
    def _check_image(cls, value: Optional[str]) -> Optional[str]:
        return check_image_ref(value)

    @field_validator("entrypoint")
    @classmethod
    def _check_entrypoint(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            try:
                words = shlex.split(value)
            except ValueError as exc:
                raise ValueError(f"Invalid entrypoint: {exc}") from None
            if not words:
                raise ValueError("`entrypoint` is empty")
        return value

    @field_validator("repos")
    @classmethod
    def _one_repo(cls, value: list[RepoConfig]) -> list[RepoConfig]:
        if len(value) > 1:
            raise ValueError("A maximum of one repo is currently supported")
        return value

    @field_validator("user", mode="before")
    @classmethod
    def _check_user(cls, value: Any) -> Any:
        return check_user(str(value)) if isinstance(value, int) and not isinstance(value, bool) else check_user(value)

    @field_validator("shell")
    @classmethod
    def _check_shell(cls, value: Optional[str]) -> Optional[str]:
        return check_shell(value)

    @field_validator("stop_duration", "max_duration", mode="before")
    @classmethod
    def _parse_off_duration(cls, value: Any) -> Any:
        return parse_off_duration(value)

    @field_validator("python", mode="before")
    @classmethod
    def _parse_python(cls, value: Any) -> Any:
        return parse_python_version(value)

    @field_validator("setup", "commands", mode="before")
    @classmethod
    def _parse_lines(cls, value: Any) -> Any:
        return parse_lines(value)

    @field_validator("env", mode="before")
    @classmethod
    def _parse_env(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return {}
        if isinstance(value, list):
            pairs: list[tuple[Any, Any]] = []
            for item in value:
                if not isinstance(item, str):
                    raise ValueError(f"Invalid env entry {item!r}: expected `KEY=VALUE` or `KEY`")
                key, sep, val = item.partition("=")
                pairs.append((key.strip(), val if sep else _PLACEHOLDER))
        elif isinstance(value, dict):
            pairs = [(k, _PLACEHOLDER if v is None else v) for k, v in value.items()]
        else:
            raise ValueError("`env` must be a mapping or a list of `KEY=VALUE` strings")
        ctx = info.context or {}
        overrides = ctx.get("env_overrides") or {}
        environ = ctx.get("environ") or {}
        result: dict[str, str] = {}
        problems: list[str] = []
        for key, val in pairs:
            if not isinstance(key, str) or not ENV_KEY_RE.match(key):
                problems.append(f"Invalid environment variable name `{key}`")
                continue
            if key in result:
                problems.append(f"Duplicate environment variable `{key}`")
                continue
            if val is _PLACEHOLDER:
                if key in overrides:
                    val = overrides[key]
                elif key in environ:
                    val = environ[key]
                else:
                    problems.append(f"Environment variable {key} is not set")
                    continue
            elif isinstance(val, bool):
                val = "true" if val else "false"
            elif isinstance(val, (int, float)):
                val = str(val)
            elif not isinstance(val, str):
                problems.append(f"Invalid value for environment variable `{key}`: expected a string")
                continue
            result[key] = val
        if problems:
            # Several problems are separated by a marker the loader splits into one problem each.
            raise ValueError(PROBLEM_SEP.join(problems))
        return result

    @model_validator(mode="after")
    def _check(self):
        problems: list[str] = []
        if self.python is not None and self.image is not None:
            problems.append(at("python", "`image` and `python` are mutually exclusive"))
        if self.docker:
            for other in ("image", "python", "nvcc"):
                if getattr(self, other):
                    problems.append(at("docker", f"`{other}` and `docker` are mutually exclusive fields"))
        if self.groups is not None:
            problems.extend(check_service_groups(self))
        else:
            problems.extend(self._check_replicas())
        if self.schedule is not None and all((g.replicas.min or 0) == 0 for g in self.replica_groups):
            problems.append(at("schedule", "Scheduled services with autoscaling to zero are not supported"))
        if self.registry_auth is not None:
            problems.extend(self._interpolate_registry_auth())
        if self.routing == "prefix" and self.model is None:
            problems.append(at("routing", "`routing: prefix` routes a model's chat/completions requests by their "
                                          "prompt: it needs `model`"))
        if self.routing == "prefix" and any(g.router is not None for g in self.groups or []):
            problems.append(at("routing", "`routing: prefix` and a `router` group: the router group picks the "
                                          "worker; leave `routing` out"))
        if self.routing == "prefix" and self.rate_limits:
            problems.append(at("routing", "`routing: prefix` and `rate_limits`: each replica enforces its share of "
                                          "the limits, which holds only while a client's requests spread over the "
                                          "replicas; use `routing: least_connections` or drop `rate_limits`"))
        if problems:
            raise ValueError(PROBLEM_SEP.join(problems))
        return self

    def _check_replicas(self) -> list[str]:
        """A service without groups: `commands` or `image`, and the `replicas`/`scaling` rules."""
        problems: list[str] = []
        if not self.commands and self.image is None:
            problems.append(at("commands", "Either `commands` or `image` must be set"))
        is_range = self.replicas.min != self.replicas.max
        if is_range and self.replicas.max is None:
            problems.append(at("replicas", "The maximum of a replicas range is required, e.g. `1..4`"))
        elif self.replicas.max == 0:
            problems.append(at("replicas", "At least one replica is required"))
        if is_range and self.scaling is None:
            problems.append(at("replicas", "When you set `replicas` to a range, ensure to specify `scaling`."))
        if not is_range and self.scaling is not None:
            problems.append(at("scaling", "To use `scaling`, `replicas` must be set to a range."))
        return problems

    def _interpolate_registry_auth(self) -> list[str]:
        """dstack's `${{ env.NAME }}` in `registry_auth` takes the value of `env.NAME` of this service."""
        assert self.registry_auth is not None
        problems: list[str] = []

        def sub(field: str, text: str) -> str:
            def repl(m: re.Match[str]) -> str:
                key = m.group(1)
                if key not in self.env:
                    problems.append(at(f"registry_auth.{field}", f"`${{{{ env.{key} }}}}`: {key} is not in `env`"))
                    return ""
                return self.env[key]

            return _INTERPOLATION_RE.sub(repl, text)

        username = sub("username", self.registry_auth.username)
        password = sub("password", self.registry_auth.password.get_secret_value())
        self.registry_auth = RegistryAuth(username=username, password=SecretStr(password))
        return problems

    def ignored_fields(self) -> list[str]:
        """dstack-backend-only fields set in this file."""
        return [name for name in IGNORED_FIELDS if name in self.model_fields_set]

    @property
    def replica_groups(self) -> list[ReplicaGroup]:
        """The groups, names filled in; without `groups`, one group named `0` from the top-level fields."""
        if self.groups is not None:
            return list(self.groups)
        return [ReplicaGroup.model_construct(
            name=DEFAULT_GROUP_NAME, replicas=self.replicas.model_copy(),
            scaling=self.scaling.model_copy() if self.scaling is not None else None,
            resources=self.resources.model_copy(deep=True), commands=list(self.commands),
            image=self.image, python=self.python,
        )]

    @property
    def router_group(self) -> Optional[ReplicaGroup]:
        """The group with `router:`, if any (at most one)."""
        return next((group for group in self.replica_groups if group.router is not None), None)

    def group_path(self, index: int, field: Optional[str] = None) -> str:
        """A group's field path as the file spells it: `groups[1].replicas` or `replicas[1].count`."""
        path = f"{self._groups_key or 'groups'}[{index}]"
        if field == "replicas" and self.groups is not None:
            field = self.groups[index]._replicas_key
        return f"{path}.{field}" if field else path

    def group_warnings(self) -> list[str]:
        """What a service with groups sets that Ray ignores or does not honour yet."""
        if self.groups is None:
            return []
        warnings = [GROUP_RESOURCES_IGNORED] if "resources" in self.model_fields_set else []
        for index, group in enumerate(self.groups):
            for field in ("spot_policy", "reservation", "nvcc"):
                if getattr(group, field) is not None:
                    warnings.append(ignored_warning(self.group_path(index, field), field))
        return warnings


def ignored_warning(path: str, field: str) -> str:
    """The warning for a dstack-backend-only field (`field` of IGNORED_FIELDS) set at `path`."""
    what = IGNORED_FIELDS[field]
    return f"`{path}` is ignored on Ray ({what[0].lower() + what[1:]} is up to the Ray cluster)"
