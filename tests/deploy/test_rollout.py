"""`deploy`'s own "no node can host a replica" diagnosis (deploy/rollout.py placement_problem) with the plan's
requests: the small default CPU share, an explicit `cpu`, a GPU type."""

from __future__ import annotations

from ray_dstack.config import parse_service
from ray_dstack.deploy.rollout import placement_problem
from ray_dstack.plan import build_plan

BASE = "type: service\nname: svc\ncommands: ['python3 -m http.server $RAY_DSTACK_PORT']\nport: 8000\n"


def _opts(extra: str = "") -> dict:
    return build_plan(parse_service(BASE + extra, "svc.dstack.yml")).ray_actor_options


def _node(ip: str, cpus: float, gpus: int = 0, accel: str | None = None) -> dict:
    resources = {"CPU": cpus, "memory": 8 * 1024**3}
    if gpus:
        resources |= {"GPU": gpus, f"accelerator_type:{accel}": 1}
    return {"node_ip": ip, "state": "ALIVE", "resources_total": resources,
            "labels": {"ray.io/accelerator-type": accel} if accel else {}}


LAPTOP = [_node("10.0.0.1", 2)]


def test_a_replica_without_cpu_fits_any_node_with_cpus():
    assert placement_problem(_opts(), LAPTOP) is None
    assert placement_problem(_opts(), [_node("10.0.0.1", 0), _node("10.0.0.2", 4, 1, "A10G")]) is None


def test_a_replica_without_cpu_names_its_small_share_where_no_node_has_cpus():
    """A head started with `--num-cpus 0` (a common cluster setup) and nothing else: the share is not 0."""
    problem = placement_problem(_opts(), [_node("10.0.0.1", 0)])
    assert problem is not None
    assert problem == "no node can host a replica: each needs 0.05 CPU. Nodes in the cluster: 10.0.0.1 (no GPU, 0 CPU)"


def test_an_explicit_cpu_stays_a_hard_request():
    problem = placement_problem(_opts("resources: {cpu: 4}\n"), LAPTOP)
    assert problem == "no node can host a replica: each needs 4 CPU. Nodes in the cluster: 10.0.0.1 (no GPU, 2 CPU)"
    assert placement_problem(_opts("resources: {cpu: 4}\n"), LAPTOP + [_node("10.0.0.2", 4)]) is None
    big_memory = placement_problem(_opts("resources: {cpu: 1, memory: 16GB}\n"), LAPTOP)
    assert big_memory is not None and "each needs 1 CPU, 16.0 GiB memory" in big_memory


def test_a_gpu_type_no_node_has_is_named_with_the_default_share():
    """The message docs/multinode.md quotes."""
    nodes = [_node("10.0.0.1", 1, 1, "A10G"), _node("10.0.0.2", 1, 2, "A100-80G")]
    problem = placement_problem(_opts("resources: {gpu: H100}\n"), nodes)
    assert problem is not None
    assert problem.startswith("no node can host a replica: each needs 1 GPU of type H100, 0.05 CPU. ")
    assert placement_problem(_opts("resources: {gpu: A10G}\n"), nodes) is None
