"""Replica groups (dstack 0.21): a service whose replicas are not all alike, e.g. a router plus its workers.

HEAD spells them `groups: [{name, replicas, ...}]`; release 0.21.2 spells them `replicas: [{name, count, ...}]`.
Both are accepted; validators work on the HEAD spelling (`groups[i].replicas`) and `spelled_loc` turns a path
back into what the file says. After dstack's `ReplicaGroup`, `ReplicaGroupRouterConfig` and the
`ServiceConfigurationParams` validators in `core/models/configurations.py` (messages are dstack's).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Callable, Literal, Optional

from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from ray_dstack.config.models.common import CoreModel, IntRange
from ray_dstack.config.models.resources import ResourcesSpec
from ray_dstack.config.models.scaling import ScalingConfig
from ray_dstack.config.models.validation import at, check_image_ref, parse_lines, parse_python_version

GROUP_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
DEFAULT_GROUP_NAME = "0"  # the one group of a service without groups (dstack's DEFAULT_REPLICA_GROUP_NAME)


class RouterConfig(CoreModel):
    """`router:` of a replica group: its replicas run the service's router, the other groups are its workers."""

    type: Literal["sglang", "dynamo"] = Field(
        "sglang",
        description="`sglang`: an SGLang router (SMG) that is told the worker URLs; "
        "`dynamo`: an NVIDIA Dynamo frontend that discovers workers itself (etcd/NATS)",
    )


class ReplicaGroup(CoreModel):
    """One replica group: its own count, scaling, resources, commands and image; the rest is the service's."""

    name: Optional[str] = Field(
        None, description="Group name (`^[a-z0-9][a-z0-9-]{0,39}$`); default: its position, `0`, `1`, ..."
    )
    replicas: IntRange = Field(
        description="Replica count or range `min..max` (alias `count`, 0.21.2's spelling); a range needs `scaling`"
    )
    scaling: Optional[ScalingConfig] = Field(
        None, description="Autoscaling of this group; required if `replicas` is a range, forbidden otherwise"
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="Resources per replica of this group (not the top-level ones)"
    )
    spot_policy: Optional[Literal["spot", "on-demand", "auto"]] = Field(
        None, description="`spot`, `on-demand` or `auto` for this group's instances (ignored on Ray)"
    )
    reservation: Optional[str] = Field(None, description="Capacity reservation for this group (ignored on Ray)")
    commands: list[str] = Field(
        default_factory=list, description="Shell lines this group's replicas run (instead of top-level `commands`)"
    )
    image: Optional[str] = Field(
        None, description="Container image of this group (excludes group `python` and `docker`)"
    )
    python: Optional[str] = Field(
        None, description="Python version of this group, `3.8`…`3.13` (excludes group `image` and `docker`)"
    )
    nvcc: Optional[bool] = Field(
        None, description="Use an image with the CUDA compiler (excludes group `docker`; ignored on Ray)"
    )
    docker: Optional[bool] = Field(
        None, description="Docker-in-Docker for this group (excludes group `image`, `python`, `nvcc`)"
    )
    privileged: Optional[bool] = Field(None, description="Run this group's containers privileged")
    router: Optional[RouterConfig] = Field(
        None, description="This group runs the router (`{type: sglang|dynamo}`; `{}` is sglang); one replica"
    )

    # Which key the file used for the count: `replicas`, or its alias `count`.
    _replicas_key: str = PrivateAttr("replicas")

    @model_validator(mode="wrap")
    @classmethod
    def _count_alias(cls, data: Any, handler: Callable[[Any], "ReplicaGroup"]) -> "ReplicaGroup":
        key = None
        if isinstance(data, dict):
            data, key = dict(data), "replicas"
            if "replicas" in data:
                data.pop("count", None)  # both given: `replicas` wins, like dstack
            elif "count" in data:
                data["replicas"], key = data.pop("count"), "count"
        group = handler(data)
        if key is not None:
            group._replicas_key = key
        return group

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not GROUP_NAME_RE.match(value):
            raise ValueError("Resource name should match regex '^[a-z0-9][a-z0-9-]{0,39}$'")
        return value

    @field_validator("replicas")
    @classmethod
    def _check_replicas(cls, value: IntRange) -> IntRange:
        if value.max is None:
            raise ValueError("The maximum number of replicas is required")
        if value.min is None:  # `..3` means `0..3`
            value.min = 0
        return value

    @field_validator("commands", mode="before")
    @classmethod
    def _parse_commands(cls, value: Any) -> Any:
        return parse_lines(value)

    @field_validator("image")
    @classmethod
    def _check_image(cls, value: Optional[str]) -> Optional[str]:
        return check_image_ref(value)

    @field_validator("python", mode="before")
    @classmethod
    def _parse_python(cls, value: Any) -> Any:
        return parse_python_version(value)

    @field_validator("python")
    @classmethod
    def _python_vs_image(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        if value is not None and info.data.get("image"):
            raise ValueError("`image` and `python` are mutually exclusive within a replica group")
        return value

    @field_validator("docker")
    @classmethod
    def _docker(cls, value: Optional[bool], info: ValidationInfo) -> Optional[bool]:
        if value is True:
            for other in ("image", "python", "nvcc"):
                if info.data.get(other):
                    raise ValueError(f"`{other}` and `docker` are mutually exclusive within a replica group")
        return value

    @field_validator("privileged")
    @classmethod
    def _privileged(cls, value: Optional[bool], info: ValidationInfo) -> Optional[bool]:
        if value is False and info.data.get("docker") is True:
            raise ValueError(
                "`privileged: false` is incompatible with `docker: true` within "
                "a replica group (docker-in-docker requires privileged mode)"
            )
        return value

    @model_validator(mode="after")
    def _check_scaling(self):
        is_range = self.replicas.min != self.replicas.max
        if is_range and self.scaling is None:
            raise ValueError(at("replicas", "When you set `replicas` to a range, ensure to specify `scaling`."))
        if not is_range and self.scaling is not None:
            raise ValueError(at("scaling", "To use `scaling`, `replicas` must be set to a range."))
        return self


# --- spelling: `groups[i].replicas` (HEAD) or `replicas[i].count` (0.21.2) -------------------------------


def groups_key(data: Any) -> str:
    """The top-level key that holds the groups: `replicas` when it is a list and `groups` is unset."""
    if isinstance(data, dict) and data.get("groups") is None and isinstance(data.get("replicas"), list):
        return "replicas"
    return "groups"


def count_key(raw_group: Any, legacy: bool) -> str:
    """The key a group's count is under: the one the file used, else the spelling's own."""
    if isinstance(raw_group, dict):
        for key in ("replicas", "count"):
            if key in raw_group:
                return key
    return "count" if legacy else "replicas"


def spelled_loc(data: Any, loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """A field location in the validators' spelling (`groups`, 1, `replicas`) as the file `data` spells it."""
    if not loc or loc[0] != "groups" or not isinstance(data, dict):
        return loc
    key = groups_key(data)
    out = [key, *loc[1:]]
    if len(loc) >= 3 and isinstance(loc[1], int) and loc[2] == "replicas":
        items = data.get(key)
        raw = items[loc[1]] if isinstance(items, list) and 0 <= loc[1] < len(items) else None
        out[2] = count_key(raw, legacy=key == "replicas")
    return tuple(out)


def normalize_groups_input(data: Any) -> tuple[Any, Optional[str]]:
    """dstack's before-validator: 0.21.2's `replicas: [...]` moves to `groups`; both set is an error.

    Returns the data to validate and the key the file used for the groups (None: no groups).
    """
    if not isinstance(data, dict):
        return data, None
    data = dict(data)
    key = groups_key(data)
    if key == "replicas":
        data["groups"] = data.pop("replicas")
    elif data.get("groups") is not None and data.get("replicas") is not None:
        raise ValueError(at("replicas", "`replicas` and `groups` are mutually exclusive"))
    elif data.get("groups") is not None:
        data.pop("replicas", None)  # `replicas: null` beside `groups`
    return data, (key if data.get("groups") is not None else None)


# --- service-level rules -------------------------------------------------------------------------------


def name_groups(groups: list[ReplicaGroup]) -> list[str]:
    """Fill in default names (the index) and check they are unique; problems are relative to `groups`."""
    if not groups:
        return ["`groups` cannot be an empty list"]
    named = [group.name is not None for group in groups]
    for index, group in enumerate(groups):
        if group.name is None:
            group.name = str(index)
    counts = Counter(group.name for group in groups)
    duplicates = [name for name, count in counts.items() if count > 1]
    if not duplicates:
        return []
    seen: set[str] = set()
    for index, group in enumerate(groups):
        if group.name in seen:
            break
        seen.add(group.name)  # type: ignore[arg-type]
    message = (
        f"Duplicate replica group names found: {duplicates}. Each replica group must have a unique name."
    )
    return [at(f"{index}.name" if named[index] else str(index), message)]


def _set(value: Any) -> bool:
    return value is not None


def _true(value: Any) -> bool:  # docker/privileged/nvcc count as set at service level only when true
    return value is True


# (field, its "set at service level" test): set at the service level or in groups, never both.
ONE_PLACE_ONLY: list[tuple[str, Callable[[Any], bool]]] = [
    ("image", _set), ("docker", _true), ("privileged", _true), ("python", _set), ("nvcc", _true),
    ("spot_policy", _set), ("reservation", _set),
]
# (service field, its "set" test, group field): image sources that conflict across the levels.
CROSS_LEVEL: list[tuple[str, Callable[[Any], bool], str]] = [
    ("image", _set, "docker"), ("image", _set, "python"), ("image", _set, "nvcc"),
    ("docker", _true, "image"), ("docker", _true, "python"), ("docker", _true, "nvcc"),
    ("python", _set, "image"), ("python", _set, "docker"),
    ("nvcc", _true, "image"), ("nvcc", _true, "docker"),
]


def check_service_groups(service: Any) -> list[str]:
    """dstack's service-level rules for a service with `groups` (named already); `@path:` problems."""
    groups: list[ReplicaGroup] = service.groups
    problems: list[str] = []
    if service.scaling is not None:
        problems.append(at("scaling", "Top-level `scaling` is not allowed when `groups` is set. "
                                      "Specify `scaling` in each replica group instead."))
    if service.commands:
        problems.append(at("commands", "Top-level `commands` is not allowed when `groups` is set. "
                                       "Specify `commands` in each replica group instead."))

    def conflicts(field: str) -> list[int]:
        return [i for i, group in enumerate(groups) if getattr(group, field) is not None]

    for field, is_set in ONE_PLACE_ONLY:
        if is_set(getattr(service, field)) and (where := conflicts(field)):
            names = [groups[i].name for i in where]
            problems.append(at(f"groups.{where[0]}.{field}", (
                f"`{field}` is set at both the service level and in replica group(s) {names}. "
                f"Set `{field}` in one place only — either at the service level (all groups inherit) "
                "or per group, but not both.")))
    for s_field, is_set, g_field in CROSS_LEVEL:
        if is_set(getattr(service, s_field)) and (where := conflicts(g_field)):
            names = [groups[i].name for i in where]
            problems.append(at(f"groups.{where[0]}.{g_field}", (
                f"Service-level `{s_field}` conflicts with group-level `{g_field}` in replica group(s) {names}. "
                "These image-source fields are mutually exclusive.")))
    for i, group in enumerate(groups):
        if not group.commands and group.image is None and service.image is None:
            problems.append(at(f"groups.{i}", (
                f"Replica group '{group.name}': either `commands` or `image` must be set in the group, "
                "or `image` at the service level.")))
    routers = [i for i, group in enumerate(groups) if group.router is not None]
    if len(routers) > 1:
        problems.append(at(f"groups.{routers[1]}.router", "At most one replica group may specify `router`."))
    for i in routers:
        if groups[i].replicas.min != 1 or groups[i].replicas.max != 1:
            problems.append(at(f"groups.{i}.replicas", "For now replica group with `router` must have `replicas: 1`."))
    return problems
