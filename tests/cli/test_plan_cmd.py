"""`ray-dstack plan FILE` prints valid `serve deploy` input: the summary above the YAML is comments only."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from ray_dstack.cli.main import main
from ray_dstack.cli.plan_cmd import comment_block
from tests.config.test_configs_examples import CONFIGS, placeholder_env


def plan_stdout(capsys, path: Path, *args: str) -> str:
    assert main(["plan", str(path), *args]) == 0
    return capsys.readouterr().out


def assert_serve_input(out: str) -> dict:
    data = yaml.safe_load(out)
    ServeDeploySchema.model_validate(data)
    head = out[: out.index("applications:")]
    assert all(line.startswith("#") for line in head.splitlines()), head
    return data


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_example_plan_parses_as_yaml(capsys, path):
    args = [arg for key in placeholder_env(path) for arg in ("-e", f"{key}=dummy")]
    assert_serve_input(plan_stdout(capsys, path, *args))


def test_image_service_with_a_multi_line_script(capsys, tmp_path):
    f = tmp_path / "tgi.dstack.yml"
    f.write_text("type: service\nname: tgi\nimage: ghcr.io/huggingface/text-generation-inference:latest\n"
                 "port: 80\ncommands:\n  - echo starting\n  - |\n    if true; then\n      text-generation-launcher --port 80\n"
                 "    fi\n")
    out = plan_stdout(capsys, f)
    data = assert_serve_input(out)
    assert data["applications"][0]["name"] == "tgi"
    # The script is shown whole, one comment line per line of it.
    for line in ("# echo starting", "# if true; then", "#   text-generation-launcher --port 80", "# fi"):
        assert line in out.splitlines(), line


def test_comment_block_comments_every_line():
    assert comment_block(["a", "b\nc", "", "d\n\ne"]) == "# a\n# b\n# c\n#\n# d\n#\n# e\n"
