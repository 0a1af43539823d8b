"""The Python environment a service's commands run with: one virtual environment per (service, Python
version) on each node, never the Python that Ray itself runs from.

- Where: `$RAY_DSTACK_ENV_ROOT/<service>-py<version>` (default /tmp/ray-dstack/envs).
- Created once under an exclusive lock (`<env>.lock`), so two replicas starting at once on a node wait for
  one creation instead of corrupting it; `<env>/.complete` is written last, so a creation that died half way
  is redone. Then reused: a restarted or added replica finds it complete and installs nothing again.
- `uv venv --seed` (pip inside, so `pip install` in the commands lands in the env) — measured 0.6 s here
  against 4.7 s for `python -m venv`, which remains the fallback when uv is missing or fails.
- `python: "3.x"` picks an interpreter the node has (see `find_python`), never a download.
- An env of the node's own Python version also sees the node's site-packages, *after* its own (a `.pth`
  file): commands like `python -m llama_cpp.server` keep using what the node has installed, while
  `pip install X` writes into the env only (pip never uninstalls outside the env it runs in).
- Garbage collection: each replica holds a shared lock on `<env>/.in-use` while it runs; creating an env
  removes the other envs nobody holds whose last use is older than `$RAY_DSTACK_ENV_TTL_S` (default one
  day). The env of a deleted service is collected that way.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import site
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ray_dstack.errors import RayDstackError
from ray_dstack.spec import env_dir_name

ENV_ROOT_ENV = "RAY_DSTACK_ENV_ROOT"
DEFAULT_ENV_ROOT = "/tmp/ray-dstack/envs"
PYTHON_DIRS_ENV = "RAY_DSTACK_PYTHON_DIRS"
ENV_TTL_ENV = "RAY_DSTACK_ENV_TTL_S"
DEFAULT_ENV_TTL_S = 86400.0
COMPLETE = ".complete"
IN_USE = ".in-use"
NODE_SITE_PTH = "_ray_dstack_node_site.pth"
CREATE_TIMEOUT_S = 600.0
_VERSION = re.compile(r"^python(3\.\d+)$")


class PythonEnvError(RayDstackError):
    """The node cannot provide the environment a service asks for."""


def node_version() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def env_root() -> Path:
    return Path(os.environ.get(ENV_ROOT_ENV) or DEFAULT_ENV_ROOT)


def _python_dirs() -> list[Path] | None:
    """`$RAY_DSTACK_PYTHON_DIRS` (os.pathsep-separated): when set, the only places interpreters are taken from."""
    value = os.environ.get(PYTHON_DIRS_ENV)
    if value is None:
        return None
    return [Path(p).expanduser() for p in value.split(os.pathsep) if p]


def _executables_in(directory: Path) -> Iterator[Path]:
    for d in (directory, directory / "bin"):
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            if _VERSION.match(name) and os.access(d / name, os.X_OK):
                yield d / name


def _candidates() -> Iterator[Path]:
    """Interpreters this node offers, most specific places first."""
    dirs = _python_dirs()
    if dirs is not None:
        for d in dirs:
            yield from _executables_in(d)
        return
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    if pyenv.is_dir():
        for d in sorted(pyenv.iterdir()):
            yield from _executables_in(d)
    # PATH, without pyenv's shims (a shim for a version not selected fails when run).
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if d and "shims" not in Path(d).parts:
            yield from _executables_in(Path(d))
    for d in ("/usr/local/bin", "/usr/bin"):
        yield from _executables_in(Path(d))


def _version_of(path: Path) -> str | None:
    match = _VERSION.match(path.name)
    return match.group(1) if match else None


def available_versions() -> list[str]:
    versions = {v for p in _candidates() if (v := _version_of(p))}
    if _python_dirs() is None:
        versions.add(node_version())
    return sorted(versions, key=lambda v: tuple(int(x) for x in v.split(".")))


def _runs(path: Path, version: str) -> bool:
    try:
        out = subprocess.run([str(path), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and out.stdout.strip() == version


def find_python(version: str) -> Path:
    """An interpreter of `version` on this node; PythonEnvError naming the node and what it has otherwise."""
    if version == node_version() and _python_dirs() is None:
        return Path(sys.executable)
    for path in _candidates():
        if _version_of(path) == version and _runs(path, version):
            return path
    import socket

    have = ", ".join(available_versions()) or "none"
    raise PythonEnvError(
        f"`python: \"{version}\"`: node {socket.gethostname()} has no Python {version} "
        f"(Python versions on this node: {have}). Install it there (e.g. with pyenv or the OS packages), "
        f"or list where it is in ${PYTHON_DIRS_ENV}; ray-dstack never downloads interpreters."
    )


def _uv() -> str | None:
    return shutil.which("uv", path=os.path.dirname(sys.executable)) or shutil.which("uv")


def _create(python: Path, path: Path, log) -> None:
    uv = _uv()
    if uv is not None:
        proc = subprocess.run([uv, "venv", "--seed", "--quiet", "--no-python-downloads", "--python", str(python),
                               str(path)], capture_output=True, text=True, timeout=CREATE_TIMEOUT_S,
                              check=False)
        if proc.returncode == 0:
            return
        log(f"uv venv failed ({proc.stderr.strip()[-500:]}); falling back to python -m venv")
        shutil.rmtree(path, ignore_errors=True)
    proc = subprocess.run([str(python), "-m", "venv", str(path)], capture_output=True, text=True,
                          timeout=CREATE_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise PythonEnvError(f"could not create the environment {path}: {proc.stderr.strip()[-1000:]}")


def _site_packages(path: Path, version: str) -> Path:
    return path / "lib" / f"python{version}" / "site-packages"


def _see_node_site(path: Path, version: str) -> None:
    """Make the node's packages importable after the env's own (`import` lines: their .pth files run too)."""
    lines = [f"import site; site.addsitedir({p!r})\n" for p in site.getsitepackages() if os.path.isdir(p)]
    (_site_packages(path, version) / NODE_SITE_PTH).write_text("".join(lines))


def _lock(path: Path, mode: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class PythonEnv:
    """A service's environment on this node, held (shared lock) until `release()`."""

    path: Path
    version: str
    created: bool  # this replica created it (False: reused)
    seconds: float  # time spent getting it (waiting for the lock included)
    _in_use_fd: int | None = None

    @property
    def bin_dir(self) -> Path:
        return self.path / "bin"

    def apply(self, env: dict[str, str]) -> dict[str, str]:
        """`env` for commands that run in this environment (python, python3, pip resolve in it)."""
        env = dict(env)
        env["VIRTUAL_ENV"] = str(self.path)
        env["PATH"] = str(self.bin_dir) + os.pathsep + env.get("PATH", "")
        env.pop("PYTHONHOME", None)
        return env

    def release(self) -> None:
        if self._in_use_fd is not None:
            try:
                os.utime(self.path / IN_USE)  # last use, for garbage collection
            except OSError:
                pass
            os.close(self._in_use_fd)
            self._in_use_fd = None


def acquire(service: str, version: str | None, log=lambda _msg: None) -> PythonEnv:
    """The service's environment for `version` (None: the node's own), created if missing, held in use."""
    started = time.monotonic()
    version = version or node_version()
    root = env_root()
    root.mkdir(parents=True, exist_ok=True)
    path = root / env_dir_name(service, version)
    created = False
    lock = _lock(root / (path.name + ".lock"), fcntl.LOCK_EX)
    try:
        if not (path / COMPLETE).exists():
            python = find_python(version)
            shutil.rmtree(path, ignore_errors=True)  # a creation that died half way
            log(f"creating the Python {version} environment {path} from {python}")
            _create(python, path, log)
            (path / COMPLETE).write_text(f"{python}\n")
            created = True
            collect_garbage(root, keep=path.name)
        if version == node_version():
            # Every time, not only at creation: the env follows the node's current packages (a Ray venv that was
            # reinstalled elsewhere, a new clone of the project) instead of those of the venv it was made from.
            _see_node_site(path, version)
        # Taken under the creation lock, so garbage collection (which holds it too) cannot remove the env now.
        in_use = _lock(path / IN_USE, fcntl.LOCK_SH)
        os.utime(path / IN_USE)
    finally:
        os.close(lock)
    return PythonEnv(path, version, created, time.monotonic() - started, in_use)


def collect_garbage(root: Path, *, keep: str = "", ttl_s: float | None = None) -> list[str]:
    """Remove the envs under `root` that no replica holds and none used for `ttl_s`; their names."""
    if ttl_s is None:
        ttl_s = float(os.environ.get(ENV_TTL_ENV) or DEFAULT_ENV_TTL_S)
    removed = []
    for lock_file in root.glob("*.lock"):
        name = lock_file.name[: -len(".lock")]
        env = root / name
        if name == keep or not env.is_dir():
            continue
        try:
            lock = _lock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # being created right now
        try:
            marker = env / IN_USE
            try:
                last_use = marker.stat().st_mtime
            except FileNotFoundError:
                last_use = (env / COMPLETE).stat().st_mtime if (env / COMPLETE).exists() else 0.0
            if time.time() - last_use < ttl_s:
                continue
            try:
                held = _lock(marker, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a replica uses it
            os.close(held)
            shutil.rmtree(env, ignore_errors=True)
            removed.append(name)
        finally:
            os.close(lock)
    return removed
