"""`probes` and `rate_limits` of a service (after dstack's `ProbeConfig` and `RateLimit`, 0.19–0.21).

Limits follow dstack's: a probe has at most 16 headers, a header value and a body are 1..2048 characters,
`timeout` and `interval` are at least 1 s, `ready_after` at least 1; a probe body is refused with `get`/`head`.
A rate-limit header name matches `^[a-zA-Z0-9-_]+$`; `rps` is a float > 0 (below 1 allowed), `burst` ≥ 0.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from ray_dstack.config.models.common import CoreModel
from ray_dstack.config.units import parse_duration

PROBE_METHODS = ("get", "post", "put", "patch", "delete", "head")
MAX_PROBE_URL_LENGTH = 2048
MAX_PROBE_HEADERS = 16
MAX_PROBE_VALUE_LENGTH = 2048
# RFC 9110 token characters: what may appear in an HTTP header name (no spaces, no separators).
HTTP_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
RATE_LIMIT_HEADER_RE = re.compile(r"^[a-zA-Z0-9\-_]+$")


class ProbeHeader(CoreModel):
    """One header sent with a probe request."""

    name: str = Field(description="Header name (an HTTP token: letters, digits, `-`, no spaces)")
    value: str = Field(
        min_length=1, max_length=MAX_PROBE_VALUE_LENGTH, description="Header value (1..2048 characters)"
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not HTTP_HEADER_NAME_RE.match(value):
            raise ValueError(f"Invalid header name `{value}`: use letters, digits and `-` (no spaces)")
        return value

    @field_validator("value")
    @classmethod
    def _check_value(cls, value: str) -> str:
        if any(c in value for c in "\r\n\0"):
            raise ValueError("A header value cannot contain line breaks")
        return value


class ProbeConfig(CoreModel):
    """An HTTP probe (dstack ≥0.19.22): the replica is ready after `ready_after` 2xx answers in a row."""

    type: Literal["http"] = Field(description="Probe type; `http` is the only one")
    url: str = Field("/", description="Path requested on the service's port, e.g. `/health` (must start with `/`)")
    method: Literal[PROBE_METHODS] = Field(  # type: ignore[valid-type]
        "get", description="HTTP method: get, post, put, patch, delete or head"
    )
    headers: list[ProbeHeader] = Field(default_factory=list, description="Headers sent with the probe (at most 16)")
    body: Optional[str] = Field(
        None, min_length=1, max_length=MAX_PROBE_VALUE_LENGTH, description="Request body (not with get/head)"
    )
    timeout: int = Field(10, description="Timeout of one probe request (duration; at least 1s)")
    interval: int = Field(15, description="Time from the end of one probe to the start of the next (at least 1s)")
    ready_after: int = Field(1, ge=1, description="Consecutive successes before the replica is ready")
    until_ready: bool = Field(False, description="Stop probing once the replica is ready")

    @field_validator("method", mode="before")
    @classmethod
    def _lower_method(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("interval", "timeout", mode="before")
    @classmethod
    def _parse_duration(cls, value: Any) -> Any:
        return parse_duration(value)

    @field_validator("interval", "timeout")
    @classmethod
    def _at_least_one_second(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be at least 1s, got {value}s")
        return value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"`url` must be a path starting with `/`, got `{value}`")
        if len(value) > MAX_PROBE_URL_LENGTH:
            raise ValueError(f"`url` is longer than {MAX_PROBE_URL_LENGTH} characters")
        if not value.isprintable() or " " in value:
            raise ValueError("`url` must be printable, without spaces")
        return value

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: list[ProbeHeader]) -> list[ProbeHeader]:
        if len(value) > MAX_PROBE_HEADERS:
            raise ValueError(f"At most {MAX_PROBE_HEADERS} `headers` are allowed, got {len(value)}")
        return value

    @model_validator(mode="after")
    def _check_body(self):
        if self.body is not None and self.method in ("get", "head"):
            raise ValueError(f"@body:A probe `body` is not allowed with method `{self.method}`")
        return self


class RateLimitKey(CoreModel):
    """What a rate limit counts by: the client's IP address (default) or a request header."""

    type: Literal["ip_address", "header"] = Field("ip_address", description="`ip_address` or `header`")
    header: Optional[str] = Field(None, description="Header name (for `type: header`), `^[a-zA-Z0-9-_]+$`")

    @field_validator("header")
    @classmethod
    def _check_header(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not RATE_LIMIT_HEADER_RE.match(value):
            raise ValueError(f"Invalid header name `{value}`: use letters, digits, `-` and `_`")
        return value

    @model_validator(mode="after")
    def _check(self):
        if self.type == "header" and not self.header:
            raise ValueError("`header` is required when `type` is `header`")
        if self.type == "ip_address" and self.header:
            raise ValueError("`header` is only allowed when `type` is `header`")
        return self


class RateLimit(CoreModel):
    """A request rate limit per client (dstack ≥0.19.4), nginx `limit_req rate=rps burst=burst nodelay`."""

    prefix: str = Field("/", description="Path prefix (relative to the service) the limit applies to")
    key: RateLimitKey = Field(default_factory=RateLimitKey, description="What requests are counted by")
    rps: float = Field(description="Allowed requests per second per key (> 0; may be below 1)")
    burst: int = Field(0, ge=0, description="Requests above the rate still served at once")

    @field_validator("rps")
    @classmethod
    def _check_rps(cls, value: float) -> float:
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"`rps` must be greater than 0, got {value:g}")
        return value

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"`prefix` must start with `/`, got `{value}`")
        return value


def check_rate_limits(limits: list[RateLimit]) -> list[str]:
    """Cross-item problems: two limits on one prefix are ambiguous (nginx refuses two such locations too)."""
    problems: list[str] = []
    seen: dict[str, int] = {}
    for i, limit in enumerate(limits):
        prefix = normalized_prefix(limit.prefix)
        if prefix in seen:
            problems.append(f"rate_limits[{i}] and rate_limits[{seen[prefix]}] have the same `prefix` `{limit.prefix}`")
        else:
            seen[prefix] = i
    return problems


def normalized_prefix(prefix: str) -> str:
    """`/v1/` and `/v1` are one prefix; the root stays `/`."""
    return prefix.rstrip("/") or "/"
