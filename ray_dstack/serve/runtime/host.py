"""A replica whose commands run as a child process on the node, as in a dstack container without an image: a
working directory of its own (runtime/workspace.py), the service's own Python environment (runtime/python_env.py)
and, for a fixed `port`, a network namespace of its own (runtime/netns.py, reached through
transport/netns_connect.py).

dstack's container fields on the node: `volumes`, `files` and `repos` (runtime/filesystem.py) land in the
workspace or become bind mounts, made in a mount namespace private to the replica (`unshare --mount
--propagation private`, then runtime/enter.py; behind pasta that namespace is the one pasta already runs in), so
nothing is mounted on the node itself. `user` (runtime/users.py): the commands run as that user; enter.py
switches to it, and behind pasta the namespace's init does (runtime/supervise.py), since in pasta's user namespace
only an identity map the supervisor writes gives the init the right to. `shell` runs the commands.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray_dstack.errors import RayDstackError
from ray_dstack.ports import free_port, port_in_use
from ray_dstack.serve.runtime import docker_access, dstack_env, filesystem, netns, python_env, users, workspace
from ray_dstack.serve.runtime.base import ReplicaRuntime
from ray_dstack.serve.runtime.process import ServiceProcess, ServiceProcessError
from ray_dstack.serve.transport.netns_connect import NamespaceConnector, connector_for
from ray_dstack.spec import PORT_ENV_VAR

ENTER = [sys.executable, "-m", "ray_dstack.serve.runtime.enter"]


def private_mount_namespace() -> list[str] | None:
    """The argv prefix that gives the rest of the command a mount namespace of its own; None where this node
    cannot (not root, or no util-linux unshare)."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        return None
    return [unshare, "--mount", "--propagation", "private", "--"]


def mount_blocker() -> str | None:
    """What this node lacks for a replica's bind mounts (None: nothing)."""
    if os.geteuid() != 0:
        return "Ray to run as root"
    return None if shutil.which("unshare") else "util-linux's unshare"


def mountable(mounts: list[filesystem.Mount], blocker: str | None,
              warn: Callable[[str], object]) -> tuple[filesystem.Mount, ...]:
    """The mounts a node lacking `blocker` can make: an optional one it cannot is left out (with a warning),
    any other fails the replica, naming its field."""
    if not mounts or blocker is None:
        return tuple(mounts)
    for mount in mounts:
        if not mount.optional:
            raise ServiceProcessError(
                f"{mount.field}: {mount.target} needs a bind mount of the replica's own, and that needs {blocker} "
                f"on node {socket.gethostname()}; or use a container `image`")
    for mount in mounts:
        warn(f"volumes: {mount.source} is not mounted at {mount.target}: that needs {blocker} on this node "
             "(optional: running without it)")
    return ()


def _chown_down_to(top: Path, path: Path, owner: tuple[int, int]) -> None:
    """chown `top` and every directory from it down to `path` (when `path` is inside it)."""
    try:
        parts = path.relative_to(top).parts
    except ValueError:
        parts = ()
    os.chown(top, *owner)
    for i in range(len(parts)):
        os.chown(top.joinpath(*parts[:i + 1]), *owner)


class ProcessRuntime(ReplicaRuntime):
    """In the node's network: on a free port ($RAY_DSTACK_PORT in the commands) or the service's fixed one."""

    kind = "process"
    python_env: python_env.PythonEnv | None = None
    workspace: Path | None = None
    files_dir: Path | None = None  # what `files`/`repos` put outside the workspace, mounted from here
    mounts: tuple[filesystem.Mount, ...] = ()
    run_as: users.RunAs | None = None
    docker: docker_access.DockerAccess | None = None  # `docker: true`: the commands' Docker API

    def _network(self) -> tuple[int, int]:
        """(port the replica reaches, port the service listens on)."""
        spec = self.spec
        if spec.port_from_env:
            port = free_port()
            return port, port
        if port_in_use(spec.port):
            raise ServiceProcessError(
                f"port {spec.port} is already in use on node {socket.gethostname()}: another replica, another "
                f"service or Serve's own HTTP port holds it. Use ${PORT_ENV_VAR} in the commands so each "
                "replica gets a free port, or change `port`."
            )
        return spec.port, spec.port

    def _namespace(self, port: int, *, mounts: bool) -> tuple[list[str] | None, bool]:
        """(argv prefix of a network namespace, whether it gets its own /proc)."""
        return None, False

    def _connector(self, workspace_dir: Path) -> NamespaceConnector | None:
        return None

    def _enter(self, *, switch_user: bool) -> list[str]:
        """The exec helper's argv prefix (mounts, then the user), or nothing when it has nothing to do."""
        args: list[str] = []
        for mount in self.mounts:
            args += ["--ro-bind" if mount.read_only else "--bind", mount.source, mount.target]
        if switch_user and self.run_as is not None:
            args += ["--user", self.run_as.arg()]
        return [*ENTER, *args, "--"] if args else []

    async def prepare(self) -> None:
        spec = self.spec
        try:
            self.run_as = run_as = users.resolve(spec.user)
            shell = users.shell(spec.shell)
        except RayDstackError as exc:
            raise ServiceProcessError(str(exc)) from exc
        self.port, service_port = self._network()
        owner = run_as.owner if run_as else None
        try:
            self.workspace = workspace.create(spec.name, self.replica_tag)
            self.files_dir = self.workspace.with_name(self.workspace.name + ".files")
            shutil.rmtree(self.files_dir, ignore_errors=True)  # a previous replica of the same id left it
            connector = self._connector(self.workspace)
            cwd = workspace.working_dir(self.workspace, spec.working_dir)
            if owner is not None:
                try:
                    _chown_down_to(self.workspace, cwd, owner)
                except OSError as exc:
                    raise ServiceProcessError(
                        f"user: the replica's directory {cwd} cannot be given to {spec.user!r}: {exc.strerror}") from None
            # Blocking (reads from the cluster's KV, git, a lock another replica may hold while it creates the
            # env, a subprocess): off the loop.
            mounts = await asyncio.to_thread(
                filesystem.prepare_files, spec, workspace=self.files_dir, working_dir=str(cwd),
                in_place_under=self.workspace.resolve(), log=self.logger.info, owner=owner)
            self.mounts = mountable(mounts, mount_blocker(), self.logger.warning)
            self.python_env = env = await asyncio.to_thread(python_env.acquire, spec.name, spec.python,
                                                            self.logger.info)
        except ServiceProcessError:
            raise
        except RayDstackError as exc:
            raise ServiceProcessError(str(exc)) from exc
        self.logger.info("Python %s environment %s %s in %.2fs", env.version, env.path,
                         "created" if env.created else "reused", env.seconds)
        namespace, own_proc = self._namespace(self.port, mounts=bool(self.mounts))
        if namespace is None:
            wrapper = self._enter(switch_user=True)
            if self.mounts:
                wrapper = [*(private_mount_namespace() or []), *wrapper]
        else:
            # Between `unshare` and pasta: inside pasta's user namespace the commands hold no capability over
            # the mount namespace. The user switch happens in the namespace's init (supervise --init --user).
            at = next(i for i, arg in enumerate(namespace) if os.path.basename(arg).startswith("pasta"))
            namespace = [*namespace[:at], *self._enter(switch_user=False), *namespace[at:]]
            wrapper = []
        dstack = {**dstack_env.dstack_env(spec.name, gpus=dstack_env.assigned_gpus(), ip=dstack_env.node_ip(),
                                          working_dir=str(cwd)),
                  **dstack_env.cluster_env(spec.dstack_api)}
        user_env = {**run_as.env(), **spec.env} if run_as else spec.env
        commands_env = env.apply(dstack_env.with_dstack_env(user_env, dstack, router_ip=self.router_ip))
        path = str(env.bin_dir) + os.pathsep + spec.env.get("PATH", os.environ.get("PATH", ""))
        if spec.docker:  # dstack's `docker: true`: on the event loop (the daemon's supervisor dies with this thread)
            try:
                self.docker = await docker_access.docker_access(self.workspace, self.logger.info, commands_path=path)
            except RayDstackError as exc:
                raise ServiceProcessError(str(exc)) from exc
            commands_env = {**self.docker.env, **commands_env}
            path = self.docker.path(path)
        self.process = ServiceProcess(
            spec.commands,
            port=self.port,
            env=commands_env,
            working_dir=str(cwd),
            logger=self.logger,
            path=path,
            namespace=namespace,
            service_port=service_port,
            cleanup_dir=str(self.workspace),
            extra_cleanup=[str(self.files_dir)],
            connector=connector,
            own_proc=own_proc,
            shell=shell,
            wrapper=wrapper,
            init_user=run_as.arg() if run_as and namespace is not None else None,
        )

    def release(self) -> None:
        if self.docker is not None:
            self.docker.close()
            self.docker = None
        if self.python_env is not None:
            self.python_env.release()
            self.python_env = None
        workspace.remove(self.workspace)
        workspace.remove(self.files_dir)
        self.workspace = self.files_dir = None

    def details(self) -> dict[str, Any]:
        return {
            "python": self.python_env.version if self.python_env else None,
            "python_env": str(self.python_env.path) if self.python_env else None,
            "workspace": str(self.workspace) if self.workspace else None,
            "mounts": [mount.describe() for mount in self.mounts],
            "user": self.run_as.describe() if self.run_as else None,
        }


class NamespaceRuntime(ProcessRuntime):
    """A fixed `port` in a network namespace of the replica's own (pasta), so replicas share a node."""

    kind = "network namespace"
    # Set before prepare(): no host port maps to the service's port when the connector reaches it (the engine
    # path, ray_dstack/serve/ingress/engine_registration.py). `connector`: the one prepare() made.
    private_port = False
    connector: NamespaceConnector | None = None

    def _network(self) -> tuple[int, int]:
        if netns.pasta_path() is None:
            raise ServiceProcessError(
                f"node {socket.gethostname()} cannot give this replica a network namespace for its fixed port "
                f"{self.spec.port}: {netns.INSTALL_HINT} on it, or redeploy with ${netns.NETNS_ENV}=off "
                "(one replica per node)"
            )
        return free_port(), self.spec.port

    def _namespace(self, port: int, *, mounts: bool) -> tuple[list[str] | None, bool]:
        pasta = netns.pasta_path()
        assert pasta is not None, "checked by _network"
        own_proc = netns.own_proc()  # one answer for pasta's command line and the supervisor's
        node_address = dstack_env.node_ip() if self.spec.reached_from_other_nodes else None
        return netns.pasta_argv(pasta, port, self.spec.port, private_mounts=own_proc or mounts,
                                node_address=node_address,
                                map_host_port=not self.port_is_private), own_proc

    def _connector(self, workspace_dir: Path) -> NamespaceConnector | None:
        self.connector = connector_for(workspace_dir, self.spec.port, self.logger.warning)
        return self.connector

    @property
    def port_is_private(self) -> bool:
        """Whether the service's port is reachable only inside the namespace (no host port maps to it)."""
        return self.private_port and self.connector is not None
