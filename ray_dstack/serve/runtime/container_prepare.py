"""The replica's side of `image`: everything between "this replica runs in a container" and the command the
replica starts under its supervisor (ray_dstack/serve/runtime/supervise.py), exactly as it starts a service's shell.

Steps (blocking: the replica runs them in a thread): find the node's runtime; remove containers whose
replica died without cleaning up; read `registry_auth` from Ray's internal KV (ray_dstack/deploy/
registry_auth.py says why not the Serve config) and pull; settle the container's working directory (the image's
WORKDIR without `working_dir`) and put `volumes`, `files` and the repo in place in the replica's directory on
the node (runtime/filesystem.py), bind-mounted where the commands see them; write the env file; build the `run`
command for the GPUs Ray assigned to this replica on a free loopback port of the node. The result runs as
`python -m ray_dstack.serve.runtime.container_run ... -- podman run ...`, which removes the container whatever ends it.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ray_dstack.serve.runtime import container as c
from ray_dstack.serve.runtime import filesystem, pull_progress
from ray_dstack.spec import KV_NAMESPACE, PORT_ENV_VAR, ServiceSpec


@dataclass
class PreparedContainer:
    runtime: c.Runtime
    name: str
    command: list[str]  # what the supervisor runs: container_run wrapping the runtime's `run`
    run: c.ContainerRun
    secret_dir: str  # the env file's directory; container_run deletes it once the container exists
    process_env: dict[str, str]  # values an env file cannot carry (newlines): `--env KEY`, value inherited
    pulled: bool
    working_dir: str = "/"  # the commands' working directory inside the container
    mounts: list[filesystem.Mount] = field(default_factory=list)  # as `-v` flags in `run`

    def discard(self) -> None:
        shutil.rmtree(self.secret_dir, ignore_errors=True)


def read_credentials(key: str) -> tuple[str, str]:
    """`registry_auth` as `deploy` left it in the internal KV for this version of the service."""
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
    if raw is None:
        raise c.ContainerError("this deploy's `registry_auth` is no longer in the cluster's KV: deploy the service again")
    data = json.loads(raw)
    return data["username"], data["password"]


def pull_with_progress(runtime: c.Runtime, spec: ServiceSpec, username: str | None, password: str | None,
                       log: Callable[[str], None]) -> bool:
    """The pull, its lines into the replica's log and its progress to `deploy` (ray_dstack/serve/runtime/pull_progress.py).
    The lines are scrubbed of the password before either sees them (container.pull)."""
    assert spec.image is not None
    progress = pull_progress.Publisher(spec.name, spec.image, c.node_name())

    def on_line(line: str) -> None:
        log(f"[pull] {line}")
        progress.line(line)

    try:
        pulled = c.pull(runtime, spec.image, username=username, password=password, on_line=on_line)
    except c.ContainerError as exc:
        progress.finish(c.scrub(str(exc), password), failed=True)
        raise
    progress.finish("pulled" if pulled else "already on the node, reused")
    return pulled


def put_files_in_place(spec: ServiceSpec, runtime: c.Runtime, *, workspace: Path, working_dir: str,
                       flags: Sequence[str], log: Callable[[str], None]) -> list[filesystem.Mount]:
    """`volumes`, `files` and the repo, each a bind mount into the container (runtime/filesystem.py); the
    files belong to `user` as the image resolves it, so the commands may change them."""
    if not (spec.volumes or spec.uploads or spec.git_repo):
        return []
    owner = None
    if spec.user:
        assert spec.image is not None
        owner = c.image_user_ids(runtime, spec.image, spec.user, flags)
    mounts = filesystem.prepare_files(spec, workspace=workspace, working_dir=working_dir, in_place_under=None,
                                      log=log, owner=owner)
    for mount in mounts:
        if mount.target == "/":  # `-v src:/` would replace the image's whole filesystem
            raise c.ContainerError(
                f"{mount.field}: its path is the container's root `/` (the image sets no WORKDIR and `working_dir` "
                "is not set): set `working_dir`, or give it a `path` such as /workflow")
        try:
            c.volume_arg(mount)
        except ValueError as exc:
            raise c.ContainerError(f"{mount.field}: {exc}") from None
    return mounts


def run_spec(spec: ServiceSpec, *, runtime: str, name: str, host_port: int, gpu_ids: Sequence[int | str] = (),
             env_file: str | None = None, env_from_process: Sequence[str] = (), owner: str | None = None,
             flags: Sequence[str] = (), node_address: str | None = None, mounts: Sequence = ()) -> c.ContainerRun:
    assert spec.image is not None
    labels = {c.LABEL: "1", c.SERVICE_LABEL: spec.name}
    if owner:
        labels[c.OWNER_LABEL] = owner
    return c.ContainerRun(
        runtime=runtime, name=name, image=spec.image, container_port=spec.port, host_port=host_port,
        commands=list(spec.commands), entrypoint=spec.entrypoint, working_dir=c.working_dir_of(spec.working_dir),
        shm_size_bytes=spec.shm_size_bytes, gpu_ids=list(gpu_ids), env_file=env_file,
        env_from_process=list(env_from_process), labels=labels, flags=list(flags),
        node_address=node_address if spec.reached_from_other_nodes else None,
        mounts=list(mounts), shell=spec.shell or c.DEFAULT_SHELL, user=spec.user, privileged=spec.privileged,
    )


def prepare(spec: ServiceSpec, *, replica_tag: str, host_port: int, gpu_ids: Sequence[int | str],
            log: Callable[[str], None], node_address: str | None = None,
            workspace: Path | None = None) -> PreparedContainer:
    """`workspace`: the replica's directory on the node, where its files and repo are put in place (required
    when the spec has `volumes`, `files` or `repos`)."""
    runtime = c.detect_runtime()
    flags = c.extra_flags()
    c.reap_orphans(runtime, log)
    assert spec.image is not None
    username = password = None
    if spec.registry_auth is not None:
        username, password = read_credentials(spec.registry_auth.kv_key)
    log(f"pulling image {spec.image} with {runtime.name}" + (f" as {username}" if username else ""))
    pulled = pull_with_progress(runtime, spec, username, password, log)
    log(f"image {spec.image} " + ("pulled" if pulled else "already on this node: reused"))
    # dstack resolves a relative `working_dir` inside the container (under `/`); none: the image's WORKDIR.
    working_dir = c.working_dir_of(spec.working_dir) or c.image_working_dir(runtime, spec.image)
    mounts: list[filesystem.Mount] = []
    if workspace is not None:
        mounts = put_files_in_place(spec, runtime, workspace=workspace, working_dir=working_dir, flags=flags,
                                    log=log)
    elif spec.volumes or spec.uploads or spec.git_repo:
        raise c.ContainerError("volumes/files/repos need the replica's directory on the node")
    name = c.container_name(spec.name, replica_tag)
    secret_dir = c.private_dir("ray-dstack-ctr-")
    try:
        # The service finds its port in $RAY_DSTACK_PORT as without `image` (inside: the container port), and
        # its working directory in $DSTACK_WORKING_DIR (the user's `env` wins, as with dstack's runner).
        env = {"DSTACK_WORKING_DIR": working_dir, **spec.env, PORT_ENV_VAR: str(spec.port)}
        env_file, multiline = c.write_env_file(secret_dir, env)
        run = run_spec(spec, runtime=runtime.name, name=name, host_port=host_port, gpu_ids=gpu_ids,
                       env_file=env_file, env_from_process=multiline, owner=c.owner_label(), flags=flags,
                       node_address=node_address, mounts=mounts)
        command = [sys.executable, "-m", "ray_dstack.serve.runtime.container_run", "--runtime", runtime.path,
                   "--name", name, "--secret-dir", secret_dir, "--", *run.argv(runtime.path)]
    except BaseException:
        shutil.rmtree(secret_dir, ignore_errors=True)
        raise
    return PreparedContainer(runtime=runtime, name=name, command=command, run=run, secret_dir=secret_dir,
                             process_env={k: env[k] for k in multiline}, pulled=pulled, working_dir=working_dir,
                             mounts=list(mounts))
