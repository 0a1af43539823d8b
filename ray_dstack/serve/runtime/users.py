"""dstack's `user` and `shell` for a replica whose commands run on the node (no `image`).

`user` (`name_or_uid[:group_or_gid]`) is looked up in the node's user database; switching to it needs the replica
(Ray) to run as root, unless it is the replica's own user. A number that names no user runs with that uid and,
without a group, the same number as its gid. `shell` must be an absolute path of an executable on the node;
without it the commands run in /bin/bash (/bin/sh where bash is missing), as dstack does without an image.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
from dataclasses import dataclass

from ray_dstack.errors import RayDstackError


@dataclass(frozen=True)
class RunAs:
    """The user the commands run as, resolved on this node."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str | None
    home: str | None

    @property
    def owner(self) -> tuple[int, int]:
        return self.uid, self.gid

    def arg(self) -> str:
        """`UID:GID:G1,G2,...` for `enter --user` and `supervise --init --user`."""
        return f"{self.uid}:{self.gid}:{','.join(str(g) for g in self.groups)}"

    def env(self) -> dict[str, str]:
        """What a login as that user sets (the service's own `env` goes over it)."""
        if self.name is None:
            return {}
        env = {"USER": self.name, "LOGNAME": self.name}
        if self.home:
            env["HOME"] = self.home
        return env

    def describe(self) -> str:
        return f"{self.name or self.uid} (uid {self.uid}, gid {self.gid})"


def _group(value: str, user: str) -> int:
    if value.isdigit():
        return int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise RayDstackError(f"user: {user!r}: there is no group {value!r} on node {socket.gethostname()}") from None


def resolve(user: str | None) -> RunAs | None:
    """The user to switch to; None when the commands run as the replica's own user."""
    if not user:
        return None
    name_or_uid, _, group = user.partition(":")
    try:
        entry = pwd.getpwuid(int(name_or_uid)) if name_or_uid.isdigit() else pwd.getpwnam(name_or_uid)
    except KeyError:
        if not name_or_uid.isdigit():
            raise RayDstackError(f"user: there is no user {name_or_uid!r} on node {socket.gethostname()}") from None
        entry = None
    uid = entry.pw_uid if entry else int(name_or_uid)
    gid = _group(group, user) if group else (entry.pw_gid if entry else uid)
    if uid == os.geteuid() and gid == os.getegid():
        return None
    if os.geteuid() != 0:
        raise RayDstackError(
            f"user: running the commands as {user!r} needs Ray to run as root on node {socket.gethostname()} "
            f"(the replica runs as uid {os.geteuid()}); start Ray as root there, or use a container `image`")
    groups = os.getgrouplist(entry.pw_name, gid) if entry else [gid]
    return RunAs(uid, gid, tuple(dict.fromkeys([gid, *groups])), entry.pw_name if entry else None,
                 entry.pw_dir if entry else None)


def shell(configured: str | None) -> str | None:
    """`shell` checked on this node; None: the default (runtime/process.py's default_shell)."""
    if configured is None:
        return None
    if not os.path.isabs(configured):
        raise RayDstackError(f"shell: {configured!r} must be an absolute path (or `sh`, `bash`)")
    if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
        raise RayDstackError(f"shell: {configured} is not an executable file on node {socket.gethostname()}")
    return configured
