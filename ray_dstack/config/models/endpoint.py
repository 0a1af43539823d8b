"""What a service exposes: its `port` and the `model` it serves (after dstack's `PortMapping`, `AnyModel`)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from ray_dstack.config.models.common import CoreModel
from ray_dstack.config.units import parse_int


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
