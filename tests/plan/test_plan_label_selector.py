"""Verified on a real local Ray 2.60: a `label_selector` with `in(...)` on `ray.io/accelerator-type` is a
hard constraint — this is what the plan relies on for GPU names/memory (see ray_dstack/plan/plan.py)."""

from __future__ import annotations

import pytest

from ray_dstack.plan.defaults import ACCELERATOR_LABEL_KEY


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_label_selector_in_is_strict():
    import ray

    # A driver left connected by an earlier test in this process would join the wrong cluster.
    if ray.is_initialized():
        ray.shutdown()
    # address="local": never join a cluster someone else started on this machine.
    ray.init(address="local", num_cpus=1, include_dashboard=False, labels={ACCELERATOR_LABEL_KEY: "A10G"}, log_to_driver=False)
    try:
        @ray.remote(num_cpus=0)
        class Probe:
            def ping(self):
                return "ok"

        # The plan's own selector for `gpu: 24GB` (minus num_gpus: this node has no GPU).
        from ray_dstack.plan import build_plan
        from tests.support.config_helpers import BASE, load

        selector = build_plan(load(BASE + "resources: {gpu: 24GB}\n")).ray_actor_options["label_selector"]
        assert selector[ACCELERATOR_LABEL_KEY].startswith("in(") and "A10G" in selector[ACCELERATOR_LABEL_KEY]
        admitted = Probe.options(label_selector=selector).remote()
        assert ray.get(admitted.ping.remote(), timeout=30) == "ok"

        refused = Probe.options(label_selector={ACCELERATOR_LABEL_KEY: "in(H100,A100-80G)"}).remote()
        ready, _ = ray.wait([refused.ping.remote()], timeout=5)
        assert ready == [], "an actor whose selector does not match the node's label must stay pending"
        single = Probe.options(label_selector={ACCELERATOR_LABEL_KEY: "L4"}).remote()
        ready, _ = ray.wait([single.ping.remote()], timeout=2)
        assert ready == []
    finally:
        ray.shutdown()
