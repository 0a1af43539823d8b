"""`scaling`: autoscaling on requests per second (after dstack's `ScalingSpec`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from ray_dstack.config.models.common import CoreModel
from ray_dstack.config.units import parse_duration


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
