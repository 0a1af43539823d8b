"""A replica group behind a router (or beside a grouped service's ingress) scales on the service's requests:
the ingress replicas' counters, read from Ray's internal KV, not the group's own (it takes none from Serve)."""

from __future__ import annotations

import json
import time

from ray.serve.config import AutoscalingConfig

from ray_dstack.serve.scaling import autoscaling_policy
from ray_dstack.serve.scaling.autoscaling_policy import RpsPolicy, evaluate
from ray_dstack.serve.scaling.service_counters import counters_prefix

from test_autoscaling_policy import make_config, make_ctx  # noqa: E402 - sibling test module


def test_counters_from_the_kv_drive_the_decision_and_the_groups_own_replicas_do_not():
    config = make_config(lo=0, hi=4, target_rps=1.0, window_s=10.0, scale_up_delay_s=0.0, scale_down_delay_s=0.0)
    # The group's own replica reports nothing (no request reaches it); the service took 20 + 10 requests.
    first = make_ctx(config=config, totals={1: 0.0}, target=1, now=1000.0)
    _, state = evaluate(first, target_rps=1.0, window_s=10.0, scale_up_delay_s=0.0, scale_down_delay_s=0.0,
                        counters=({"a": [0.0], "b": [0.0]}, {}))
    later = make_ctx(config=config, totals={1: 0.0}, target=1, now=1001.0, state=state)
    desired, state = evaluate(later, target_rps=1.0, window_s=10.0, scale_up_delay_s=0.0, scale_down_delay_s=0.0,
                              counters=({"a": [20.0], "b": [10.0]}, {}))
    assert desired == 3  # 30 requests / 10 s = 3 rps at 1 rps per replica
    # Without the service's counters the same context would scale the group to its minimum.
    own, _ = evaluate(make_ctx(config=config, totals={1: 0.0}, target=1, now=1001.0, state={}), target_rps=1.0,
                      window_s=10.0, scale_up_delay_s=0.0, scale_down_delay_s=0.0)
    assert own == 0


def test_the_policy_reads_the_service_counters_from_the_kv(monkeypatch):
    store = {f"{counters_prefix('svc')}r1": json.dumps({"total": 0, "in_window": 0, "time": time.time()}).encode()}

    def kv_list(prefix, namespace=None):
        assert namespace == "ray-dstack"
        return [k.encode() for k in store if k.startswith(prefix)]

    def kv_get(key, namespace=None):
        return store.get(key.decode() if isinstance(key, bytes) else key)

    import ray.experimental.internal_kv as internal_kv

    monkeypatch.setattr(internal_kv, "_internal_kv_list", kv_list)
    monkeypatch.setattr(internal_kv, "_internal_kv_get", kv_get)
    policy = RpsPolicy(target_rps=2.0, window_s=5.0, scale_up_delay_s=0.0, scale_down_delay_s=0.0,
                       service_counters_prefix=counters_prefix("svc"), kv_namespace="ray-dstack")
    config = make_config(lo=0, hi=8, target_rps=2.0, window_s=5.0)
    _, state = policy(make_ctx(config=config, totals={}, target=0, running=0, now=50.0))
    store[f"{counters_prefix('svc')}r1"] = json.dumps({"total": 40, "in_window": 40, "time": time.time()}).encode()
    policy._counters = None  # a second later: the policy reads the KV again (it caches a read for 1 s)
    desired, _ = policy(make_ctx(config=config, totals={}, target=0, running=0, now=51.0, state=state))
    assert desired == 4  # from zero at once: 40 requests / 5 s = 8 rps at 2 rps per replica


def test_a_kv_read_failure_keeps_the_current_count(monkeypatch):
    def broken(*_a, **_k):
        raise ConnectionError("GCS away")

    import ray.experimental.internal_kv as internal_kv

    monkeypatch.setattr(internal_kv, "_internal_kv_list", broken)
    policy = RpsPolicy(target_rps=1.0, service_counters_prefix="requests/svc/", kv_namespace="ray-dstack")
    config = make_config(lo=1, hi=4, target_rps=1.0)
    desired, _ = policy(make_ctx(config=config, totals={}, target=3, running=3, now=10.0))
    assert desired == 3


def test_the_plan_points_non_ingress_groups_at_the_service_counters():
    from ray_dstack.config.loader import parse_service
    from ray_dstack.plan import build_plan

    text = """
type: service
name: pd
port: 8000
groups:
  - name: router
    replicas: 1
    router: {type: sglang}
    commands: [smg launch --port 8000]
  - name: decode
    replicas: 0..4
    scaling: {metric: rps, target: 5}
    commands: [python -m server --port 8000]
"""
    plan = build_plan(parse_service(text, filename="pd.dstack.yml"))
    decode = next(g for g in plan.groups if g.name == "decode")
    kwargs = decode.deployment["autoscaling_config"]["policy"]["policy_kwargs"]
    assert kwargs["service_counters_prefix"] == "requests/pd/" and kwargs["kv_namespace"] == "ray-dstack"
    assert AutoscalingConfig(**decode.deployment["autoscaling_config"]).min_replicas == 0


def test_a_stale_counter_does_not_seed_a_policy_that_lost_its_state(monkeypatch):
    """An ingress replica killed outright leaves its key; after a redeploy its last window must not count."""
    import ray.experimental.internal_kv as internal_kv

    now = 10_000.0
    store = {"requests/svc/dead": json.dumps({"total": 500, "in_window": 500, "time": now - 3600}).encode(),
             "requests/svc/live": json.dumps({"total": 7, "in_window": 6, "time": now - 1}).encode()}
    monkeypatch.setattr(internal_kv, "_internal_kv_list", lambda prefix, namespace=None: [k.encode() for k in store])
    monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda key, namespace=None: store[key.decode()])
    totals, in_window = autoscaling_policy.service_counters("requests/svc/", "ray-dstack", now=now)
    assert totals == {"requests/svc/dead": [500.0], "requests/svc/live": [7.0]}
    assert in_window == {"requests/svc/dead": [0.0], "requests/svc/live": [6.0]}


def test_the_counters_are_read_at_most_once_a_second(monkeypatch):
    import ray.experimental.internal_kv as internal_kv

    reads = []
    monkeypatch.setattr(internal_kv, "_internal_kv_list", lambda prefix, namespace=None: reads.append(prefix) or [])
    policy = RpsPolicy(target_rps=1.0, service_counters_prefix="requests/svc/", kv_namespace="ray-dstack")
    config = make_config(lo=1, hi=4, target_rps=1.0)
    for tick in range(10):  # Serve's controller ticks every ~0.1 s
        policy(make_ctx(config=config, totals={}, target=1, running=1, now=100.0 + tick / 10))
    assert len(reads) == 1
