"""dstack `service` configurations: YAML → validated `ServiceConfig` with field paths and line numbers."""

from ray_dstack.config.errors import ConfigError, Problem
from ray_dstack.config.loader import (
    LoadedService,
    load_service,
    name_from_filename,
    parse_service,
)
from ray_dstack.config.models.common import IntRange, MemoryRange
from ray_dstack.config.models.groups import ReplicaGroup, RouterConfig
from ray_dstack.config.models.resources import DiskSpec, GPUSpec, ResourcesSpec
from ray_dstack.config.models.service import (
    IGNORED_FIELDS,
    ModelConfig,
    PortMapping,
    RegistryAuth,
    ScalingConfig,
    ServiceConfig,
)
from ray_dstack.config.models.traffic import ProbeConfig, ProbeHeader, RateLimit, RateLimitKey

__all__ = [
    "ConfigError", "Problem", "LoadedService", "load_service", "parse_service", "name_from_filename",
    "IntRange", "MemoryRange", "DiskSpec", "GPUSpec", "ResourcesSpec", "IGNORED_FIELDS", "ModelConfig",
    "PortMapping", "ProbeConfig", "ProbeHeader", "RateLimit", "RateLimitKey", "RegistryAuth", "ScalingConfig", "ServiceConfig",
    "ReplicaGroup", "RouterConfig",
]
