"""The exact `podman run`/`docker run` command of one replica's container: pure, so `plan` shows the same
command the replica runs (ray_dstack/serve/runtime/container.py prepares the node side: runtime, pull, env file)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field

RUNTIME_ENV = "RAY_DSTACK_CONTAINER_RUNTIME"  # podman, docker, or a path to either (on the nodes; and for `plan`)
RUNTIMES = ("podman", "docker")


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

    def argv(self, executable: str | None = None) -> list[str]:
        """The `run` command. dstack's semantics: `entrypoint` (shell words) replaces the image's entrypoint
        and `commands` become its arguments; `commands` alone run as one `set -e` script in `/bin/sh -c`;
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
        cmd += gpu_flags(self.runtime, self.gpu_ids)
        cmd += list(self.flags)
        args: list[str] = []
        if self.entrypoint is not None:
            words = shlex.split(self.entrypoint)
            if words:
                cmd += ["--entrypoint", words[0]]
                args = words[1:] + list(self.commands)
        elif self.commands:
            cmd += ["--entrypoint", "/bin/sh"]
            args = ["-c", shell_script(self.commands)]
        return cmd + [self.image] + args

    def display(self) -> str:
        """The command for `plan`/logs: shell-quoted (file paths are placeholders until the replica runs)."""
        return shlex.join(self.argv())


def display(spec, runtime: str = "podman") -> str:
    """The `runtime` ("podman" or "docker") command `plan` shows for a service spec with `image` (duck-typed:
    this module sits beside ray_dstack.spec). Placeholders where the replica decides: its name, host port, env
    file, node flags."""
    run = ContainerRun(
        runtime=runtime, name=f"{spec.name}-<replica>", image=spec.image,
        container_port=spec.port, host_port=0, commands=list(spec.commands), entrypoint=spec.entrypoint,
        working_dir=spec.working_dir if not spec.working_dir or spec.working_dir.startswith("/")
        else "/" + spec.working_dir, shm_size_bytes=spec.shm_size_bytes,
        env_file="<env file, mode 0600>", flags=["<$RAY_DSTACK_CONTAINER_FLAGS>", "<GPUs Ray assigned>"],
    )
    return run.display().replace("127.0.0.1:0:", "127.0.0.1:<free port>:")
