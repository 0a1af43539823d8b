"""A replica that another replica connects to directly (an SGLang router's worker, a group beside the ingress
group) is published on every address of its node, not only on loopback: a router on another node reaches it
there. Every other replica stays on loopback only (its port would bypass the token check)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket

import httpx

from ray_dstack.plan import build_plan
from ray_dstack.serve.runtime import dstack_env, netns, python_env, runtime_for, workspace
from ray_dstack.serve.runtime.host import NamespaceRuntime
from ray_dstack.spec.container_command import ContainerRun
from tests.support.config_helpers import load

LOG = logging.getLogger("test.published")
ROUTED = """
type: service
name: routed
port: 8000
groups:
  - name: router
    replicas: 1
    router: {type: sglang}
    commands: [python3 -m http.server $RAY_DSTACK_PORT]
  - name: workers
    replicas: 2
    commands: [python3 -m http.server 8000 --bind 0.0.0.0]
"""


def group_specs(text: str, *, network_namespaces: bool = True) -> dict:
    plan = build_plan(load(text), network_namespaces=network_namespaces)
    return {g.name: g.spec for g in plan.groups} or {"0": plan.spec}


def node_address() -> str | None:
    """An address of this machine other than loopback (the node's address in a cluster)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.254", 9))  # no packet is sent: it only picks the outgoing interface
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


def test_which_replicas_are_reached_from_other_nodes():
    routed = group_specs(ROUTED)
    assert routed["workers"].reached_from_other_nodes and not routed["router"].reached_from_other_nodes
    members = group_specs(ROUTED.replace("    router: {type: sglang}\n", ""))
    assert members["workers"].reached_from_other_nodes and not members["router"].reached_from_other_nodes
    dynamo = group_specs(ROUTED.replace("type: sglang", "type: dynamo"))
    assert not dynamo["workers"].reached_from_other_nodes  # Dynamo's frontend finds its workers itself
    plain = group_specs("type: service\ncommands: [python3 -m http.server 8000]\nport: 8000\nreplicas: 2\n")
    assert not plain["0"].reached_from_other_nodes


def test_the_mappings_on_the_command_lines():
    argv = netns.pasta_argv("/usr/bin/pasta", 41000, 8000, uid=1000, private_mounts=False, node_address="10.0.0.7")
    assert argv[argv.index("41000:8000") - 1] == "-t" and "127.0.0.1/41000:8000" not in argv  # every address
    assert "127.0.0.1/41000:8000" in netns.pasta_argv("/usr/bin/pasta", 41000, 8000, uid=1000, private_mounts=False)
    assert not any("10.0.0.7" in a for a in netns.pasta_argv("/usr/bin/pasta", 41000, 8000, uid=1000,
                                                             private_mounts=False))
    run = ContainerRun(runtime="podman", name="w", image="img", container_port=8000, host_port=41000,
                       node_address="10.0.0.7")
    args = run.argv()
    assert args[args.index("-p") + 1] == "41000:8000" and args.count("-p") == 1  # every address of the node
    loopback = ContainerRun(runtime="podman", name="w", image="img", container_port=8000, host_port=41000).argv()
    assert loopback[loopback.index("-p") + 1] == "127.0.0.1:41000:8000" and loopback.count("-p") == 1


def test_a_workers_namespace_answers_at_the_nodes_address(tmp_path, monkeypatch):
    assert shutil.which("pasta"), "pasta (Debian package passt) is missing: .ci/run installs it"
    address = node_address()
    assert address, "this machine has no address besides loopback"
    monkeypatch.setenv(python_env.ENV_ROOT_ENV, str(tmp_path / "envs"))
    monkeypatch.setenv(workspace.WORK_ROOT_ENV, str(tmp_path / "work"))
    monkeypatch.setattr(dstack_env, "node_ip", lambda: address)
    spec = group_specs(ROUTED)["workers"]

    async def life() -> tuple[int, int]:
        runtime = runtime_for(spec, replica_tag="w1", logger=LOG)
        assert isinstance(runtime, NamespaceRuntime)
        await runtime.prepare()
        try:
            await runtime.start()
            await runtime.ready(30.0)
            async with httpx.AsyncClient(trust_env=False) as client:
                remote = await client.get(f"http://{address}:{runtime.port}/")
                local = await client.get(f"http://127.0.0.1:{runtime.port}/")
            return remote.status_code, local.status_code
        finally:
            await runtime.stop()

    assert asyncio.run(life()) == (200, 200)
