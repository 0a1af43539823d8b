"""`resources`: cpu, memory, shm_size, gpu, disk (after dstack's `core/models/resources.py`)."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field, field_validator, model_validator

from ray_dstack.config.models.common import CoreModel, IntRange, MemoryRange
from ray_dstack.config.units import parse_memory

DEFAULT_CPU = "2.."
DEFAULT_MEMORY = "8GB.."
DEFAULT_DISK = "100GB.."


def parse_gpu_string(text: str) -> dict[str, Any]:
    """dstack's compact GPU grammar: `:`-separated tokens in any order.

    A token starting with a letter is a comma-separated name list, a token containing a unit is the
    per-GPU memory (range allowed), anything else is the count (range allowed).
    """
    spec: dict[str, Any] = {}
    for token in text.split(":"):
        token = token.strip()
        if not token:
            raise ValueError(f"GPU spec contains an empty token: `{text}`")
        if token[0].isalpha():
            if "name" in spec:
                raise ValueError(f"GPU spec name conflict: `{text}` has two name tokens")
            names = [n.strip() for n in token.split(",")]
            if any(not n for n in names):
                raise ValueError(f"GPU name can not be empty: `{text}`")
            spec["name"] = names
        elif any(c.isalpha() for c in token):
            if "memory" in spec:
                raise ValueError(f"GPU spec memory conflict: `{text}` has two memory tokens")
            spec["memory"] = token
        else:
            if "count" in spec:
                raise ValueError(f"GPU spec count conflict: `{text}` has two count tokens")
            spec["count"] = token
    return spec


class GPUSpec(CoreModel):
    """GPUs per replica: `24GB`, `A100:2`, `A100,H100:40GB:1..2`, an int (count) or a mapping."""

    vendor: Optional[str] = Field(None, description="GPU vendor: `nvidia`, `amd`, `google` (TPU), `intel`")
    name: Optional[list[str]] = Field(None, description="Accepted GPU models, e.g. `[A100, H100]`")
    count: IntRange = Field(
        default_factory=lambda: IntRange(min=1, max=1), description="Number of GPUs per replica (range)"
    )
    memory: Optional[MemoryRange] = Field(None, description="Memory per GPU (range), e.g. `24GB..`")
    total_memory: Optional[MemoryRange] = Field(None, description="Memory of all GPUs together (range)")
    compute_capability: Optional[str] = Field(None, description="Minimum CUDA compute capability, e.g. `8.0`")

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"Invalid GPU spec: {value!r}")
        if isinstance(value, int):
            return {"count": value}
        if isinstance(value, str):
            return parse_gpu_string(value)
        return value

    @field_validator("name", mode="before")
    @classmethod
    def _parse_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [n.strip() for n in value.split(",")]
        if isinstance(value, list) and any(isinstance(n, str) and not n.strip() for n in value):
            raise ValueError("GPU name can not be empty")
        return value

    @field_validator("vendor", mode="before")
    @classmethod
    def _parse_vendor(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower()
            if value not in ("nvidia", "amd", "google", "tpu", "intel"):
                raise ValueError(f"Unknown GPU vendor `{value}` (use nvidia, amd, google, intel)")
        return value

    @field_validator("compute_capability", mode="before")
    @classmethod
    def _parse_cc(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = f"{float(value):.1f}"
        if isinstance(value, str):
            major, dot, minor = value.strip().partition(".")
            if not major.isdigit() or (dot and not minor.isdigit()):
                raise ValueError(f"Invalid compute capability `{value}` (expected e.g. `8.0`)")
        return value

    def __str__(self) -> str:
        parts = []
        if self.name:
            parts.append(",".join(self.name))
        if self.memory:
            parts.append(str(self.memory))
        parts.append(str(self.count))
        return ":".join(parts)


class DiskSpec(CoreModel):
    """Disk size: `200GB`, `100GB..`, or `{size: ...}`."""

    size: MemoryRange = Field(description="Disk size in GB (range)")

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return {"size": value}
        return value


class ResourcesSpec(CoreModel):
    """Resources one replica needs. Defaults follow dstack: `cpu: 2..`, `memory: 8GB..`, `disk: 100GB..`."""

    cpu: IntRange = Field(default_factory=lambda: IntRange.model_validate(DEFAULT_CPU), description="CPU cores (range)")
    memory: MemoryRange = Field(
        default_factory=lambda: MemoryRange.model_validate(DEFAULT_MEMORY), description="RAM in GB (range)"
    )
    shm_size: Optional[float] = Field(None, description="Shared memory (/dev/shm) size in GB, e.g. `16GB`")
    gpu: Optional[GPUSpec] = Field(None, description="GPUs (compact string, count, or mapping)")
    disk: DiskSpec = Field(
        default_factory=lambda: DiskSpec.model_validate(DEFAULT_DISK), description="Disk size in GB (range)"
    )

    @field_validator("shm_size", mode="before")
    @classmethod
    def _parse_shm(cls, value: Any) -> Any:
        return None if value is None else parse_memory(value)

    @field_validator("cpu", mode="before")
    @classmethod
    def _parse_cpu(cls, value: Any) -> Any:
        # dstack ≥0.19 accepts an architecture prefix (`x86:4..`, `arm:2`); Ray schedules by count only.
        if isinstance(value, str) and ":" in value:
            arch, _, count = value.partition(":")
            if arch.strip().lower() not in ("x86", "arm"):
                raise ValueError(f"Unknown CPU architecture `{arch.strip()}` (use x86 or arm)")
            return count
        if isinstance(value, dict) and "count" in value:
            return value["count"]
        return value
