"""The gateway application in the merged Serve config: mounted at the ingress root (for `GET /health`),
present with any service, and carrying each model's request timeout (it bounds the gateway's retries)."""

from ray.serve.schema import ServeDeploySchema

from ray_dstack.config import parse_service
from ray_dstack.deploy import apps
from ray_dstack.plan import build_plan


def _details(text: str, **others: dict) -> dict:
    plan = build_plan(parse_service(text, "svc.dstack.yml"), token_sha256="ab" * 32)
    app = plan.finalized(token_sha256="ab" * 32, request_timeout_s=7.5).application()
    applications = {"svc": {"status": "RUNNING", "deployed_app_config": app, "deployments": {}}}
    for name, cfg in others.items():
        applications[name] = {"status": "RUNNING", "deployed_app_config": cfg, "deployments": {}}
    return {"http_options": {"host": "0.0.0.0", "port": 8100}, "applications": applications}


def _gateway(merged: dict) -> dict | None:
    return next((a for a in merged["applications"] if a["name"] == "ray-dstack-gateway"), None)


def test_the_gateway_is_mounted_at_the_root_and_carries_the_request_timeout():
    merged = apps.merged_config(_details("type: service\nname: svc\ncommands: [x]\nport: 8000\nmodel: m1\n"))
    gateway = _gateway(merged)
    assert gateway["route_prefix"] == "/"
    route = gateway["deployments"][0]["user_config"]["routes"]["m1"]
    assert route["app"] == "svc" and route["request_timeout_s"] == 7.5
    ServeDeploySchema.model_validate(merged)


def test_a_service_without_a_model_still_gets_the_health_route():
    merged = apps.merged_config(_details("type: service\nname: svc\ncommands: [x]\nport: 8000\n"))
    gateway = _gateway(merged)
    assert gateway is not None and gateway["deployments"][0]["user_config"]["routes"] == {}


def test_the_gateway_stays_at_v1_when_a_foreign_app_owns_the_root():
    foreign = {"name": "web", "import_path": "x:y", "route_prefix": "/"}
    merged = apps.merged_config(_details("type: service\nname: svc\ncommands: [x]\nport: 8000\nmodel: m1\n",
                                         web=foreign))
    assert _gateway(merged)["route_prefix"] == "/v1"
    ServeDeploySchema.model_validate(merged)


def test_the_routes_carry_the_rate_limits_and_trusted_proxies_and_uvicorn_trusts_no_one():
    text = ("type: service\nname: svc\ncommands: [x]\nport: 8000\nmodel: m1\n"
            "rate_limits:\n  - {prefix: /v1, rps: 2, burst: 3}\n")
    merged = apps.merged_config(_details(text))
    gateway = _gateway(merged)
    user_config = gateway["deployments"][0]["user_config"]
    route = user_config["routes"]["m1"]
    assert [(r["prefix"], r["rps"], r["burst"]) for r in route["rate_limits"]] == [("/v1", 2.0, 3)]
    assert route["trusted_proxies"] == []
    assert user_config["replicas"] == gateway["deployments"][0]["num_replicas"] == apps.GATEWAY_REPLICAS
    assert gateway["runtime_env"]["env_vars"]["FORWARDED_ALLOW_IPS"] == "none"
    ServeDeploySchema.model_validate(merged)
