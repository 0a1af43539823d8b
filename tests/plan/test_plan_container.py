"""`image` in the plan: the container command each replica runs, `registry_auth` by reference only."""

from __future__ import annotations

import json

import pytest

from ray_dstack.cli.main import main
from ray_dstack.plan import build_plan
from tests.support.config_helpers import load


def plan(text: str):
    return build_plan(load(text))

IMAGE = ("type: service\nname: llm\nimage: ghcr.io/acme/tgi:2\nport: 8000\nreplicas: 2\n"
         "env: {HF_TOKEN: hf_plan_secret, MODE: fast}\n"
         "registry_auth: {username: bot, password: hunter2-plan-pw}\nresources: {shm_size: 2GB}\n")


def test_image_service_spec_and_deployment():
    p = plan(IMAGE + "commands: [text-generation-launcher --port 8000]\n")
    s = p.spec
    assert s.image == "ghcr.io/acme/tgi:2" and s.shm_size_bytes == 2 * 1024**3
    assert s.registry_auth.username == "bot" and "hunter2" not in s.registry_auth.kv_key
    # Each container has its own network: replicas share a node on the same container port.
    assert not s.port_from_env and not s.network_namespace and "max_replicas_per_node" not in p.deployment
    assert not any("image" in w or "registry_auth" in w or "shm_size" in w for w in p.warnings)


def test_password_is_in_no_part_of_the_plan():
    p = plan(IMAGE + "commands: [run]\n")
    for text in (json.dumps(p.to_serve_config()), json.dumps(p.to_display_dict()), "\n".join(p.summary_lines())):
        assert "hunter2-plan-pw" not in text
    final = p.finalized(token_sha256=None, registry_auth_key="registry-auth/llm/abc")
    assert final.spec.registry_auth.kv_key == "registry-auth/llm/abc"
    assert "hunter2-plan-pw" not in json.dumps(final.to_serve_config())


def test_plan_shows_the_container_command():
    lines = "\n".join(plan(IMAGE + "commands: [echo hi, text-generation-launcher --port 8000]\n").summary_lines())
    assert ("container per replica: podman run --name 'llm-<replica>' --init --rm --pull never "
            "-p 127.0.0.1:<free port>:8000 --env-file '<env file, mode 0600>' --shm-size 2147483648") in lines
    assert "ghcr.io/acme/tgi:2 -c 'set -e\necho hi\ntext-generation-launcher --port 8000\n'" in lines
    assert "registry_auth: user bot, password ***" in lines


def test_image_without_commands_runs_its_own_entrypoint():
    p = plan("type: service\nimage: ghcr.io/acme/tgi:2\nport: 80\n")
    assert p.spec.commands == [] and p.spec.image == "ghcr.io/acme/tgi:2"
    assert "--entrypoint" not in "\n".join(p.summary_lines())


def test_entrypoint_and_registry_auth_without_image_are_reported():
    p = plan("type: service\ncommands: [run]\nport: 80\nentrypoint: python3\nregistry_auth: {username: u, password: p}\n")
    assert p.spec.image is None and p.spec.registry_auth is None and p.spec.entrypoint is None
    text = "\n".join(p.warnings)
    assert "`entrypoint` is ignored" in text and "`registry_auth` is ignored" in text


def test_cli_plan_redacts_the_registry_password(tmp_path, capsys):
    f = tmp_path / "llm.dstack.yml"
    f.write_text(IMAGE + "commands: [run]\n")
    assert main(["plan", str(f)]) == 0
    out = capsys.readouterr().out
    assert "hunter2-plan-pw" not in out and "hf_plan_secret" not in out and "podman run" in out


def test_plan_shows_dockers_command_where_the_runtime_chosen_is_docker(tmp_path, capsys, monkeypatch):
    f = tmp_path / "llm.dstack.yml"
    f.write_text(IMAGE + "commands: [run]\n")
    monkeypatch.delenv("RAY_DSTACK_CONTAINER_RUNTIME", raising=False)
    assert main(["plan", str(f)]) == 0
    out = capsys.readouterr().out
    assert "container per replica: podman run --name 'llm-<replica>'" in out and "docker run" not in out
    for chosen in ("docker", "/usr/local/bin/docker"):
        monkeypatch.setenv("RAY_DSTACK_CONTAINER_RUNTIME", chosen)
        assert main(["plan", str(f)]) == 0
        out = capsys.readouterr().out
        assert "container per replica: docker run --name 'llm-<replica>' --init --rm --pull never" in out
        assert "podman run" not in out and "hunter2-plan-pw" not in out


def test_build_plan_takes_the_runtime_to_show():
    p = build_plan(load(IMAGE + "commands: [run]\n"), container_runtime="docker")
    assert any(line.startswith("container per replica: docker run ") for line in p.summary_lines())
    with pytest.raises(ValueError, match="container_runtime"):
        build_plan(load(IMAGE), container_runtime="lxc")
