"""Drain and health-check options of the service deployment (`deploy --drain-timeout`)."""

from ray.serve.schema import ServeDeploySchema

from ray_dstack.config import parse_service
from ray_dstack.plan import build_plan
from ray_dstack.plan import defaults

YAML = "type: service\nname: svc\ncommands: [x]\nport: 8000\nreplicas: 2\nmodel: m1\n"


def test_default_drain_and_a_short_health_check_period():
    dep = build_plan(parse_service(YAML, "svc.dstack.yml"), token_sha256=None).deployment
    assert dep["graceful_shutdown_timeout_s"] == defaults.GRACEFUL_SHUTDOWN_TIMEOUT_S == 300.0  # dstack's stop_duration default
    assert dep["graceful_shutdown_wait_loop_s"] == defaults.GRACEFUL_SHUTDOWN_WAIT_LOOP_S
    assert dep["health_check_period_s"] <= 2.0  # Serve drops a dead backend's replica after 3 failed checks


def test_drain_timeout_reaches_the_serve_config_without_changing_the_plan_it_came_from():
    plan = build_plan(parse_service(YAML, "svc.dstack.yml"), token_sha256=None)
    final = plan.finalized(token_sha256=None, drain_timeout_s=5.0)
    app = final.application()
    assert app["deployments"][0]["graceful_shutdown_timeout_s"] == 5.0
    assert plan.deployment["graceful_shutdown_timeout_s"] == 300.0
    assert plan.finalized(token_sha256=None).deployment["graceful_shutdown_timeout_s"] == 300.0
    ServeDeploySchema.model_validate({"applications": [app]})
