"""Shorthand and defaults mean what they mean in dstack."""

from __future__ import annotations

import pytest

from ray_dstack.config import name_from_filename, parse_service
from tests.support.config_helpers import BASE, load


def test_defaults():
    c = load(BASE).config
    assert c.name == "serve" and c.auth is True and c.home_dir == "/root"
    assert (c.replicas.min, c.replicas.max) == (1, 1)
    assert (c.resources.cpu.min, c.resources.cpu.max) == (2, None)
    assert c.resources.memory.min == 8 and c.resources.disk.size.min == 100
    assert c.port.container_port == 8000 and c.scaling is None


@pytest.mark.parametrize("value,expected", [("3.1", "3.10"), ("'3.11'", "3.11"), ("3.9", "3.9")])
def test_python(value, expected):
    assert load(BASE + f"python: {value}\n").config.python == expected


def test_env_list_and_placeholders():
    text = BASE + "env:\n  - A=x=y\n  - B=\n  - C\n  - D\n"
    c = load(text, environ={"C": "from-env", "D": "env"}, env_overrides={"D": "cli"}).config
    assert c.env == {"A": "x=y", "B": "", "C": "from-env", "D": "cli"}


def test_env_mapping():
    assert load(BASE + "env:\n  A: 1\n  B: two\n").config.env == {"A": "1", "B": "two"}


@pytest.mark.parametrize("value,port,local", [("8000", 8000, None), ("'8080'", 8080, None), ("'80:8000'", 8000, 80)])
def test_port(value, port, local):
    c = parse_service(f"type: service\ncommands: [x]\nport: {value}\n", "a.dstack.yml", environ={}).config
    assert (c.port.container_port, c.port.local_port) == (port, local)


@pytest.mark.parametrize(
    "value,lo,hi", [("2", 2, 2), ("'1..4'", 1, 4), ("' 1 .. 4 '", 1, 4), ("'..3'", 0, 3), ("{min: 2, max: 5}", 2, 5)]
)
def test_replicas(value, lo, hi):
    scaling = "" if lo == hi else "scaling: {metric: rps, target: 2}\n"
    c = load(BASE + f"replicas: {value}\n" + scaling).config
    assert (c.replicas.min, c.replicas.max) == (lo, hi)


def test_scaling_durations():
    c = load(BASE + "replicas: 0..2\nscaling: {metric: rps, target: 2.5, scale_up_delay: 30s, scale_down_delay: 1h, window: '90'}\n").config
    s = c.scaling
    assert (s.target, s.scale_up_delay, s.scale_down_delay, s.window) == (2.5, 30, 3600, 90)
    d = load(BASE + "replicas: 0..2\nscaling: {metric: rps, target: 1}\n").config.scaling
    assert (d.scale_up_delay, d.scale_down_delay, d.window) == (300, 600, 60)


def test_model_shorthand_and_formats():
    m = load(BASE + "model: meta/llama\n").config.model
    assert (m.type, m.name, m.format, m.prefix) == ("chat", "meta/llama", "openai", "/v1")
    t = load(BASE + "model: {name: m, format: tgi, chat_template: '{{x}}', eos_token: '</s>'}\n").config.model
    assert (t.format, t.chat_template, t.eos_token, t.prefix) == ("tgi", "{{x}}", "</s>", None)


@pytest.mark.parametrize(
    "gpu,names,memory,count",
    [
        ("24GB", None, (24, 24), (1, 1)),
        ("80GB:2", None, (80, 80), (2, 2)),
        ("A100:2", ["A100"], None, (2, 2)),
        ("A100,H100:40GB:1..2", ["A100", "H100"], (40, 40), (1, 2)),
        ("40GB:A100", ["A100"], (40, 40), (1, 1)),
        ("'2:24GB..'", None, (24, None), (2, 2)),
        ("'16 gb..80GB'", None, (16, 80), (1, 1)),
        ("512MB", None, (0.5, 0.5), (1, 1)),
        ("2", None, None, (2, 2)),
        ("{name: [L4], count: 1..2, memory: 24GB}", ["L4"], (24, 24), (1, 2)),
    ],
)
def test_gpu(gpu, names, memory, count):
    g = load(BASE + f"resources:\n  gpu: {gpu}\n").config.resources.gpu
    assert g.name == names
    assert (None if g.memory is None else (g.memory.min, g.memory.max)) == memory
    assert (g.count.min, g.count.max) == count


def test_resources_units():
    r = load(BASE + "resources:\n  memory: 1TB\n  shm_size: 16gb\n  disk: {size: 200GB..}\n  cpu: 4..8\n").config.resources
    assert (r.memory.min, r.shm_size, r.disk.size.min, r.cpu.min, r.cpu.max) == (1024, 16, 200, 4, 8)
    assert load(BASE + "resources:\n  disk: 200GB\n").config.resources.disk.size.max == 200


def test_ignored_fields_warn():
    loaded = load(BASE + "backends: [aws]\nspot_policy: auto\nmax_price: 1.5\n")
    assert loaded.warnings[0].startswith("`backends` is ignored on Ray")
    assert len(loaded.warnings) == 3 and all("is ignored on Ray" in w for w in loaded.warnings)


def test_registry_auth_secret():
    c = load(BASE + "env: [PW]\nregistry_auth:\n  username: me\n  password: ${{ env.PW }}\n", environ={"PW": "s3cret"}).config
    assert c.registry_auth.password.get_secret_value() == "s3cret"
    plain = load(BASE + "registry_auth: {username: me, password: hunter2}\n").config
    assert "hunter2" not in repr(plain) and "hunter2" not in plain.model_dump_json()


def test_probes_and_rate_limits():
    c = load(BASE + "probes: [{type: http, url: /health, interval: 5s, timeout: 2, ready_after: 3}]\n"
             "rate_limits: [{prefix: /v1, key: {type: header, header: X-Api-Key}, rps: 2, burst: 5}]\n").config
    assert (c.probes[0].url, c.probes[0].interval, c.probes[0].timeout, c.probes[0].ready_after) == ("/health", 5, 2, 3)
    assert c.rate_limits[0].key.header == "X-Api-Key"


@pytest.mark.parametrize(
    "filename,name",
    [("serve.dstack.yml", "serve"), ("My_Service.dstack.yml", "my-service"), ("7b.dstack.yml", "svc-7b"), ("x/.dstack.yml", "x")],
)
def test_name_from_filename(filename, name):
    assert name_from_filename(filename) == name


def test_name_override():
    assert load(BASE + "name: a\n", name="other").config.name == "other"
