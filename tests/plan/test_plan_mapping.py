"""ServiceConfig → ServicePlan → Serve config: the mapping rules."""

from __future__ import annotations

import json

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from ray_dstack import spec as rt
from ray_dstack.cli.main import main
from ray_dstack.config import ConfigError
from ray_dstack.plan import PlanError, build_plan, defaults
from tests.support.config_helpers import BASE, load


def plan(text: str, **kw):
    p = build_plan(load(text, environ=kw.pop("environ", {})), **kw)
    ServeDeploySchema.model_validate(p.to_serve_config())
    return p


def deployment(p):
    return p.to_serve_config()["applications"][0]["deployments"][0]


def test_basic_application():
    p = plan(BASE, token_sha256="ab" * 32)
    app = p.to_serve_config()["applications"][0]
    assert (app["name"], app["route_prefix"], app["import_path"]) == ("serve", "/serve", rt.SERVICE_IMPORT_PATH)
    spec = rt.ServiceSpec.model_validate(app["args"]["service"])
    assert spec.auth.enabled and spec.auth.token_sha256 == "ab" * 32 and spec.port == 8000
    d = deployment(p)
    assert d["name"] == rt.REPLICA_DEPLOYMENT_NAME and d["num_replicas"] == 1
    assert d["max_ongoing_requests"] == defaults.MAX_ONGOING_REQUESTS == 256
    assert d["max_replicas_per_node"] == 1 and spec.port_from_env is False


def test_token_digest_added_after_planning_gives_the_same_config():
    """`deploy` plans before it reads the cluster (where a redeploy's token digest lives), then adds it."""
    digest = "cd" * 32
    assert plan(BASE).finalized(token_sha256=digest).to_serve_config() == plan(BASE, token_sha256=digest).to_serve_config()
    public = plan(BASE + "auth: false\n").finalized(token_sha256=digest)
    assert public.spec.auth.enabled is False and public.spec.auth.token_sha256 is None


def test_finalized_plan_carries_what_deploy_learned_into_the_serve_config():
    """Creation time, --request-timeout and a tgi model's resolved chat settings land in the plan's own
    output: nothing downstream edits the Serve config."""
    tgi = BASE + "model: {name: tiny, format: tgi, chat_template: '{{ messages }}'}\n"
    settings = rt.ModelSettings(chat_template="T", eos_token="</s>", bos_token="<s>")
    final = plan(tgi).finalized(token_sha256="ef" * 32, created=1700000000, request_timeout_s=42.0,
                                model_settings=settings)
    app = final.to_serve_config()["applications"][0]
    assert app["args"]["created"] == 1700000000
    spec = rt.ServiceSpec.model_validate(app["args"]["service"])
    assert spec.request_timeout_s == 42.0 and spec.auth.token_sha256 == "ef" * 32
    assert (spec.model.chat_template, spec.model.eos_token, spec.model.bos_token) == ("T", "</s>", "<s>")
    assert "created" not in plan(tgi).to_serve_config()["applications"][0]["args"]


def test_default_resources_are_small_with_advisory():
    """No `cpu`/`memory`: a small CPU share (a scheduling weight, 20 replicas per core), no memory
    reservation; dstack's own defaults are shown as advisory, and the summary says the share is the default."""
    p = plan(BASE)
    assert p.ray_actor_options == {"num_cpus": defaults.DEFAULT_NUM_CPUS}
    assert 0 < defaults.DEFAULT_NUM_CPUS <= 0.05 and defaults.DEFAULT_MEMORY_BYTES is None
    assert p.requirements["cpu"] == "2.. (dstack default)" and p.requirements["memory"] == "8GB.. (dstack default)"
    assert "Ray request per replica: num_cpus=0.05 (default without `cpu`)" in p.summary_lines()


def test_explicit_resources_requested():
    p = plan(BASE + "resources: {cpu: 4.., memory: 16GB..32GB, shm_size: 1GB, disk: 50GB}\n")
    assert p.ray_actor_options["num_cpus"] == 4 and p.ray_actor_options["memory"] == 16 * 1024**3
    assert p.requirements == {"disk": "50GB", "shm_size": "1GB"}
    assert "Ray request per replica: num_cpus=4, memory=16GB" in p.summary_lines()


@pytest.mark.parametrize("cpu, requested", [("4", 4), ("1..", 1), ("2..8", 2), ("0", 0)])
def test_cpu_in_the_yaml_is_requested_exactly(cpu, requested):
    """The small default never applies when the YAML says `cpu`, not even below it or at 0."""
    p = plan(BASE + f"resources: {{cpu: '{cpu}'}}\n")
    assert p.ray_actor_options["num_cpus"] == requested and "cpu" not in p.requirements
    assert "(default without `cpu`)" not in "\n".join(p.summary_lines())


def test_port_from_env():
    p = plan("type: service\ncommands: ['python -m http.server ${RAY_DSTACK_PORT}']\nport: 8000\n")
    assert p.spec.port_from_env and "max_replicas_per_node" not in deployment(p)


@pytest.mark.parametrize(
    "gpu,types,num",
    [
        ("24GB", {"A10G", "L4", "A10"}, 1),
        ("80GB:2", {"A100-80G", "H100"}, 2),
        ("A100", {"A100-40G", "A100-80G", "A100"}, 1),
        ("A100:80GB", {"A100-80G"}, 1),
        ("24GB..", {"A10G", "L4", "L40S", "H100", "H200", "B200"}, 1),
        ("H100,H200:1..2", {"H100", "H200"}, 1),
    ],
)
def test_gpu_mapping(gpu, types, num):
    p = plan(BASE + f"resources:\n  gpu: '{gpu}'\n")
    assert types <= set(p.gpu_types)
    if ".." not in gpu.split(":")[0]:
        assert "T4" not in p.gpu_types
    assert p.ray_actor_options["num_gpus"] == num
    sel = p.ray_actor_options["label_selector"][defaults.ACCELERATOR_LABEL_KEY]
    assert sel == (p.gpu_types[0] if len(p.gpu_types) == 1 else "in(" + ",".join(p.gpu_types) + ")")


def test_gpu_count_only_has_no_constraint():
    p = plan(BASE + "resources: {gpu: 2}\n")
    assert p.ray_actor_options["num_gpus"] == 2 and "label_selector" not in p.ray_actor_options
    assert p.gpu_types is None


def test_unknown_gpu_is_plan_error():
    with pytest.raises(PlanError) as info:
        build_plan(load(BASE + "resources: {gpu: 'FOO100:2'}\n"))
    assert isinstance(info.value, ConfigError)
    assert "resources.gpu: No known GPU type satisfies `FOO100:2`" in str(info.value)
    with pytest.raises(PlanError, match="No known GPU type satisfies"):
        build_plan(load(BASE + "resources: {gpu: 1000GB}\n"))


def test_autoscaling():
    p = plan(BASE + "replicas: 0..5\nscaling: {metric: rps, target: 2, scale_up_delay: 30s, scale_down_delay: 2m, window: 20}\n")
    a = deployment(p)["autoscaling_config"]
    assert "num_replicas" not in deployment(p)
    assert (a["min_replicas"], a["max_replicas"], a["initial_replicas"]) == (0, 5, 0)
    assert a["policy"]["policy_function"] == defaults.AUTOSCALING_POLICY
    assert a["policy"]["policy_kwargs"] == {"target_rps": 2.0, "window_s": 20.0, "scale_up_delay_s": 30.0, "scale_down_delay_s": 120.0}
    assert a["upscale_delay_s"] == 0 and a["downscale_delay_s"] == 0
    assert p.spec.scaling.target == 2 and p.spec.scaling.max_replicas == 5


def test_spec_fields():
    p = plan(BASE + "setup: [pip install x]\nworking_dir: /app\nauth: false\n"
             "probes: [{type: http, url: /health, interval: 3, timeout: 1, ready_after: 2}]\n"
             "model: {name: m, format: tgi, eos_token: '</s>'}\n")
    s = p.spec
    assert s.commands == ["pip install x", "python3 -m http.server"] and s.working_dir == "/app"
    assert s.auth.enabled is False and s.auth.token_sha256 is None
    assert (s.probe.path, s.probe.interval_s, s.probe.timeout_s, s.probe.ready_after) == ("/health", 3, 1, 2)
    assert (s.model.format, s.model.eos_token, s.model.chat_template) == ("tgi", "</s>", None)


def test_not_honoured_warnings():
    p = plan("type: service\nimage: x/y\nenv: [PW=1]\nregistry_auth: {username: u, password: '${{ env.PW }}'}\n"
             "commands: [run]\nport: 80\nbackends: [aws]\n")
    text = "\n".join(p.warnings)
    assert "`backends` is ignored on Ray" in text
    # `image` and `registry_auth` are honoured now (tests/plan/test_plan_container.py).
    assert "image" not in text and "registry_auth" not in text
    honoured = plan(BASE + "python: '3.11'\n")
    assert honoured.spec.python == "3.11" and not any("python" in w for w in honoured.warnings)


def test_redaction():
    p = plan(BASE + "env: {HF_TOKEN: hf_secret, API_KEY: k, DB_PASSWORD: pw, MODEL: m}\n")
    env = p.to_display_dict()["applications"][0]["args"]["service"]["env"]
    assert env == {"HF_TOKEN": "***", "API_KEY": "***", "DB_PASSWORD": "***", "MODEL": "m"}
    assert p.to_serve_config()["applications"][0]["args"]["service"]["env"]["HF_TOKEN"] == "hf_secret"


def test_cli_plan(tmp_path, capsys):
    f = tmp_path / "serve.dstack.yml"
    f.write_text(BASE + "env: [HF_TOKEN]\nregistry_auth: {username: u, password: hunter2}\nresources: {gpu: 24GB}\n")
    assert main(["plan", str(f), "-e", "HF_TOKEN=hf_abc"]) == 0
    out = capsys.readouterr().out
    assert "hf_abc" not in out and "hunter2" not in out
    assert out.startswith("# service serve") and "admitted types: A10, A10G, L4" in out
    data = yaml.safe_load(out)
    ServeDeploySchema.model_validate(data)
    assert main(["plan", str(f), "-e", "HF_TOKEN=x", "--json", "--name", "other"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["serve_config"]["applications"][0]["name"] == "other"


def test_cli_errors(tmp_path, capsys):
    f = tmp_path / "bad.dstack.yml"
    f.write_text(BASE + "replicas: 1..2\n")
    assert main(["plan", str(f)]) == 2
    err = capsys.readouterr().err
    assert "bad.dstack.yml:4: replicas: When you set `replicas` to a range, ensure to specify `scaling`." in err
    assert "Traceback" not in err


def test_cli_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "resources" in schema["properties"] and schema["additionalProperties"] is False
