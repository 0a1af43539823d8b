"""Replica groups (dstack 0.21): `groups: [{name, replicas}]` (HEAD) and `replicas: [{name, count}]` (0.21.2).

Every rule of dstack's `ReplicaGroup` / `ServiceConfigurationParams` validators, each checked for its message,
its field path (spelled the way the file spells it) and its YAML line; the normalized `replica_groups`;
the warnings; and the replica-group services of dstack's docs parse.
"""

from __future__ import annotations

import re

import pytest

from ray_dstack.config import ReplicaGroup, RouterConfig, ScalingConfig
from ray_dstack.config.models.service import GROUP_RESOURCES_IGNORED
from tests.support.config_helpers import errors, load

HEAD_SPELLING = ("groups", "replicas")  # the top-level key, the count key
LEGACY_SPELLING = ("replicas", "count")
SPELLINGS = pytest.mark.parametrize("spelling", [HEAD_SPELLING, LEGACY_SPELLING], ids=["groups", "replicas-list"])


def grouped(items: list[str], spelling: tuple[str, str], after: str = "", before: str = "") -> str:
    """A service whose groups are `items`, one flow mapping per line from line 4 (`N:` is the count key).

    `before` goes between `port` and the groups (shifts the item lines), `after` after the last item.
    """
    key, count = spelling
    body = "".join(f"  - {{{item.replace('N:', count + ':')}}}\n" for item in items)
    return f"type: service\nport: 8000\n{before}{key}:\n{body}{after}"


def spelled(path: str, spelling: tuple[str, str]) -> str:
    """`G[1].N` → `groups[1].replicas` or `replicas[1].count`."""
    return path.replace("G[", spelling[0] + "[").replace(".N", "." + spelling[1])


def problem(text: str, message: str, environ: dict[str, str] | None = None):
    err = errors(text, environ)
    matching = [p for p in err.problems if p.message == message]
    assert matching, str(err)
    assert "pydantic" not in str(err) and "Traceback" not in str(err)
    return matching[0]


# --- one rule, one case: (items, after, path, line, message) ---------------------------------------------

OK = "N: 1, commands: [x]"
IN_GROUP = [
    # name
    (["name: A_b, N: 1, commands: [x]"], "", "G[0].name", 4,
     "Resource name should match regex '^[a-z0-9][a-z0-9-]{0,39}$'"),
    (["name: " + "a" * 41 + ", N: 1, commands: [x]"], "", "G[0].name", 4,
     "Resource name should match regex '^[a-z0-9][a-z0-9-]{0,39}$'"),
    # count
    (["commands: [x]"], "", "G[0].N", 4, "Field `N` is required"),
    (["N: '1..', commands: [x], scaling: {metric: rps, target: 1}"], "", "G[0].N", 4,
     "The maximum number of replicas is required"),
    (["N: '3..1', commands: [x], scaling: {metric: rps, target: 1}"], "", "G[0].N", 4, "Invalid range order: 3..1"),
    (["N: -1, commands: [x]"], "", "G[0].N.min", 4, "Input should be greater than or equal to 0"),
    # scaling
    ([OK, "N: 1..3, commands: [x]"], "", "G[1].N", 5,
     "When you set `replicas` to a range, ensure to specify `scaling`."),
    ([OK, "N: 2, commands: [x], scaling: {metric: rps, target: 1}"], "", "G[1].scaling", 5,
     "To use `scaling`, `replicas` must be set to a range."),
    (["N: 1..2, commands: [x], scaling: {metric: rps, target: 0}"], "", "G[0].scaling.target", 4,
     "`target` must be greater than 0, got 0"),
    # image sources within a group
    (["N: 1, image: ubuntu, python: '3.11'"], "", "G[0].python", 4,
     "`image` and `python` are mutually exclusive within a replica group"),
    (["N: 1, image: ubuntu, docker: true"], "", "G[0].docker", 4,
     "`image` and `docker` are mutually exclusive within a replica group"),
    (["N: 1, commands: [x], python: '3.11', docker: true"], "", "G[0].docker", 4,
     "`python` and `docker` are mutually exclusive within a replica group"),
    (["N: 1, commands: [x], nvcc: true, docker: true"], "", "G[0].docker", 4,
     "`nvcc` and `docker` are mutually exclusive within a replica group"),
    (["N: 1, commands: [x], docker: true, privileged: false"], "", "G[0].privileged", 4,
     "`privileged: false` is incompatible with `docker: true` within a replica group "
     "(docker-in-docker requires privileged mode)"),
    (["N: 1, commands: [x], python: 2.7"], "", "G[0].python", 4,
     "Unsupported python version `2.7` (use one of 3.8, 3.9, 3.10, 3.11, 3.12, 3.13)"),
    (["N: 1, commands: [x], spot_policy: cheap"], "", "G[0].spot_policy", 4,
     "Input should be 'spot', 'on-demand' or 'auto', got 'cheap'"),
    (["N: 1, commands: [x], router: {type: nginx}"], "", "G[0].router.type", 4,
     "Input should be 'sglang' or 'dynamo', got 'nginx'"),
    (["N: 1, commands: [x], router: sglang"], "", "G[0].router", 4,
     "Input should be a valid dictionary or instance of RouterConfig"),
    # a group has only the group fields (dstack: extra=forbid)
    (["N: 1, commands: [x], env: [A=1]"], "", "G[0].env", 4, "Unknown field `env`"),
    (["N: 1, commands: [x], port: 9000"], "", "G[0].port", 4, "Unknown field `port`"),
    # service-level rules
    (["name: a, N: 1, commands: [x]", "name: a, N: 1, commands: [y]"], "", "G[1].name", 5,
     "Duplicate replica group names found: ['a']. Each replica group must have a unique name."),
    ([OK, OK, "name: '1', N: 1, commands: [y]"], "", "G[2].name", 6,
     "Duplicate replica group names found: ['1']. Each replica group must have a unique name."),
    (["name: '1', N: 1, commands: [x]", OK], "", "G[1]", 5,
     "Duplicate replica group names found: ['1']. Each replica group must have a unique name."),
    ([OK], "scaling: {metric: rps, target: 1}\n", "scaling", 5,
     "Top-level `scaling` is not allowed when `groups` is set. Specify `scaling` in each replica group instead."),
    ([OK], "commands: [y]\n", "commands", 5,
     "Top-level `commands` is not allowed when `groups` is set. Specify `commands` in each replica group instead."),
    ([OK, "name: b, N: 1"], "", "G[1]", 5,
     "Replica group 'b': either `commands` or `image` must be set in the group, or `image` at the service level."),
    (["N: 1"], "", "G[0]", 4,
     "Replica group '0': either `commands` or `image` must be set in the group, or `image` at the service level."),
    (["N: 1, commands: [x], router: {}", "N: 1, commands: [y], router: {type: dynamo}"], "", "G[1].router", 5,
     "At most one replica group may specify `router`."),
    ([OK, "N: 2, commands: [x], router: {}"], "", "G[1].N", 5,
     "For now replica group with `router` must have `replicas: 1`."),
    (["N: 0, commands: [x], router: {}"], "", "G[0].N", 4,
     "For now replica group with `router` must have `replicas: 1`."),
    (["N: 1..2, commands: [x], router: {}, scaling: {metric: rps, target: 1}"], "", "G[0].N", 4,
     "For now replica group with `router` must have `replicas: 1`."),
]


@SPELLINGS
@pytest.mark.parametrize("items,after,path,line,message", IN_GROUP, ids=[f"{c[2]}:{c[4][:40]}" for c in IN_GROUP])
def test_rule(spelling, items, after, path, line, message):
    found = problem(grouped(items, spelling, after=after), message.replace("Field `N`", f"Field `{spelling[1]}`"))
    assert found.path == spelled(path, spelling)
    assert found.line == line


@SPELLINGS
def test_empty_list(spelling):
    found = problem(f"type: service\nport: 8000\n{spelling[0]}: []\n", "`groups` cannot be an empty list")
    assert (found.path, found.line) == (spelling[0], 3)


def test_replicas_and_groups_are_mutually_exclusive():
    for other in ("replicas: 2\n", "replicas:\n  - {count: 1, commands: [x]}\n"):
        found = problem(grouped([OK], HEAD_SPELLING, after=other), "`replicas` and `groups` are mutually exclusive")
        assert (found.path, found.line) == ("replicas", 5)


# One place only: (service-level YAML, group item) → the group field's path in the message.
ONE_PLACE = [
    ("image: ubuntu\n", "image: debian", "image"),
    ("python: '3.11'\n", "python: '3.12'", "python"),
    ("spot_policy: spot\n", "spot_policy: auto", "spot_policy"),
    ("reservation: r1\n", "reservation: r2", "reservation"),
    ("docker: true\n", "docker: false", "docker"),
    ("privileged: true\n", "privileged: false", "privileged"),
    ("nvcc: true\n", "nvcc: false", "nvcc"),
]


@SPELLINGS
@pytest.mark.parametrize("service,group,field", ONE_PLACE, ids=[c[2] for c in ONE_PLACE])
def test_one_place_only(spelling, service, group, field):
    text = grouped([f"name: a, {OK}", f"name: b, N: 1, commands: [y], {group}"], spelling, before=service)
    message = (f"`{field}` is set at both the service level and in replica group(s) ['b']. Set `{field}` in one "
               "place only — either at the service level (all groups inherit) or per group, but not both.")
    found = problem(text, message)
    assert (found.path, found.line) == (spelled(f"G[1].{field}", spelling), 6)


@pytest.mark.parametrize("field", ["docker", "privileged", "nvcc"])
def test_one_place_only_counts_a_service_level_false_as_unset(field):
    text = grouped([f"{OK}, {field}: true"], HEAD_SPELLING, before=f"{field}: false\n")
    assert load(text).config.groups[0].model_dump()[field] is True


# Service-level image source vs group-level one: (service YAML, group item, service field, group field).
CROSS = [
    ("image: ubuntu\n", "docker: true", "image", "docker"),
    ("image: ubuntu\n", "python: '3.11'", "image", "python"),
    ("image: ubuntu\n", "nvcc: true", "image", "nvcc"),
    ("docker: true\n", "image: ubuntu", "docker", "image"),
    ("docker: true\n", "python: '3.11'", "docker", "python"),
    ("docker: true\n", "nvcc: false", "docker", "nvcc"),
    ("python: '3.11'\n", "image: ubuntu", "python", "image"),
    ("python: '3.11'\n", "docker: true", "python", "docker"),
    ("nvcc: true\n", "image: ubuntu", "nvcc", "image"),
    ("nvcc: true\n", "docker: false", "nvcc", "docker"),
]


@SPELLINGS
@pytest.mark.parametrize("service,group,s_field,g_field", CROSS, ids=[f"{c[2]}-{c[3]}" for c in CROSS])
def test_cross_level_image_sources(spelling, service, group, s_field, g_field):
    text = grouped([f"name: a, {OK}", f"name: b, N: 1, commands: [y], {group}"], spelling, before=service)
    message = (f"Service-level `{s_field}` conflicts with group-level `{g_field}` in replica group(s) ['b']. "
               "These image-source fields are mutually exclusive.")
    found = problem(text, message)
    assert (found.path, found.line) == (spelled(f"G[1].{g_field}", spelling), 6)


def test_several_problems_each_with_its_line():
    text = grouped(["name: a, N: 1", "name: b, N: 1"], LEGACY_SPELLING, after="scaling: {metric: rps, target: 1}\n")
    err = errors(text)
    assert str(err).splitlines() == [
        "serve.dstack.yml:4: replicas[0]: Replica group 'a': either `commands` or `image` must be set in the group, "
        "or `image` at the service level.",
        "serve.dstack.yml:5: replicas[1]: Replica group 'b': either `commands` or `image` must be set in the group, "
        "or `image` at the service level.",
        "serve.dstack.yml:6: scaling: Top-level `scaling` is not allowed when `groups` is set. "
        "Specify `scaling` in each replica group instead.",
    ]


# --- what is accepted, and what it means ------------------------------------------------------------------


@SPELLINGS
def test_service_image_is_enough_and_top_level_rules_do_not_fire(spelling):
    # No top-level `commands` (a group's image or the service's is enough); ranges with per-group scaling.
    text = grouped(["N: 0..4, scaling: {metric: rps, target: 2}", "N: '..2', scaling: {metric: rps, target: 1}"],
                   spelling, before="image: lmsysorg/sglang\n")
    config = load(text).config
    assert (config.replicas.min, config.replicas.max) == (1, 1) and config.scaling is None
    assert [(g.replicas.min, g.replicas.max) for g in config.replica_groups] == [(0, 4), (0, 2)]
    assert all(g.scaling.target > 0 for g in config.groups)


def test_count_alias_and_replicas_wins():
    text = grouped(["N: 2, commands: [x]", "replicas: 3, count: 9, commands: [x]"], LEGACY_SPELLING)
    groups = load(text).config.groups
    assert [(g.replicas.min, g.replicas.max) for g in groups] == [(2, 2), (3, 3)]
    groups = load(grouped(["count: 2, commands: [x]"], HEAD_SPELLING)).config.groups
    assert groups[0].replicas.max == 2 and "count" not in groups[0].model_dump()


@SPELLINGS
def test_names_default_to_the_index(spelling):
    config = load(grouped([OK, "name: router, N: 1, commands: [y], router: {}", OK], spelling)).config
    assert [g.name for g in config.groups] == ["0", "router", "2"]
    assert [g.name for g in config.replica_groups] == ["0", "router", "2"]


def test_router_defaults():
    config = load(grouped(["N: 1, commands: [x], router: {}", "N: 1, commands: [y]"], HEAD_SPELLING)).config
    assert config.router_group is config.groups[0] and config.router_group.router == RouterConfig(type="sglang")
    config = load(grouped(["N: 1, commands: [y]", "N: 1, commands: [x], router: {type: dynamo}"], HEAD_SPELLING)).config
    assert config.router_group is config.groups[1] and config.groups[1].router.type == "dynamo"
    config = load(grouped(["N: 1, commands: [x], router: null", OK], HEAD_SPELLING)).config
    assert config.router_group is None


@pytest.mark.parametrize("value,expected", [("3.1", "3.10"), ("'3.11'", "3.11"), ("3.9", "3.9")])
def test_group_python(value, expected):
    assert load(grouped([f"N: 1, commands: [x], python: {value}"], HEAD_SPELLING)).config.groups[0].python == expected


def test_group_fields():
    group = load(grouped([
        "name: w, N: 1..4, scaling: {metric: rps, target: 3, window: 30s}, resources: {gpu: H200, cpu: 4},"
        " spot_policy: spot, reservation: cr-1, commands: one line, image: 'ghcr.io/org/img:1', privileged: true"
    ], LEGACY_SPELLING)).config.groups[0]
    assert group.name == "w" and (group.replicas.min, group.replicas.max) == (1, 4)
    assert group.scaling == ScalingConfig(metric="rps", target=3, window=30)
    assert group.resources.gpu.name == ["H200"] and group.resources.cpu.min == 4
    assert (group.spot_policy, group.reservation, group.commands) == ("spot", "cr-1", ["one line"])
    assert (group.image, group.privileged, group.docker, group.nvcc, group.router) == (
        "ghcr.io/org/img:1", True, None, None, None)
    # Defaults: dstack's ResourcesSpec(), not the top-level resources.
    plain = load(grouped([OK], HEAD_SPELLING, after="resources: {gpu: 1}\n")).config.groups[0]
    assert plain.resources.gpu is None and plain.resources.cpu.min == 2 and plain.commands == ["x"]


def test_replica_groups_without_groups():
    config = load("""\
        type: service
        port: 8000
        image: vllm/vllm-openai
        commands: [serve]
        replicas: 1..3
        scaling: {metric: rps, target: 5}
        resources: {gpu: 24GB}
        """).config
    assert config.groups is None and config.router_group is None
    (group,) = config.replica_groups
    assert isinstance(group, ReplicaGroup) and group.name == "0"
    assert (group.replicas.min, group.replicas.max) == (1, 3) and group.scaling.target == 5
    assert group.commands == ["serve"] and group.image == "vllm/vllm-openai" and group.python is None
    assert group.resources.gpu.memory.min == 24 and group.router is None
    plain = load("type: service\nport: 8000\ncommands: [x]\npython: 3.12\n").config.replica_groups[0]
    assert (plain.name, plain.replicas.min, plain.replicas.max, plain.python) == ("0", 1, 1, "3.12")
    assert plain.scaling is None and plain.image is None


@SPELLINGS
def test_replica_groups_with_groups_and_paths(spelling):
    config = load(grouped([OK, "name: dec, N: 1, commands: [y]"], spelling)).config
    assert config.replica_groups == config.groups and all(isinstance(g.name, str) for g in config.replica_groups)
    assert config.group_path(1) == f"{spelling[0]}[1]"
    assert config.group_path(1, "replicas") == f"{spelling[0]}[1].{spelling[1]}"
    assert config.group_path(0, "image") == f"{spelling[0]}[0].image"


def test_warnings():
    loaded = load(grouped(
        ["N: 1, commands: [x], spot_policy: spot, reservation: r, nvcc: true",
         "N: 1, commands: [y], docker: true", "N: 1, commands: [z], privileged: true, docker: false"],
        LEGACY_SPELLING, after="resources: {gpu: 1}\nregions: [us]\n"))
    assert loaded.warnings == [
        "`regions` is ignored on Ray (regions to provision in is up to the Ray cluster)",
        GROUP_RESOURCES_IGNORED,
        "`replicas[0].spot_policy` is ignored on Ray (`spot`, `on-demand` or `auto` is up to the Ray cluster)",
        "`replicas[0].reservation` is ignored on Ray (capacity reservation to use is up to the Ray cluster)",
        "`replicas[0].nvcc` is ignored on Ray (install the CUDA compiler is up to the Ray cluster)",
    ]  # group-level `docker` and `privileged` are honoured (tests/plan/test_plan_container_fields.py)
    assert GROUP_RESOURCES_IGNORED == (
        "top-level `resources` is ignored when `replicas`/`groups` lists groups: each group has its own")
    assert load(grouped([OK], HEAD_SPELLING)).warnings == []
    assert load("type: service\nport: 8000\ncommands: [x]\nresources: {gpu: 1}\n").warnings == []


# --- dstack's documented replica-group services ----------------------------------------------------------

# mkdocs/docs/concepts/services.md, "PD disaggregation", SMG (0.21.2 spelling, as the docs write it).
SGLANG_PD = """\
type: service
name: prefill-decode
image: lmsysorg/sglang:v0.5.10.post1

env:
  - HF_TOKEN
  - MODEL_ID=zai-org/GLM-4.5-Air-FP8

replicas:
  - count: 1
    # For now replica group with router must have count: 1
    commands:
      - pip install smg
      - |
        smg launch \\
          --host 0.0.0.0 \\
          --port 8000 \\
          --pd-disaggregation \\
          --prefill-policy cache_aware
    resources:
      cpu: 4
    router:
      type: sglang

  - count: 1..4
    scaling:
      metric: rps
      target: 3
    commands:
      - |
        python -m sglang.launch_server \\
          --model-path $MODEL_ID \\
          --disaggregation-mode prefill \\
          --disaggregation-transfer-backend nixl \\
          --port 8000 \\
          --disaggregation-bootstrap-port 8998
    resources:
      gpu: H200

  - count: 1..8
    scaling:
      metric: rps
      target: 2
    commands:
      - |
        python -m sglang.launch_server \\
          --model-path $MODEL_ID \\
          --disaggregation-mode decode \\
          --disaggregation-transfer-backend nixl \\
          --port 8000
    resources:
      gpu: H200

port: 8000
model: zai-org/GLM-4.5-Air-FP8

# Custom probe is required for PD disaggregation.
probes:
  - type: http
    url: /health
    interval: 15s
"""

# mkdocs/docs/concepts/services.md, "PD disaggregation", Dynamo.
DYNAMO_PD = """\
type: service
name: dynamo-pd

env:
  - HF_TOKEN
  - MODEL_ID=zai-org/GLM-4.5-Air-FP8

replicas:
  - count: 1
    docker: true
    commands:
      - apt-get update
      - apt-get install -y python3-dev python3-venv
      - python3 -m venv ~/dyn-venv
      - source ~/dyn-venv/bin/activate
      - pip install -U pip
      - pip install "ai-dynamo[sglang]==1.1.1"
      - git clone https://github.com/ai-dynamo/dynamo.git
      # Brings up the NATS / etcd compose stack and runs the Dynamo HTTP frontend.
      - docker compose -f dynamo/dev/docker-compose.yml up -d
      - |
        python3 -m dynamo.frontend \\
          --http-host 0.0.0.0 --http-port 8000 \\
          --discovery-backend etcd --router-mode kv \\
          --kv-cache-block-size 64
    resources:
      cpu: 4
    router:
      type: dynamo

  - count: 1..4
    scaling:
      metric: rps
      target: 3
    python: "3.12"
    nvcc: true
    commands:
      - export ETCD_ENDPOINTS="http://$DSTACK_ROUTER_INTERNAL_IP:2379"
      - export NATS_SERVER="nats://$DSTACK_ROUTER_INTERNAL_IP:4222"
      - export DYN_SYSTEM_PORT="8000"
      - |
        until (echo > /dev/tcp/$DSTACK_ROUTER_INTERNAL_IP/2379) 2>/dev/null \\
           && (echo > /dev/tcp/$DSTACK_ROUTER_INTERNAL_IP/4222) 2>/dev/null; do
          echo "waiting for etcd/NATS on $DSTACK_ROUTER_INTERNAL_IP..."; sleep 3
        done
      - pip install "ai-dynamo[sglang]==1.1.1"
      - |
        python3 -m dynamo.sglang \\
          --model-path $MODEL_ID --served-model-name $MODEL_ID \\
          --discovery-backend etcd --host 0.0.0.0 \\
          --page-size 64 \\
          --disaggregation-mode prefill --disaggregation-transfer-backend nixl
    resources:
      gpu: H200

  - count: 1..8
    scaling:
      metric: rps
      target: 2
    python: "3.12"
    nvcc: true
    commands:
      - export ETCD_ENDPOINTS="http://$DSTACK_ROUTER_INTERNAL_IP:2379"
      - export NATS_SERVER="nats://$DSTACK_ROUTER_INTERNAL_IP:4222"
      - export DYN_SYSTEM_PORT="8000"
      - pip install "ai-dynamo[sglang]==1.1.1"
      - |
        python3 -m dynamo.sglang \\
          --model-path $MODEL_ID --served-model-name $MODEL_ID \\
          --discovery-backend etcd --host 0.0.0.0 \\
          --page-size 64 \\
          --disaggregation-mode decode --disaggregation-transfer-backend nixl
    resources:
      gpu: H200

port: 8000
model: zai-org/GLM-4.5-Air-FP8

# Custom probe is required for PD disaggregation.
probes:
  - type: http
    url: /health
    interval: 15s
"""

# An SGLang router (SMG) in front of plain (not disaggregated) workers, in HEAD's spelling.
SGLANG_ROUTER = """\
type: service
name: sglang-router
image: lmsysorg/sglang:v0.5.10.post1

env:
  - MODEL_ID=deepseek-ai/DeepSeek-R1-Distill-Llama-8B

groups:
  - name: router
    replicas: 1
    commands:
      - pip install smg
      - smg launch --host 0.0.0.0 --port 8000 --policy cache_aware
    resources:
      cpu: 4
    router: {}

  - name: workers
    replicas: 1..4
    scaling:
      metric: rps
      target: 10
    commands:
      - python -m sglang.launch_server --model-path $MODEL_ID --host 0.0.0.0 --port 8000
    resources:
      gpu: 24GB

port: 8000
model: deepseek-ai/DeepSeek-R1-Distill-Llama-8B
"""


def head_spelling(text: str) -> str:
    """0.21.2's `replicas: [- count: ...]` → HEAD's `groups: [- replicas: ...]`."""
    return re.sub(r"^  - count:", "  - replicas:", re.sub(r"^replicas:$", "groups:", text, flags=re.M), flags=re.M)


@pytest.mark.parametrize("convert", [lambda t: t, head_spelling], ids=["0.21.2", "head"])
def test_sglang_pd_disaggregation(convert):
    config = load(convert(SGLANG_PD), environ={"HF_TOKEN": "t"}).config
    router, prefill, decode = config.replica_groups
    assert [g.name for g in config.replica_groups] == ["0", "1", "2"]
    assert config.router_group is router and router.router.type == "sglang"
    assert (router.replicas.min, router.replicas.max, router.resources.cpu.min, router.resources.gpu) == (1, 1, 4, None)
    assert "--pd-disaggregation" in router.commands[1] and router.commands[0] == "pip install smg"
    assert (prefill.replicas.min, prefill.replicas.max, prefill.scaling.target) == (1, 4, 3)
    assert (decode.replicas.min, decode.replicas.max, decode.scaling.target) == (1, 8, 2)
    assert prefill.resources.gpu.name == ["H200"] and "--disaggregation-mode decode" in decode.commands[0]
    assert config.image == "lmsysorg/sglang:v0.5.10.post1" and config.model.name == "zai-org/GLM-4.5-Air-FP8"
    assert config.probes[0].url == "/health" and config.commands == []


@pytest.mark.parametrize("convert", [lambda t: t, head_spelling], ids=["0.21.2", "head"])
def test_dynamo_pd_disaggregation(convert):
    loaded = load(convert(DYNAMO_PD), environ={"HF_TOKEN": "t"})
    config = loaded.config
    router, prefill, decode = config.replica_groups
    assert config.router_group is router and router.router == RouterConfig(type="dynamo")
    assert router.docker is True and config.image is None
    assert (prefill.python, prefill.nvcc, decode.python, decode.nvcc) == ("3.12", True, "3.12", True)
    assert (prefill.replicas.max, decode.replicas.max) == (4, 8)
    key = "replicas" if convert is not head_spelling else "groups"
    assert not any("docker" in warning for warning in loaded.warnings)  # honoured: tests/plan
    assert f"`{key}[1].nvcc` is ignored on Ray (install the CUDA compiler is up to the Ray cluster)" in loaded.warnings


def test_sglang_router():
    config = load(SGLANG_ROUTER).config
    router, workers = config.replica_groups
    assert (router.name, workers.name) == ("router", "workers")
    assert config.router_group is router and router.router.type == "sglang"
    assert (workers.replicas.min, workers.replicas.max) == (1, 4) and workers.resources.gpu.memory.min == 24
    assert config.group_path(1, "replicas") == "groups[1].replicas"
