"""dstack's run-time environment in every replica (dstack's runner sets these; spec §1.9 of dstack-now.md).

A dstack service replica is one job on one node, so its "cluster" is the replica itself: `DSTACK_NODES_NUM=1`,
`DSTACK_NODE_RANK=0`, the node list and master are its own address, and the GPU counts are the GPUs Ray
assigned to it (dstack's docs pass `--tensor-parallel-size $DSTACK_GPUS_NUM`). The user's `env` wins over
these, as with dstack's runner; `DSTACK_ROUTER_INTERNAL_IP` (a Dynamo router's address, for its workers) is
merged last and wins over `env`, as in dstack.
"""

from __future__ import annotations

ROUTER_IP_ENV = "DSTACK_ROUTER_INTERNAL_IP"
# `dstack: true`: where `ray-dstack` and `ray job` inside the service find the cluster it runs on. Not RAY_ADDRESS:
# `ray.init()` reads it as a GCS address and refuses an http URL, which would break a service that uses Ray.
CLUSTER_ADDRESS_ENVS = ("RAY_DSTACK_ADDRESS", "RAY_API_SERVER_ADDRESS")


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


def dashboard_url() -> str | None:
    """The dashboard of the cluster this replica runs in, as its head published it in the GCS (None outside Ray).
    With a dashboard bound to the head's loopback (a local `ray start --head`) it answers on the head node only."""
    try:
        import ray
        from ray._private import ray_constants
        from ray.experimental import internal_kv

        if not ray.is_initialized():
            return None
        raw = internal_kv._internal_kv_get(ray_constants.DASHBOARD_ADDRESS,
                                           namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
    except Exception:  # noqa: BLE001 - no GCS to ask: the service is not told an address
        return None
    if not raw:
        return None
    address = raw.decode()
    return address if "://" in address else f"http://{address}"


def cluster_env(enabled: bool) -> dict[str, str]:
    """dstack's `dstack: true`: the commands can reach the cluster they run on. dstack gives no credentials
    (a token must come through `env`); neither does this."""
    url = dashboard_url() if enabled else None
    return {key: url for key in CLUSTER_ADDRESS_ENVS} if url else {}


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
