"""Two service processes on port 8000 at once, each in its own pasta namespace (no Ray needed), reached the
way a replica reaches them: through the connector of the namespace's init, and through pasta's host port."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil

import httpx
import pytest

from ray_dstack.ports import free_port
from ray_dstack.serve.runtime import netns
from ray_dstack.serve.transport import netns_connect
from ray_dstack.serve.runtime.process import ServiceProcess
from ray_dstack.serve.transport.client import model_server_client

PASTA = shutil.which("pasta")
assert PASTA is not None, "pasta (Debian package passt) is missing: .ci/run installs it"


def pasta_pids() -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as fh:
                    if fh.read().strip().startswith(("pasta", "passt")):
                        pids.add(int(entry))
            except OSError:
                pass
    return pids


def service(tmp_path, name: str, bind: str) -> ServiceProcess:
    root = tmp_path / name
    root.mkdir()
    (root / "who").write_text(name)
    host_port = free_port()
    return ServiceProcess(
        ["cat /proc/1/cmdline > init-cmdline", f"exec python3 -m http.server 8000 --bind {bind}"],
        port=host_port, service_port=8000, env={}, working_dir=str(root), logger=logging.getLogger("test"),
        namespace=netns.pasta_argv(PASTA, host_port, 8000), cleanup_dir=str(root),
        connector=netns_connect.connector_for(root, 8000, warn=pytest.fail),
        own_proc=netns.own_proc(),
    )


def test_two_services_on_port_8000(tmp_path):
    before = pasta_pids()

    async def scenario():
        a, b = service(tmp_path, "a", "0.0.0.0"), service(tmp_path, "b", "127.0.0.1")
        await a.start()
        await b.start()
        try:
            await asyncio.gather(a.wait_ready(30), b.wait_ready(30))
            async with httpx.AsyncClient() as client:
                answers = [(await client.get(f"http://127.0.0.1:{p.port}/who")).text for p in (a, b)]
                assert answers == ["a", "b"]
                if netns.own_proc():  # root here: the namespace has its own /proc, where PID 1 is its init
                    for p in (a, b):
                        init = (await client.get(f"http://127.0.0.1:{p.port}/init-cmdline")).content
                        assert b"ray_dstack.serve.runtime.supervise\0--init" in init, init
            # The replica's own client goes in through the connector: the URL's port is not used at all.
            for p, name in ((a, "a"), (b, "b")):
                assert os.path.exists(p.connector.path)
                client = model_server_client(f"http://127.0.0.1:{free_port()}", 10, network_backend=p.network_backend)
                try:
                    assert [(await client.get("/who")).text for _ in range(3)] == [name] * 3
                finally:
                    await client.aclose()
            await a.check_health()
        finally:
            await a.stop(grace_s=10)
            await b.stop(grace_s=10)
        return a, b

    a, b = asyncio.run(scenario())
    # The supervisor cleaned up: directories and the connectors' sockets.
    assert sorted(os.listdir(tmp_path)) == []
    assert pasta_pids() - before == set()
