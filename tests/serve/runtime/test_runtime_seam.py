"""One runtime per kind behind one interface: which kind a spec gets, and a process replica's whole life
(prepare, start, ready with probes, describe, check_health, stop) on this machine, without Ray."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import httpx
import pytest

from ray_dstack.plan import build_plan
from ray_dstack.serve.runtime import python_env, runtime_for, workspace
from ray_dstack.serve.runtime.container_runtime import ContainerRuntime
from ray_dstack.serve.runtime.host import NamespaceRuntime, ProcessRuntime
from ray_dstack.serve.runtime.process import ServiceProcessError
from tests.support.config_helpers import load

LOG = logging.getLogger("test.runtime")
FREE_PORT_SERVER = "type: service\nname: seam\ncommands: [python3 -m http.server $RAY_DSTACK_PORT]\nport: 8000\n"


def spec_of(text: str, *, network_namespaces: bool = False):
    return build_plan(load(text), network_namespaces=network_namespaces).spec


@pytest.fixture
def node_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv(python_env.ENV_ROOT_ENV, str(tmp_path / "envs"))
    monkeypatch.setenv(workspace.WORK_ROOT_ENV, str(tmp_path / "work"))
    return tmp_path


def test_the_spec_picks_the_runtime():
    fixed_port = "type: service\ncommands: [python3 -m http.server 8000]\nport: 8000\n"
    cases = [
        (FREE_PORT_SERVER, True, ProcessRuntime),  # $RAY_DSTACK_PORT: no namespace needed
        (fixed_port, True, NamespaceRuntime),
        (fixed_port, False, ProcessRuntime),  # no pasta on the nodes: one replica per node
        ("type: service\nimage: reg.example/acme/web:1\nport: 8000\n", True, ContainerRuntime),
    ]
    for text, namespaces, kind in cases:
        runtime = runtime_for(spec_of(text, network_namespaces=namespaces), replica_tag="r1", logger=LOG)
        assert type(runtime) is kind, text


def test_a_process_replica_from_prepare_to_stop(node_dirs):
    spec = spec_of(FREE_PORT_SERVER + "probes: [{type: http, url: /, interval: 1s, ready_after: 1}]\n")

    async def life() -> tuple[dict, int, Path]:
        runtime = runtime_for(spec, replica_tag="r1", logger=LOG)
        await runtime.prepare()
        try:
            await runtime.start()
            await runtime.ready(30.0)
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"http://127.0.0.1:{runtime.port}/")).status_code == 200
            await runtime.check_health()
            described = runtime.describe()
        finally:
            await runtime.stop(grace_s=5.0)
        return described, runtime.process.returncode, Path(described["workspace"])

    described, returncode, work = asyncio.run(life())
    assert described["runtime"] == "process" and described["child_pid"] and described["port"]
    assert described["probes"][0]["ready"] is True
    assert described["python_env"].startswith(str(node_dirs / "envs")) and described["container"] is None
    assert work.parent == node_dirs / "work"
    assert returncode is not None and not work.exists()  # stopped, and its working directory is gone


def test_a_replica_whose_probe_never_passes_is_not_ready_and_leaves_nothing(node_dirs):
    spec = spec_of(FREE_PORT_SERVER + "probes: [{type: http, url: /missing, interval: 1s, timeout: 1s}]\n")

    async def life() -> tuple[str, ProcessRuntime]:
        runtime = runtime_for(spec, replica_tag="r2", logger=LOG)
        try:
            await runtime.prepare()
            await runtime.start()
            with pytest.raises(ServiceProcessError) as info:
                await runtime.ready(3.0)
            return str(info.value), runtime
        finally:
            await runtime.stop(grace_s=5.0)

    message, runtime = asyncio.run(life())
    assert message.startswith("the service was not ready") and "/missing" in message
    assert runtime.process.returncode is not None and runtime.probes is None
    assert os.listdir(node_dirs / "work") == []


def test_stop_before_prepare_and_twice_is_harmless(node_dirs):
    async def life() -> None:
        runtime = runtime_for(spec_of(FREE_PORT_SERVER), replica_tag="r3", logger=LOG)
        await runtime.stop()
        with pytest.raises(ServiceProcessError, match="never started"):
            await runtime.check_health()
        await runtime.prepare()
        await runtime.stop()
        await runtime.stop()

    asyncio.run(life())
    assert os.listdir(node_dirs / "work") == []
