"""`schedule` and `max_duration` in the autoscaling policy: the windows as a pure function of the time, and the
policy's answer through evaluate() and through Serve's own wrapper (real AutoscalingContext objects)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from ray_dstack.serve.scaling.autoscaling_policy import (
    STATE_KEY,
    Lifetime,
    RpsPolicy,
    active_window,
    evaluate,
    lifetime_window,
    next_fire,
)
from tests.serve.scaling.test_autoscaling_policy import make_config, make_ctx, serve_wrapped

H = 3600.0


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


MONDAY = ts(2026, 1, 5)  # a Monday, 00:00 UTC


def lifetime(deployed_at=MONDAY + 10 * H + 123.4, crons=(), max_duration_s=None) -> dict:
    return {"deployed_at": deployed_at, "crons": list(crons), "max_duration_s": max_duration_s}


# --- the windows -------------------------------------------------------------------------------------------


def test_no_schedule_no_max_duration_always_runs():
    assert active_window(lifetime(), MONDAY) == (True, None)


def test_max_duration_only_stops_for_good():
    lt = lifetime(deployed_at=MONDAY, max_duration_s=2 * H)
    assert active_window(lt, MONDAY + 1) == (True, MONDAY + 2 * H)
    assert active_window(lt, MONDAY + 2 * H - 0.001) == (True, MONDAY + 2 * H)
    assert active_window(lt, MONDAY + 2 * H) == (False, None)
    assert active_window(lt, MONDAY + 400 * H) == (False, None)
    # A deploying machine's clock a little ahead: the service still starts at once.
    assert active_window(lt, MONDAY - 2) == (True, MONDAY + 2 * H)


def test_schedule_only_waits_for_the_first_cron_time_then_never_stops():
    lt = lifetime(crons=["0 9 * * *"])  # deployed Monday 10:02, after Monday's 9:00
    tuesday_9 = MONDAY + 24 * H + 9 * H
    assert active_window(lt, MONDAY + 11 * H) == (False, tuesday_9)
    assert active_window(lt, tuesday_9) == (True, None)
    assert active_window(lt, tuesday_9 + 30 * 24 * H) == (True, None)  # later cron times change nothing


def test_schedule_and_max_duration_repeat_a_window_at_each_cron_time():
    lt = lifetime(crons=["0 9 * * *"], max_duration_s=2 * H)
    tuesday_9 = MONDAY + 33 * H
    assert active_window(lt, MONDAY + 11 * H) == (False, tuesday_9)
    assert active_window(lt, tuesday_9 + 1 * H) == (True, tuesday_9 + 2 * H)
    assert active_window(lt, tuesday_9 + 2 * H) == (False, tuesday_9 + 24 * H)
    assert active_window(lt, tuesday_9 + 24 * H + 5) == (True, tuesday_9 + 26 * H)
    assert lifetime_window(lt, tuesday_9 + 3 * H) == (tuesday_9, tuesday_9 + 2 * H, tuesday_9 + 24 * H)


def test_cron_times_inside_a_window_are_ignored_and_a_stop_at_a_cron_time_waits_for_the_next():
    # Every hour, 90 minutes each: 9:00 runs to 10:30; 10:00 falls inside it; the next start is 11:00.
    lt = lifetime(deployed_at=MONDAY + 8 * H + 59 * 60, crons=["0 * * * *"], max_duration_s=1.5 * H)
    assert lifetime_window(lt, MONDAY + 10 * H + 45 * 60) == (MONDAY + 9 * H, MONDAY + 10.5 * H, MONDAY + 11 * H)
    assert active_window(lt, MONDAY + 11 * H) == (True, MONDAY + 12.5 * H)
    # Exactly one hour each: the stop at 10:00 is a cron time, but the service starts again at 11:00 (dstack
    # computes the next start when the run has already stopped).
    lt = lifetime(deployed_at=MONDAY + 8 * H + 59 * 60, crons=["0 * * * *"], max_duration_s=H)
    assert active_window(lt, MONDAY + 10 * H) == (False, MONDAY + 11 * H)


def test_several_crons_start_at_the_earliest():
    lt = lifetime(crons=["0 18 * * *", "30 12 * * *"], max_duration_s=H)  # deployed Monday 10:02
    assert active_window(lt, MONDAY + 11 * H) == (False, MONDAY + 12.5 * H)
    assert active_window(lt, MONDAY + 13 * H) == (True, MONDAY + 13.5 * H)
    assert active_window(lt, MONDAY + 14 * H) == (False, MONDAY + 18 * H)


def test_day_of_week_0_is_monday():
    lt = lifetime(deployed_at=ts(2026, 1, 1), crons=["0 9 * * 0"])  # a Thursday
    assert active_window(lt, ts(2026, 1, 2)) == (False, ts(2026, 1, 5, 9))
    assert next_fire(["0 9 * * 6"], ts(2026, 1, 1)) == ts(2026, 1, 4, 9)  # 6 = Sunday


def test_the_cached_clock_agrees_with_the_pure_function_over_a_week():
    lt = lifetime(crons=["*/20 8-17 * * 0-4", "0 22 * * 5"], max_duration_s=25 * 60)
    clock = Lifetime(lt)
    t = MONDAY
    while t < MONDAY + 6 * 24 * H:  # Monday to Saturday night: every kind of window and gap
        assert clock.active(t) == active_window(lt, t), t
        t += 17 * 60 + 13


def test_deployed_at_none_counts_from_the_policys_first_tick():
    clock = Lifetime(lifetime(deployed_at=None, crons=["0 9 * * *"]), now=MONDAY + 10 * H)
    assert clock.active(MONDAY + 10 * H) == (False, MONDAY + 33 * H)


# --- the policy's answer -------------------------------------------------------------------------------------


def policy_config(lo=0, hi=3, **extra):
    """The autoscaling_config the plan writes for a service with a lifetime (Serve's own minimum is 0)."""
    config = make_config(lo=0, hi=hi, target_rps=1.0, window_s=10.0, scale_up_delay_s=0.0, scale_down_delay_s=0.0)
    config.policy.policy_kwargs.update(extra)
    return config


def test_a_fixed_count_runs_only_inside_its_windows():
    lt = lifetime(crons=["0 9 * * *"], max_duration_s=2 * H)
    tuesday_9 = MONDAY + 33 * H
    before = make_ctx(config=policy_config(hi=2), totals={}, target=0, now=MONDAY + 11 * H, total_num_requests=3.0)
    assert evaluate(before, fixed_replicas=2, lifetime=lt)[0] == 0  # requests waiting change nothing
    during = make_ctx(config=policy_config(hi=2), totals={}, target=0, now=tuesday_9 + 60)
    n, state = evaluate(during, fixed_replicas=2, lifetime=lt)
    assert n == 2 and state[STATE_KEY]["lifetime"] == {"active": True, "next_change": tuesday_9 + 2 * H}
    after = make_ctx(config=policy_config(hi=2), totals={1: 5.0, 2: 0.0}, target=2, now=tuesday_9 + 2 * H)
    assert evaluate(after, fixed_replicas=2, lifetime=lt)[0] == 0


def test_the_rps_rule_applies_inside_a_window_floored_at_the_services_minimum():
    lt = lifetime(deployed_at=MONDAY, max_duration_s=H)
    config = policy_config(hi=4)
    t = MONDAY + 10
    n, state = evaluate(make_ctx(config=config, totals={}, target=0, running=0, now=t), target_rps=1.0,
                        window_s=10.0, scale_up_delay_s=0.0, scale_down_delay_s=0.0, lifetime=lt, min_replicas=2)
    assert n == 2  # dstack starts a group at its minimum
    t += 1
    n, state = evaluate(make_ctx(config=config, totals={1: 0.0, 2: 30.0}, target=2, now=t, state=state),
                        target_rps=1.0, window_s=10.0, scale_up_delay_s=0.0, scale_down_delay_s=0.0, lifetime=lt,
                        min_replicas=2)
    assert n == 3  # 30 requests in 10 s at 1 rps each
    t = MONDAY + H
    n, state = evaluate(make_ctx(config=config, totals={1: 0.0, 2: 60.0}, target=3, now=t, state=state,
                                 total_num_requests=4.0),
                        target_rps=1.0, window_s=10.0, scale_up_delay_s=0.0, scale_down_delay_s=0.0, lifetime=lt,
                        min_replicas=2)
    assert n == 0  # max_duration is over: no minimum, no in-flight guard
    assert state[STATE_KEY]["lifetime"] == {"active": False, "next_change": None}


def test_through_serve_outside_a_window_a_queued_request_starts_one_replica_that_the_policy_stops():
    lt = lifetime(crons=["0 9 * * *"])
    config = policy_config(hi=2, lifetime=lt, fixed_replicas=2)
    policy = serve_wrapped(config)  # the class Serve builds from the config (pickled by value), wrapped
    t = MONDAY + 11 * H
    assert policy(make_ctx(config=config, totals={}, target=0, running=0, now=t))[0] == 0
    # Serve's cold-start path answers without asking the policy (documented in the policy's module).
    ctx = make_ctx(config=config, totals={}, target=0, running=0, now=t + 1, total_num_requests=1.0)
    assert policy(ctx)[0] == 1
    # Once that replica runs, the policy is asked again and it goes (downscale_to_zero_delay_s: 0).
    ctx = make_ctx(config=config, totals={1: 0.0}, target=1, running=1, now=t + 5, total_num_requests=1.0)
    assert policy(ctx)[0] == 0
    assert policy(make_ctx(config=config, totals={}, target=0, running=0, now=MONDAY + 33 * H))[0] == 2


def test_the_policy_takes_the_plans_kwargs():
    lt = lifetime(crons=["0 9 * * *"], max_duration_s=H)
    instance = RpsPolicy(target_rps=1.0, lifetime=lt, fixed_replicas=3, min_replicas=3)
    assert (instance.fixed_replicas, instance.min_replicas) == (3, 3)
    assert instance.lifetime.active(MONDAY + 33 * H) == (True, MONDAY + 34 * H)
    assert RpsPolicy(fixed_replicas=1).target_rps == 1.0  # a fixed count needs no RPS target
    with pytest.raises(ValueError):
        RpsPolicy(fixed_replicas=-1)
    with pytest.raises(ValueError):
        RpsPolicy()
