"""The contract between the plan (pure, runs anywhere) and the runtime (Serve replicas on the cluster).

The plan turns a parsed `.dstack.yml` into a `ServiceSpec`; the Serve application's `args` carry
`{"service": ServiceSpec.model_dump(mode="json")}` and the replica rebuilds it with
`ServiceSpec.model_validate(args["service"])`. Everything the replica needs at run time is here, already
resolved (env placeholders filled, shorthand expanded, durations in seconds), so the replica never
re-parses YAML and never needs the caller's environment.

Secrets never travel in clear text where Serve shows them: the auth token is kept as its SHA-256 only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Serve application that publishes the OpenAI-compatible routes for every deployed model.
GATEWAY_APP_NAME = "ray-dstack-gateway"
GATEWAY_ROUTE_PREFIX = "/v1"
GATEWAY_APP_ROUTE_PREFIX = "/"  # the gateway application also answers `GET /health` at the ingress root
GATEWAY_DEPLOYMENT_NAME = "OpenAIGateway"
# Deployment (inside each service's application) whose replicas run the service's commands.
REPLICA_DEPLOYMENT_NAME = "ServiceReplica"
SERVICE_IMPORT_PATH = "ray_dstack.serve.app:build_service"
GATEWAY_IMPORT_PATH = "ray_dstack.serve.app:build_gateway"
# Set by ray-dstack's rules in Serve's HAProxy (ray_dstack/serve/ingress/haproxy_v1.py) on a `/v1/...` request it sent
# straight to the model's service, to the request's original path; removed from every request clients send.
V1_ROUTE_HEADER = "x-ray-dstack-v1"
# Set by the prefix-affinity rules (serve/ingress/prefix_affinity.py) on each request they route, removed from
# clients' requests: how the replica was chosen, one of PREFIX_ROUTE_OUTCOMES (the replica counts them).
PREFIX_ROUTE_HEADER = "x-ray-dstack-prefix-route"
# `affinity`: back to the replica the prefix went to last; `spilled`: that replica carried more than its share;
# `moved`: that replica is down or gone; `new`: no replica known for the prefix (least connections chose).
PREFIX_ROUTE_OUTCOMES = ("affinity", "spilled", "moved", "new")
# ray-dstack's namespace in Ray's internal KV: `registry_auth` for the replicas (ray_dstack/deploy/registry_auth.py),
# image pull progress (serve/runtime/pull_progress.py), the /v1 model table (serve/ingress/v1_routes.py).
KV_NAMESPACE = b"ray-dstack"
# `registry_auth` of one deploy: `<prefix><service>/<random>`, written by deploy (deploy/registry_auth.py); the
# replica reads it by the key its spec carries.
REGISTRY_AUTH_KEY_PREFIX = "registry-auth/"
# A grouped service's request counters, `<prefix><service>/<replica>`, written by its ingress replicas
# (serve/scaling/service_counters.py) for the other groups' autoscaling policy.
SERVICE_COUNTERS_PREFIX = "requests/"
# Named volumes are directories under this root on each node (serve/runtime/filesystem.py; `plan` names it).
VOLUME_ROOT_ENV = "RAY_DSTACK_VOLUME_ROOT"
DEFAULT_VOLUME_ROOT = "/var/lib/ray-dstack/volumes"
# Commands that mention this variable get a free port chosen per replica, so replicas can share a node.
PORT_ENV_VAR = "RAY_DSTACK_PORT"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProbeSpec(_Spec):
    """An HTTP probe: the replica is ready once `path` answers 2xx `ready_after` times in a row (dstack's fields)."""

    path: str = Field("/", description="Path requested on the service's port")
    method: str = Field("get", description="HTTP method, lower case")
    headers: list[tuple[str, str]] = Field(default_factory=list, description="Headers sent with the probe")
    body: str | None = Field(None, description="Request body")
    interval_s: float = Field(15.0, description="Seconds from the end of one probe to the start of the next")
    timeout_s: float = Field(10.0, description="Timeout of one probe request")
    ready_after: int = Field(1, ge=1, description="Consecutive successes needed before the replica is ready")
    until_ready: bool = Field(False, description="Stop probing once the replica is ready")


class RateLimitSpec(_Spec):
    """One of `rate_limits`: nginx `limit_req rate=rps burst=burst nodelay` per partition of `key`."""

    prefix: str = Field("/", description="Path prefix relative to the service's route (a plain string prefix, as an nginx location)")
    key: Literal["ip_address", "header"] = Field("ip_address", description="What partitions the requests")
    header: str | None = Field(None, description="Header name for `key: header` (lower case)")
    rps: float = Field(gt=0, description="Requests per second per partition, for the whole service")
    burst: int = Field(0, ge=0, description="Requests above the rate still served at once")


class AuthSpec(_Spec):
    enabled: bool = Field(True, description="Requests need `Authorization: Bearer <token>`")
    token_sha256: str | None = Field(None, description="SHA-256 hex digest of the service token")

    def accepts(self, authorization: str | None) -> bool:
        """Whether an `Authorization` header value grants access (constant-time comparison)."""
        if not self.enabled:
            return True
        if not authorization or self.token_sha256 is None:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        return hmac.compare_digest(token_digest(token.strip()), self.token_sha256)


class ModelSpec(_Spec):
    type: Literal["chat"] = "chat"
    name: str = Field(description="Model id that clients send as `model`")
    format: Literal["tgi", "openai"] = Field(description="API the backend speaks")
    prefix: str = Field("/v1", description="Where an `openai`-format backend serves its OpenAI routes")
    chat_template: str | None = Field(None, description="Jinja2 chat template (tgi format)")
    eos_token: str | None = Field(None, description="End-of-sequence token (tgi format)")
    bos_token: str | None = Field(None, description="Beginning-of-sequence token (tgi format)")


class ModelSettings(_Spec):
    """A tgi model's chat settings as `deploy` resolved them (from the YAML and/or the Hugging Face Hub)."""

    chat_template: str = Field(description="Jinja2 chat template")
    eos_token: str | None = Field(None, description="End-of-sequence token")
    bos_token: str | None = Field(None, description="Beginning-of-sequence token")


class ScalingSpec(_Spec):
    """dstack's `scaling` with replicas as a range: one replica per `target` requests per second."""

    metric: Literal["rps"] = "rps"
    target: float = Field(gt=0, description="Requests per second one replica should serve")
    min_replicas: int = Field(ge=0)
    max_replicas: int = Field(ge=1)
    window_s: float = Field(60.0, gt=0, description="Window over which RPS is averaged")
    scale_up_delay_s: float = Field(300.0, ge=0, description="Min time since the last scaling before scaling up")
    scale_down_delay_s: float = Field(600.0, ge=0, description="Min time since the last scaling before scaling down")


class RegistryAuthRef(_Spec):
    """Where a replica finds `registry_auth`: the password is never in the spec (the Serve config is readable
    through the dashboard API) but in Ray's internal KV under `kv_key` (ray_dstack/deploy/registry_auth.py)."""

    username: str = Field(description="Registry user name (not a secret; shown by `plan`)")
    kv_key: str = Field(description="Internal-KV key (namespace `ray-dstack`) of `{username, password}`")


class MountSpec(_Spec):
    """One of `volumes` (dstack's `core/models/volumes.py`): a directory of the node that appears at `path` for
    the commands (a bind mount: `-v` for a container, the replica's own mount namespace for a process)."""

    kind: Literal["instance", "volume"] = Field(
        description="`instance`: `instance_path` on the node; `volume`: a named (network) volume, on Ray the "
        "directory `<volume root>/<name>` of the node (the root: $RAY_DSTACK_VOLUME_ROOT on the node)")
    instance_path: str | None = Field(None, description="Absolute path on the node (`instance`)")
    names: list[str] = Field(
        default_factory=list,
        description="Volume names (`volume`), `${{ dstack.job_num }}`/`${{ dstack.node_rank }}` already "
        "interpolated; of several, the first that exists on the node is used, else the first is created")
    path: str = Field(description="Absolute path where the commands see it")
    optional: bool = Field(False, description="`instance`: run without it where the node cannot mount it")


class UploadSpec(_Spec):
    """One of `files` (or a local `repos` entry): packed at deploy time into Ray's package store, unpacked into
    each replica before its commands start."""

    uri: str = Field(description="The archive in Ray's package store: `gcs://_ray_pkg_<sha256>.zip`")
    path: str = Field(description="Where it lands: relative to the working directory, or absolute")
    source: str = Field(description="The local path as the configuration wrote it (for `plan`/`status`)")
    size: int = Field(ge=0, description="Bytes of the archive")
    is_file: bool = Field(False, description="The archive holds one file (`path` is that file, not a directory)")
    repo: bool = Field(False, description="A local `repos` entry (`if_exists` applies) rather than `files`")
    if_exists: Literal["error", "skip"] = Field("error", description="`repos`: when `path` already has files")


class GitRepoSpec(_Spec):
    """A `repos` entry with `url`: each replica clones it before its commands start."""

    url: str = Field(description="Git URL (https, ssh, file or a local path the node can read)")
    branch: str | None = Field(None, description="Branch to check out; default: the remote's default branch")
    hash: str | None = Field(None, description="Commit to check out")
    path: str = Field(".", description="Where to clone: relative to the working directory, or absolute")
    if_exists: Literal["error", "skip"] = Field("error", description="When `path` already has files")
    single_branch: bool = Field(True, description="Clone only the checked-out branch")


RouterType = Literal["sglang", "dynamo"]
GROUP_DEPLOYMENT_PREFIX = REPLICA_DEPLOYMENT_NAME + "-"
# The paths a router group takes from clients (dstack's `proxy/lib/const.py`): the router's admin API
# (`/workers`, `/health`, ...) is never public.
ROUTER_ALLOWED_PATHS = ("/generate", "/chat/completions")
ROUTER_ALLOWED_PREFIXES = ("/v1/",)


# A grouped service's replica spec travels in its deployment's `ray_actor_options.runtime_env.env_vars`, not in
# the application's `args`: Serve versions every deployment of an application by its `args`, so a spec there
# would restart every group when one changes; a deployment's own options restart that deployment only (dstack
# rolls the changed group only). The replica reads it and removes it from its environment. Its `env` is empty:
# the service's `env` (shared by every group, secrets among it) stays in `args["env"]`, since Ray logs a
# runtime_env and passes it on a command line.
SPEC_ENV_VAR = "RAY_DSTACK_SERVICE_SPEC"


def application_specs(app_config: dict[str, Any]) -> list[dict[str, Any]]:
    """The replica specs (JSON) of a service's Serve application, the ingress group's first: `args.service`
    for a service without groups, else each deployment's SPEC_ENV_VAR."""
    args = app_config.get("args") or {}
    if "service" in args:
        return [args["service"]]
    specs = []
    for deployment in app_config.get("deployments") or []:
        env = ((deployment.get("ray_actor_options") or {}).get("runtime_env") or {}).get("env_vars") or {}
        if SPEC_ENV_VAR in env:
            spec = {**json.loads(env[SPEC_ENV_VAR]), "env": dict(args.get("env") or {})}
            if deployment.get("name") == REPLICA_DEPLOYMENT_NAME:
                specs.insert(0, spec)
            else:
                specs.append(spec)
    return specs


def group_deployment_name(group: str, *, ingress: bool) -> str:
    """The Serve deployment of a replica group: the group that takes the service's traffic keeps
    REPLICA_DEPLOYMENT_NAME (the gateway, the limits and `status` find it by that name); the others get
    `ServiceReplica-<group>`."""
    return REPLICA_DEPLOYMENT_NAME if ingress else GROUP_DEPLOYMENT_PREFIX + group


class GroupSpec(_Spec):
    """Which replica group (dstack 0.21's `groups`) a replica belongs to, and its part in the service."""

    name: str = Field(description="Group name from the configuration (`0`, `1`, ... when unnamed)")
    deployment: str = Field(description="Serve deployment that runs this group's replicas")
    role: Literal["router", "worker", "member"] = Field(
        description="`router`: takes all the service's traffic and routes it over the workers; `worker`: reached "
        "only through the router; `member`: a group of a service without a router (every group serves)")
    router: RouterType | None = Field(None, description="The service's router type, if it has a router group")
    groups: list[str] = Field(default_factory=list, description="Every group of the service, in file order")


# Fields a Serve config carries only when they differ from their default: the config of a service that does not
# use them stays what it was before they existed, so upgrading ray-dstack does not restart it.
OPTIONAL_SPEC_FIELDS = ("volumes", "uploads", "git_repo", "shell", "user", "privileged", "docker", "dstack_api",
                        "strip_prefix", "max_duration_s", "schedule", "routing")


class ServiceSpec(_Spec):
    """What one replica of a service needs at run time."""

    name: str = Field(description="Service (and Serve application) name")
    commands: list[str] = Field(description="Shell lines run in order in one shell")
    env: dict[str, str] = Field(default_factory=dict, description="Environment of the commands")
    working_dir: str | None = Field(
        None, description="Working directory of the commands: relative to the replica's own directory, or absolute"
    )
    python: str | None = Field(
        None, description="Python version of the service's environment (`3.12`); None: the node's own version"
    )
    network_namespace: bool = Field(
        False, description="Run the commands in a network namespace of their own (pasta), the fixed port mapped"
    )
    image: str | None = Field(None, description="Container image: each replica runs in a container of it")
    entrypoint: str | None = Field(None, description="Replaces the image's entrypoint; `commands` are its arguments")
    registry_auth: RegistryAuthRef | None = Field(None, description="Credentials for pulling `image`, by reference")
    shm_size_bytes: int | None = Field(None, ge=1, description="`resources.shm_size` of the container, in bytes")
    port: int = Field(ge=1, le=65535, description="Port the service listens on (fixed port mode)")
    port_from_env: bool = Field(
        False, description=f"The commands read ${PORT_ENV_VAR}: each replica gets a free port"
    )
    probes: list[ProbeSpec] = Field(
        default_factory=list, description="HTTP probes, all must pass; none: ready once the port accepts connections"
    )
    rate_limits: list[RateLimitSpec] = Field(default_factory=list, description="Request rate limits (429 past them)")
    routing: Literal["least_connections", "prefix"] = Field(
        "least_connections", description="How HAProxy picks a replica for the model's chat/completions requests")
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses/networks whose X-Forwarded-For is believed (`deploy --trusted-proxies`)",
    )
    auth: AuthSpec = Field(default_factory=AuthSpec)
    model: ModelSpec | None = None
    scaling: ScalingSpec | None = None
    ready_timeout_s: float = Field(900.0, description="How long a replica may take to become ready")
    request_timeout_s: float = Field(600.0, description="Upstream read timeout for one request")

    # dstack's container fields (spec §4), honoured by both runtimes.
    volumes: list[MountSpec] = Field(default_factory=list, description="Node directories mounted for the commands")
    uploads: list[UploadSpec] = Field(default_factory=list, description="`files` and local `repos`, by reference")
    git_repo: GitRepoSpec | None = Field(None, description="A `repos` entry cloned by each replica")
    shell: str | None = Field(
        None, description="Absolute path of the shell running `commands`; None: /bin/bash (/bin/sh with `image`)")
    user: str | None = Field(None, description="`name_or_uid[:group_or_gid]` the commands run as")
    privileged: bool = Field(False, description="Run the container privileged")
    docker: bool = Field(False, description="The commands get a working Docker daemon (dstack's `docker: true`)")
    dstack_api: bool = Field(
        False, description="`dstack: true`: the commands are told the cluster's dashboard address")
    strip_prefix: bool = Field(True, description="The service sees paths without `/<service>`")
    max_duration_s: float | None = Field(
        None, gt=0, description="`max_duration`: a replica stops its service this long after it started")
    schedule: list[str] = Field(
        default_factory=list, description="`schedule.cron` (UTC, dstack's day-of-week numbering): starts the service")

    replicas: int = Field(1, ge=0, description="Replicas at deploy time: each enforces 1/N of `rate_limits`")
    group: GroupSpec | None = Field(None, description="The replica group (services with `groups` only)")

    @model_validator(mode="before")
    @classmethod
    def _single_probe(cls, value: Any) -> Any:
        # Specs written before several probes were supported carry `probe`: still readable.
        if isinstance(value, dict) and "probe" in value:
            value = dict(value)
            old = value.pop("probe")
            value.setdefault("probes", [old] if old else [])
        return value

    @property
    def reached_from_other_nodes(self) -> bool:
        """A replica another replica connects to directly: an SGLang router's worker, or a group beside the
        ingress group of a service without a router. Its service port is published on its node's address too
        (by the namespace or the container), not only on loopback."""
        group = self.group
        if group is None or group.deployment == REPLICA_DEPLOYMENT_NAME:
            return False
        return group.role == "member" or (group.role == "worker" and group.router == "sglang")

    @property
    def probe(self) -> ProbeSpec | None:
        """The first probe (callers written before several probes were supported)."""
        return self.probes[0] if self.probes else None


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def env_dir_name(service: str, version: str) -> str:
    """Directory name of a service's Python environment on a node (under $RAY_DSTACK_ENV_ROOT)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", service) + f"-py{version}"
