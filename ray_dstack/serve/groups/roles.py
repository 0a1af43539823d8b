"""What a replica does for its replica group (spec.group): the router's and the workers' parts.

- router (SGLang): syncs the router's worker list from the first moment its process runs (sglang_sync.py);
  takes only `/generate`, `/v1/...` and `/chat/completions` from clients.
- router (Dynamo): publishes its node's address for the workers (dynamo.py); same paths.
- worker (SGLang): announces itself while ready and healthy (registry.py).
- worker (Dynamo): waits for the router's address before its commands start ($DSTACK_ROUTER_INTERNAL_IP).
- member (a group of a service without a router): the ingress group's replicas spread requests over every
  group's (peers.py); the other groups' replicas announce themselves while ready (registry.py).
- services without groups: nothing.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import unquote
from typing import Any, Awaitable, Callable, TypeVar

import httpx

from ray_dstack.serve.groups import dynamo
from ray_dstack.serve.groups.peers import REFRESH_S, PeerPool
from ray_dstack.serve.groups.registry import KV, Announcer, Watcher
from ray_dstack.serve.groups.sglang_sync import SYNC_S, SglangWorkerSync
from ray_dstack.serve.runtime.base import ReplicaRuntime, probe_client
from ray_dstack.serve.runtime.dstack_env import node_ip
from ray_dstack.spec import REPLICA_DEPLOYMENT_NAME, ROUTER_ALLOWED_PATHS, ROUTER_ALLOWED_PREFIXES, ServiceSpec

B = TypeVar("B")
# The reader of the announcements (the SGLang sync, the ingress group's peer pool) looks every second: after
# this long a withdrawn replica gets no new request. The reader's list cannot be polled from here.
WITHDRAW_SETTLE_S = max(SYNC_S, REFRESH_S) + 0.5


def router_allows(path: str) -> bool:
    """dstack's whitelist for services with a router group (`proxy/lib/const.py`). A path with a `.` or `..`
    segment, plain or percent-encoded, is refused: the client that relays it would resolve it (`/v1/../workers`
    is `/workers` to the router), where dstack's nginx matches the normalized path."""
    path = path.split("?", 1)[0]
    if any(segment in (".", "..") for segment in unquote(path).split("/")):
        return False
    return path in ROUTER_ALLOWED_PATHS or path.startswith(ROUTER_ALLOWED_PREFIXES)


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray
        return None


class GroupRole:
    def __init__(self, spec: ServiceSpec, *, replica_tag: str, logger: logging.Logger, kv: KV | None = None) -> None:
        self.spec = spec
        self.group = spec.group
        self.replica_tag = replica_tag
        self.logger = logger
        self.kv = kv or KV()
        self.sync: SglangWorkerSync | None = None
        self.announcer: Announcer | None = None
        self.published_router = False
        self.peers: PeerPool | None = None

    @property
    def role(self) -> str | None:
        return self.group.role if self.group is not None else None

    @property
    def is_router(self) -> bool:
        return self.role == "router"

    async def before_prepare(self, runtime: ReplicaRuntime) -> None:
        if self.role == "worker" and self.group is not None and self.group.router == "dynamo":
            runtime.router_ip = await dynamo.wait_for_router(self.kv, self.spec.name, self.logger)

    async def after_start(self, runtime: ReplicaRuntime) -> None:
        if not self.is_router or self.group is None:
            return
        if self.group.router == "sglang":
            assert runtime.process is not None
            client = probe_client(runtime.process)
            client.base_url = httpx.URL(f"http://127.0.0.1:{runtime.port}")
            client.timeout = httpx.Timeout(10.0)
            # A router in a container has a network of its own: its loopback is not the node's, so it reaches
            # every worker at its node's address (node_id None), the ones on its own node included.
            node_id = None if runtime.kind == "container" else _node_id()
            self.sync = SglangWorkerSync(client, Watcher(self.kv, self.spec.name), node_id=node_id,
                                         logger=self.logger)
            self.sync.start()
        elif self.group.router == "dynamo":
            await dynamo.publish_router(self.kv, self.spec.name, node_ip=node_ip(), replica=self.replica_tag)
            self.published_router = True

    @property
    def is_ingress(self) -> bool:
        return self.group is None or self.group.deployment == REPLICA_DEPLOYMENT_NAME

    async def after_ready(self, runtime: ReplicaRuntime, healthy) -> None:
        """A replica reached through another (an SGLang router's worker, a member group that is not the
        ingress) announces itself while it is ready and healthy; so does an ingress replica of a service
        without a router (the others count them to share the traffic evenly: peers.py)."""
        if self.group is None:
            return
        if self.role == "router" or (self.role == "worker" and self.group.router != "sglang"):
            return  # Dynamo's frontend finds its workers itself
        if self.role == "member" and len(self.group.groups) < 2:
            return
        assert runtime.port is not None
        self.announcer = Announcer(
            self.kv, service=self.spec.name, group=self.group.name, deployment=self.group.deployment,
            replica=self.replica_tag, node_id=_node_id() or "", node_ip=node_ip(), port=runtime.port,
            healthy=healthy, logger=self.logger)
        self.announcer.start()

    def start_peers(self, make: Callable[[str], B], close: Callable[[B], Awaitable[None]]) -> PeerPool[B] | None:
        """The ingress group of a service without a router: the other groups' replicas to spread requests over."""
        if self.role != "member" or not self.is_ingress or self.group is None or len(self.group.groups) < 2:
            return None
        self.peers = PeerPool(Watcher(self.kv, self.spec.name), node_id=_node_id(), make=make, close=close,
                              logger=self.logger, own_deployment=self.group.deployment)
        self.peers.start()
        return self.peers

    async def _withdraw(self, announcer: Announcer) -> None:
        """Withdraw, then give the router (or the ingress group) one sync period to stop choosing this replica:
        only then do its commands stop. Requests already sent to it get the runtime's own stop grace."""
        await announcer.close()
        if announcer.announced:
            await asyncio.sleep(WITHDRAW_SETTLE_S)

    def describe(self) -> dict[str, Any]:
        if self.group is None:
            return {}
        out: dict[str, Any] = {"group": self.group.name, "role": self.group.role}
        if self.sync is not None:
            out["router"] = self.sync.describe()
        if self.peers is not None:
            out.update(self.peers.describe())
        return out

    async def aclose(self) -> None:
        """First thing when the replica stops: the router stops sending it requests. Never raises (the
        replica's own teardown and its original error come next)."""
        steps = []
        if self.announcer is not None:
            steps.append(("withdraw the announcement", self._withdraw(self.announcer)))
            self.announcer = None
        if self.sync is not None:
            steps.append(("stop the router sync", self.sync.aclose()))
            self.sync = None
        if self.peers is not None:
            steps.append(("close the other groups' connections", self.peers.aclose()))
            self.peers = None
        if self.published_router:
            steps.append(("withdraw the router's address", dynamo.withdraw_router(
                self.kv, self.spec.name, replica=self.replica_tag)))
            self.published_router = False
        for what, step in steps:
            try:
                await step
            except Exception as exc:  # noqa: BLE001 - readers drop a silent entry after registry.STALE_S
                self.logger.warning("could not %s: %s", what, exc)
