"""The `service` configuration (after dstack's `core/models/configurations.py`).

Shorthand is expanded in `field_validator(mode="before")`; cross-field rules live in `model_validator`s.
Env placeholders (`env: [HF_TOKEN]`) are resolved from the validation context
(`{"env_overrides": {...}, "environ": {...}}`), overrides first.
"""

from __future__ import annotations

import re
import shlex
from typing import Any, Literal, Optional

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from ray_dstack.config.models.common import CoreModel, IntRange
from ray_dstack.config.models.resources import ResourcesSpec
from ray_dstack.config.models.traffic import ProbeConfig, RateLimit, check_rate_limits
from ray_dstack.config.units import parse_duration, parse_int

ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,40}$")
PYTHON_VERSIONS = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13")

# dstack fields that only make sense on dstack's own backends: accepted, reported as ignored on Ray.
IGNORED_FIELDS: dict[str, str] = {
    "backends": "Backends to provision on",
    "regions": "Regions to provision in",
    "availability_zones": "Availability zones to provision in",
    "instance_types": "Cloud instance types to use",
    "reservation": "Capacity reservation to use",
    "spot_policy": "`spot`, `on-demand` or `auto`",
    "retry": "Retry policy for failed provisioning/runs",
    "max_duration": "Maximum run duration",
    "stop_duration": "Graceful stop timeout",
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
    "strip_prefix": "Strip the service path prefix (gateway)",
    "volumes": "Volumes to mount",
    "privileged": "Run the container privileged",
    "user": "User to run as",
    "shell": "Shell used to run `commands`",
    "nvcc": "Install the CUDA compiler",
    "single_branch": "Clone only one git branch",
    "repos": "Repositories to mount",
    "files": "Files to upload",
    "docker": "Docker-in-Docker",
    "priority": "Run priority",
}

_PLACEHOLDER = object()
_INTERPOLATION_RE = re.compile(r"\$\{\{\s*env\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")

# A validator that finds several problems joins them with PROBLEM_SEP; a problem may name its own field
# path as `@path:message` (model validators have no field location). The loader splits them again.
PROBLEM_SEP = "\x1e"


def at(path: str, message: str) -> str:
    return f"@{path}:{message}"


class PortMapping(CoreModel):
    """`port: 8000`, `port: "8000"` or `port: "80:8000"` (local:container; the replica uses container)."""

    local_port: Optional[int] = Field(None, ge=1, le=65535, description="Port on the dstack side (unused on Ray)")
    container_port: int = Field(ge=1, le=65535, description="Port the service listens on")

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"Invalid port: {value!r}")
        if isinstance(value, int):
            value = {"container_port": value}
        elif isinstance(value, str):
            text = value.strip()
            local, sep, container = text.partition(":")
            try:
                if sep:
                    value = {"local_port": parse_int(local), "container_port": parse_int(container)}
                else:
                    value = {"container_port": parse_int(text)}
            except ValueError:
                raise ValueError(f"Invalid port `{value}` (expected e.g. 8000 or \"80:8000\")") from None
        else:
            raise ValueError(f"Invalid port {value!r} (expected e.g. 8000 or \"80:8000\")")
        for port in value.values():
            if not 1 <= port <= 65535:
                raise ValueError(f"Port out of range: {port} (must be 1..65535)")
        return value


class ScalingConfig(CoreModel):
    """Autoscaling on requests per second; needs `replicas` to be a range."""

    metric: Literal["rps"] = Field(description="The only metric: `rps` (requests per second)")
    target: float = Field(description="Target requests per second per replica (> 0)")
    scale_up_delay: int = Field(300, description="Min seconds since the last scaling before scaling up (`5m`)")
    scale_down_delay: int = Field(600, description="Min seconds since the last scaling before scaling down (`10m`)")
    window: int = Field(60, description="Seconds over which RPS is averaged (`60s`)")

    @field_validator("scale_up_delay", "scale_down_delay", "window", mode="before")
    @classmethod
    def _parse_duration(cls, value: Any) -> Any:
        return parse_duration(value)

    @field_validator("target")
    @classmethod
    def _check_target(cls, value: float) -> float:
        if not (value > 0 and value != float("inf")):  # also refuses .nan
            raise ValueError(f"`target` must be greater than 0, got {value:g}")
        return value

    @field_validator("window")
    @classmethod
    def _check_window(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("`window` must be greater than 0")
        return value


class ModelConfig(CoreModel):
    """The model a service serves: `model: NAME` means `{type: chat, name: NAME, format: openai}`."""

    type: Literal["chat"] = Field("chat", description="Model type; `chat` is the only one")
    name: str = Field(min_length=1, description="Model id that clients send as `model`")
    format: Literal["tgi", "openai"] = Field("openai", description="API the backend speaks: `tgi` or `openai`")
    prefix: Optional[str] = Field(None, description="Where an `openai` backend serves its routes (default `/v1`)")
    chat_template: Optional[str] = Field(None, description="Jinja2 chat template (`tgi` only)")
    eos_token: Optional[str] = Field(None, description="End-of-sequence token (`tgi` only)")

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"type": "chat", "name": value, "format": "openai"}
        if isinstance(value, dict):
            fmt = value.get("format", "openai")
            if fmt not in ("tgi", "openai"):
                raise ValueError(f"Unsupported model format `{fmt}`: use `openai` or `tgi`")
            wrong = [k for k in (("chat_template", "eos_token") if fmt == "openai" else ("prefix",)) if k in value]
            if wrong:
                raise ValueError(f"`{wrong[0]}` is not allowed with model format `{fmt}`")
        return value

    @model_validator(mode="after")
    def _default_prefix(self):
        if self.format == "openai" and self.prefix is None:
            self.prefix = "/v1"
        return self


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
    home_dir: str = Field("/root", description="Home directory inside the container")
    working_dir: Optional[str] = Field(None, description="Working directory of the commands")
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
        default_factory=lambda: IntRange(min=1, max=1), description="Replica count or range `min..max`"
    )
    scaling: Optional[ScalingConfig] = Field(None, description="Autoscaling (needs `replicas` as a range)")
    model: Optional[ModelConfig] = Field(None, description="The model served (chat), for the OpenAI endpoint")
    probes: list[ProbeConfig] = Field(
        default_factory=list,
        description="HTTP probes, all must pass; a `model` service without `probes` gets a one-token chat probe, "
        "`probes: []` turns it off",
    )
    rate_limits: list[RateLimit] = Field(default_factory=list, description="Per-client request rate limits")

    # dstack-backend-only fields (see IGNORED_FIELDS).
    backends: Any = Field(None, description=IGNORED_FIELDS["backends"] + " (ignored on Ray)")
    regions: Any = Field(None, description=IGNORED_FIELDS["regions"] + " (ignored on Ray)")
    availability_zones: Any = Field(None, description=IGNORED_FIELDS["availability_zones"] + " (ignored on Ray)")
    instance_types: Any = Field(None, description=IGNORED_FIELDS["instance_types"] + " (ignored on Ray)")
    reservation: Any = Field(None, description=IGNORED_FIELDS["reservation"] + " (ignored on Ray)")
    spot_policy: Any = Field(None, description=IGNORED_FIELDS["spot_policy"] + " (ignored on Ray)")
    retry: Any = Field(None, description=IGNORED_FIELDS["retry"] + " (ignored on Ray)")
    max_duration: Any = Field(None, description=IGNORED_FIELDS["max_duration"] + " (ignored on Ray)")
    stop_duration: Any = Field(None, description=IGNORED_FIELDS["stop_duration"] + " (ignored on Ray)")
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
    strip_prefix: Any = Field(None, description=IGNORED_FIELDS["strip_prefix"] + " (ignored on Ray)")
    volumes: Any = Field(None, description=IGNORED_FIELDS["volumes"] + " (ignored on Ray)")
    privileged: Any = Field(None, description=IGNORED_FIELDS["privileged"] + " (ignored on Ray)")
    user: Any = Field(None, description=IGNORED_FIELDS["user"] + " (ignored on Ray)")
    shell: Any = Field(None, description=IGNORED_FIELDS["shell"] + " (ignored on Ray)")
    nvcc: Any = Field(None, description=IGNORED_FIELDS["nvcc"] + " (ignored on Ray)")
    single_branch: Any = Field(None, description=IGNORED_FIELDS["single_branch"] + " (ignored on Ray)")
    repos: Any = Field(None, description=IGNORED_FIELDS["repos"] + " (ignored on Ray)")
    files: Any = Field(None, description=IGNORED_FIELDS["files"] + " (ignored on Ray)")
    docker: Any = Field(None, description=IGNORED_FIELDS["docker"] + " (ignored on Ray)")
    priority: Any = Field(None, description=IGNORED_FIELDS["priority"] + " (ignored on Ray)")

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

    @field_validator("probes", "rate_limits", mode="before")
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
        if value is not None and (not value.strip() or any(ch.isspace() for ch in value)):
            raise ValueError(f"Invalid image `{value}`: expected a reference such as `ghcr.io/org/name:tag`")
        return value

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

    @field_validator("python", mode="before")
    @classmethod
    def _parse_python(cls, value: Any) -> Any:
        if isinstance(value, float):
            value = "3.10" if value == 3.1 else str(value)
        if isinstance(value, str) and value not in PYTHON_VERSIONS:
            raise ValueError(f"Unsupported python version `{value}` (use one of {', '.join(PYTHON_VERSIONS)})")
        return value

    @field_validator("setup", "commands", mode="before")
    @classmethod
    def _parse_lines(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        return value

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
        if self.registry_auth is not None:
            problems.extend(self._interpolate_registry_auth())
        if problems:
            raise ValueError(PROBLEM_SEP.join(problems))
        return self

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
