"""Probes and rate limits in the plan: dstack's fields carried to the replica, the default model probe."""

from __future__ import annotations

import json

from ray_dstack.plan import build_plan
from ray_dstack.spec import ServiceSpec
from tests.support.config_helpers import BASE, load


def spec_of(text: str) -> ServiceSpec:
    plan = build_plan(load(text))
    # What the replica gets: the spec survives the trip through Serve's args.
    return ServiceSpec.model_validate(plan.application()["args"]["service"])


def test_configured_probes_all_fields():
    s = spec_of(BASE + """probes:
  - {type: http, url: /a, method: put, headers: [{name: X-A, value: b}], body: hi, timeout: 2, interval: 3,
     ready_after: 2, until_ready: true}
  - {type: http, url: /b}
""")
    a, b = s.probes
    assert (a.path, a.method, a.headers, a.body, a.timeout_s, a.interval_s, a.ready_after, a.until_ready) == (
        "/a", "put", [("X-A", "b")], "hi", 2.0, 3.0, 2, True)
    assert (b.path, b.method, b.interval_s, b.timeout_s) == ("/b", "get", 15.0, 10.0)


def test_default_probe_openai_model():
    s = spec_of(BASE + "model: {name: m1, format: openai, prefix: /api/v1}\n")
    (p,) = s.probes
    assert (p.method, p.path, p.until_ready, p.ready_after) == ("post", "/api/v1/chat/completions", True, 1)
    assert json.loads(p.body) == {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    assert ("Content-Type", "application/json") in p.headers


def test_default_probe_tgi_model():
    s = spec_of(BASE + "model: {name: m2, format: tgi, chat_template: x, eos_token: y}\n")
    (p,) = s.probes
    assert (p.method, p.path) == ("post", "/generate")
    assert json.loads(p.body)["parameters"] == {"max_new_tokens": 1}


def test_empty_probes_turn_the_default_off_and_no_model_no_probe():
    assert spec_of(BASE + "model: m\nprobes: []\n").probes == []
    assert spec_of(BASE).probes == []


def test_rate_limits_carried_and_no_warning():
    loaded = load(BASE + "replicas: 2\nrate_limits:\n  - {prefix: /v1/, rps: 0.5, burst: 3}\n"
                  "  - {key: {type: header, header: X-Api-Key}, rps: 10}\n")
    plan = build_plan(loaded)
    a, b = plan.spec.rate_limits
    assert (a.prefix, a.key, a.rps, a.burst) == ("/v1/", "ip_address", 0.5, 3)
    assert (b.prefix, b.key, b.header, b.rps, b.burst) == ("/", "header", "x-api-key", 10.0, 0)
    assert plan.spec.replicas == 2
    assert not any("rate_limits" in w for w in plan.warnings)
    summary = "\n".join(plan.summary_lines())
    assert "rate limit: /v1/ 0.5 rps, burst 3, per client address" in summary
    assert "rate limit: / 10 rps, burst 0, per header x-api-key" in summary


def test_old_spec_with_single_probe_still_reads():
    s = ServiceSpec.model_validate({"name": "a", "commands": ["x"], "port": 1, "probe": {"path": "/h"}})
    assert s.probe is not None and s.probe.path == "/h" and len(s.probes) == 1


def test_routing_prefix_reaches_the_spec_the_gateways_table_and_the_plan():
    from ray_dstack.deploy import apps

    plan = build_plan(load(BASE + "model: m\nrouting: prefix\nreplicas: 2\n"))
    assert ServiceSpec.model_validate(plan.application()["args"]["service"]).routing == "prefix"
    assert any(line.startswith("routing: prefix affinity") for line in plan.summary_lines())
    assert apps.gateway_routes({"svc": plan.application()})["m"]["routing"] == "prefix"


def test_prefix_is_the_default_for_a_model_service():
    plan = build_plan(load(BASE + "model: m\nreplicas: 2\n"))
    assert ServiceSpec.model_validate(plan.application()["args"]["service"]).routing == "prefix"
    assert any(line.startswith("routing: prefix affinity") for line in plan.summary_lines())


def test_least_connections_without_a_model_with_rate_limits_or_chosen_leaves_the_serve_config_as_it_was():
    limits = "rate_limits:\n  - {prefix: /, rps: 5}\n"
    for text in (BASE, BASE + "model: m\n" + limits, BASE + "model: m\nrouting: least_connections\n"):
        plan = build_plan(load(text))
        assert "routing" not in plan.application()["args"]["service"], text  # running services are not restarted
    assert not any(line.startswith("routing:") for line in build_plan(load(BASE)).summary_lines())
    assert "routing: least connections" in build_plan(load(BASE + "model: m\n" + limits)).summary_lines()


def test_prefix_routing_and_rate_limits_are_refused_together():
    from tests.support.config_helpers import errors

    err = errors(BASE + "model: m\nrouting: prefix\nrate_limits:\n  - {prefix: /, rps: 5}\n")
    assert any(p.path == "routing" and "rate_limits" in p.message for p in err.problems), str(err)


def test_a_router_group_and_prefix_routing_are_refused():
    from tests.support.config_helpers import errors

    text = """type: service
port: 8000
model: m
routing: prefix
groups:
  - name: router
    router: {type: sglang}
    replicas: 1
    commands: [smg launch --port 8000]
  - name: workers
    replicas: 2
    commands: [python3 -m http.server]
"""
    err = errors(text)
    assert any(p.path == "routing" and "router" in p.message for p in err.problems), str(err)
    # Without `routing`, the router group picks the worker: least connections to the router, no error.
    from tests.plan.test_plan_groups import specs

    plan = build_plan(load(text.replace("routing: prefix\n", "")))
    assert {spec.routing for spec in specs(plan).values()} == {"least_connections"}
