"""dstack's container fields (`core/models/volumes.py`, `files.py`, `unix.py`, `configurations.py`): `volumes`,
`files`, `repos`, `user`, `shell` and the off-able durations, with dstack's shorthand and messages.

What each becomes on Ray is in the plan (ray_dstack/plan/container_fields.py) and the replica's runtime.
"""

from __future__ import annotations

import re
import string
from pathlib import PurePosixPath, PureWindowsPath
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BeforeValidator, Discriminator, Field, Tag, field_validator, model_validator

from ray_dstack.config.models.common import CoreModel
from ray_dstack.config.units import parse_duration

# `${{ dstack.job_num }}` / `${{ dstack.node_rank }}` in a volume name (dstack's JCB L504-537).
VOLUME_NAME_VAR_RE = re.compile(r"\$\{\{\s*dstack\.(\w+)\s*\}\}")
VOLUME_NAME_VARS = ("job_num", "node_rank")


def _mount_point_path(path: str) -> str:
    if not path:
        raise ValueError("empty path")
    parsed = PurePosixPath(path)
    if not parsed.is_absolute():
        raise ValueError(f"path must be absolute: {path}")
    if ".." in parsed.parts:
        raise ValueError(f".. are not allowed: {path}")
    if ":" in path:  # a bind mount's `-v source:target` cannot carry it
        raise ValueError(f"`:` is not allowed in a mount path: {path}")
    return str(parsed)


def _split_mount_point(value: str) -> tuple[str, str]:
    parts = value.split(":")
    if len(parts) != 2:
        raise ValueError(f"invalid mount point format: {value} (expected `/node/path:/path` or `name:/path`)")
    return parts[0], parts[1]


class InstanceMount(CoreModel):
    """A directory of the node (dstack's instance volume), e.g. a model cache kept across replicas."""

    instance_path: str = Field(description="The absolute path on the node")
    path: str = Field(description="The absolute path where the commands see it")
    optional: bool = Field(False, description="Run without it where the replica cannot mount it")

    @field_validator("instance_path", "path")
    @classmethod
    def _check_paths(cls, value: str) -> str:
        return _mount_point_path(value)


class VolumeMount(CoreModel):
    """A named (network) volume. Ray attaches no disks: on Ray it is the directory `<volume root>/<name>` of the
    node, the root set per cluster (`$RAY_DSTACK_VOLUME_ROOT` on the nodes, e.g. shared storage)."""

    name: Union[str, list[str]] = Field(
        description="Volume name, or several: the first that exists on the node is used, else the first is "
        "created; `${{ dstack.job_num }}` and `${{ dstack.node_rank }}` are interpolated")
    path: str = Field(description="The absolute path where the commands see it")

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        return _mount_point_path(value)

    @field_validator("name")
    @classmethod
    def _check_names(cls, value: Union[str, list[str]]) -> Union[str, list[str]]:
        names = [value] if isinstance(value, str) else value
        if not names:
            raise ValueError("`name` lists no volume")
        for name in names:
            for var in VOLUME_NAME_VAR_RE.findall(name):
                if var not in VOLUME_NAME_VARS:
                    raise ValueError(f"unknown variable `dstack.{var}` in volume name {name!r} "
                                     f"(known: {', '.join('dstack.' + v for v in VOLUME_NAME_VARS)})")
            plain = VOLUME_NAME_VAR_RE.sub("0", name)
            if not plain or "/" in plain or plain in (".", "..") or "\x00" in plain:
                raise ValueError(f"invalid volume name {name!r}")
        return value

    @property
    def names(self) -> list[str]:
        return [self.name] if isinstance(self.name, str) else list(self.name)


def parse_volume(value: Any) -> Any:
    """dstack's `parse_mount_point`: `src:dest`, an instance mount when `src` has a `/`, else a volume name."""
    if isinstance(value, str):
        src, dest = _split_mount_point(value)
        return {"instance_path": src, "path": dest} if "/" in src else {"name": src, "path": dest}
    if isinstance(value, dict) and "instance_path" not in value and "name" not in value:
        raise ValueError("a volume needs `name` (a network volume) or `instance_path` (a node directory)")
    return value


def _volume_kind(value: Any) -> str:
    if isinstance(value, InstanceMount) or (isinstance(value, dict) and "instance_path" in value):
        return "instance"
    return "volume"


UNION_TAGS = ("instance", "volume")  # the config loader leaves them out of error paths
Mount = Annotated[
    Union[Annotated[InstanceMount, Tag("instance")], Annotated[VolumeMount, Tag("volume")]],
    Discriminator(_volume_kind),
    BeforeValidator(parse_volume),
]


def _windows_drive(parts: list[str]) -> list[str]:
    # `C:\path` or `c:/path`: the colon belongs to the path (dstack's special case)
    if len(parts) > 1 and len(parts[0]) == 1 and parts[0] in string.ascii_letters and parts[1][:1] in ("\\", "/"):
        return [f"{parts[0]}:{parts[1]}", *parts[2:]]
    return parts


class FileMapping(CoreModel):
    """One of `files`: a local file or directory copied into every replica."""

    local_path: str = Field(description="Path on the deploying machine; relative to the configuration file's directory")
    path: str = Field(description="Where the commands see it: relative to the working directory, or absolute")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = _windows_drive(value.split(":"))
            if len(parts) == 1:
                return {"local_path": parts[0], "path": parts[0]}
            if len(parts) == 2:
                return {"local_path": parts[0], "path": parts[1]}
            raise ValueError(f"invalid file path mapping: {value}")
        if isinstance(value, dict) and "local_path" in value and value.get("path") is None:
            return {**value, "path": value["local_path"]}
        return value

    @field_validator("local_path", "path")
    @classmethod
    def _check(cls, value: str) -> str:
        if not value:
            raise ValueError("empty path")
        return value

    @field_validator("path")
    @classmethod
    def _unix_path(cls, value: str) -> str:
        if PureWindowsPath(value).is_absolute():
            raise ValueError(f"path must be a Unix file path: {value}")
        if ":" in value:  # a container's `-v source:target` cannot carry it
            raise ValueError(f"`:` is not allowed in a file's path: {value}")
        return value


class RepoConfig(CoreModel):
    """One of `repos` (at most one): a local directory uploaded like `files`, or a git URL each replica clones."""

    local_path: Optional[str] = Field(
        None, description="Local directory, relative to the configuration file's directory; excludes `url`")
    url: Optional[str] = Field(None, description="Git URL cloned by each replica; excludes `local_path`")
    branch: Optional[str] = Field(None, description="Branch; default: the remote's default branch")
    hash: Optional[str] = Field(None, description="Commit to check out")
    path: str = Field(".", description="Where the commands see it: relative to the working directory, or absolute")
    if_exists: Literal["error", "skip"] = Field("error", description="What to do when `path` already has files")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        is_url = False
        parts = value.split(":")
        if len(parts) > 1:
            if "@" in parts[0] or parts[1].startswith("//"):  # git@host:org/repo.git, https://host/...
                parts = [f"{parts[0]}:{parts[1]}", *parts[2:]]
                is_url = True
            else:
                parts = _windows_drive(parts)
        key = "url" if is_url else "local_path"
        if len(parts) == 1:
            return {key: parts[0]}
        if len(parts) == 2:
            return {key: parts[0], "path": parts[1]}
        raise ValueError(f"Invalid repo: {value}")

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if value.startswith("~") and PurePosixPath(value).parts[0] != "~":
            raise ValueError("`~username` syntax is not supported")
        return value

    @field_validator("url")
    @classmethod
    def _no_credentials(cls, value: Optional[str]) -> Optional[str]:
        # The URL travels in the Serve config, which anyone who reaches the dashboard reads.
        scheme, sep, rest = (value or "").partition("://")
        userinfo = rest.split("/", 1)[0].rpartition("@")[0] if sep else ""
        if userinfo and (":" in userinfo or scheme.lower() in ("http", "https")):
            raise ValueError(
                "`url` must not carry credentials (the cluster's Serve config shows it): give the nodes access "
                "instead (a git credential helper or an SSH key of the user Ray runs as)")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "RepoConfig":
        if self.local_path and self.url:
            raise ValueError("`local_path` and `url` are mutually exclusive")
        if not self.local_path and not self.url:
            raise ValueError("Either `local_path` or `url` must be specified")
        return self


def check_user(value: Optional[str]) -> Optional[str]:
    """dstack's `UnixUser.parse`: `name_or_uid[:group_or_gid]`."""
    if value is None:
        return None
    if not isinstance(value, str):
        value = str(value)
    parts = value.split(":")
    problem = None
    if len(parts) > 2:
        problem = "too many parts"
    elif not parts[0]:
        problem = "empty user name or id"
    elif len(parts) == 2 and not parts[1]:
        problem = "empty group name or id"
    elif any(p.lstrip("-").isdigit() and int(p) < 0 for p in parts):
        problem = "negative id"
    if problem:
        raise ValueError(f"invalid user format: {problem} (expected `name_or_uid[:group_or_gid]`)")
    return value


SHELLS = {"sh": "/bin/sh", "bash": "/bin/bash"}


def check_shell(value: Optional[str]) -> Optional[str]:
    if value is None or value in SHELLS:
        return value
    if isinstance(value, str) and PurePosixPath(value).is_absolute():
        return value
    raise ValueError("The value must be `sh`, `bash`, or an absolute path")


def shell_path(value: Optional[str], *, image: bool) -> str:
    """The shell's path: `sh`/`bash` spelled out; by default /bin/bash, /bin/sh with an `image` (dstack's JCB)."""
    if value is None:
        return "/bin/sh" if image else "/bin/bash"
    return SHELLS.get(value, value)


OFF = "off"


def parse_off_duration(value: Any) -> Union[Literal["off"], int, None]:
    """dstack's `OptionalOffableDuration`: `off`/`false` → "off", `true`/absent → None (the default), else seconds."""
    if value == OFF or value is False:
        return OFF
    if value is True or value is None:
        return None
    return parse_duration(value)
