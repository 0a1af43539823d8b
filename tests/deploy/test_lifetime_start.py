"""What a redeploy's `schedule`/`max_duration` count from: the running service's own start while it is on, else
the deploy's time (a service `max_duration` stopped starts afresh, as dstack's next `apply` submits a new run)."""

from __future__ import annotations

from ray_dstack.deploy.apps import lifetime_start, policy_lifetime
from ray_dstack.plan import build_plan
from tests.support.config_helpers import BASE, load

T0 = 1_800_000_000.0


def app_config(extra: str, deployed_at: float | None) -> dict:
    plan = build_plan(load(BASE + extra))
    return plan.finalized(token_sha256=None, deployed_at=deployed_at).application()


def test_a_running_service_keeps_its_start_and_a_stopped_one_starts_afresh():
    running = app_config("max_duration: 100s\n", T0)
    assert policy_lifetime(running) == {"deployed_at": T0, "crons": [], "max_duration_s": 100.0}
    assert lifetime_start(running, T0 + 50) == T0
    assert lifetime_start(running, T0 + 150) == T0 + 150  # stopped by max_duration: a redeploy starts it again


def test_a_new_service_or_one_without_a_lifetime_counts_from_now():
    assert lifetime_start(None, T0) == T0
    assert lifetime_start(app_config("", None), T0) == T0


def test_a_scheduled_service_that_has_not_started_counts_from_now():
    scheduled = app_config("schedule: {cron: '0 9 * * 0'}\n", T0)
    assert lifetime_start(scheduled, T0 + 10) == T0 + 10
