"""Fixed ports with and without network namespaces per replica; the environment the plan shows."""

from __future__ import annotations

import json

from ray_dstack.cli.main import main
from ray_dstack.plan import build_plan
from tests.support.config_helpers import BASE, load

SCALING = "replicas: 1..3\nscaling: {metric: rps, target: 1}\n"


def deployment(p):
    return p.to_serve_config()["applications"][0]["deployments"][0]


def test_namespaces_lift_the_one_replica_per_node_cap():
    p = build_plan(load(BASE + SCALING), network_namespaces=True)
    assert p.spec.network_namespace and "max_replicas_per_node" not in deployment(p)
    assert not any("passt" in w for w in p.warnings)
    assert "a network namespace per replica" in p.summary_lines()[0]


def test_without_namespaces_one_replica_per_node_and_a_warning_naming_passt():
    p = build_plan(load(BASE + SCALING), network_namespaces=False)
    assert not p.spec.network_namespace and deployment(p)["max_replicas_per_node"] == 1
    assert any("passt" in w and "one replica per" in w for w in p.warnings)


def test_port_from_env_needs_no_namespace():
    text = "type: service\ncommands: ['python3 -m http.server $RAY_DSTACK_PORT']\nport: 8000\n"
    p = build_plan(load(text + SCALING), network_namespaces=True)
    assert p.spec.port_from_env and not p.spec.network_namespace
    assert "max_replicas_per_node" not in deployment(p)


def test_environment_shown():
    p = build_plan(load(BASE + "python: '3.12'\n"))
    assert p.spec.python == "3.12"
    assert p.environment()["python"] == "3.12" and p.environment()["env"].endswith("serve-py3.12")
    assert any(line.startswith("python: 3.12") for line in p.summary_lines())
    assert build_plan(load(BASE)).environment()["python"] == "the node's version"


def test_cli_plan_reads_the_namespace_setting(tmp_path, capsys, monkeypatch):
    f = tmp_path / "serve.dstack.yml"
    f.write_text(BASE + SCALING)
    monkeypatch.setenv("RAY_DSTACK_NETWORK_NAMESPACES", "off")
    assert main(["plan", str(f), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["environment"]["network_namespace"] is False and any("passt" in w for w in out["warnings"])
    monkeypatch.setenv("RAY_DSTACK_NETWORK_NAMESPACES", "on")
    assert main(["plan", str(f), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["environment"]["network_namespace"] is True
    assert "max_replicas_per_node" not in json.dumps(out["serve_config"])
