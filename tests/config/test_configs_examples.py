"""Every file in configs/ parses, plans, and gives a Serve config that Serve itself accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from ray.serve.schema import ServeDeploySchema

from ray_dstack.config import load_service
from ray_dstack.plan import build_plan

CONFIGS = sorted((Path(__file__).resolve().parent.parent.parent / "configs").glob("*.dstack.yml"))


def placeholder_env(path: Path) -> dict[str, str]:
    """A value for every env placeholder (a bare `- KEY` list entry) the file needs."""
    return {m: "dummy" for m in re.findall(r"^\s*-\s*([A-Za-z_][A-Za-z0-9_]*)\s*$", path.read_text(), re.M)}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_plans(path):
    loaded = load_service(path, environ=placeholder_env(path))
    plan = build_plan(loaded, token_sha256="0" * 64)
    ServeDeploySchema.model_validate(plan.to_serve_config())
    ServeDeploySchema.model_validate(plan.to_display_dict())


def test_examples_present():
    names = {p.name for p in CONFIGS}
    assert {"http-server.dstack.yml", "http-server-open.dstack.yml", "vllm-openai.dstack.yml",
            "private-image.dstack.yml", "autoscaling.dstack.yml", "mixtral.dstack.yml",
            "tgi-mistral.dstack.yml"} <= names


def test_example_meanings():
    d = Path(__file__).resolve().parent.parent.parent / "configs"
    assert build_plan(load_service(d / "http-server-open.dstack.yml")).spec.auth.enabled is False
    mixtral = build_plan(load_service(d / "mixtral.dstack.yml", environ={"HF_TOKEN": "x"}))
    assert mixtral.ray_actor_options["num_gpus"] == 2 and "A100-80G" in mixtral.gpu_types
    assert mixtral.requirements["disk"] == "200GB"
    vllm = build_plan(load_service(d / "vllm-openai.dstack.yml"))
    assert {"A10G", "L4"} <= set(vllm.gpu_types) and vllm.spec.env["MODEL"] == "NousResearch/Llama-2-7b-chat-hf"
    auto = build_plan(load_service(d / "autoscaling.dstack.yml"))
    assert auto.spec.scaling.min_replicas == 1 and auto.spec.scaling.max_replicas == 4
