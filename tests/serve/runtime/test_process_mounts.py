"""dstack's `volumes`, `files`, `shell` and `user` for a replica without an image, for real: a ProcessRuntime and a
NamespaceRuntime (pasta) replica driven without Serve, with an instance volume, a named volume, `files` at a
relative and at an absolute path, `shell: /bin/sh` and `user: nobody`; the commands record what they see and
serve it. Archives come from a real local Ray's package store. Needs root, util-linux and pasta (.ci/run
installs them), as the project's other namespace tests."""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ray_dstack.serve.runtime import filesystem, python_env, workspace
from ray_dstack.serve.runtime.base import probe_client
from ray_dstack.serve.runtime.filesystem import Mount
from ray_dstack.serve.runtime.host import NamespaceRuntime, ProcessRuntime, mountable
from ray_dstack.serve.runtime.process import ServiceProcessError
from ray_dstack.spec import MountSpec, ServiceSpec, UploadSpec
from tests.support.packages import zip_of

LOG = logging.getLogger("test.mounts")
NOBODY = pwd.getpwnam("nobody")
assert os.geteuid() == 0 and shutil.which("unshare") and shutil.which("pasta"), \
    "these replicas need root, util-linux's unshare and pasta (Debian package passt): .ci/run provides them"




APP_ZIP = zip_of({"bin/hello.sh": (b"#!/bin/sh\necho hello from the app\n", 0o755)})
CFG_ZIP = zip_of({"app.cfg": (b"answer=42\n", 0o644)})


@pytest.fixture(scope="module")
def package_store():
    """A real local Ray holding the two archives as `deploy` leaves them (Ray's packaging.py's KV keys)."""
    import ray
    from ray.experimental import internal_kv

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        internal_kv._internal_kv_put("gcs://_ray_pkg_h1app.zip", APP_ZIP)
        internal_kv._internal_kv_put("gcs://_ray_pkg_h1cfg.zip", CFG_ZIP)
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def base(tmp_path, monkeypatch):
    """A directory `nobody` may walk through (pytest's own are root's only), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="ray-dstack-mounts-", dir="/tmp"))
    path.chmod(0o755)
    monkeypatch.setenv(workspace.WORK_ROOT_ENV, str(path / "work"))
    monkeypatch.setenv(filesystem.VOLUME_ROOT_ENV, str(path / "volumes"))
    monkeypatch.setenv(python_env.ENV_ROOT_ENV, str(tmp_path / "envs"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


def service(base: Path, *, namespace: bool) -> ServiceSpec:
    seen = base / "seen"  # where the commands see their mounts: absolute paths outside the workspace
    host = base / "host-models"
    host.mkdir()
    (host / "weights.bin").write_text("W")
    (base / "root-only").mkdir(mode=0o755)
    return ServiceSpec(
        name="mounts",
        commands=[
            "id -un > whoami",
            "readlink /proc/$$/exe > shell",
            f"cat {seen}/models/weights.bin > models",
            f"echo from-the-service > {seen}/cache/out.txt",
            "app/bin/hello.sh > hello",
            f"cat {seen}/conf/app.cfg > cfg",
            f"if touch {base}/root-only/x 2>/dev/null; then echo yes; else echo no; fi > root-write",
            f"exec busybox httpd -f -p {'8000' if namespace else '$RAY_DSTACK_PORT'} -h .",
        ],
        port=8000,
        port_from_env=not namespace,
        network_namespace=namespace,
        volumes=[MountSpec(kind="instance", instance_path=str(host), path=f"{seen}/models"),
                 MountSpec(kind="volume", names=["h1-cache"], path=f"{seen}/cache")],
        uploads=[UploadSpec(uri="gcs://_ray_pkg_h1app.zip", path="app", source="./app", size=len(APP_ZIP)),
                 UploadSpec(uri="gcs://_ray_pkg_h1cfg.zip", path=f"{seen}/conf/app.cfg", source="app.cfg",
                            size=len(CFG_ZIP), is_file=True)],
        shell="/bin/sh",
        user="nobody",
    )


def host_mounts(base: Path) -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        return [line for line in fh if str(base) in line]


@pytest.mark.parametrize("kind", [ProcessRuntime, NamespaceRuntime])
def test_volumes_files_shell_and_user(package_store, base, kind):
    spec = service(base, namespace=kind is NamespaceRuntime)

    async def life() -> tuple[dict[str, str], dict, bytes]:
        runtime = kind(spec, replica_tag="r1", logger=LOG)
        try:
            await runtime.prepare()
            await runtime.start()
            await runtime.ready(60.0)
            work = Path(runtime.workspace)
            seen = {name: (work / name).read_text().strip()
                    for name in ("whoami", "shell", "models", "hello", "cfg", "root-write")}
            async with probe_client(runtime.process) as client:
                served = (await client.get(f"http://127.0.0.1:{runtime.port}/whoami")).content
            # The mounts live in the replica's own namespace: on the node the mount points are empty.
            assert os.listdir(base / "seen" / "models") == [] and host_mounts(base) == []
            assert stat.S_IMODE((work / "app" / "bin" / "hello.sh").stat().st_mode) == 0o755
            assert (work.stat().st_uid, (work / "app").stat().st_uid) == (NOBODY.pw_uid, NOBODY.pw_uid)
            described = runtime.describe()
        finally:
            await runtime.stop(grace_s=5.0)
        return seen, described, served

    seen, described, served = asyncio.run(life())
    assert seen == {
        "whoami": "nobody",  # the real user, with the real user's file access
        "shell": os.path.realpath("/bin/sh"),
        "models": "W",
        "hello": "hello from the app",
        "cfg": "answer=42",
        "root-write": "no",
    }
    assert served == b"nobody\n"
    out = base / "volumes" / "h1-cache" / "out.txt"  # the named volume keeps what the service wrote
    assert out.read_text() == "from-the-service\n" and out.stat().st_uid == NOBODY.pw_uid
    assert {m["target"] for m in described["mounts"]} == {
        f"{base}/seen/models", f"{base}/seen/cache", f"{base}/seen/conf/app.cfg"}
    assert described["user"].startswith("nobody (uid")
    assert os.listdir(base / "work") == []  # workspace, files directory (and connector) gone
    assert host_mounts(base) == []


def test_a_mount_the_node_cannot_make_fails_naming_the_field_unless_optional():
    volume = Mount("/srv/models", "/models", field="volumes")
    upload = Mount("/w/0-files", "/etc/app", field="files")
    optional = Mount("/srv/extra", "/extra", field="volumes", optional=True)
    warnings: list[str] = []
    assert mountable([volume, upload], None, warnings.append) == (volume, upload)
    with pytest.raises(ServiceProcessError, match=r"^files: /etc/app needs a bind mount .* Ray to run as root .*"
                                                  r"or use a container `image`$"):
        mountable([optional, upload], "Ray to run as root", warnings.append)
    assert mountable([optional], "util-linux's unshare", warnings.append) == ()
    assert warnings == ["volumes: /srv/extra is not mounted at /extra: that needs util-linux's unshare on this "
                        "node (optional: running without it)"]


def test_user_needs_root_unless_it_is_the_replica_own():
    """As a non-root replica (a real `nobody` process), another user is refused with what to do."""
    code = ("from ray_dstack.serve.runtime.users import resolve\n"
            "print(resolve('nobody'))\n"
            "try:\n    resolve('root')\nexcept Exception as exc:\n    print(exc)\n")
    out = subprocess.run(["setpriv", "--reuid", "nobody", "--regid", str(NOBODY.pw_gid), "--clear-groups",
                          sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    lines = out.stdout.splitlines()
    assert lines[0] == "None", out.stderr
    assert lines[1].startswith("user: running the commands as 'root' needs Ray to run as root on node ")
    assert lines[1].endswith("or use a container `image`")


def test_an_unknown_shell_or_user_fails_prepare(base):
    async def prepare(**fields) -> str:
        spec = ServiceSpec(name="bad", commands=["true"], port=8000, port_from_env=True, **fields)
        runtime = ProcessRuntime(spec, replica_tag="r1", logger=LOG)
        try:
            with pytest.raises(ServiceProcessError) as info:
                await runtime.prepare()
        finally:
            await runtime.stop()
        return str(info.value)

    assert asyncio.run(prepare(shell="/no/such/sh")).startswith("shell: /no/such/sh is not an executable file")
    assert asyncio.run(prepare(user="no-such-user-h1")).startswith("user: there is no user 'no-such-user-h1'")
    assert asyncio.run(prepare(user="nobody:no-such-group")).startswith("user: 'nobody:no-such-group': there is no group")
