"""dstack's container fields on an `image` replica: `user`, `shell`, `privileged`, bind mounts (`-v`), the
image's WORKDIR, the replica's directory on the node, and a runtime failure only a node setting fixes.

The command lines are checked exactly; what they do is checked inside real podman containers of an image built
here (busybox + a user `app`, a group `staff`, WORKDIR /srv and a shell that marks the commands it runs)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from conftest import free_port
from ray_dstack.serve.runtime import container as c
from ray_dstack.serve.runtime import pull_progress, runtime_for, workspace
from ray_dstack.serve.runtime.container_runtime import ContainerRuntime
from ray_dstack.serve.runtime.process import ServiceProcessError
from ray_dstack.spec import GitRepoSpec, MountSpec, ServiceSpec, UploadSpec
from ray_dstack.spec.container_command import ContainerRun, display, volume_arg
from tests.support import images

LOG = logging.getLogger("test.container_fields")
IMAGE = "localhost/ray-dstack-test/runtime-fields:1"  # tests/e2e builds its own `fields:1`
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24


@dataclass(frozen=True)
class Mount:  # the shape of runtime/filesystem.py's Mount
    source: str
    target: str
    read_only: bool = False
    is_file: bool = False


# --- the command line ------------------------------------------------------------------------------------


def test_user_privileged_shell_and_mounts_on_the_command_line():
    run = ContainerRun(runtime="podman", name="svc-r1", image="img:1", container_port=8000, host_port=41000,
                       commands=["serve"], working_dir="/srv", user="app:staff", privileged=True, shell="/bin/bash",
                       mounts=[Mount("/node/data", "/data"), Mount("/node/ws/files/cfg.yml", "/srv/cfg.yml",
                                                                    read_only=True, is_file=True)])
    assert run.argv() == [
        "podman", "run", "--name", "svc-r1", "--init", "--rm", "--pull", "never", "-p", "127.0.0.1:41000:8000",
        "--workdir", "/srv", "--user", "app:staff", "--privileged",
        "-v", "/node/data:/data", "-v", "/node/ws/files/cfg.yml:/srv/cfg.yml:ro",
        "--entrypoint", "/bin/bash", "img:1", "-c", "set -e\nserve\n"]
    plain = ContainerRun(runtime="docker", name="n", image="img:1", container_port=80, host_port=1,
                         commands=["serve"]).argv()
    assert "--user" not in plain and "--privileged" not in plain and "-v" not in plain
    assert plain[plain.index("--entrypoint") + 1] == "/bin/sh"  # dstack's default shell with an image
    # `entrypoint` replaces the shell altogether (dstack: the commands are its arguments)
    with_entrypoint = ContainerRun(runtime="podman", name="n", image="img:1", container_port=80, host_port=1,
                                   commands=["--port", "80"], entrypoint="python3 -m server", shell="/bin/bash").argv()
    assert with_entrypoint[with_entrypoint.index("--entrypoint"):] == [
        "--entrypoint", "python3", "img:1", "-m", "server", "--port", "80"]


def test_a_colon_in_a_mount_path_is_refused_with_the_path():
    with pytest.raises(ValueError, match="'/a:b' contains ':'"):
        volume_arg(Mount("/a:b", "/data"))


def spec(**fields) -> ServiceSpec:
    base = dict(name="web", commands=["httpd -f -p 8000"], image=IMAGE, port=8000)
    return ServiceSpec(**{**base, **fields})


def test_plan_shows_the_mounts_with_placeholders_where_the_node_decides():
    shown = display(spec(
        volumes=[MountSpec(kind="instance", instance_path="/mnt/models", path="/models"),
                 MountSpec(kind="volume", names=["cache-0", "cache-1"], path="/cache")],
        uploads=[UploadSpec(uri="gcs://_ray_pkg_1.zip", path="app", source="./app", size=10)],
        git_repo=GitRepoSpec(url="https://github.com/acme/svc.git", path="src"),
        user="1000:1000", privileged=True, shell="/bin/bash"))
    assert ("--user 1000:1000 --privileged -v /mnt/models:/models -v '<$RAY_DSTACK_VOLUME_ROOT>/cache-0|cache-1:/cache' "
            "-v '<unpacked ./app>:<image WORKDIR>/app' -v '<git clone>:<image WORKDIR>/src'") in shown
    assert "--entrypoint /bin/bash" in shown
    # an absolute working_dir is where relative paths land (and the container's --workdir)
    assert "-v '<unpacked ./app>:/work/app'" in display(spec(
        working_dir="/work", uploads=[UploadSpec(uri="gcs://_ray_pkg_1.zip", path="app", source="./app", size=1)]))


PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1234:2345::/home/app:/bin/sh\n"
GROUP = "root:x:0:\nstaff:x:3456:app\n"


def test_user_as_the_image_resolves_it():
    assert c.resolve_user("app", PASSWD, None, "img") == (1234, 2345)
    assert c.resolve_user("app:staff", PASSWD, GROUP, "img") == (1234, 3456)
    assert c.resolve_user("app:77", PASSWD, None, "img") == (1234, 77)
    assert c.resolve_user("1234", PASSWD, None, "img") == (1234, 2345)  # the uid's passwd entry gives the group
    assert c.resolve_user("4321", PASSWD, None, "img") == (4321, 0)  # none: group 0, as Docker and podman do
    with pytest.raises(c.ContainerError, match="user 'ghost': image img has no user 'ghost'"):
        c.resolve_user("ghost", PASSWD, None, "img")
    with pytest.raises(c.ContainerError, match="no group 'wheel'"):
        c.resolve_user("app:wheel", PASSWD, GROUP, "img")


RUNC = ("Error: runc: runc create failed: unable to start container process: error during container init: error "
        "setting rlimits for ready process: error setting rlimit type 7: operation not permitted: OCI permission denied")
CRUN = "Error: crun: setrlimit `RLIMIT_NOFILE`: Operation not permitted: OCI permission denied"


def test_the_node_setting_named_for_each_runtimes_words():
    for line in (RUNC, CRUN):
        hint = c.node_setting_hint(["starting", line], environ={})
        assert 'RAY_DSTACK_CONTAINER_FLAGS="--ulimit nofile=1024:1024 --ulimit nproc=1000:1000"' in hint
    # the node's other flags stay; limits it already tried are replaced
    hint = c.node_setting_hint([RUNC], environ={c.FLAGS_ENV: "--runtime runc --ulimit nofile=1048576:1048576"})
    assert 'RAY_DSTACK_CONTAINER_FLAGS="--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1000:1000"' in hint
    assert "(it is RAY_DSTACK_CONTAINER_FLAGS='--runtime runc --ulimit nofile=1048576:1048576' there now)" in hint
    hybrid = c.node_setting_hint(["Error: crun: cgroups in hybrid mode not supported"], environ={})
    assert 'RAY_DSTACK_CONTAINER_FLAGS="--runtime runc"' in hybrid
    assert c.node_setting_hint(["Error: no such file: /app/server"], environ={}) is None


# --- real containers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image():
    missing = [t for t in ("podman", "runc", images.BUSYBOX) if not (os.path.exists(t) or shutil.which(t))]
    assert not missing, f"these tests need {missing} (.ci/run installs them with apt-get)"
    with tempfile.TemporaryDirectory(prefix="ray-dstack-rootfs-") as tmp:
        root = Path(tmp)
        images.busybox_rootfs(root)
        with open(root / "etc" / "passwd", "a") as fh:
            fh.write("app:x:1234:2345::/srv:/bin/sh\n")
        with open(root / "etc" / "group", "a") as fh:
            fh.write("staff:x:3456:app\n")
        (root / "srv").mkdir()
        shell = root / "usr" / "local" / "bin" / "markshell"
        shell.parent.mkdir(parents=True)
        shell.write_text('#!/bin/sh\nexport SHELL_USED=markshell\nexec /bin/sh "$@"\n')
        shell.chmod(0o755)
        tar = root.parent / f"{root.name}.tar"
        subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True)
        try:
            images.podman("import", "--change", "ENV PATH=/usr/local/bin:/usr/bin:/bin", "--change", "WORKDIR /srv",
                          "--change", 'CMD ["/bin/sh"]', str(tar), IMAGE)
        finally:
            tar.unlink()
    yield IMAGE
    images.podman("rmi", "-f", IMAGE, check=False)


def podman_runtime() -> c.Runtime:
    return c.Runtime("podman", shutil.which("podman"))


def test_what_the_image_says_workdir_and_users(image):
    rt = podman_runtime()
    assert c.image_working_dir(rt, image) == "/srv"
    assert c.image_user_ids(rt, image, "app") == (1234, 2345)
    assert c.image_user_ids(rt, image, "app:staff") == (1234, 3456)
    assert c.image_user_ids(rt, image, "nobody") == (65534, 65534)
    assert c.image_user_ids(rt, image, "7:8") == (7, 8)  # numbers only: nothing to look up
    with pytest.raises(c.ContainerError, match="no user 'ghost'"):
        c.image_user_ids(rt, image, "ghost")
    leftovers = images.podman("ps", "-a", "--filter", "name=ray-dstack-inspect-", "--format", "{{.Names}}").stdout
    assert not leftovers.strip()  # the containers created to read /etc/passwd are gone


INSPECT = ('echo "uid=$(id -u) gid=$(id -g) shell=$0 marked=${SHELL_USED:-no} pwd=$(pwd)"; '
           "grep CapEff /proc/self/status; cat /data/in.txt; cat /srv/cfg.yml; "
           "if touch /srv/cfg.yml 2>/dev/null; then echo cfg-writable; else echo cfg-read-only; fi; "
           "echo from-container > /data/out.txt")


def cap_eff(output: str) -> int:
    return int(next(line for line in output.splitlines() if line.startswith("CapEff:")).split()[1], 16)


def test_user_shell_privileged_and_mounts_inside_a_real_container(image, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)  # the container's `app` writes here
    (data / "in.txt").write_text("from-node\n")
    cfg = tmp_path / "cfg.yml"
    cfg.write_text("key: value\n")
    mounts = [Mount(str(data), "/data"), Mount(str(cfg), "/srv/cfg.yml", read_only=True, is_file=True)]
    flags = c.extra_flags({c.FLAGS_ENV: images.RUN_FLAGS_HERE})

    def run(**fields) -> str:
        argv = ContainerRun(runtime="podman", name=f"ray-dstack-test-fields-{uuid.uuid4().hex[:8]}", image=image,
                            container_port=8000, host_port=free_port(), commands=[INSPECT], mounts=mounts,
                            flags=flags, **fields).argv()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = run(user="app", shell="/usr/local/bin/markshell")
    assert "uid=1234 gid=2345 shell=/bin/sh marked=markshell pwd=/srv" in out  # markshell ran, then exec sh
    assert "from-node" in out and "key: value" in out and "cfg-read-only" in out
    assert (data / "out.txt").read_text() == "from-container\n"
    assert (data / "out.txt").stat().st_uid == 1234  # the container's user wrote it through the bind mount

    out = run()  # the image's user (root), dstack's default shell, the runtime's default capabilities
    assert "uid=0 gid=0 shell=/bin/sh marked=no pwd=/srv" in out
    assert not cap_eff(out) & (1 << CAP_SYS_ADMIN)
    out = run(privileged=True)
    assert cap_eff(out) & (1 << CAP_SYS_ADMIN)
    assert "cfg-read-only" in out  # root, privileged even: `:ro` holds


@pytest.fixture
def node(tmp_path, monkeypatch):
    def outside_ray():  # Ray's runtime context would start a local Ray in this process (outside a worker)
        raise RuntimeError("not in a Ray worker")

    monkeypatch.setattr(pull_progress, "_node_id", outside_ray)
    monkeypatch.setenv(workspace.WORK_ROOT_ENV, str(tmp_path / "work"))
    monkeypatch.setenv(c.RUNTIME_ENV, "podman")
    monkeypatch.setenv(c.FLAGS_ENV, images.RUN_FLAGS_HERE)
    return tmp_path


def containers_of(service: str) -> list[str]:
    out = images.podman("ps", "-a", "--filter", f"label={c.SERVICE_LABEL}={service}", "--format", "{{.Names}}")
    return out.stdout.split()


def test_a_container_replica_with_its_own_directory_user_and_shell(image, node):
    commands = ["mkdir -p /tmp/www",
                'echo "uid=$(id -u) marked=${SHELL_USED:-no} pwd=$(pwd) wd=$DSTACK_WORKING_DIR" > /tmp/www/info',
                "httpd -f -p 8000 -h /tmp/www"]
    runtime = runtime_for(spec(name="fields-life", commands=commands, user="app",
                               shell="/usr/local/bin/markshell"), replica_tag="r1", logger=LOG)
    assert isinstance(runtime, ContainerRuntime)

    async def life() -> tuple[str, dict]:
        await runtime.prepare()
        try:
            await runtime.start()
            await runtime.ready(60.0)
            async with httpx.AsyncClient(trust_env=False) as client:
                info = (await client.get(f"http://127.0.0.1:{runtime.port}/info")).text
            await runtime.check_health()
            return info, runtime.describe()
        finally:
            await runtime.stop(grace_s=10.0)

    info, described = asyncio.run(life())
    # No working_dir: the image's WORKDIR, and the commands are told it as dstack's runner tells them.
    assert info.strip() == "uid=1234 marked=markshell pwd=/srv wd=/srv"
    assert described["working_dir"] == "/srv" and described["container"] == "fields-life-r1"
    work = Path(described["workspace"])
    assert work.parent == node / "work"
    assert not work.exists() and containers_of("fields-life") == []  # stopped: directory and container gone


def test_a_runtime_that_may_not_set_rlimits_names_the_node_setting(image, node, monkeypatch):
    """Without RAY_DSTACK_CONTAINER_FLAGS podman's default limits fail setrlimit on a node without
    CAP_SYS_RESOURCE (this machine, CI). On a node that has it, a limit above the kernel's nr_open fails the
    same way, so the same failure is reproduced either way."""
    with open("/proc/self/status") as fh:
        caps = cap_eff(fh.read())
    if caps & (1 << CAP_SYS_RESOURCE):
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text()) + 1
        monkeypatch.setenv(c.FLAGS_ENV, f"--runtime runc --ulimit nofile={nr_open}:{nr_open}")
    else:
        monkeypatch.delenv(c.FLAGS_ENV)
    runtime = runtime_for(spec(name="fields-rlimit"), replica_tag="r1", logger=LOG)

    async def life() -> str:
        await runtime.prepare()
        try:
            await runtime.start()
            with pytest.raises(ServiceProcessError) as info:
                await runtime.ready(60.0)
            return str(info.value)
        finally:
            await runtime.stop(grace_s=10.0)

    message = asyncio.run(life())
    # What `deploy` prints: the setting first, then the runtime's own words from the replica's log tail.
    assert message.startswith("the container runtime may not set the container's resource limits on node ")
    assert 'set RAY_DSTACK_CONTAINER_FLAGS="' in message and "--ulimit nofile=1024:1024" in message
    assert "operation not permitted" in message.lower() and "exited with code" in message
    assert containers_of("fields-rlimit") == [] and os.listdir(node / "work") == []


def git_repo(path: Path) -> str:
    """A local repository with one commit (a URL every node of this machine can clone)."""
    path.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    (path / "README.md").write_text("cloned for the container\n")
    for argv in (["init", "-q", "-b", "main"], ["add", "README.md"], ["commit", "-q", "-m", "one"]):
        subprocess.run(["git", "-C", str(path), *argv], check=True, env=env)
    return f"file://{path}"


def test_a_container_replica_with_volumes_and_a_repo_owned_by_its_user(image, node, monkeypatch):
    """filesystem.prepare_files puts them in place under the replica's directory; the container sees them at
    their paths (a relative repo path under the image's WORKDIR), the clone belongs to `user` as the image
    resolves the name, and the node's directory keeps what the commands wrote."""
    node_dir = node / "node-dir"
    node_dir.mkdir()
    node_dir.chmod(0o777)
    (node_dir / "from-the-node").write_text("x")
    monkeypatch.setenv("RAY_DSTACK_VOLUME_ROOT", str(node / "volumes"))
    commands = ["mkdir -p /tmp/www",
                "ls /data > /tmp/www/data",
                "touch /data/written-by-app /cache/written-by-app",
                "cat src/README.md > /tmp/www/repo",
                "stat -c %u:%g src/README.md > /tmp/www/owner",
                "echo changed >> src/README.md",  # the clone is the user's to change
                "httpd -f -p 8000 -h /tmp/www"]
    runtime = runtime_for(spec(
        name="fields-files", commands=commands, user="app",
        volumes=[MountSpec(kind="instance", instance_path=str(node_dir), path="/data"),
                 MountSpec(kind="volume", names=["model-cache"], path="/cache")],
        git_repo=GitRepoSpec(url=git_repo(node / "repo"), branch="main", path="src")), replica_tag="r1", logger=LOG)

    async def life() -> tuple[dict[str, str], dict]:
        await runtime.prepare()
        try:
            await runtime.start()
            await runtime.ready(60.0)
            async with httpx.AsyncClient(trust_env=False) as client:
                got = {name: (await client.get(f"http://127.0.0.1:{runtime.port}/{name}")).text.strip()
                       for name in ("data", "repo", "owner")}
            return got, runtime.describe()
        finally:
            await runtime.stop(grace_s=10.0)

    got, described = asyncio.run(life())
    assert got == {"data": "from-the-node", "repo": "cloned for the container", "owner": "1234:2345"}
    mounts = described["mounts"]
    assert f"{node_dir}:/data" in mounts and f"{node / 'volumes' / 'model-cache'}:/cache" in mounts
    assert any(m.endswith(":/srv/src") and m.startswith(described["workspace"]) for m in mounts), mounts
    assert (node_dir / "written-by-app").stat().st_uid == 1234
    assert (node / "volumes" / "model-cache" / "written-by-app").exists()  # volumes outlive the replica
    assert not Path(described["workspace"]).exists() and containers_of("fields-files") == []
