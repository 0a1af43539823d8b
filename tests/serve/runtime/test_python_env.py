"""Each service's own Python environment on a node: created once under a lock, reused, version lookup, GC."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ray_dstack.serve.runtime import python_env
NODE = python_env.node_version()


@pytest.fixture
def env_root(tmp_path, monkeypatch):
    root = tmp_path / "envs"
    monkeypatch.setenv(python_env.ENV_ROOT_ENV, str(root))
    return root


def run_in(env: python_env.PythonEnv, code: str) -> str:
    proc = subprocess.run(["python", "-c", code], env=env.apply(dict(os.environ)), capture_output=True,
                          text=True, timeout=60, check=True)
    return proc.stdout.strip()


def test_created_once_then_reused(env_root):
    first = python_env.acquire("svc", None)
    try:
        assert first.created and first.version == NODE
        assert first.path == env_root / f"svc-py{NODE}"
        out = json.loads(run_in(first, "import json, sys; print(json.dumps([sys.prefix, sys.executable]))"))
        assert out[0] == str(first.path)  # `python` on PATH is the env's, not Ray's
        assert Path(out[1]).parent == first.bin_dir
        # The node's packages stay importable (after the env's own): pydantic is in the Ray venv only.
        assert run_in(first, "import pydantic, sys; print(pydantic.__name__)") == "pydantic"
    finally:
        first.release()
    again = python_env.acquire("svc", None)
    again.release()
    assert not again.created and again.seconds < 1.0


def test_concurrent_acquires_create_one_env(env_root):
    with ThreadPoolExecutor(3) as pool:
        envs = list(pool.map(lambda _: python_env.acquire("race", None), range(3)))
    try:
        assert sum(e.created for e in envs) == 1
        assert len({e.path for e in envs}) == 1
        assert (envs[0].path / python_env.COMPLETE).exists()
    finally:
        for e in envs:
            e.release()


def test_half_created_env_is_redone(env_root):
    broken = env_root / f"half-py{NODE}"
    broken.mkdir(parents=True)
    (broken / "junk").write_text("x")  # no .complete: the creator died
    env = python_env.acquire("half", None)
    env.release()
    assert env.created and not (broken / "junk").exists()


def test_missing_version_names_node_and_versions(env_root, tmp_path, monkeypatch):
    only = tmp_path / "pythons"
    only.mkdir()
    (only / f"python{NODE}").symlink_to(sys.executable)
    monkeypatch.setenv(python_env.PYTHON_DIRS_ENV, str(only))
    with pytest.raises(python_env.PythonEnvError) as err:
        python_env.acquire("svc", "3.99")
    message = str(err.value)
    assert "3.99" in message and socket.gethostname() in message and NODE in message
    assert not (env_root / "svc-py3.99").exists()


def test_other_version_from_pyenv(env_root):
    pyenv = Path.home() / ".pyenv" / "versions"
    other = next((d.name for d in sorted(pyenv.glob("3.1[0-9].*")) if not d.name.startswith(NODE + ".")), None)
    assert other is not None, "this kind of machine has pyenv's 3.10-3.13 (shared/notes/environment.md)"
    version = ".".join(other.split(".")[:2])
    env = python_env.acquire("other", version)
    try:
        assert run_in(env, "import sys; print('%d.%d' % sys.version_info[:2])") == version
        # An env of another version does not see the node's packages (they are built for the node's Python).
        assert not (env.path / "lib" / f"python{version}" / "site-packages" / python_env.NODE_SITE_PTH).exists()
    finally:
        env.release()


def test_garbage_collection_spares_envs_in_use(env_root):
    held = python_env.acquire("held", None)
    idle = python_env.acquire("idle", None)
    idle.release()
    old = time.time() - 2 * python_env.DEFAULT_ENV_TTL_S
    for env in (held, idle):
        os.utime(env.path / python_env.IN_USE, (old, old))
    try:
        removed = python_env.collect_garbage(env_root)
        assert removed == [f"idle-py{NODE}"]
        assert held.path.exists() and not idle.path.exists()
    finally:
        held.release()
