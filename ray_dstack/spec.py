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
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Serve application that publishes the OpenAI-compatible routes for every deployed model.
GATEWAY_APP_NAME = "ray-dstack-gateway"
GATEWAY_ROUTE_PREFIX = "/v1"
GATEWAY_APP_ROUTE_PREFIX = "/"  # the gateway application also answers `GET /health` at the ingress root
GATEWAY_DEPLOYMENT_NAME = "OpenAIGateway"
# Deployment (inside each service's application) whose replicas run the service's commands.
REPLICA_DEPLOYMENT_NAME = "ServiceReplica"
SERVICE_IMPORT_PATH = "ray_dstack.serve.app:build_service"
GATEWAY_IMPORT_PATH = "ray_dstack.serve.app:build_gateway"
# Commands that mention this variable get a free port chosen per replica, so replicas can share a node.
PORT_ENV_VAR = "RAY_DSTACK_PORT"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProbeSpec(_Spec):
    """An HTTP readiness probe: the replica is ready once `path` answers 2xx `ready_after` times in a row."""

    path: str = Field("/", description="Path requested on the service's port")
    interval_s: float = Field(2.0, description="Seconds between probe requests")
    timeout_s: float = Field(5.0, description="Timeout of one probe request")
    ready_after: int = Field(1, description="Consecutive successes needed before the replica is ready")


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


class ServiceSpec(_Spec):
    """What one replica of a service needs at run time."""

    name: str = Field(description="Service (and Serve application) name")
    commands: list[str] = Field(description="Shell lines run in order in one shell")
    env: dict[str, str] = Field(default_factory=dict, description="Environment of the commands")
    working_dir: str | None = Field(None, description="Working directory of the commands")
    port: int = Field(ge=1, le=65535, description="Port the service listens on (fixed port mode)")
    port_from_env: bool = Field(
        False, description=f"The commands read ${PORT_ENV_VAR}: each replica gets a free port"
    )
    probe: ProbeSpec | None = Field(None, description="Readiness probe; default: the port accepts connections")
    auth: AuthSpec = Field(default_factory=AuthSpec)
    model: ModelSpec | None = None
    scaling: ScalingSpec | None = None
    ready_timeout_s: float = Field(900.0, description="How long a replica may take to become ready")
    request_timeout_s: float = Field(600.0, description="Upstream read timeout for one request")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
