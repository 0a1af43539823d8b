"""Container images and a private registry for the tests, built from this machine's files (no download).

- `busybox_image(ref)`: a rootfs of busybox-static (Debian package) with its applets as links: a shell and
  `httpd`; ~2 MB, imported in well under a second.
- `tgi_image(ref)`: the busybox rootfs plus the node's Debian Python 3.11 (`/usr/bin/python3.11`, the shared
  libraries `ldd` names, the standard library without tests/tk/idle/config) and a `text-generation-launcher`
  that runs tests/apps/tgi_stdlib_server.py, TGI's launcher options included.
- `Registry`: Debian's `docker-registry` (distribution 2.8) with htpasswd auth (`htpasswd -Bbn` from
  apache2-utils) on 127.0.0.1:<free port>, declared insecure in /etc/containers/registries.conf.d/ as an
  operator would (removed again on stop); `push()` logs in with an auth file of its own, never node-wide.

`RUN_FLAGS_HERE`: what podman 4.3 needs on this machine (crun refuses the hybrid cgroup layout; podman's
default ulimits fail setrlimit without CAP_SYS_RESOURCE), passed through `RAY_DSTACK_CONTAINER_FLAGS`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from conftest import REPO, free_port, wait_until

RUN_FLAGS_HERE = "--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1000:1000"
BUSYBOX = "/bin/busybox"
PYTHON = "/usr/bin/python3.11"
STDLIB = "/usr/lib/python3.11"
STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "distutils",
               "dist-packages", "site-packages", "unittest", "config-3.11-x86_64-linux-gnu"}
TOOLS = ("podman", "runc", "docker-registry", "htpasswd", BUSYBOX)


def cluster_env(base: Path, **extra: str) -> dict[str, str]:
    """The environment of a local cluster for container tests (its replicas get this machine's podman flags),
    the home under `base`, plus `extra`."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update({
        "RAY_DSTACK_HOME": str(base / "home"),
        "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        "RAY_DSTACK_CONTAINER_RUNTIME": "podman",
        "RAY_DSTACK_CONTAINER_FLAGS": RUN_FLAGS_HERE,
        **extra,
    })
    return env


def missing_tools() -> list[str]:
    return [t for t in TOOLS if not (shutil.which(t) or os.path.exists(t))]


def podman(*args: str, check: bool = True, input: str | None = None, timeout: float = 300):
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, input=input, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:2])} failed: {proc.stderr.strip()[-2000:]}")
    return proc


def busybox_rootfs(root: Path) -> None:
    for d in ("bin", "tmp", "etc", "root", "proc", "sys", "dev"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox" and not (root / "bin" / applet).exists():
            (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")


def _copy_with_libs(binary: str, root: Path) -> None:
    dest = root / binary.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, dest)
    for line in subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout.splitlines():
        parts = line.split()
        path = next((p for p in parts if p.startswith("/")), None)
        if path:
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(path), target)


def python_rootfs(root: Path) -> None:
    busybox_rootfs(root)
    _copy_with_libs(PYTHON, root)
    (root / "usr" / "bin" / "python3").symlink_to("python3.11")
    shutil.copytree(STDLIB, root / STDLIB.lstrip("/"), symlinks=True,
                    ignore=lambda d, names: [n for n in names if n in STDLIB_SKIP and d == STDLIB])
    app = root / "opt" / "tgi"
    app.mkdir(parents=True)
    shutil.copy2(REPO / "tests" / "apps" / "tgi_stdlib_server.py", app / "server.py")
    launcher = root / "usr" / "local" / "bin" / "text-generation-launcher"
    launcher.parent.mkdir(parents=True)
    launcher.write_text('#!/bin/sh\nexec /usr/bin/python3 -u /opt/tgi/server.py "$@"\n')
    launcher.chmod(0o755)


def import_rootfs(root: Path, ref: str, *, cmd: str | None = None, entrypoint: str | None = None) -> None:
    """`tar` + `podman import`: a one-layer image; `cmd`/`entrypoint` are JSON arrays (Dockerfile syntax)."""
    with tempfile.TemporaryDirectory(prefix="ray-dstack-img-") as tmp:
        tar = Path(tmp) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True)
        changes = ["--change", "ENV PATH=/usr/local/bin:/usr/bin:/bin"]
        if cmd:
            changes += ["--change", f"CMD {cmd}"]
        if entrypoint:
            changes += ["--change", f"ENTRYPOINT {entrypoint}"]
        podman("import", *changes, str(tar), ref)


def busybox_image(ref: str, *, cmd: str | None = '["/bin/sh"]') -> float:
    """Build the busybox image; returns the seconds it took."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ray-dstack-rootfs-") as tmp:
        busybox_rootfs(Path(tmp))
        import_rootfs(Path(tmp), ref, cmd=cmd)
    return time.monotonic() - start


def tgi_image(ref: str) -> float:
    """Build the TGI-shaped image (its default command is the launcher on port 80); returns the seconds."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ray-dstack-rootfs-") as tmp:
        python_rootfs(Path(tmp))
        import_rootfs(Path(tmp), ref, cmd='["text-generation-launcher", "--port", "80"]')
    return time.monotonic() - start


def image_size_mb(ref: str) -> float:
    out = podman("image", "inspect", "--format", "{{.Size}}", ref).stdout.strip()
    return int(out) / 1e6


class Registry:
    """A private registry on 127.0.0.1:<free port> that wants `username`/`password` (htpasswd, bcrypt)."""

    def __init__(self, username: str, password: str) -> None:
        self.username, self.password = username, password
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="ray-dstack-registry-"))
        self.conf_d = Path("/etc/containers/registries.conf.d") / f"ray-dstack-test-{self.port}.conf"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Registry":
        htpasswd = subprocess.run(["htpasswd", "-Bbn", self.username, self.password], capture_output=True,
                                  text=True, check=True).stdout
        (self.dir / "htpasswd").write_text(htpasswd)
        (self.dir / "config.yml").write_text(
            "version: 0.1\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.dir / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n"
            f"auth:\n  htpasswd:\n    realm: ray-dstack-test\n    path: {self.dir / 'htpasswd'}\n"
        )
        # How an operator makes a plain-HTTP registry usable: declare it insecure for podman/skopeo.
        self.conf_d.write_text(f'[[registry]]\nlocation = "{self.host}"\ninsecure = true\n')
        self.log = open(self.dir / "registry.log", "wb")
        self.proc = subprocess.Popen(["docker-registry", "serve", str(self.dir / "config.yml")],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        import httpx

        # 401 is the answer that says it is up (the API wants credentials).
        wait_until(lambda: httpx.get(f"http://{self.host}/v2/", timeout=2).status_code == 401,
                   timeout=30, interval=0.2, what="the registry to answer")
        return self

    def push(self, local_ref: str, name: str) -> str:
        """Push `local_ref` as `<host>/<name>` with an auth file of its own; returns the remote reference."""
        remote = f"{self.host}/{name}"
        with tempfile.TemporaryDirectory(prefix="ray-dstack-push-") as tmp:
            auth = os.path.join(tmp, "auth.json")
            podman("login", "--authfile", auth, "--username", self.username, "--password-stdin", self.host,
                   input=self.password)
            podman("push", "--authfile", auth, local_ref, remote)
        return remote

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.log.close()
        self.conf_d.unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)
