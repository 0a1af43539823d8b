"""dstack's run-time variables in every replica (dstack-now.md §1.9): what `dstack_env` sets, who wins over whom,
and what a process replica's commands really see (a ProcessRuntime driven without Ray)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from ray_dstack.plan import build_plan
from ray_dstack.serve.runtime import dstack_env, python_env, runtime_for, workspace
from ray_dstack.serve.runtime.dstack_env import ROUTER_IP_ENV, with_dstack_env
from tests.support.config_helpers import load

LOG = logging.getLogger("test.runtime.dstack_env")


def test_a_service_replica_is_a_one_node_cluster_of_its_own():
    assert dstack_env.dstack_env("chat", gpus=2, ip="10.0.0.5", working_dir="/work/chat.r1") == {
        "DSTACK_RUN_NAME": "chat",
        "DSTACK_GPUS_NUM": "2",
        "DSTACK_GPUS_PER_NODE": "2",
        "DSTACK_NODES_NUM": "1",
        "DSTACK_NODE_RANK": "0",
        "DSTACK_NODES_IPS": "10.0.0.5",
        "DSTACK_MASTER_NODE_IP": "10.0.0.5",
        "DSTACK_WORKING_DIR": "/work/chat.r1",
    }


def test_no_working_dir_no_variable():
    env = dstack_env.dstack_env("chat", gpus=0, ip="127.0.0.1", working_dir=None)
    assert "DSTACK_WORKING_DIR" not in env and env["DSTACK_GPUS_NUM"] == "0"


def test_no_router_variable_unless_given():
    dstack = dstack_env.dstack_env("chat", gpus=0, ip="127.0.0.1", working_dir=None)
    assert ROUTER_IP_ENV not in with_dstack_env({}, dstack)
    assert ROUTER_IP_ENV not in dstack and ROUTER_IP_ENV == "DSTACK_ROUTER_INTERNAL_IP"


def test_user_env_wins_over_dstack_variables():
    dstack = dstack_env.dstack_env("chat", gpus=1, ip="10.0.0.5", working_dir="/w")
    env = with_dstack_env({"DSTACK_GPUS_NUM": "8", "HF_TOKEN": "t"}, dstack)
    assert env["DSTACK_GPUS_NUM"] == "8" and env["HF_TOKEN"] == "t"
    assert env["DSTACK_NODE_RANK"] == "0" and env["DSTACK_RUN_NAME"] == "chat"
    assert dstack["DSTACK_GPUS_NUM"] == "1"  # the inputs are not modified


def test_router_ip_wins_over_user_env():
    dstack = dstack_env.dstack_env("chat", gpus=1, ip="10.0.0.5", working_dir="/w")
    user = {ROUTER_IP_ENV: "1.1.1.1", "A": "b"}
    env = with_dstack_env(user, dstack, router_ip="10.0.0.9")
    assert env[ROUTER_IP_ENV] == "10.0.0.9" and env["A"] == "b"
    assert user[ROUTER_IP_ENV] == "1.1.1.1"


def test_outside_ray_the_node_is_loopback_with_no_gpus():
    assert dstack_env.node_ip() == "127.0.0.1"
    assert dstack_env.assigned_gpus() == 0


# --- what a process replica's commands see ----------------------------------------------------------------


@pytest.fixture
def node_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv(python_env.ENV_ROOT_ENV, str(tmp_path / "envs"))
    monkeypatch.setenv(workspace.WORK_ROOT_ENV, str(tmp_path / "work"))
    return tmp_path


def replica_env(yaml_text: str, *, router_ip: str | None = None) -> Path:
    """Start a process replica of `yaml_text` (its commands write `$OUT`, then serve), wait until it is ready,
    stop it; returns its workspace."""
    spec = build_plan(load(yaml_text)).spec

    async def life() -> Path:
        runtime = runtime_for(spec, replica_tag="r1", logger=LOG)
        runtime.router_ip = router_ip
        await runtime.prepare()
        try:
            await runtime.start()
            await runtime.ready(60.0)  # the commands wrote the file before the server listened
            return Path(runtime.describe()["workspace"])
        finally:
            await runtime.stop(grace_s=5.0)

    return asyncio.run(life())


def service(out: Path, line: str, extra: str = "") -> str:
    return (f"type: service\nname: envcheck\nport: 8000\nenv:\n  - OUT={out}\n{extra}"
            f"commands:\n  - echo \"{line}\" > \"$OUT\"\n  - python3 -m http.server --bind 127.0.0.1 $RAY_DSTACK_PORT\n")


def test_process_replica_commands_see_the_dstack_variables(node_dirs):
    out = node_dirs / "seen.txt"
    line = "$DSTACK_GPUS_NUM $DSTACK_NODES_NUM $DSTACK_NODE_RANK $DSTACK_RUN_NAME $DSTACK_WORKING_DIR"
    work = replica_env(service(out, line))
    assert work.parent == node_dirs / "work"
    assert out.read_text() == f"0 1 0 envcheck {work}\n"


def test_process_replica_sees_its_node_address_and_gpu_count_per_node(node_dirs):
    out = node_dirs / "seen.txt"
    replica_env(service(out, "$DSTACK_NODES_IPS $DSTACK_MASTER_NODE_IP $DSTACK_GPUS_PER_NODE"))
    assert out.read_text() == "127.0.0.1 127.0.0.1 0\n"


def test_process_replica_working_dir_is_the_configured_one(node_dirs):
    out = node_dirs / "seen.txt"
    work = replica_env(service(out, "$DSTACK_WORKING_DIR $PWD", extra="working_dir: sub/dir\n"))
    assert out.read_text() == f"{work / 'sub' / 'dir'} {work / 'sub' / 'dir'}\n"


def test_process_replica_user_env_over_dstack_and_router_ip_over_user_env(node_dirs):
    out = node_dirs / "seen.txt"
    extra = f"  - DSTACK_NODE_RANK=7\n  - {ROUTER_IP_ENV}=1.1.1.1\n"
    text = service(out, f"$DSTACK_NODE_RANK ${ROUTER_IP_ENV}").replace(f"  - OUT={out}\n", f"  - OUT={out}\n{extra}")
    replica_env(text, router_ip="10.0.0.9")
    assert out.read_text() == "7 10.0.0.9\n"


def test_the_cluster_address_only_with_dstack_true_and_only_inside_ray():
    from ray_dstack.serve.runtime.dstack_env import CLUSTER_ADDRESS_ENVS, cluster_env

    assert CLUSTER_ADDRESS_ENVS == ("RAY_DSTACK_ADDRESS", "RAY_API_SERVER_ADDRESS")
    assert cluster_env(False) == {}
    assert cluster_env(True) == {}  # outside a Ray worker there is no cluster to name (e2e: the real address)
