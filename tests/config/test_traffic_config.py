"""`probes` and `rate_limits`: dstack's fields, defaults and validation, errors with field path and line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.config_helpers import BASE, errors, load

BAD = [
    # (yaml, path, line, message substring)
    (BASE + "probes:\n  - type: http\n    method: get\n    body: x\n", "probes[0].body", 7,
     "A probe `body` is not allowed with method `get`"),
    (BASE + "probes:\n  - {type: http, method: head, body: x}\n", "probes[0].body", 5, "not allowed with method `head`"),
    (BASE + "probes:\n  - type: http\n    timeout: 0\n", "probes[0].timeout", 6, "must be at least 1s, got 0s"),
    (BASE + "probes:\n  - type: http\n    interval: 0s\n", "probes[0].interval", 6, "must be at least 1s"),
    (BASE + "probes:\n  - type: http\n    headers:\n      - name: X Bad\n        value: v\n",
     "probes[0].headers[0].name", 7, "Invalid header name `X Bad`"),
    (BASE + "probes:\n  - type: http\n    headers: [{name: X-A, value: ''}]\n", "probes[0].headers[0].value", 6,
     "at least 1 character"),
    (BASE + "probes:\n  - type: http\n    method: options\n", "probes[0].method", 6, "Input should be 'get'"),
    (BASE + "probes:\n  - type: http\n    url: health\n", "probes[0].url", 6, "must be a path starting with `/`"),
    (BASE + "probes:\n  - type: http\n    ready_after: 0\n", "probes[0].ready_after", 6, "greater than or equal to 1"),
    (BASE + "probes:\n  - url: /health\n", "probes[0].type", 5, "Field `type` is required"),
    (BASE + "probes:\n  - type: http\n    headers:\n" + "".join(f"      - {{name: H{i}, value: v}}\n" for i in range(17)),
     "probes[0].headers", 6, "At most 16 `headers`"),
    (BASE + "probes:\n  - type: http\n    body: '" + "x" * 2049 + "'\n    method: post\n", "probes[0].body", 6,
     "at most 2048 characters"),
    (BASE + "rate_limits:\n  - rps: -1\n", "rate_limits[0].rps", 5, "`rps` must be greater than 0, got -1"),
    (BASE + "rate_limits:\n  - rps: 0\n", "rate_limits[0].rps", 5, "`rps` must be greater than 0"),
    (BASE + "rate_limits:\n  - {rps: 1, burst: -2}\n", "rate_limits[0].burst", 5, "greater than or equal to 0"),
    (BASE + "rate_limits:\n  - rps: 1\n    key: {type: header}\n", "rate_limits[0].key", 6,
     "`header` is required when `type` is `header`"),
    (BASE + "rate_limits:\n  - rps: 1\n    key: {type: header, header: 'X Key'}\n", "rate_limits[0].key.header", 6,
     "Invalid header name `X Key`"),
    (BASE + "rate_limits:\n  - rps: 1\n    key: {type: cookie}\n", "rate_limits[0].key.type", 6, "Input should be"),
    (BASE + "rate_limits:\n  - {rps: 1, prefix: v1}\n", "rate_limits[0].prefix", 5, "`prefix` must start with `/`"),
    (BASE + "rate_limits:\n  - {rps: 1, prefix: /v1}\n  - {rps: 2, prefix: /v1/}\n", "rate_limits", 4,
     "rate_limits[1] and rate_limits[0] have the same `prefix`"),
]


@pytest.mark.parametrize("text,path,line,message", BAD, ids=[f"{c[1]}:{c[3][:30]}" for c in BAD])
def test_bad_values(text, path, line, message):
    err = errors(text)
    assert err.exit_code == 2
    matching = [p for p in err.problems if message in p.message]
    assert matching, str(err)
    assert (matching[0].path, matching[0].line) == (path, line)
    assert "Traceback" not in str(err) and "pydantic" not in str(err)


def test_probe_defaults_are_dstacks():
    p = load(BASE + "probes: [{type: http}]\n").config.probes[0]
    assert (p.url, p.method, p.headers, p.body, p.timeout, p.interval, p.ready_after, p.until_ready) == (
        "/", "get", [], None, 10, 15, 1, False)


def test_probe_every_field():
    c = load(BASE + """probes:
  - type: http
    url: /ready?deep=1
    method: POST
    headers:
      - {name: X-Probe, value: "1"}
      - {name: Content-Type, value: application/json}
    body: '{"q": 1}'
    timeout: 2s
    interval: 1m
    ready_after: 3
    until_ready: true
  - {type: http, url: /health}
""").config
    p = c.probes[0]
    assert (p.url, p.method, p.body, p.timeout, p.interval, p.ready_after, p.until_ready) == (
        "/ready?deep=1", "post", '{"q": 1}', 2, 60, 3, True)
    assert [(h.name, h.value) for h in p.headers] == [("X-Probe", "1"), ("Content-Type", "application/json")]
    assert len(c.probes) == 2


def test_rate_limit_defaults_and_fractional_rps():
    r = load(BASE + "rate_limits: [{rps: 0.5}]\n").config.rate_limits[0]
    assert (r.prefix, r.key.type, r.key.header, r.rps, r.burst) == ("/", "ip_address", None, 0.5, 0)


def test_probes_absent_vs_empty():
    assert "probes" not in load(BASE).config.model_fields_set
    assert "probes" in load(BASE + "probes: []\n").config.model_fields_set


def test_cli_plan_exits_2_with_field_and_line(tmp_path):
    path = tmp_path / "serve.dstack.yml"
    path.write_text(BASE + "probes:\n  - type: http\n    body: x\nrate_limits:\n  - rps: -3\n")
    run = subprocess.run([sys.executable, "-m", "ray_dstack.cli.main", "plan", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stdout + run.stderr
    out = run.stdout + run.stderr
    assert "serve.dstack.yml:6: probes[0].body: A probe `body` is not allowed with method `get`" in out
    assert "serve.dstack.yml:8: rate_limits[0].rps: `rps` must be greater than 0, got -3" in out
    assert "Traceback" not in out
