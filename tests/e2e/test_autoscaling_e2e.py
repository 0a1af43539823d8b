"""The RPS policy driving a real local Serve: 1 → 3 replicas under ~3× the target RPS and back; 0 ↔ 1."""

from __future__ import annotations

import sys
import threading
import time

import httpx
import pytest

import ray
from ray import cloudpickle, serve

from conftest import free_port, wait_until  # noqa: E402
from ray_dstack.serve.scaling.request_counter import RequestCounter  # noqa: E402
from ray_dstack.serve.scaling.autoscaling_policy import POLICY_IMPORT_PATH, policy_kwargs  # noqa: E402

pytestmark = pytest.mark.slow

# Workers cannot import this test module by name: ship its classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

WINDOW_S = 3.0
TARGET_RPS = 2.0


@serve.deployment(
    max_ongoing_requests=100,
    ray_actor_options={"num_cpus": 0.25},
    logging_config={"enable_access_log": False},
)
class Counted:
    """What ServiceReplica does for autoscaling: count answered requests, report them to Serve."""

    def __init__(self, window_s: float) -> None:
        self.counter = RequestCounter(window_s)

    async def __call__(self, request) -> str:
        self.counter.record(200)
        return "ok"

    def record_autoscaling_stats(self) -> dict[str, float]:
        return self.counter.stats()


def autoscaling_config(lo: int, hi: int, up: float, down: float, initial: int | None = None) -> dict:
    return {
        "min_replicas": lo,
        "max_replicas": hi,
        "initial_replicas": initial,
        "upscale_delay_s": 0,
        "downscale_delay_s": 0,
        "downscale_to_zero_delay_s": 0,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 2.0,
        "policy": {
            "policy_function": POLICY_IMPORT_PATH,
            "policy_kwargs": policy_kwargs(TARGET_RPS, WINDOW_S, scale_up_delay_s=up, scale_down_delay_s=down),
        },
    }


@pytest.fixture(scope="module")
def serve_url():
    port = free_port()
    # address="local": a cluster of our own, even when another (e.g. `ray start`) runs on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def running_replicas(app: str) -> int:
    deployment = serve.status().applications[app].deployments["Counted"]
    return sum(n for state, n in deployment.replica_states.items() if str(getattr(state, "value", state)) == "RUNNING")


def wait_for(predicate, timeout_s: float, what: str):
    return wait_until(predicate, timeout=timeout_s, interval=0.25, what=what)


class Load:
    """Sends `rps` requests per second from a background thread until stopped."""

    def __init__(self, url: str, rps: float) -> None:
        self.url, self.period = url, 1.0 / rps
        self.codes: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10.0) as client:
            next_at = time.monotonic()
            while not self._stop.is_set():
                try:
                    self.codes.append(client.get(self.url).status_code)
                except httpx.HTTPError:
                    self.codes.append(-1)
                next_at += self.period
                self._stop.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def test_scales_up_to_three_under_three_times_target_and_back_to_one(serve_url):
    app = "rps-up"
    serve.run(
        Counted.options(autoscaling_config=autoscaling_config(1, 3, up=1.0, down=2.0)).bind(WINDOW_S),
        name=app,
        route_prefix=f"/{app}",
    )
    assert running_replicas(app) == 1
    started = time.monotonic()
    with Load(f"{serve_url}/{app}", rps=3 * TARGET_RPS + 0.5) as load:
        wait_for(lambda: running_replicas(app) == 3, 40, "3 running replicas")
        took = time.monotonic() - started
    assert all(code == 200 for code in load.codes), set(load.codes)
    # Window 3 s, up delay 1 s: two steps at most; generous for a loaded 2-core machine.
    assert took < 35, took
    wait_for(lambda: running_replicas(app) == 1, 40, "back to 1 running replica")
    serve.delete(app)


def test_idles_to_zero_and_a_request_wakes_it_up(serve_url):
    app = "rps-zero"
    serve.run(
        Counted.options(autoscaling_config=autoscaling_config(0, 2, up=1.0, down=1.0, initial=1)).bind(WINDOW_S),
        name=app,
        route_prefix=f"/{app}",
    )
    with httpx.Client(timeout=60.0) as client:
        assert client.get(f"{serve_url}/{app}").status_code == 200
        wait_for(lambda: running_replicas(app) == 0, 40, "scale to zero")
        started = time.monotonic()
        response = client.get(f"{serve_url}/{app}")
        cold_start = time.monotonic() - started
    assert response.status_code == 200 and response.text == "ok", (response.status_code, response.text)
    assert running_replicas(app) >= 1
    assert cold_start < 30, cold_start
    serve.delete(app)
