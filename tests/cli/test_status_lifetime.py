"""`status` for a service with `max_duration` / `schedule`: when it runs, read from the Serve config the plan
writes (its autoscaling policy's `lifetime`), as the policy itself decides it."""

from __future__ import annotations

import copy
from datetime import datetime, timezone

from ray_dstack.cli.status_cmds import lifetime_line, lifetime_summary
from ray_dstack.plan import build_plan
from tests.support.config_helpers import BASE, load

H = 3600.0
MONDAY = datetime(2026, 1, 5, tzinfo=timezone.utc).timestamp()
DEPLOYED = MONDAY + 10 * H  # Monday 10:00 UTC


def app_config(extra: str) -> dict:
    """The Serve application config `deploy` submits, first deployed at DEPLOYED."""
    plan = build_plan(load(BASE + "name: svc\n" + extra)).finalized(token_sha256=None, created=int(DEPLOYED))
    return copy.deepcopy(plan.application())


def test_a_service_without_schedule_or_max_duration_shows_nothing():
    assert lifetime_summary(app_config(""), DEPLOYED) is None
    assert lifetime_summary(app_config("max_duration: off\n"), DEPLOYED) is None  # `off`: no limit
    assert lifetime_summary(None, DEPLOYED) is None


def test_max_duration_alone_runs_then_stops_for_good():
    app = app_config("max_duration: 2h\n")
    running = lifetime_summary(app, DEPLOYED + H)
    assert running == {"state": "running", "crons": [], "max_duration_s": 7200.0,
                       "started_at": "2026-01-05T10:00:00Z", "stops_at": "2026-01-05T12:00:00Z",
                       "stopped_at": None, "next_start": None}
    assert lifetime_line(running) == "running since 2026-01-05 10:00:00 UTC, max_duration stops it at " \
                                     "2026-01-05 12:00:00 UTC"
    stopped = lifetime_summary(app, DEPLOYED + 3 * H)
    assert (stopped["state"], stopped["stopped_at"], stopped["next_start"]) == ("stopped", "2026-01-05T12:00:00Z", None)
    assert lifetime_line(stopped) == ("stopped by max_duration at 2026-01-05 12:00:00 UTC (no schedule: it stays at "
                                      "0 replicas)")


def test_a_schedule_shows_the_next_start_and_after_max_duration_the_one_after():
    app = app_config("max_duration: 1h\nschedule: {cron: '0 9 * * *'}\n")
    scheduled = lifetime_summary(app, DEPLOYED + 60)
    assert (scheduled["state"], scheduled["next_start"]) == ("scheduled", "2026-01-06T09:00:00Z")
    assert lifetime_line(scheduled) == "scheduled: starts at 2026-01-06 09:00:00 UTC (schedule: 0 9 * * *)"
    running = lifetime_summary(app, MONDAY + 33.5 * H)
    assert lifetime_line(running) == ("running since 2026-01-06 09:00:00 UTC, max_duration stops it at "
                                      "2026-01-06 10:00:00 UTC, next start 2026-01-07 09:00:00 UTC "
                                      "(schedule: 0 9 * * *)")
    stopped = lifetime_summary(app, MONDAY + 35 * H)
    assert lifetime_line(stopped) == ("stopped by max_duration at 2026-01-06 10:00:00 UTC, next start "
                                      "2026-01-07 09:00:00 UTC (schedule: 0 9 * * *)")


def test_a_schedule_without_max_duration_runs_for_good_once_started():
    app = app_config("schedule: {cron: ['30 12 * * 0']}\n")
    assert lifetime_line(lifetime_summary(app, DEPLOYED)) == ("scheduled: starts at 2026-01-05 12:30:00 UTC "
                                                             "(schedule: 30 12 * * 0)")
    running = lifetime_summary(app, MONDAY + 400 * H)
    assert (running["state"], running["stops_at"], running["next_start"]) == ("running", None, None)
    assert lifetime_line(running) == "running since 2026-01-05 12:30:00 UTC (schedule: 30 12 * * 0)"
