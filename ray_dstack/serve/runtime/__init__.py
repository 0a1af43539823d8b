"""How a replica runs its service's commands: one `ReplicaRuntime` per kind, chosen here from the spec."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ray_dstack.spec import ServiceSpec

if TYPE_CHECKING:  # the CLI imports runtime/netns.py: this package's __init__ stays light
    from ray_dstack.serve.runtime.base import ReplicaRuntime


def runtime_for(spec: ServiceSpec, *, replica_tag: str, logger: logging.Logger) -> ReplicaRuntime:
    """`image` → a container; a fixed `port` with namespaces on → its own network namespace; else a process."""
    from ray_dstack.serve.runtime.container_runtime import ContainerRuntime
    from ray_dstack.serve.runtime.host import NamespaceRuntime, ProcessRuntime

    if spec.image is not None:
        kind: type[ReplicaRuntime] = ContainerRuntime
    elif spec.network_namespace and not spec.port_from_env:
        kind = NamespaceRuntime
    else:
        kind = ProcessRuntime
    return kind(spec, replica_tag=replica_tag, logger=logger)
