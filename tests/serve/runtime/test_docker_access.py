"""dstack's `docker: true` for a process replica (runtime/docker_access.py): a shell given the replica's env
and PATH runs `docker ps` and `docker run` against a real daemon: the replica's own podman service (through the
node's `docker` command or the podman shim) or the node's daemon when one answers; the replica's own daemon and
every container the commands started through it go when the replica stops, and when it dies without stopping."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import tomllib
import uuid
from pathlib import Path

import pytest

from conftest import REPO, wait_until
from ray_dstack.serve.runtime import docker_access as da
from tests.support import images

NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NO_DOCKER_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # where this machine has no `docker` (it is in /usr/local/bin)


@pytest.fixture(scope="module")
def image():
    assert not [t for t in ("podman", "runc") if not shutil.which(t)], "podman and runc are needed"
    assert not any(Path(d, "docker").exists() for d in NO_DOCKER_PATH.split(":")), \
        f"a `docker` in {NO_DOCKER_PATH}: the shim tests need a PATH without one"
    ref = f"localhost/ray-dstack-test/docker-access-{uuid.uuid4().hex[:8]}:1"
    images.busybox_image(ref)
    yield ref
    images.podman("rmi", "-f", ref, check=False)


@pytest.fixture
def environ():
    """The replica's environment with the node's container flags (podman's defaults fail here)."""
    return {**os.environ, "RAY_DSTACK_CONTAINER_FLAGS": images.RUN_FLAGS_HERE}


def shell(access: da.DockerAccess, script: str, path: str = NODE_PATH) -> subprocess.CompletedProcess:
    """What the replica's commands do: a shell with the access's env and PATH."""
    env = {**os.environ, **access.env, "PATH": access.path(path)}
    return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=180)


def in_namespace(namespace: str) -> list[str]:
    return images.podman("--namespace", namespace, "ps", "-a", "--format", "{{.Names}}").stdout.split()


def test_flags_become_the_daemons_defaults_on_top_of_the_nodes_conf(tmp_path):
    conf, ignored = da.conf_from_flags(["--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit=nproc=10:10",
                                        "--cgroups=disabled", "--pids-limit", "100", "--security-opt", "label=disable"])
    assert conf == {"engine": {"runtime": "runc"},
                    "containers": {"default_ulimits": ["nofile=1024:1024", "nproc=10:10"], "cgroups": "disabled",
                                   "pids_limit": 100}}
    assert ignored == ["--security-opt", "label=disable"]
    node = tmp_path / "node.conf"
    node.write_text('[containers]\ndefault_capabilities = ["CHOWN"]\ndefault_ulimits = ["core=0:0"]\n'
                    '[engine.runtimes]\nrunc = ["/usr/sbin/runc"]\n[network]\ndefault_subnet = "10.89.0.0/16"\n')
    merged = da.system_conf(print, files=[str(node), str(tmp_path / "absent.conf")])
    da._merge(merged, conf)
    assert tomllib.loads(da.to_toml(merged)) == {
        "containers": {"default_capabilities": ["CHOWN"], "default_ulimits": ["nofile=1024:1024", "nproc=10:10"],
                       "cgroups": "disabled", "pids_limit": 100},
        "engine": {"runtime": "runc", "runtimes": {"runc": ["/usr/sbin/runc"]}},
        "network": {"default_subnet": "10.89.0.0/16"},
    }


def test_docker_ps_and_run_with_the_nodes_docker_command_or_the_shim(image, tmp_path, environ):
    """Whatever `docker` this node offers the commands (its own CLI, else the shim), against the replica's own
    daemon; the node's container flags apply to the containers it runs."""
    work = tmp_path / "web.r1"
    work.mkdir()
    logs: list[str] = []

    async def life() -> tuple[da.DockerAccess, subprocess.CompletedProcess]:
        access = await da.docker_access(work, logs.append, environ=environ, node_socket=tmp_path / "no-daemon.sock")
        try:
            return access, shell(access, f"docker ps && docker run --rm {image} sh -c 'ulimit -n'")
        finally:
            access.close()

    access, done = asyncio.run(life())
    assert done.returncode == 0, done.stderr
    assert "CONTAINER ID" in done.stdout and done.stdout.strip().endswith("1024")  # the node's `--ulimit`
    assert access.source == "podman" and access.docker_host == f"unix://{work}/{da.STATE_DIR}/docker.sock"
    assert access.process is None and not Path(access.docker_host[len("unix://"):]).exists()
    assert any("the replica's own Docker daemon" in line for line in logs)


def test_the_shim_and_what_close_removes(image, tmp_path, environ):
    work = tmp_path / "web.r2"
    work.mkdir()
    namespace = da.namespace_for(work)

    async def life() -> tuple[da.DockerAccess, subprocess.CompletedProcess, list[str]]:
        access = await da.docker_access(work, print, commands_path=NO_DOCKER_PATH, environ=environ,
                                        node_socket=tmp_path / "no-daemon.sock")
        try:
            done = shell(access, f"command -v docker && docker ps && docker run --rm {image} true && "
                                 f"docker run -d --name left-running-{uuid.uuid4().hex[:6]} {image} sleep 600",
                         path=NO_DOCKER_PATH)
            return access, done, in_namespace(namespace)
        finally:
            access.close()

    access, done, running = asyncio.run(life())
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == str(access.bin_dir / "docker")  # the shim: `podman --remote`
    assert len(running) == 1 and running[0].startswith("left-running-")
    assert in_namespace(namespace) == []  # close() removed what the commands left running


def test_a_replica_that_dies_without_stopping_leaves_no_daemon_and_no_container(image, tmp_path, environ):
    """The replica SIGKILLed (Ray kills a dying worker's children too): its supervisor takes the daemon down,
    which removes the commands' containers."""
    work = tmp_path / "web.r3"
    work.mkdir()
    namespace = da.namespace_for(work)
    replica = textwrap.dedent(f"""
        import asyncio, os, subprocess, sys
        from pathlib import Path
        from ray_dstack.serve.runtime import docker_access as da

        async def main():
            access = await da.docker_access(Path({str(work)!r}), print, commands_path={NO_DOCKER_PATH!r},
                                            node_socket=Path({str(tmp_path / "no-daemon.sock")!r}))
            env = {{**os.environ, **access.env, "PATH": access.path({NO_DOCKER_PATH!r})}}
            subprocess.run(["docker", "run", "-d", {image!r}, "sleep", "600"], env=env, check=True)
            print("running", flush=True)
            await asyncio.Event().wait()

        asyncio.run(main())
    """)
    sock = work / da.STATE_DIR / "docker.sock"

    def daemon_processes() -> list[str]:  # the supervisor's two processes and the daemon wrapper name the socket
        return subprocess.run(["pgrep", "-f", "--", f"--socket {sock}"], capture_output=True, text=True).stdout.split()

    env = {**environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", replica], stdout=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:  # its log lines, the container's id, then "running" (EOF if it failed)
            lines.append(line.strip())
            if lines[-1] == "running":
                break
        assert lines[-1:] == ["running"], f"the replica did not get its container running: {lines}"
        assert len(in_namespace(namespace)) == 1 and len(daemon_processes()) == 3
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    wait_until(lambda: in_namespace(namespace) == [] and not sock.exists() and daemon_processes() == [], timeout=30,
               interval=0.2, what="the dead replica's daemon to remove its containers and socket, and exit")


def test_the_nodes_daemon_is_used_when_it_answers(tmp_path, environ):
    """A node with its own daemon (here podman's API on a socket standing in for /var/run/docker.sock): the
    commands use it and the replica starts nothing."""
    node_sock = tmp_path / "docker.sock"
    node_daemon = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{node_sock}"],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: da.ping(node_sock), timeout=30, interval=0.1, what="the node's daemon to answer")
        work = tmp_path / "web.r4"
        work.mkdir()

        async def life() -> tuple[da.DockerAccess, subprocess.CompletedProcess]:
            access = await da.docker_access(work, print, commands_path=NO_DOCKER_PATH, environ=environ,
                                            node_socket=node_sock)
            try:
                return access, shell(access, "docker ps", path=NO_DOCKER_PATH)
            finally:
                access.close()

        access, done = asyncio.run(life())
        assert done.returncode == 0, done.stderr
        assert access.source == "node" and access.docker_host == f"unix://{node_sock}" and access.process is None
        assert access.bin_dir is not None  # podman's API answers there: the shim speaks it
    finally:
        node_daemon.terminate()
        node_daemon.wait(30)


def test_no_daemon_and_no_podman_is_a_clear_error(tmp_path):
    with pytest.raises(da.DockerAccessError) as err:
        asyncio.run(da.docker_access(tmp_path, print, which=lambda *a, **k: None, node_socket=tmp_path / "none.sock"))
    assert "no Docker daemon answering at" in str(err.value) and "apt-get install podman" in str(err.value)


def test_a_directory_too_deep_for_a_socket_gets_one_in_tmp_removed_by_close(image, tmp_path, environ):
    work = tmp_path / ("d" * 90)
    work.mkdir()

    async def life() -> tuple[da.DockerAccess, subprocess.CompletedProcess, Path]:
        access = await da.docker_access(work, print, environ=environ, node_socket=tmp_path / "no-daemon.sock")
        state = Path(access.docker_host[len("unix://"):]).parent
        try:
            return access, shell(access, "docker ps"), state
        finally:
            access.close()

    access, done, state = asyncio.run(life())
    assert done.returncode == 0, done.stderr
    assert not str(state).startswith(str(work)) and len(access.docker_host) - len("unix://") <= da.MAX_SOCKET_PATH
    assert not state.exists()
