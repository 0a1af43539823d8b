"""Every invalid file gives readable problems with field path and YAML line (never a pydantic dump)."""

from __future__ import annotations

import pytest

from ray_dstack.config import ConfigError, load_service
from ray_dstack.errors import UsageError
from tests.support.config_helpers import BASE, errors

CASES = [
    # (yaml, path, line, message substring)
    (BASE + "foo: 1\n", "foo", 4, "Unknown field `foo`"),
    (BASE + "auth: [1]\n", "auth", 4, "Input should be a valid boolean"),
    (BASE + "resources:\n  memory: 8GB..4GB\n", "resources.memory", 5, "Invalid range order: 8GB..4GB"),
    (BASE + "resources:\n  cpu: '..'\n", "resources.cpu", 5, "Invalid empty range"),
    (BASE + "resources:\n  gpu: A100:H100\n", "resources.gpu", 5, "GPU spec name conflict"),
    (BASE + "resources:\n  gpu: 24GB:40GB\n", "resources.gpu", 5, "GPU spec memory conflict"),
    (BASE + "resources:\n  gpu: '1:2'\n", "resources.gpu", 5, "GPU spec count conflict"),
    (BASE + "resources:\n  gpu: 'A100::2'\n", "resources.gpu", 5, "GPU spec contains an empty token"),
    (BASE + "resources:\n  gpu: 'A100,:2'\n", "resources.gpu", 5, "GPU name can not be empty"),
    (BASE + "replicas: 1..3\n", "replicas", 4, "When you set `replicas` to a range, ensure to specify `scaling`."),
    (BASE + "scaling:\n  metric: rps\n  target: 1\n", "scaling", 4, "To use `scaling`, `replicas` must be set to a range."),
    (BASE + "replicas: 1..3\nscaling:\n  metric: rps\n  target: 0\n", "scaling.target", 7, "`target` must be greater than 0"),
    (BASE + "replicas: 1..3\nscaling: {metric: cpu, target: 1}\n", "scaling.metric", 5, "Input should be 'rps'"),
    (BASE + "model:\n  name: m\n  format: vllm\n", "model", 4, "Unsupported model format `vllm`"),
    (BASE + "python: '3.11'\nimage: ubuntu\n", "python", 4, "`image` and `python` are mutually exclusive"),
    ("type: service\ncommands: [x]\nport: 70000\n", "port", 3, "Port out of range: 70000"),
    ("type: service\ncommands: [x]\nport: '80:0'\n", "port", 3, "Port out of range: 0"),
    (BASE + "env:\n  - A=1\n  - HF_TOKEN\n", "env", 6, "Environment variable HF_TOKEN is not set"),
    (BASE + "env:\n  - A=1\n  - A=2\n", "env", 4, "Duplicate environment variable `A`"),
    (BASE + "env:\n  1A: x\n", "env", 4, "Invalid environment variable name `1A`"),
    ("type: service\nport: 80\n", "commands", None, "Either `commands` or `image` must be set"),
    ("type: service\ncommands: [x]\n", "port", None, "Field `port` is required"),
    (BASE + "name: Bad_Name\n", "name", 4, "Invalid name `Bad_Name`"),
    (BASE + "python: 2.7\n", "python", 4, "Unsupported python version `2.7`"),
    (BASE + "replicas: '..'\n", "replicas", 4, "Invalid empty range"),
    (BASE + "replicas: 3..1\nscaling: {metric: rps, target: 1}\n", "replicas", 4, "Invalid range order: 3..1"),
    (BASE + "replicas: 1..3\nscaling: {metric: rps, target: 1, window: 5x}\n", "scaling.window", 5, "Invalid duration `5x`"),
    (BASE + "registry_auth: {username: u}\n", "registry_auth.password", 4, "Field `password` is required"),
    (BASE + "probes: [{type: tcp}]\n", "probes[0].type", 4, "Input should be 'http'"),
    (BASE + "resources:\n  memory: 8XB\n", "resources.memory", 5, "Invalid memory size `8XB`"),
    (BASE + "model:\n  name: m\n  format: openai\n  chat_template: x\n", "model", 4, "`chat_template` is not allowed with model format `openai`"),
    (BASE + "port: 1\n", "port", 4, "Duplicate key"),
    (BASE + "routing: prefix\n", "routing", 4, "`routing: prefix` routes a model's chat/completions requests"),
    (BASE + "model: m\nrouting: sticky\n", "routing", 5, "Input should be 'least_connections' or 'prefix'"),
]


@pytest.mark.parametrize("text,path,line,message", CASES, ids=[c[3][:40] for c in CASES])
def test_problem(text, path, line, message):
    err = errors(text)
    assert isinstance(err, UsageError) and err.exit_code == 2
    matching = [p for p in err.problems if message in p.message]
    assert matching, str(err)
    problem = matching[0]
    assert problem.path == path
    if line is not None:
        assert problem.line == line
    rendered = f"serve.dstack.yml:{line}: {path}: " if line else "serve.dstack.yml"
    assert rendered in str(err)
    assert "pydantic" not in str(err) and "Traceback" not in str(err)


def test_all_problems_reported_one_line_each():
    err = errors(BASE + "foo: 1\nresources:\n  gpu: 'A100:H100'\n  memory: 8GB..4GB\nauth: maybe\n")
    lines = str(err).splitlines()
    assert len(lines) == 4
    assert lines[0] == "serve.dstack.yml:4: foo: Unknown field `foo`"
    assert lines[1].startswith("serve.dstack.yml:6: resources.gpu: GPU spec name conflict")
    assert lines[2] == "serve.dstack.yml:7: resources.memory: Invalid range order: 8GB..4GB"
    assert lines[3].startswith("serve.dstack.yml:8: auth: Input should be a valid boolean")


def test_yaml_syntax_error_has_line():
    err = errors("type: service\ncommands: [x\nport: 80\n: :\n")
    assert len(err.problems) == 1
    assert err.problems[0].message.startswith("Invalid YAML")
    assert err.problems[0].line is not None and err.problems[0].line >= 2


def test_yaml_mapping_value_error_line():
    err = errors("type: service\n  port: 80\n")
    assert str(err) == "serve.dstack.yml:2: Invalid YAML: mapping values are not allowed here"


@pytest.mark.parametrize("text,kind", [("- a\n- b\n", "a list"), ("just text\n", "a str"), ("", "empty")])
def test_not_a_mapping(text, kind):
    err = errors(text)
    assert err.problems[0].message == f"The file must be a YAML mapping, not {kind}"


def test_type_must_be_service():
    err = errors("type: task\ncommands: [x]\n")
    assert str(err) == "serve.dstack.yml:1: type: Only `type: service` is supported, got `task`"
    err = errors("commands: [x]\nport: 80\n")
    assert "Field `type` is required and must be `service`" in str(err)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_service(tmp_path / "nope.dstack.yml")
    assert str(info.value).endswith("nope.dstack.yml: File not found")


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_service(tmp_path)
    assert "Is a directory" in str(info.value)
    bad = tmp_path / "bin.dstack.yml"
    bad.write_bytes(b"\xff\xfe\x00type")
    with pytest.raises(ConfigError) as info:
        load_service(bad)
    assert "Cannot read file" in str(info.value)


def test_registry_auth_interpolation_missing_env():
    err = errors(BASE + "registry_auth:\n  username: u\n  password: ${{ env.PW }}\n")
    assert err.problems[0].path == "registry_auth.password"
    assert "PW is not in `env`" in err.problems[0].message
