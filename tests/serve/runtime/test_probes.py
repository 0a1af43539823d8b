"""The probe runner: method/headers/body sent, ready_after, several probes, until_ready, health, last answers."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from ray_dstack.serve.runtime.probes import FAILURES_UNHEALTHY, ProbeError, ProbeRunner
from ray_dstack.spec import ProbeSpec


class Backend:
    """Answers each path from a script of status codes (the last one repeats); records the requests."""

    def __init__(self, **scripts: list[int | str]) -> None:
        self.scripts = {"/" + k.replace("_", "/"): list(v) for k, v in scripts.items()}
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        script = self.scripts[request.url.path]
        answer = script.pop(0) if len(script) > 1 else script[0]
        if answer == "refuse":
            raise httpx.ConnectError("refused", request=request)
        if answer == "slow":
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(int(answer), text="" if answer == 200 else "loading")


def runner(backend: Backend, *probes: ProbeSpec) -> ProbeRunner:
    client = httpx.AsyncClient(transport=httpx.MockTransport(backend))
    return ProbeRunner(list(probes), "http://svc", client=client)


def fast(path: str, **kw) -> ProbeSpec:
    return ProbeSpec(path=path, interval_s=kw.pop("interval_s", 0.01), timeout_s=1, **kw)


def test_method_headers_body_are_sent():
    backend = Backend(ready=[200])
    probe = fast("/ready", method="post", headers=[("X-Probe", "yes"), ("Content-Type", "application/json")],
                 body='{"q": 1}')
    asyncio.run(runner(backend, probe).wait_ready(5))
    req = backend.requests[0]
    assert (req.method, req.url.path, req.headers["x-probe"], req.content) == ("POST", "/ready", "yes", b'{"q": 1}')


def test_ready_after_consecutive_successes_a_failure_resets():
    backend = Backend(h=[200, 503, 200, 200, 200])
    r = runner(backend, fast("/h", ready_after=3))
    asyncio.run(r.wait_ready(5))
    assert len(backend.requests) == 5 and r.states[0].ready


def test_all_probes_must_pass_and_the_error_names_the_last_answer():
    backend = Backend(a=[200], b=[503])
    r = runner(backend, fast("/a"), fast("/b", method="put"))
    with pytest.raises(ProbeError, match=r"PUT /b last answered HTTP 503: loading") as info:
        asyncio.run(r.wait_ready(0.3))
    assert "/a" not in str(info.value)  # the passing one is not blamed


def test_timeout_and_refused_are_reported():
    for answer, text in (("slow", "timed out after 1s"), ("refuse", "connection refused")):
        r = runner(Backend(x=[answer]), fast("/x"))
        with pytest.raises(ProbeError, match=text):
            asyncio.run(r.wait_ready(0.1))


def test_process_exit_stops_the_wait():
    r = runner(Backend(x=[503]), fast("/x"))
    with pytest.raises(ProbeError, match="exited with code 3"):
        asyncio.run(r.wait_ready(30, exited=lambda: "the service's commands exited with code 3"))


def test_unhealthy_after_consecutive_failures_only():
    async def scenario():
        backend = Backend(h=[200, 200, 503, 200] + [503] * 50)
        r = runner(backend, fast("/h"))
        await r.wait_ready(5)
        r.start()
        while r.states[0].failures < FAILURES_UNHEALTHY:
            assert r.states[0].failures == 0 or r.health_problem() is None
            await asyncio.sleep(0.01)
        problem = r.health_problem()
        await r.aclose()
        return problem

    problem = asyncio.run(scenario())
    assert problem is not None and "GET /h failed" in problem and "HTTP 503" in problem


def test_until_ready_stops_probing():
    async def scenario():
        backend = Backend(h=[200, 503])
        r = runner(backend, fast("/h", until_ready=True))
        await r.wait_ready(5)
        r.start()
        await asyncio.sleep(0.1)
        await r.aclose()
        return backend, r

    backend, r = asyncio.run(scenario())
    assert len(backend.requests) == 1 and r.health_problem() is None
    assert r.as_dicts()[0]["active"] is False and r.as_dicts()[0]["ready"] is True


def test_successes_after_the_first_are_interval_apart():
    async def scenario():
        loop = asyncio.get_running_loop()
        times: list[float] = []
        backend = Backend(h=[200])
        orig = backend.__call__

        def record(request):
            times.append(loop.time())
            return orig(request)

        client = httpx.AsyncClient(transport=httpx.MockTransport(record))
        r = ProbeRunner([ProbeSpec(path="/h", interval_s=0.3, timeout_s=1, ready_after=2)], "http://svc",
                        client=client)
        await r.wait_ready(5)
        return times

    times = asyncio.run(scenario())
    assert len(times) == 2 and times[1] - times[0] >= 0.29


def test_the_state_is_logged_when_it_changes_only(caplog):
    import json
    import logging

    from ray_dstack.serve.runtime.probes import STATE_LOG_MARKER

    backend = Backend(x=[503, 503, 503, "refuse", 200])
    r = runner(backend, fast("/x"))
    r.logger = logging.getLogger("probe-test")
    with caplog.at_level(logging.INFO, logger="probe-test"):
        asyncio.run(r.wait_ready(10))
    lines = [m.split(STATE_LOG_MARKER, 1)[1] for m in caplog.messages if STATE_LOG_MARKER in m]
    assert len(backend.requests) == 5 and len(lines) == 3  # 503 (once for three), refused, 200
    states = [json.loads(line)[0] for line in lines]
    assert [(s["ready"], s["last"]) for s in states] == [
        (False, "HTTP 503: loading"), (False, "connection refused"), (True, "HTTP 200")]
