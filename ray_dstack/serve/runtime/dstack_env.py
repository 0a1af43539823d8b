"""dstack's run-time environment in every replica (dstack's runner sets these; spec §1.9 of dstack-now.md).

A dstack service replica is one job on one node, so its "cluster" is the replica itself: `DSTACK_NODES_NUM=1`,
`DSTACK_NODE_RANK=0`, the node list and master are its own address, and the GPU counts are the GPUs Ray
assigned to it (dstack's docs pass `--tensor-parallel-size $DSTACK_GPUS_NUM`). The user's `env` wins over
these, as with dstack's runner; `DSTACK_ROUTER_INTERNAL_IP` (a Dynamo router's address, for its workers) is
merged last and wins over `env`, as in dstack.
"""

from __future__ import annotations

ROUTER_IP_ENV = "DSTACK_ROUTER_INTERNAL_IP"


def node_ip() -> str:
    """This node's address in the Ray cluster (other nodes reach it there); loopback outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside a Ray worker: the node is this machine
        pass
    return "127.0.0.1"


def assigned_gpus() -> int:
    """How many GPUs Ray assigned to this replica (0 outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return len(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001
        pass
    return 0


def dstack_env(service: str, *, gpus: int, ip: str, working_dir: str | None) -> dict[str, str]:
    env = {
        "DSTACK_RUN_NAME": service,
        "DSTACK_GPUS_NUM": str(gpus),
        "DSTACK_GPUS_PER_NODE": str(gpus),
        "DSTACK_NODES_NUM": "1",
        "DSTACK_NODE_RANK": "0",
        "DSTACK_NODES_IPS": ip,
        "DSTACK_MASTER_NODE_IP": ip,
    }
    if working_dir:
        env["DSTACK_WORKING_DIR"] = working_dir
    return env


def with_dstack_env(user_env: dict[str, str], dstack: dict[str, str], *, router_ip: str | None = None) -> dict[str, str]:
    """The commands' environment: dstack's variables, the user's `env` over them, the router's address last."""
    env = {**dstack, **user_env}
    if router_ip is not None:
        env[ROUTER_IP_ENV] = router_ip
    return env
