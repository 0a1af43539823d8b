"""Replica groups (dstack 0.21) from the YAML text to the Serve config: one deployment per group in the service's
one application, each with its own Ray request, replicas or autoscaling and spec; the service-wide fields shared.
"""

from __future__ import annotations

import json

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from ray_dstack import spec as rt
from ray_dstack.plan import PlanError, build_plan, defaults
from tests.support.config_helpers import load

REPO = Path(__file__).resolve().parents[2]
DIGEST = "ab" * 32

# dstack's "PD disaggregation" service (SMG router + prefill + decode), run from the nodes' Python (no `image`,
# so the workers' fixed port 8000 can get a network namespace each) and with dstack's `$DSTACK_GPUS_NUM`.
SGLANG_PD = """\
type: service
name: pd
python: "3.12"
env:
  - HF_TOKEN
  - MODEL_ID=meta-llama/Llama-3.1-8B-Instruct
groups:
  - name: router
    replicas: 1
    router:
      type: sglang
    commands:
      - pip install smg
      - smg launch --host 0.0.0.0 --port 8000 --pd-disaggregation --prefill-policy cache_aware
    resources:
      cpu: 4
  - name: prefill
    replicas: 1..4
    scaling:
      metric: rps
      target: 3
    commands:
      - pip install "sglang[all]"
      - python -m sglang.launch_server --model-path $MODEL_ID --disaggregation-mode prefill --tp $DSTACK_GPUS_NUM --port 8000 --disaggregation-bootstrap-port 8998
    resources:
      gpu: H100:1
  - name: decode
    replicas: 2
    commands:
      - python -m sglang.launch_server --model-path $MODEL_ID --disaggregation-mode decode --tp $DSTACK_GPUS_NUM --port 8000
    resources:
      gpu: H100:1
port: 8000
model: meta-llama/Llama-3.1-8B-Instruct
probes:
  - type: http
    url: /health
"""
PD_ENV = {"HF_TOKEN": "hf_secret_value"}

DYNAMO = """\
type: service
name: dyn
groups:
  - name: frontend
    replicas: 1
    router: {type: dynamo}
    commands:
      - python3 -m dynamo.frontend --http-host 0.0.0.0 --http-port 8000
  - name: workers
    replicas: 1..3
    scaling: {metric: rps, target: 2}
    commands:
      - export ETCD_ENDPOINTS="http://$DSTACK_ROUTER_INTERNAL_IP:2379"
      - python3 -m dynamo.sglang --model-path m --tp $DSTACK_GPUS_NUM
    resources:
      gpu: 24GB
port: 8000
"""

MEMBERS = """\
type: service
name: members
groups:
  - name: big
    replicas: 3
    commands: [python3 -m http.server $RAY_DSTACK_PORT]
  - name: small
    replicas: 0..5
    scaling: {metric: rps, target: 1}
    commands: [python3 -m http.server $RAY_DSTACK_PORT]
port: 8000
"""

NO_GROUPS = """\
type: service
name: plain
commands: [python3 -m http.server 8000]
env: [API_TOKEN=t0ken, MODE=fast]
replicas: 1..3
scaling: {metric: rps, target: 5}
resources: {gpu: A10G:1}
port: 8000
"""


def legacy_spelling(text: str) -> str:
    """HEAD's `groups: [- replicas: N]` → 0.21.2's `replicas: [- count: N]`."""
    text = re.sub(r"^groups:$", "replicas:", text, flags=re.M)
    return re.sub(r"^    replicas:", "    count:", text, flags=re.M)


def plan(text: str, environ: dict[str, str] | None = None, **kw):
    p = build_plan(load(text, environ=environ or {}), **kw)
    ServeDeploySchema.model_validate(p.to_serve_config())
    return p


def app_of(p) -> dict:
    return p.to_serve_config()["applications"][0]


def deployments(p) -> dict[str, dict]:
    return {d["name"]: d for d in app_of(p)["deployments"]}


def spec_json(deployment: dict) -> dict:
    """A group's spec as its replicas read it: from the deployment's own options (rt.SPEC_ENV_VAR)."""
    return json.loads(deployment["ray_actor_options"]["runtime_env"]["env_vars"][rt.SPEC_ENV_VAR])


def specs(p) -> dict[str, rt.ServiceSpec]:
    """Every group's spec as the replicas rebuild it (the service's `env` from args), by deployment name."""
    env = app_of(p)["args"]["env"]
    return {d["name"]: rt.ServiceSpec.model_validate({**spec_json(d), "env": env}) for d in app_of(p)["deployments"]}


def non_ingress(p) -> list[str]:
    return [g["deployment"] for g in app_of(p)["args"]["groups"] if g["deployment"] != rt.REPLICA_DEPLOYMENT_NAME]


@pytest.fixture(scope="module")
def pd():
    return plan(SGLANG_PD, PD_ENV, network_namespaces=True)


# --- the SGLang PD service ----------------------------------------------------------------------------------


def test_pd_has_one_deployment_per_group_router_first(pd):
    assert [d["name"] for d in app_of(pd)["deployments"]] == [
        "ServiceReplica", "ServiceReplica-prefill", "ServiceReplica-decode"]
    assert [(g.name, g.role, g.deployment_name) for g in pd.groups] == [
        ("router", "router", "ServiceReplica"), ("prefill", "worker", "ServiceReplica-prefill"),
        ("decode", "worker", "ServiceReplica-decode")]


def test_pd_ray_actor_options_are_per_group(pd):
    d = deployments(pd)
    router = {k: v for k, v in d["ServiceReplica"]["ray_actor_options"].items() if k != "runtime_env"}
    assert router == {"num_cpus": 4.0}  # the runtime_env holds its spec only (spec_json)
    assert set(d["ServiceReplica"]["ray_actor_options"]["runtime_env"]) == {"env_vars"}
    for name in ("ServiceReplica-prefill", "ServiceReplica-decode"):
        opts = d[name]["ray_actor_options"]
        assert opts["num_gpus"] == 1.0
        assert opts["label_selector"] == {defaults.ACCELERATOR_LABEL_KEY: "H100"}
        assert opts["num_cpus"] == defaults.DEFAULT_NUM_CPUS  # no `cpu` in the group: the small default


def test_pd_replicas_and_autoscaling_are_per_group(pd):
    d = deployments(pd)
    assert d["ServiceReplica"]["num_replicas"] == 1 and "autoscaling_config" not in d["ServiceReplica"]
    prefill = d["ServiceReplica-prefill"]
    assert "num_replicas" not in prefill
    auto = prefill["autoscaling_config"]
    assert (auto["min_replicas"], auto["initial_replicas"], auto["max_replicas"]) == (1, 1, 4)
    assert auto["policy"]["policy_function"] == defaults.AUTOSCALING_POLICY
    assert auto["policy"]["policy_kwargs"]["target_rps"] == 3.0
    assert d["ServiceReplica-decode"]["num_replicas"] == 2 and "autoscaling_config" not in d["ServiceReplica-decode"]


def test_pd_args_name_the_groups_and_each_deployment_carries_its_spec(pd):
    args = app_of(pd)["args"]
    assert args == {"groups": [{"group": "router", "deployment": "ServiceReplica"},
                               {"group": "prefill", "deployment": "ServiceReplica-prefill"},
                               {"group": "decode", "deployment": "ServiceReplica-decode"}],
                    "env": {"HF_TOKEN": "hf_secret_value", "MODEL_ID": "meta-llama/Llama-3.1-8B-Instruct"}}
    # The env (secrets) never goes into a runtime_env, which Ray logs and puts on a command line.
    assert all(spec_json(d)["env"] == {} for d in app_of(pd)["deployments"])
    assert "hf_secret_value" not in json.dumps(app_of(pd)["deployments"])
    assert [s["name"] for s in rt.application_specs(app_of(pd))] == ["pd"] * 3
    assert rt.application_specs(app_of(pd))[0]["group"]["role"] == "router"  # the ingress group's first
    by_deployment = specs(pd)
    assert "--disaggregation-mode prefill" in by_deployment["ServiceReplica-prefill"].commands[1]
    assert "--disaggregation-mode decode" in by_deployment["ServiceReplica-decode"].commands[0]
    assert by_deployment["ServiceReplica"].commands[1].startswith("smg launch")
    assert by_deployment["ServiceReplica-prefill"].scaling.max_replicas == 4
    assert by_deployment["ServiceReplica-decode"].scaling is None


def test_pd_every_spec_carries_its_group(pd):
    groups = ["router", "prefill", "decode"]
    expected = {
        "ServiceReplica": rt.GroupSpec(name="router", deployment="ServiceReplica", role="router",
                                       router="sglang", groups=groups),
        "ServiceReplica-prefill": rt.GroupSpec(name="prefill", deployment="ServiceReplica-prefill",
                                               role="worker", router="sglang", groups=groups),
        "ServiceReplica-decode": rt.GroupSpec(name="decode", deployment="ServiceReplica-decode",
                                              role="worker", router="sglang", groups=groups),
    }
    assert {name: spec.group for name, spec in specs(pd).items()} == expected


def test_pd_every_spec_shares_the_service_fields(pd):
    all_specs = list(specs(pd).values())
    assert len(all_specs) == 3
    for spec in all_specs:
        assert spec.name == "pd" and spec.port == 8000 and spec.python == "3.12"
        assert spec.env == {"HF_TOKEN": "hf_secret_value", "MODEL_ID": "meta-llama/Llama-3.1-8B-Instruct"}
        assert [(p.path, p.method) for p in spec.probes] == [("/health", "get")]
        assert spec.auth.enabled is True
        assert spec.model is not None and spec.model.name == "meta-llama/Llama-3.1-8B-Instruct"


def test_pd_router_never_gets_a_network_namespace_its_fixed_port_workers_do(pd):
    s = specs(pd)
    assert s["ServiceReplica"].network_namespace is False
    assert s["ServiceReplica-prefill"].network_namespace is True
    assert s["ServiceReplica-decode"].network_namespace is True
    d = deployments(pd)
    # Without a namespace a fixed port means one replica per node; the namespaced workers may share one.
    assert d["ServiceReplica"]["max_replicas_per_node"] == 1
    assert "max_replicas_per_node" not in d["ServiceReplica-prefill"]


def test_pd_without_network_namespaces_no_group_gets_one():
    p = plan(SGLANG_PD, PD_ENV, network_namespaces=False)
    assert [s.network_namespace for s in specs(p).values()] == [False, False, False]
    assert all(d["max_replicas_per_node"] == 1 for d in app_of(p)["deployments"])


def test_pd_dstack_gpus_num_is_left_to_the_shell(pd):
    s = specs(pd)
    for name in ("ServiceReplica-prefill", "ServiceReplica-decode"):
        assert any("--tp $DSTACK_GPUS_NUM " in line for line in s[name].commands), s[name].commands
    assert "$DSTACK_GPUS_NUM" in spec_json(deployments(pd)["ServiceReplica-prefill"])["commands"][1]


def test_legacy_spelling_plans_the_same_serve_config():
    legacy = legacy_spelling(SGLANG_PD)
    assert "\nreplicas:\n" in legacy and "    count: 1..4\n" in legacy and "groups:" not in legacy
    assert (plan(legacy, PD_ENV, network_namespaces=True).to_serve_config()
            == plan(SGLANG_PD, PD_ENV, network_namespaces=True).to_serve_config())


# --- other shapes --------------------------------------------------------------------------------------------


def test_dynamo_roles_and_router_type_in_every_spec():
    p = plan(DYNAMO)
    s = specs(p)
    assert [(g.name, g.role) for g in p.groups] == [("frontend", "router"), ("workers", "worker")]
    assert list(s) == ["ServiceReplica", "ServiceReplica-workers"]
    assert {name: (spec.group.role, spec.group.router) for name, spec in s.items()} == {
        "ServiceReplica": ("router", "dynamo"), "ServiceReplica-workers": ("worker", "dynamo")}
    assert "$DSTACK_ROUTER_INTERNAL_IP" in s["ServiceReplica-workers"].commands[0]  # left to the shell too


def test_groups_without_a_router_are_members_and_the_first_is_the_ingress():
    p = plan(MEMBERS)
    s = specs(p)
    assert [(g.name, g.role, g.deployment_name) for g in p.groups] == [
        ("big", "member", "ServiceReplica"), ("small", "member", "ServiceReplica-small")]
    assert {name: (spec.group.role, spec.group.router) for name, spec in s.items()} == {
        "ServiceReplica": ("member", None), "ServiceReplica-small": ("member", None)}
    assert non_ingress(p) == ["ServiceReplica-small"]


def test_a_router_group_anywhere_is_the_ingress():
    text = DYNAMO.replace("  - name: frontend\n    replicas: 1\n    router: {type: dynamo}\n"
                          "    commands:\n      - python3 -m dynamo.frontend --http-host 0.0.0.0 --http-port 8000\n", "")
    text = text.replace("port: 8000\n", "  - name: frontend\n    replicas: 1\n    router: {type: dynamo}\n"
                                        "    commands: [python3 -m dynamo.frontend]\nport: 8000\n", 1)
    p = plan(text)
    assert [g.name for g in p.config.replica_groups] == ["workers", "frontend"]
    assert [(g.name, g.deployment_name) for g in p.groups] == [
        ("workers", "ServiceReplica-workers"), ("frontend", "ServiceReplica")]
    assert p.spec.group.name == "frontend" and p.deployment["name"] == "ServiceReplica"
    assert non_ingress(p) == ["ServiceReplica-workers"]


def test_only_the_ingress_spec_carries_its_replica_count():
    p = plan(MEMBERS)
    s = specs(p)
    assert s["ServiceReplica"].replicas == 3
    assert s["ServiceReplica-small"].replicas == 1  # 0..5: Serve scales it without restarting anything
    pd = plan(SGLANG_PD, PD_ENV)
    assert [spec.replicas for spec in specs(pd).values()] == [1, 1, 1]  # decode has 2, prefill 1..4


def test_a_non_ingress_count_change_does_not_change_its_spec():
    """Serve restarts a deployment's replicas when its options change: scaling a group must not."""
    more = plan(MEMBERS.replace("replicas: 0..5", "replicas: 2..9"))
    fewer = plan(MEMBERS)
    assert specs(more)["ServiceReplica-small"].model_copy(update={"scaling": None}) == \
        specs(fewer)["ServiceReplica-small"].model_copy(update={"scaling": None})


def test_display_redacts_secret_env_in_every_group(pd):
    services = rt.application_specs(pd.to_display_dict()["applications"][0])
    assert len(services) == 3
    for service in services:
        assert service["env"] == {"HF_TOKEN": defaults.REDACTED, "MODEL_ID": "meta-llama/Llama-3.1-8B-Instruct"}
    # The Serve config itself keeps the values (the replicas need them), and display did not change it.
    assert all(s.env["HF_TOKEN"] == "hf_secret_value" for s in specs(pd).values())
    assert "hf_secret_value" not in yaml.safe_dump(pd.to_display_dict())


def test_summary_names_each_group_its_role_and_deployment(pd):
    lines = pd.summary_lines()
    assert lines[0].startswith("service pd: route /pd, port 8000, 3 replica groups")
    assert "sglang router group 'router'" in lines[0]
    for name, role, deployment in [("router", "router", "ServiceReplica"),
                                   ("prefill", "worker", "ServiceReplica-prefill"),
                                   ("decode", "worker", "ServiceReplica-decode")]:
        assert any(line.startswith(f"group {name} ({role}, deployment {deployment}): port 8000")
                   for line in lines), lines
    assert "  replicas: 1..4, autoscaling at 3 rps per replica (window 60s, up delay 300s, down delay 600s)" in lines
    assert sum("admitted types: H100" in line for line in lines) == 2


def test_summary_of_groups_without_a_router():
    lines = plan(MEMBERS).summary_lines()
    assert "every group's replicas take traffic" in lines[0]
    assert any(line.startswith("group small (member, deployment ServiceReplica-small)") for line in lines)


def test_a_service_without_groups_plans_as_before_groups():
    p = plan(NO_GROUPS)
    assert p.groups == []
    app = app_of(p)
    assert list(app["args"]) == ["service"]  # no `groups` key
    assert [d["name"] for d in app["deployments"]] == [rt.REPLICA_DEPLOYMENT_NAME]
    service = app["args"]["service"]
    # Exactly the spec's fields before groups (commit 0f6088f): no `group` key, so the Serve config of a running
    # service is unchanged and upgrading ray-dstack does not restart it.
    assert set(service) == {
        "auth", "commands", "entrypoint", "env", "image", "model", "name", "network_namespace", "port",
        "port_from_env", "probes", "python", "rate_limits", "ready_timeout_s", "registry_auth", "replicas",
        "request_timeout_s", "scaling", "shm_size_bytes", "trusted_proxies", "working_dir"}
    assert rt.ServiceSpec.model_validate(service).group is None
    assert service["replicas"] == 1 and service["scaling"]["max_replicas"] == 3
    d = app["deployments"][0]
    assert set(d) == {"name", "ray_actor_options", "max_ongoing_requests", "health_check_period_s",
                      "health_check_timeout_s", "graceful_shutdown_timeout_s", "graceful_shutdown_wait_loop_s",
                      "max_replicas_per_node", "autoscaling_config"}
    # A plain group's autoscaling policy reads no service counters (those are for non-ingress groups).
    assert set(d["autoscaling_config"]["policy"]["policy_kwargs"]) == {
        "target_rps", "window_s", "scale_up_delay_s", "scale_down_delay_s"}
    assert d["ray_actor_options"]["label_selector"] == {defaults.ACCELERATOR_LABEL_KEY: "A10G"}
    assert (p.spec, p.deployment) == (rt.ServiceSpec.model_validate(service), d)
    assert not any(line.startswith("group ") for line in p.summary_lines())


def test_finalized_sets_the_token_digest_and_drain_timeout_in_every_group(pd):
    final = pd.finalized(token_sha256=DIGEST, drain_timeout_s=42.0)
    assert [s.auth.token_sha256 for s in specs(final).values()] == [DIGEST] * 3
    assert [d["graceful_shutdown_timeout_s"] for d in app_of(final)["deployments"]] == [42.0] * 3
    assert [s.auth.token_sha256 for s in specs(pd).values()] == [None] * 3  # the plan itself is unchanged
    assert final.to_serve_config() == plan(SGLANG_PD, PD_ENV, network_namespaces=True, token_sha256=DIGEST) \
        .finalized(token_sha256=DIGEST, drain_timeout_s=42.0).to_serve_config()


@pytest.mark.parametrize("spelling,path", [(lambda t: t, "groups[1].resources.gpu"),
                                           (legacy_spelling, "replicas[1].resources.gpu")],
                         ids=["groups", "replicas-list"])
def test_a_gpu_no_type_satisfies_names_its_group(spelling, path):
    text = spelling(SGLANG_PD.replace("gpu: H100:1\n", "gpu: H100:200GB:1\n", 1))
    with pytest.raises(PlanError) as info:
        build_plan(load(text, environ=PD_ENV))
    assert [(p.path, p.message) for p in info.value.problems] == [
        (path, "No known GPU type satisfies `H100:200GB:1`")]


def test_plan_console_script_prints_serve_input():
    script = Path(sys.executable).parent / "ray-dstack"
    done = subprocess.run([str(script), "plan", "configs/router-local-chat.dstack.yml"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    data = yaml.safe_load(done.stdout)
    ServeDeploySchema.model_validate(data)
    head = done.stdout[: done.stdout.index("applications:")]
    assert head and all(line.startswith("#") for line in head.splitlines()), head
    app = data["applications"][0]
    assert [d["name"] for d in app["deployments"]] == ["ServiceReplica", "ServiceReplica-workers"]
    assert rt.application_specs(app)[0]["group"]["role"] == "router"
    assert "# group workers (worker, deployment ServiceReplica-workers): port 8000" in done.stdout


PRIVATE_WORKERS = """
type: service
name: private
port: 8000
registry_auth:
  username: bob
  password: s3cret
groups:
  - name: router
    replicas: 1
    router: {type: sglang}
    commands: [smg launch --host 127.0.0.1 --port 8000]
  - name: workers
    replicas: 2
    image: ghcr.io/org/private:1
"""


def test_registry_auth_of_a_worker_groups_image_is_handed_over_even_when_the_router_has_no_image():
    p = plan(PRIVATE_WORKERS)
    assert p.spec.registry_auth is None and p.registry_auth is not None and p.pulls_images
    done = p.finalized(token_sha256=None, registry_auth_key="registry-auth/private/abc")
    by_name = {g.name: g.spec for g in done.groups}
    assert by_name["workers"].registry_auth.kv_key == "registry-auth/private/abc"
    assert by_name["router"].registry_auth is None  # the router pulls nothing


def test_plan_warns_when_an_sglang_router_listens_on_every_address():
    exposed = plan(PRIVATE_WORKERS.replace("--host 127.0.0.1", "--host 0.0.0.0"))
    assert any("admin API" in w and "--host 127.0.0.1" in w for w in exposed.warnings), exposed.warnings
    assert not any("admin API" in w for w in plan(PRIVATE_WORKERS).warnings)


def test_without_a_router_a_group_that_may_be_at_zero_is_not_the_ingress():
    """The ingress group takes every request: a first group at 0 would leave a ready second group idle."""
    zero = """
type: service
name: zero
port: 8000
groups:
  - name: spare
    replicas: 0..2
    scaling: {metric: rps, target: 5}
    commands: [python3 -m http.server $RAY_DSTACK_PORT]
  - name: main
    replicas: 2
    commands: [python3 -m http.server $RAY_DSTACK_PORT]
"""
    p = plan(zero)
    assert [(g.name, g.deployment_name) for g in p.groups] == [
        ("spare", "ServiceReplica-spare"), ("main", "ServiceReplica")]
    assert p.spec.group.name == "main" and p.deployment["num_replicas"] == 2
