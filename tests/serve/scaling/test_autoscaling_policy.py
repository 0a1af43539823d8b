"""dstack's RPS autoscaler rule, the replica-side counter and the Serve policy adapter (no Ray cluster)."""

from __future__ import annotations

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve._private.autoscaling_state import _resolve_policy_callable
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from ray_dstack.serve.scaling import request_counter as counter_mod
from ray_dstack.serve.scaling import autoscaling_policy as policy_mod
from ray_dstack.serve.scaling.request_counter import RequestCounter
from ray_dstack.serve.scaling.autoscaling_policy import (
    METRIC_REQUESTS_IN_WINDOW,
    METRIC_REQUESTS_TOTAL,
    POLICY_IMPORT_PATH,
    STATE_KEY,
    RpsPolicy,
    current_rps,
    desired_replicas,
    evaluate,
    policy_kwargs,
)

NOW = 10_000.0


def decide(rps, current, *, target=1.0, lo=1, hi=10, last=None, up=300.0, down=600.0, now=NOW):
    return desired_replicas(
        rps,
        current,
        target=target,
        min_replicas=lo,
        max_replicas=hi,
        now=now,
        last_scale_time=last,
        scale_up_delay_s=up,
        scale_down_delay_s=down,
    )


# --- dstack's decision rule ---------------------------------------------------------------------------------


def test_no_change_at_target():
    assert decide(1.0, 1) == 1
    assert decide(3.0, 3, target=1.0) == 3
    assert decide(0.5, 1, target=0.5) == 1


def test_double_target_adds_one():
    assert decide(2.0, 1) == 2
    assert decide(20.0, 1, target=10.0) == 2


def test_jumps_to_needed_count():
    assert decide(4.0, 1) == 4
    assert decide(4.0 * 2.5, 1, target=2.5) == 4


def test_fractional_rps_rounds_up_and_float_noise_does_not():
    assert decide(1.01, 1) == 2
    assert decide(0.3, 1, target=0.1) == 3  # 0.3 / 0.1 == 2.9999999999999996
    assert decide(0.7, 1, target=0.1) == 7  # 0.7 / 0.1 == 7.000000000000001


def test_capped_at_max():
    assert decide(100.0, 1, hi=3) == 3


def test_floored_at_min():
    assert decide(0.0, 3, lo=2) == 2
    assert decide(0.0, 1, lo=1) == 1
    assert decide(0.0, 1, lo=0) == 0


def test_down_only_after_scale_down_delay():
    assert decide(0.0, 3, last=NOW - 599.0) == 3
    assert decide(0.0, 3, last=NOW - 600.0) == 1
    # The up delay does not govern scaling down.
    assert decide(0.0, 3, last=NOW - 400.0, up=300.0, down=600.0) == 3


def test_up_only_after_scale_up_delay():
    assert decide(4.0, 1, last=NOW - 299.0) == 1
    assert decide(4.0, 1, last=NOW - 300.0) == 4
    assert decide(4.0, 2, last=NOW - 10.0, up=5.0, down=600.0) == 4


def test_delay_counts_from_last_scaling_event_in_either_direction():
    # A scale-down 100 s ago blocks a scale-up with a 300 s delay (dstack's single `last_scaled_at`).
    assert decide(5.0, 2, last=NOW - 100.0) == 2


def test_from_zero_scales_up_at_once():
    assert decide(0.1, 0, lo=0, last=NOW - 1.0) == 1
    assert decide(3.0, 0, lo=0, last=NOW) == 3


def test_no_scaling_event_yet_means_no_delay():
    assert decide(4.0, 1, last=None) == 4
    assert decide(0.0, 4, last=None) == 1


# --- the replica-side counter -------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_counter_counts_in_one_second_frames_over_the_window():
    clock = FakeClock(1000.2)
    c = RequestCounter(window_s=3, clock=clock)
    for _ in range(2):
        c.record(200)  # second 1000
    clock.t = 1001.9
    c.record(200)  # second 1001
    clock.t = 1002.0
    c.record(500)  # second 1002: errors count
    assert c.requests_in_window() == 4
    clock.t = 1003.0  # window is seconds 1001..1003: second 1000 left it
    assert c.requests_in_window() == 2
    assert c.rps() == pytest.approx(2 / 3)
    clock.t = 1005.99
    assert c.requests_in_window() == 0
    assert c.total == 4


def test_counter_ring_buffer_reuses_slots_and_stays_bounded():
    clock = FakeClock(0.0)
    c = RequestCounter(window_s=60, clock=clock)
    for second in range(1000):
        clock.t = float(second)
        c.record()
        c.record()
    assert len(c._counts) == 60 and len(c._seconds) == 60
    assert c.requests_in_window() == 120
    assert c.total == 2000
    clock.t = 1000.5 + 59  # seconds 1000..1059 hold nothing; 999 left the window
    assert c.requests_in_window() == 0


def test_counter_ignores_401_403_404():
    c = RequestCounter(window_s=60, clock=FakeClock())
    assert c.record(401) is False
    assert c.record(403) is False
    assert c.record(404) is False
    assert c.record(200) is True
    assert c.record(429) is True
    assert c.record(None) is True
    assert c.requests_in_window() == 3
    assert c.total == 3


def test_counter_fractional_window_and_stats():
    clock = FakeClock(50.0)
    c = RequestCounter(window_s=2.5, clock=clock)  # 3 frames
    c.record()
    clock.t = 52.9
    assert c.stats() == {
        counter_mod.METRIC_REQUESTS_TOTAL: 1.0,
        counter_mod.METRIC_REQUESTS_IN_WINDOW: 1.0,
        counter_mod.METRIC_WINDOW_S: 2.5,
    }
    assert all(isinstance(v, float) for v in c.stats().values())
    with pytest.raises(ValueError):
        RequestCounter(window_s=0)


def test_metric_names_agree_between_counter_and_policy():
    assert counter_mod.METRIC_REQUESTS_TOTAL == policy_mod.METRIC_REQUESTS_TOTAL
    assert counter_mod.METRIC_REQUESTS_IN_WINDOW == policy_mod.METRIC_REQUESTS_IN_WINDOW
    assert counter_mod.METRIC_WINDOW_S == policy_mod.METRIC_WINDOW_S
    assert counter_mod.METRIC_ENGINE_IN_FLIGHT == policy_mod.METRIC_ENGINE_IN_FLIGHT


# --- the Serve adapter, driven by real AutoscalingContext objects ------------------------------------------

DEP = DeploymentID(name="ServiceReplica", app_name="svc")


def rid(n: int) -> ReplicaID:
    return ReplicaID(unique_id=f"r{n}", deployment_id=DEP)


def make_config(lo=1, hi=10, **kwargs) -> AutoscalingConfig:
    return AutoscalingConfig(
        min_replicas=lo,
        max_replicas=hi,
        upscale_delay_s=0,
        downscale_delay_s=0,
        downscale_to_zero_delay_s=0,
        policy={"policy_function": POLICY_IMPORT_PATH, "policy_kwargs": policy_kwargs(**kwargs)},
    )


def make_ctx(
    *,
    config: AutoscalingConfig,
    totals: dict[int, float],
    target: int,
    running: int | None = None,
    now: float,
    state: dict | None = None,
    in_window: dict[int, float] | None = None,
    total_num_requests: float = 0.0,
    last_up: float | None = None,
    last_down: float | None = None,
    engine_in_flight: dict[int, float] | None = None,
) -> AutoscalingContext:
    """An AutoscalingContext built the way DeploymentAutoscalingState.get_autoscaling_context builds it."""
    replicas = [rid(n) for n in totals]
    raw = {METRIC_REQUESTS_TOTAL: {rid(n): [TimeStampedValue(now - 0.3, v)] for n, v in totals.items()}}
    if in_window is not None:
        raw[METRIC_REQUESTS_IN_WINDOW] = {rid(n): [TimeStampedValue(now - 0.3, v)] for n, v in in_window.items()}
    if engine_in_flight is not None:
        raw[policy_mod.METRIC_ENGINE_IN_FLIGHT] = {rid(n): [TimeStampedValue(now - 0.3, v)]
                                                   for n, v in engine_in_flight.items()}
    return AutoscalingContext(
        deployment_id=DEP,
        deployment_name=DEP.name,
        app_name=DEP.app_name,
        current_num_replicas=len(replicas) if running is None else running,
        target_num_replicas=target,
        running_replicas=replicas,
        total_num_requests=lambda: total_num_requests,
        total_queued_requests=lambda: 0.0,
        aggregated_metrics=lambda: {},
        raw_metrics=lambda: raw,
        capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas,
        policy_state=dict(state or {}),
        last_scale_up_time=last_up,
        last_scale_down_time=last_down,
        current_time=now,
        config=config,
    )


def serve_wrapped(config: AutoscalingConfig):
    """The callable Serve 2.60 builds from the config: class instantiated with policy_kwargs, then wrapped."""
    return _apply_autoscaling_config(_resolve_policy_callable(config.policy))


def test_rps_policy_is_a_class_so_serve_passes_the_kwargs():
    config = make_config(target_rps=2.0, window_s=10.0, scale_up_delay_s=1.0, scale_down_delay_s=2.0)
    instance = _resolve_policy_callable(config.policy)
    assert isinstance(instance, RpsPolicy)
    assert (instance.target_rps, instance.window_s, instance.scale_up_delay_s, instance.scale_down_delay_s) == (
        2.0,
        10.0,
        1.0,
        2.0,
    )


def test_rps_policy_scales_on_total_rps_across_replicas_and_keeps_dead_replicas_counts():
    config = make_config(lo=1, hi=5, target_rps=1.0, window_s=10.0, scale_up_delay_s=0.0, scale_down_delay_s=5.0)
    policy = serve_wrapped(config)
    t = 1000.0
    # First tick after registration: counters at zero.
    n, state = policy(make_ctx(config=config, totals={1: 0.0, 2: 0.0}, target=2, now=t, last_up=t - 100))
    assert n == 2
    # 30 requests in the window of 10 s → 3 rps → 3 replicas (no up delay).
    t += 1
    n, state = policy(make_ctx(config=config, totals={1: 10.0, 2: 20.0}, target=2, now=t, state=state, last_up=t - 100))
    assert n == 3
    assert current_rps(make_ctx(config=config, totals={}, target=3, now=t, state=state)) == pytest.approx(3.0)
    # Replica 2 stops (scaled down / died): its 20 requests still count while inside the window.
    t += 1
    n, state = policy(make_ctx(config=config, totals={1: 10.0, 3: 0.0}, target=3, now=t, state=state, last_up=t - 1))
    assert state[STATE_KEY]["rps"] == pytest.approx(3.0)
    assert n == 3
    # Once those requests leave the window (and the down delay passed), scale down to min.
    t += 10
    n, state = policy(make_ctx(config=config, totals={1: 10.0, 3: 0.0}, target=3, now=t, state=state, last_up=t - 11))
    assert state[STATE_KEY]["rps"] == 0.0
    assert n == 1


def test_rps_policy_counts_a_new_replica_from_zero_and_only_increments_afterwards():
    config = make_config(lo=1, hi=10, target_rps=1.0, window_s=60.0, scale_up_delay_s=0.0, scale_down_delay_s=0.0)
    policy = serve_wrapped(config)
    t = 500.0
    _, state = policy(make_ctx(config=config, totals={1: 1000.0}, in_window={1: 60.0}, target=1, now=t))
    # Bootstrap (no state): the replica's own window (60 requests / 60 s) is the measurement, not its total.
    assert state[STATE_KEY]["rps"] == pytest.approx(1.0)
    t += 1
    _, state = policy(make_ctx(config=config, totals={1: 1060.0, 2: 60.0}, target=1, now=t, state=state))
    # +60 from replica 1, +60 from new replica 2 (all of its count), on top of the seeded 60 (minus 1 frame).
    assert state[STATE_KEY]["rps"] == pytest.approx((60 - 1) / 60 + 2.0)


def test_rps_policy_applies_dstack_delays_from_the_last_scaling_event():
    config = make_config(lo=1, hi=10, target_rps=1.0, window_s=10.0, scale_up_delay_s=30.0, scale_down_delay_s=60.0)
    policy = serve_wrapped(config)
    t = 2000.0
    # Registered at t: that counts as a scaling event, so no scale-up for 30 s.
    n, state = policy(make_ctx(config=config, totals={1: 0.0}, target=1, now=t))
    t += 1
    n, state = policy(make_ctx(config=config, totals={1: 40.0}, target=1, now=t, state=state))
    assert n == 1
    t += 29.5  # window moved on: the 40 requests are gone; send them again
    n, state = policy(make_ctx(config=config, totals={1: 80.0}, target=1, now=t, state=state))
    assert n == 4  # 30 s after registration
    # Serve scaled up at t; a drop in load may not scale down before 60 s.
    up = t
    t += 20
    n, state = policy(make_ctx(config=config, totals={1: 80.0}, target=4, now=t, state=state, last_up=up))
    assert n == 4
    t += 40
    n, state = policy(make_ctx(config=config, totals={1: 80.0}, target=4, now=t, state=state, last_up=up))
    assert n == 1


def test_rps_policy_from_zero_with_queued_requests_scales_up_at_once():
    config = make_config(lo=0, hi=2, target_rps=1.0, window_s=10.0, scale_up_delay_s=300.0, scale_down_delay_s=600.0)
    t = 3000.0
    ctx = make_ctx(config=config, totals={}, target=0, running=0, now=t, total_num_requests=1.0, last_down=t - 1)
    # Our own answer, without Serve's wrapper…
    n, _ = RpsPolicy(**config.policy.policy_kwargs)(ctx)
    assert n == 1
    # …and through it (Serve's cold-start fast path).
    n, _ = serve_wrapped(config)(ctx)
    assert n == 1


def test_rps_policy_idles_to_zero_but_not_while_requests_are_in_flight():
    config = make_config(lo=0, hi=2, target_rps=1.0, window_s=10.0, scale_up_delay_s=0.0, scale_down_delay_s=1.0)
    policy = serve_wrapped(config)
    t = 4000.0
    n, state = policy(make_ctx(config=config, totals={1: 0.0}, target=1, now=t, last_up=t - 50))
    assert n == 1  # registration counts as a scaling event: down delay not over
    t += 2
    ctx = make_ctx(config=config, totals={1: 0.0}, target=1, now=t, state=state, total_num_requests=1.0)
    n, state = policy(ctx)
    assert n == 1  # a request is running: keep the replica
    t += 1
    n, state = policy(make_ctx(config=config, totals={1: 0.0}, target=1, now=t, state=state))
    assert n == 0


def test_rps_policy_goes_from_n_to_zero_without_a_second_delay():
    config = make_config(lo=0, hi=4, target_rps=1.0, window_s=10.0, scale_up_delay_s=0.0, scale_down_delay_s=5.0)
    policy = serve_wrapped(config)
    t = 5000.0
    _, state = policy(make_ctx(config=config, totals={1: 0.0, 2: 0.0, 3: 0.0}, target=3, now=t))
    t += 6
    n, state = policy(make_ctx(config=config, totals={1: 0.0, 2: 0.0, 3: 0.0}, target=3, now=t, state=state))
    assert n == 1  # Serve clamps N → 0 to N → 1
    t += 0.1
    n, state = policy(make_ctx(config=config, totals={1: 0.0}, target=1, now=t, state=state, last_down=t - 0.1))
    assert n == 0


def test_evaluate_keeps_serve_internal_state_and_its_own_measurement():
    config = make_config(target_rps=1.0)
    ctx = make_ctx(config=config, totals={1: 0.0}, target=1, now=100.0, state={"__serve_internal": 1})
    n, state = evaluate(ctx, target_rps=1.0, window_s=60.0)
    assert n == 1
    assert state["__serve_internal"] == 1
    assert state[STATE_KEY]["rps"] == 0.0 and state[STATE_KEY]["desired"] == 1
    assert current_rps(make_ctx(config=config, totals={}, target=1, now=100.0)) is None


def test_policy_rejects_bad_kwargs():
    with pytest.raises(ValueError):
        RpsPolicy(target_rps=0)
    with pytest.raises(ValueError):
        RpsPolicy(target_rps=1, window_s=0)


def test_rps_policy_keeps_a_replica_while_the_engine_path_has_requests_in_flight():
    """Serve's total_num_requests never sees the engine path's requests (HAProxy sends them to the engine): the
    replicas report HAProxy's count, and the guard holds on it; a stopped replica's last report does not."""
    config = make_config(lo=0, hi=2, target_rps=1.0, window_s=10.0, scale_up_delay_s=0.0, scale_down_delay_s=1.0)
    policy = serve_wrapped(config)
    t = 4000.0
    n, state = policy(make_ctx(config=config, totals={1: 0.0}, target=1, now=t, last_up=t - 50))
    t += 2
    n, state = policy(make_ctx(config=config, totals={1: 0.0}, target=1, now=t, state=state,
                               engine_in_flight={1: 1.0}))
    assert n == 1  # a stream on the engine path: keep the replica
    t += 1
    n, state = policy(make_ctx(config=config, totals={1: 0.0}, target=1, now=t, state=state,
                               engine_in_flight={1: 0.0, 9: 3.0}))  # r9 is not running: its report is stale
    assert n == 0
