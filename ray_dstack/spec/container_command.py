"""The exact `podman run`/`docker run` command of one replica's container: pure, so `plan` shows the same
command the replica runs (ray_dstack/serve/runtime/container.py prepares the node side: runtime, pull, env file)."""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

RUNTIME_ENV = "RAY_DSTACK_CONTAINER_RUNTIME"  # podman, docker, or a path to either (on the nodes; and for `plan`)
RUNTIMES = ("podman", "docker")
DEFAULT_SHELL = "/bin/sh"  # dstack's default with an `image` (without one: /bin/bash)


class MountLike(Protocol):
    """A bind mount as ray_dstack/serve/runtime/filesystem.py's `Mount` gives it (absolute `target`)."""

    source: str
    target: str
    read_only: bool


def runtime_kind(chosen: str) -> str | None:
    """"podman" or "docker" for a runtime name or path (`/usr/local/bin/docker`), None for anything else."""
    base = chosen.strip().rsplit("/", 1)[-1]
    return next((r for r in RUNTIMES if base.startswith(r)), None)


def container_name(service: str, replica: str) -> str:
    """`<service>-<replica>`, reduced to the characters runtimes accept in a name."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{service}-{replica}").strip("-.")
    return name[:120] or "ray-dstack"


def gpu_flags(runtime: str, gpu_ids: Sequence[int | str]) -> list[str]:
    """Exactly the GPUs Ray assigned to the replica. Podman: CDI devices (NVIDIA container toolkit's CDI spec,
    `nvidia-ctk cdi generate`); Docker: `--gpus` (its value is CSV, hence the quotes around several ids)."""
    ids = [str(i) for i in gpu_ids]
    if not ids:
        return []
    if runtime == "podman":
        return [arg for i in ids for arg in ("--device", f"nvidia.com/gpu={i}")]
    return ["--gpus", f'"device={",".join(ids)}"']


def shell_script(commands: Sequence[str]) -> str:
    # One script, `set -e`: a failing line stops the service, as on dstack.
    return "set -e\n" + "\n".join(commands) + "\n"


def volume_arg(mount: MountLike) -> str:
    """`-v`'s value: `source:target[:ro]`. A `:` inside a path cannot be told from the separator: ValueError."""
    for what, path in (("source", mount.source), ("target", mount.target)):
        if ":" in path:
            raise ValueError(f"mount {what} {path!r} contains ':', which `-v source:target` cannot carry")
    return f"{mount.source}:{mount.target}" + (":ro" if mount.read_only else "")


@dataclass(frozen=True)
class ContainerRun:
    """Everything one replica's `run` command depends on."""

    runtime: str
    name: str
    image: str
    container_port: int
    host_port: int
    commands: list[str] = field(default_factory=list)
    entrypoint: str | None = None
    working_dir: str | None = None
    shm_size_bytes: int | None = None
    gpu_ids: list[int | str] = field(default_factory=list)
    env_file: str | None = None
    env_from_process: list[str] = field(default_factory=list)  # values with newlines: `-e KEY`, value inherited
    labels: dict[str, str] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    # The node's address when a router on another node must reach the replica: the port is then published on
    # all the node's addresses (loopback included), not only on loopback.
    node_address: str | None = None
    mounts: Sequence[MountLike] = field(default_factory=list)  # `-v`, in order (a parent before what it holds)
    shell: str = DEFAULT_SHELL  # runs `commands` as one script (unless `entrypoint` is given)
    user: str | None = None  # `name_or_uid[:group_or_gid]`
    privileged: bool = False

    def argv(self, executable: str | None = None) -> list[str]:
        """The `run` command. dstack's semantics: `entrypoint` (shell words) replaces the image's entrypoint
        and `commands` become its arguments; `commands` alone run as one `set -e` script in `<shell> -c`;
        neither → the image's own entrypoint/cmd."""
        cmd = [executable or self.runtime, "run", "--name", self.name, "--init", "--rm",
               "--pull", "never"]  # the pull happened before, with the credentials; `run` never pulls
        for key, value in sorted(self.labels.items()):
            cmd += ["--label", f"{key}={value}"]
        # Loopback only: the replica forwards to it; the service's own port must not bypass the token check.
        if self.node_address and self.node_address != "127.0.0.1":
            # A router's worker: the router (the user's process, on any node) connects to it directly, at the
            # node's address or, on the same node, at loopback.
            cmd += ["-p", f"{self.host_port}:{self.container_port}"]
        else:
            cmd += ["-p", f"127.0.0.1:{self.host_port}:{self.container_port}"]
        if self.env_file:
            cmd += ["--env-file", self.env_file]
        for key in self.env_from_process:
            cmd += ["--env", key]
        if self.shm_size_bytes:
            cmd += ["--shm-size", str(int(self.shm_size_bytes))]
        if self.working_dir:
            cmd += ["--workdir", self.working_dir]
        if self.user:
            cmd += ["--user", self.user]
        if self.privileged:
            cmd += ["--privileged"]
        for mount in self.mounts:
            cmd += ["-v", volume_arg(mount)]
        cmd += gpu_flags(self.runtime, self.gpu_ids)
        cmd += list(self.flags)
        args: list[str] = []
        if self.entrypoint is not None:
            words = shlex.split(self.entrypoint)
            if words:
                cmd += ["--entrypoint", words[0]]
                args = words[1:] + list(self.commands)
        elif self.commands:
            cmd += ["--entrypoint", self.shell]
            args = ["-c", shell_script(self.commands)]
        return cmd + [self.image] + args

    def display(self) -> str:
        """The command for `plan`/logs: shell-quoted (file paths are placeholders until the replica runs)."""
        return shlex.join(self.argv())


@dataclass(frozen=True)
class _ShownMount:
    source: str
    target: str
    read_only: bool = False


def working_dir_of(working_dir: str | None) -> str | None:
    """The container's working directory as the spec gives it: absolute as is, relative under `/` (dstack
    resolves it inside the container, where nothing else is mounted); None: the image's own WORKDIR."""
    if not working_dir:
        return None
    return working_dir if working_dir.startswith("/") else posixpath.join("/", working_dir)


def shown_mounts(spec, working_dir: str) -> list[_ShownMount]:
    """The bind mounts `plan` shows: node paths where the spec knows them, placeholders where the node decides
    (the volume root, the replica's directory holding the unpacked files and the clone)."""
    def target(path: str) -> str:
        return posixpath.normpath(posixpath.join(working_dir, path))

    mounts = []
    for volume in spec.volumes:
        if volume.kind == "instance":
            source = volume.instance_path or "<instance path>"
        else:
            source = "<$RAY_DSTACK_VOLUME_ROOT>/" + ("|".join(volume.names) or "<name>")
        mounts.append(_ShownMount(source, volume.path))
    for upload in spec.uploads:
        # `-v` cannot carry a `:` in a placeholder either (a Windows-style or URL-like source)
        mounts.append(_ShownMount(f"<unpacked {upload.source.replace(':', '_')}>", target(upload.path)))
    if spec.git_repo is not None:
        mounts.append(_ShownMount("<git clone>", target(spec.git_repo.path)))
    return mounts


def display(spec, runtime: str = "podman") -> str:
    """The `runtime` ("podman" or "docker") command `plan` shows for a service spec with `image` (duck-typed:
    this module sits beside ray_dstack.spec). Placeholders where the replica decides: its name, host port, env
    file, node flags, the node side of its mounts."""
    working_dir = working_dir_of(spec.working_dir)
    run = ContainerRun(
        runtime=runtime, name=f"{spec.name}-<replica>", image=spec.image,
        container_port=spec.port, host_port=0, commands=list(spec.commands), entrypoint=spec.entrypoint,
        working_dir=working_dir, shm_size_bytes=spec.shm_size_bytes,
        env_file="<env file, mode 0600>", flags=["<$RAY_DSTACK_CONTAINER_FLAGS>", "<GPUs Ray assigned>"],
        mounts=shown_mounts(spec, working_dir or "<image WORKDIR>"), shell=spec.shell or DEFAULT_SHELL,
        user=spec.user, privileged=spec.privileged,
    )
    return run.display().replace("127.0.0.1:0:", "127.0.0.1:<free port>:")
