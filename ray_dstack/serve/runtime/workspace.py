"""A working directory per replica, as a container gives each dstack replica a filesystem of its own.

`$RAY_DSTACK_WORK_ROOT/<service>.<replica>` (default /tmp/ray-dstack/work); the commands start there, or in
`working_dir` (relative to it; an absolute path is used as given). The replica removes it when it stops; the
supervisor (`--cleanup`) removes it too when the replica died without stopping (crash, `ray stop`).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ray_dstack.errors import RayDstackError

WORK_ROOT_ENV = "RAY_DSTACK_WORK_ROOT"
DEFAULT_WORK_ROOT = "/tmp/ray-dstack/work"


def work_root() -> Path:
    return Path(os.environ.get(WORK_ROOT_ENV) or DEFAULT_WORK_ROOT)


def create(service: str, replica: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{service}.{replica}")
    path = work_root() / name
    shutil.rmtree(path, ignore_errors=True)  # a previous replica of the same id left it
    path.mkdir(parents=True)
    return path


def working_dir(workspace: Path, configured: str | None) -> Path:
    """Where the commands start: `working_dir` relative to the workspace (created), absolute as given."""
    if not configured:
        return workspace
    path = Path(os.path.expanduser(configured))
    if path.is_absolute():
        if not path.is_dir():
            raise RayDstackError(f"working_dir {configured!r} does not exist on this node")
        return path
    path = (workspace / path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def remove(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
