"""A replica's container: which runtime, the exact `run` command, the files that keep secrets off command lines.

Pure command building (no container is started here) plus the node-side steps a replica takes before its
container runs: finding the runtime, pulling the image with the service's credentials, writing the env file.
The container itself runs under `ray_dstack.serve.runtime.container_run` (which removes it, whatever happens).

Secrets never reach a command line:
- `env` values go into an env file of mode 0600 in a private directory (mode 0700), read by `run` and deleted
  once the container exists;
- `registry_auth` becomes an auth file of its own (mode 0600, private directory) for that one pull
  (`podman pull --authfile F`, `docker --config DIR pull`), deleted right after; never a node-wide login.

Runtime flags a node needs (this project's CI machine: `--runtime runc --ulimit nofile=1024:1024 --ulimit
nproc=1000:1000`) come from `RAY_DSTACK_CONTAINER_FLAGS` on the node, never hard-wired (docs/multinode.md).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ray_dstack.spec.container_command import (  # noqa: F401
    DEFAULT_SHELL,
    RUNTIME_ENV,
    RUNTIMES,
    ContainerRun,
    container_name,
    gpu_flags,
    runtime_kind,
    shell_script,
    volume_arg,
    working_dir_of,
)
from ray_dstack.errors import RayDstackError

FLAGS_ENV = "RAY_DSTACK_CONTAINER_FLAGS"
# Every container ray-dstack starts carries these labels: the owner (replica pid + its start time, so a reused
# pid is not mistaken for the owner) lets any replica on the node remove containers whose owner is gone.
LABEL = "ray-dstack"
OWNER_LABEL = "ray-dstack.owner"
SERVICE_LABEL = "ray-dstack.service"
INSTALL_HINT = (
    "install podman (Debian/Ubuntu: `apt-get install podman runc`) or Docker on that node, or point "
    f"{RUNTIME_ENV} at the runtime's executable"
)
REDACTED = "***"
PULL_TIMEOUT_S = 3600.0  # images are gigabytes


class ContainerError(RayDstackError):
    """The container could not be prepared or run (no runtime, a failed pull, a bad env value)."""


@dataclass(frozen=True)
class Runtime:
    name: str  # "podman" or "docker": decides the GPU and auth-file syntax
    path: str  # the executable

    def __str__(self) -> str:
        return self.name


def node_name() -> str:
    return socket.gethostname()


def detect_runtime(environ: Mapping[str, str] | None = None, which=shutil.which, node: str | None = None) -> Runtime:
    """The runtime `RAY_DSTACK_CONTAINER_RUNTIME` names (podman, docker, or a path to either), else podman,
    else docker. Neither → ContainerError naming the node and what to install."""
    environ = os.environ if environ is None else environ
    node = node or node_name()
    chosen = (environ.get(RUNTIME_ENV) or "").strip()
    if chosen:
        kind = runtime_kind(chosen)
        if kind is None:
            raise ContainerError(f"{RUNTIME_ENV}={chosen!r} on node {node}: expected podman or docker (or a path to one)")
        path = which(chosen)
        if not path:
            raise ContainerError(f"{RUNTIME_ENV}={chosen!r} on node {node}: no such executable; {INSTALL_HINT}")
        return Runtime(kind, path)
    for kind in RUNTIMES:
        path = which(kind)
        if path:
            return Runtime(kind, path)
    raise ContainerError(f"node {node} has no container runtime to run the service's `image`: {INSTALL_HINT}")


def extra_flags(environ: Mapping[str, str] | None = None) -> list[str]:
    """`RAY_DSTACK_CONTAINER_FLAGS`: flags this node's runtime needs on every `run` (shell-quoted words)."""
    environ = os.environ if environ is None else environ
    try:
        return shlex.split(environ.get(FLAGS_ENV) or "")
    except ValueError as exc:
        raise ContainerError(f"{FLAGS_ENV} on node {node_name()} is not valid shell words: {exc}") from None


# --- files that carry secrets ---------------------------------------------------------------------------


def private_dir(prefix: str) -> str:
    """A fresh directory only this user can enter (mkdtemp creates it 0700)."""
    return tempfile.mkdtemp(prefix=prefix)


def _write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def write_env_file(directory: str, env: Mapping[str, str]) -> tuple[str, list[str]]:
    """The env file (mode 0600) and the keys whose values hold a newline (an env file line cannot carry
    them: those go as `--env KEY` with the value in the runtime process's environment, not its argv)."""
    lines, multiline = [], []
    for key, value in env.items():
        if "\n" in value or "\r" in value:
            multiline.append(key)
        else:
            lines.append(f"{key}={value}")
    path = os.path.join(directory, "env")
    _write_private(path, "".join(line + "\n" for line in lines))
    return path, multiline


def registry_host(image: str) -> str:
    """The registry an image reference points at (`docker.io` when the first part is not a host)."""
    first, sep, _rest = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def auth_file_json(runtime: str, image: str, username: str, password: str) -> str:
    host = registry_host(image)
    if runtime == "docker" and host == "docker.io":
        host = "https://index.docker.io/v1/"  # the key Docker's CLI looks up for Docker Hub
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return json.dumps({"auths": {host: {"auth": token}}})


def image_present(runtime: Runtime, image: str) -> bool:
    args = ["image", "exists", image] if runtime.name == "podman" else ["image", "inspect", image]
    return subprocess.run([runtime.path, *args], capture_output=True, timeout=60).returncode == 0


def pull_argv(runtime: Runtime, image: str, auth_dir: str | None) -> list[str]:
    if auth_dir is None:
        return [runtime.path, "pull", image]
    if runtime.name == "podman":
        return [runtime.path, "pull", "--authfile", os.path.join(auth_dir, "auth.json"), image]
    return [runtime.path, "--config", auth_dir, "pull", image]


def pull(runtime: Runtime, image: str, *, username: str | None = None, password: str | None = None,
         on_line=None, timeout_s: float = PULL_TIMEOUT_S) -> bool:
    """Pull `image` on this node; True if it was pulled, False if it was already here and reused.

    Without credentials a present image is reused (pulled once per node). With credentials the pull always
    runs: it is how the registry checks them (a cached private image must not run for a wrong password);
    layers already here are not downloaded again. Failure → ContainerError with the registry's reason."""
    if username is None and image_present(runtime, image):
        return False
    auth_dir = None
    try:
        if username is not None:
            auth_dir = private_dir("ray-dstack-auth-")
            config = auth_file_json(runtime.name, image, username, password or "")
            _write_private(os.path.join(auth_dir, "auth.json" if runtime.name == "podman" else "config.json"), config)
        proc = subprocess.Popen(pull_argv(runtime, image, auth_dir), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace")
        lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            line = scrub(line.rstrip(), password)
            lines.append(line)
            if on_line:
                on_line(line)
        code = proc.wait(timeout=timeout_s)
    finally:
        if auth_dir:
            shutil.rmtree(auth_dir, ignore_errors=True)
    if code != 0:
        raise ContainerError(f"pulling image {image} on node {node_name()} failed: {pull_reason(lines)}")
    return True


def pull_reason(lines: Sequence[str]) -> str:
    """The registry's own words from a failed pull (`unauthorized: ...`, `manifest unknown`, ...)."""
    errors = [line for line in lines if "error" in line.lower() or "denied" in line.lower()
              or "unauthorized" in line.lower()]
    text = (errors or list(lines) or ["the runtime printed nothing"])[-1]
    return re.sub(r"^(Error: ?|error: ?)", "", text.strip())


def scrub(text: str, secret: str | None) -> str:
    if secret:
        text = text.replace(secret, REDACTED)
    return text


# --- what the image says: its working directory, its users ----------------------------------------------


def image_working_dir(runtime: Runtime, image: str) -> str:
    """The image's WORKDIR (`/` when it sets none), where dstack resolves relative paths without `working_dir`."""
    proc = subprocess.run([runtime.path, "image", "inspect", "--format", "{{.Config.WorkingDir}}", image],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise ContainerError(f"inspecting image {image} on node {node_name()} failed: "
                             f"{pull_reason(proc.stderr.splitlines())}")
    return proc.stdout.strip() or "/"


def image_file(runtime: Runtime, image: str, path: str, flags: Sequence[str] = ()) -> str | None:
    """A small text file of the image (`/etc/passwd`), None if it has none: from a container created (never
    started) for it; `cp ... -` writes a tar stream (both runtimes)."""
    import io
    import tarfile
    import uuid

    name = f"ray-dstack-inspect-{uuid.uuid4().hex[:12]}"
    # The entrypoint never runs; it spares an image without a command the "no command" refusal.
    created = subprocess.run([runtime.path, "create", "--name", name, "--pull", "never", *flags, "--entrypoint",
                              "/", image], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if created.returncode != 0:
        raise ContainerError(f"reading {path} of image {image} on node {node_name()} failed: "
                             f"{pull_reason(created.stderr.splitlines())}")
    try:
        copied = subprocess.run([runtime.path, "cp", f"{name}:{path}", "-"], capture_output=True, timeout=120,
                                stdin=subprocess.DEVNULL)
    finally:
        subprocess.run([runtime.path, "rm", "-f", name], capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    if copied.returncode != 0:
        return None
    with tarfile.open(fileobj=io.BytesIO(copied.stdout)) as tar:
        member = next((m for m in tar.getmembers() if m.isfile()), None)
        data = tar.extractfile(member) if member else None
        return data.read().decode(errors="replace") if data else None


def _entries(text: str | None) -> list[list[str]]:
    return [line.split(":") for line in (text or "").splitlines() if line and not line.startswith("#")]


def resolve_user(user: str, passwd: str | None, group: str | None, image: str) -> tuple[int, int]:
    """`name_or_uid[:group_or_gid]` as the runtime resolves it in the image: a name through its /etc/passwd
    (and /etc/group); a uid without a group gets its passwd entry's group, else 0 (Docker's and podman's
    rule). A name the image does not know → ContainerError naming `user`."""
    who, _, grp = user.partition(":")
    users = {e[0]: e for e in _entries(passwd) if len(e) >= 4}
    by_uid = {e[2]: e for e in users.values()}
    if who.isdigit():
        uid, entry = int(who), by_uid.get(who)
    elif who in users and users[who][2].isdigit():
        entry = users[who]
        uid = int(entry[2])
    else:
        raise ContainerError(f"user {user!r}: image {image} has no user {who!r} in its /etc/passwd "
                             "(expected a name it knows or a numeric uid)")
    if not grp:
        return uid, int(entry[3]) if entry and entry[3].isdigit() else 0
    if grp.isdigit():
        return uid, int(grp)
    groups = {e[0]: e for e in _entries(group) if len(e) >= 3}
    if grp not in groups or not groups[grp][2].isdigit():
        raise ContainerError(f"user {user!r}: image {image} has no group {grp!r} in its /etc/group "
                             "(expected a name it knows or a numeric gid)")
    return uid, int(groups[grp][2])


def image_user_ids(runtime: Runtime, image: str, user: str, flags: Sequence[str] = ()) -> tuple[int, int]:
    """The uid and gid `--user USER` runs as in `image` (the owner of the files the replica puts in place)."""
    who, _, grp = user.partition(":")
    if who.isdigit() and grp.isdigit():
        return int(who), int(grp)
    passwd = image_file(runtime, image, "/etc/passwd", flags)
    group = image_file(runtime, image, "/etc/group", flags) if grp and not grp.isdigit() else None
    return resolve_user(user, passwd, group, image)


# --- failures whose fix is a setting of the node ---------------------------------------------------------

ULIMIT_FLAGS = "--ulimit nofile=1024:1024 --ulimit nproc=1000:1000"
_NODE_SETTINGS = (
    # runc: "error setting rlimit type 7: operation not permitted"; crun: "setrlimit `RLIMIT_NOFILE`: Operation
    # not permitted". The runtime raises the container's limits to its defaults, which a node without
    # CAP_SYS_RESOURCE (a container or VM of its own) may not do; limits below the node's own are allowed.
    (re.compile(r"rlimit.*operation not permitted", re.I),
     "the container runtime may not set the container's resource limits on node {node} (no CAP_SYS_RESOURCE "
     "there): set {env}=\"{flags}\" (limits no higher than the node's own) in the environment of the Ray "
     "nodes (before `ray start`), then deploy again"),
    (re.compile(r"cgroups in hybrid mode not supported", re.I),
     "crun does not run containers on node {node}'s hybrid cgroup layout: install runc and set "
     "{env}=\"--runtime runc\" (with the node's other flags) in the environment of the Ray nodes, then deploy "
     "again"),
)


def _without_ulimits(flags: Sequence[str]) -> list[str]:
    kept, skip = [], False
    for word in flags:
        if skip:
            skip = False
        elif word == "--ulimit":
            skip = True
        elif not word.startswith("--ulimit="):
            kept.append(word)
    return kept


def node_setting_hint(lines: Sequence[str], environ: Mapping[str, str] | None = None) -> str | None:
    """What to set on the node when the runtime's own output shows a failure only the node's settings fix
    (`RAY_DSTACK_CONTAINER_FLAGS`), else None."""
    environ = os.environ if environ is None else environ
    current = (environ.get(FLAGS_ENV) or "").strip()
    flags = shlex.join([*_without_ulimits(extra_flags(environ)), *shlex.split(ULIMIT_FLAGS)])
    for pattern, hint in _NODE_SETTINGS:
        if any(pattern.search(line) for line in lines):
            text = hint.format(node=node_name(), env=FLAGS_ENV, flags=flags)
            return text + (f" (it is {FLAGS_ENV}={current!r} there now)" if current else "")
    return None


# --- containers whose replica is gone -------------------------------------------------------------------


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), which tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_label(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{process_start_time(pid) or '?'}"


def owner_alive(label: str) -> bool:
    pid, _, start = label.partition(":")
    try:
        return process_start_time(int(pid)) == start
    except ValueError:
        return True  # not ours to judge


def reap_orphans(runtime: Runtime, log=None) -> list[str]:
    """Remove this node's ray-dstack containers whose owning replica process is gone (a replica SIGKILLed
    together with its supervisor before either could clean up). Returns the names removed."""
    label_fmt = '{{index .Labels "%s"}}' if runtime.name == "podman" else '{{.Label "%s"}}'
    proc = subprocess.run(
        [runtime.path, "ps", "-a", "--filter", f"label={OWNER_LABEL}",
         "--format", "{{.Names}}\t" + label_fmt % OWNER_LABEL],
        capture_output=True, text=True, timeout=60,
    )
    removed = []
    for line in proc.stdout.splitlines():
        name, _, owner = line.partition("\t")
        if name and owner and not owner_alive(owner.strip()):
            subprocess.run([runtime.path, "rm", "-f", "-t", "2", name], capture_output=True, timeout=60)
            removed.append(name)
            if log:
                log(f"removed container {name}: the replica that owned it is gone")
    return removed
