"""A network namespace per replica for services with a fixed `port`, with pasta (Debian package `passt`).

dstack gives every replica a container of its own, so N replicas may all listen on `port: 8000` on one
host. Here each replica's commands run under

    pasta --config-net -t 127.0.0.1/HOSTPORT:PORT -T none -U none -u none -- <command>

which puts them in new network (and user and PID) namespaces with outbound access through pasta, and maps
the free host port HOSTPORT (loopback only) to PORT inside. The replica itself does not use that mapping (it
costs 40 ms a request: ray_dstack/serve/transport/netns_connect.py): the namespace's init hands it sockets connected
inside; HOSTPORT stays for a person on the node and for a socket path too long for the connector. Measured on
pasta 2023-03 (Debian 12): connections to the host's loopback are spliced to the namespace's loopback, so a
service bound to `0.0.0.0:8000` and one bound to `127.0.0.1:8000` both answer. `-T none`/`-U none`: by default
pasta also binds, inside the namespace, every port the host listens on (to reach host services), which would
take 8000 itself when Serve's HTTP port is 8000 on the node. pasta accepts on HOSTPORT before the service
listens inside, so readiness through it is an HTTP answer (ServiceProcess.http_ready); through the connector
it is the port accepting inside.

The command is PID 1 of the new PID namespace: `supervise --init` runs there (ray_dstack/serve/runtime/supervise.py).
As root pasta needs `--runas 0` (it drops to nobody otherwise); it cannot map uids then, so the commands see
uid 65534 but keep root's file access on the host.

`$RAY_DSTACK_NETWORK_NAMESPACES`: `auto` (default: use pasta where it is on PATH), `on`, `off`.
"""

from __future__ import annotations

import os
import shutil

from ray_dstack.errors import UsageError

NETNS_ENV = "RAY_DSTACK_NETWORK_NAMESPACES"
SETTINGS = ("auto", "on", "off")
INSTALL_HINT = "install pasta (Debian/Ubuntu package `passt`: apt-get install passt)"


def setting() -> str:
    value = (os.environ.get(NETNS_ENV) or "auto").strip().lower()
    if value not in SETTINGS:
        raise UsageError(f"${NETNS_ENV} must be one of {', '.join(SETTINGS)}, got {value!r}")
    return value


def pasta_path() -> str | None:
    return shutil.which("pasta")


def available() -> bool:
    """Whether fixed-port services should get a namespace per replica, as this machine sees it."""
    mode = setting()
    if mode == "off":
        return False
    return mode == "on" or pasta_path() is not None


def own_proc(uid: int | None = None) -> bool:
    """Whether the replica's PID namespace gets a /proc of its own (root with util-linux's unshare, nsenter and
    mount: pasta runs in a private mount namespace, where ray_dstack.serve.runtime.supervise mounts it). Otherwise the
    commands see the node's /proc, where /proc/<their own pid> names another process (or none)."""
    root = (os.geteuid() if uid is None else uid) == 0
    return root and all(shutil.which(tool) for tool in ("unshare", "nsenter", "mount"))


def pasta_argv(pasta: str, host_port: int, port: int, *, uid: int | None = None,
               private_mounts: bool | None = None, node_address: str | None = None,
               map_host_port: bool = True) -> list[str]:
    """The argv prefix that runs a command in its own namespaces with host port `host_port` → `port`.
    `private_mounts` (default: `own_proc(uid)`): pasta runs in a private mount namespace, for the own /proc.
    `node_address`: map `host_port` on every address of the node, that one included, not only on loopback (a
    router's worker, reached from other nodes; such connections arrive on the namespace's interface, so the
    service must listen on 0.0.0.0). `map_host_port=False`: no port of the node reaches the namespace (the
    engine path, ray_dstack/serve/ingress/engine_registration.py: HAProxy and the replica connect inside it)."""
    root = (os.geteuid() if uid is None else uid) == 0
    argv = [pasta]
    if own_proc(uid) if private_mounts is None else private_mounts:
        argv = [shutil.which("unshare") or "unshare", "--mount", "--propagation", "private", "--", pasta]
    if root:
        argv += ["--runas", "0"]
    return argv + [
        "--config-net", "--foreground", "--quiet", "--log-file", "/dev/null",
        # pasta refuses the same host port on two addresses: a worker's port is mapped on all of them.
        "-t", ("none" if not map_host_port else f"{host_port}:{port}" if node_address and node_address != "127.0.0.1"
               else f"127.0.0.1/{host_port}:{port}"),
        "-T", "none", "-U", "none", "-u", "none",
        "--",
    ]
