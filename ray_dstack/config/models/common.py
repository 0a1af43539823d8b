"""Base model and range types, after dstack's `core/models/common.py` and `resources.py`."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ray_dstack.config.units import parse_int, parse_memory, parse_range


class CoreModel(BaseModel):
    """Every config model: unknown keys are errors, like in dstack."""

    model_config = ConfigDict(extra="forbid", validate_default=False)


class _Range(CoreModel):
    """A closed, half-open or exact range. A single value means exactly that value."""

    @classmethod
    def _parse_one(cls, value: Any) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: (cls._parse_one(v) if k in ("min", "max") and v is not None else v) for k, v in value.items()}
        return parse_range(value, cls._parse_one)

    @model_validator(mode="after")
    def _check(self):
        if self.min is None and self.max is None:
            raise ValueError("Invalid empty range: `..`")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"Invalid range order: {self._fmt(self.min)}..{self._fmt(self.max)}")
        return self

    def __str__(self) -> str:
        low = "" if self.min is None else self._fmt(self.min)
        high = "" if self.max is None else self._fmt(self.max)
        if self.min is not None and self.min == self.max:
            return low
        return f"{low}..{high}"

    @staticmethod
    def _fmt(v: Any) -> str:
        return str(v)

    def contains(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


class IntRange(_Range):
    """A range of integers: `2`, `1..4`, `2..`, `..8`, or `{min, max}`."""

    min: Optional[int] = Field(None, ge=0, description="Lower bound (inclusive); none means 0")
    max: Optional[int] = Field(None, ge=0, description="Upper bound (inclusive); none means unbounded")

    @classmethod
    def _parse_one(cls, value: Any) -> Any:
        return parse_int(value)


class MemoryRange(_Range):
    """A range of sizes in GB: `24GB`, `24GB..`, `..80GB`, `512MB..1TB`."""

    min: Optional[float] = Field(None, ge=0, description="Lower bound in GB (inclusive)")
    max: Optional[float] = Field(None, ge=0, description="Upper bound in GB (inclusive)")

    @classmethod
    def _parse_one(cls, value: Any) -> Any:
        return parse_memory(value)

    @staticmethod
    def _fmt(v: Any) -> str:
        from ray_dstack.config.units import format_memory

        return format_memory(v)
