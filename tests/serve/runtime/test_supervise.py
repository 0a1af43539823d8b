"""The supervisor takes a service's whole process tree down, however the replica above it goes away."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def wait_gone(pids, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def start_tree(tmp_path: Path, replica_env: bool = True):
    """A fake replica (a Python process) running the supervisor over a shell that forks a grandchild."""
    pids = tmp_path / "pids"
    script = f"sleep 300 & echo $! >> {pids}; echo $$ >> {pids}; wait"
    replica = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys, time\n"
            "env = dict(os.environ)\n"
            + ("env['RAY_DSTACK_REPLICA_PID'] = str(os.getpid())\n" if replica_env else "")
            + f"p = subprocess.Popen([sys.executable, '-m', 'ray_dstack.serve.runtime.supervise', '--', 'bash', '-c', {script!r}], env=env)\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(300)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    anchor = int(replica.stdout.readline())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (not pids.exists() or len(pids.read_text().split()) < 2):
        time.sleep(0.05)
    service = [int(p) for p in pids.read_text().split()]
    return replica, anchor, service


@pytest.mark.parametrize("how", ["replica SIGKILL", "anchor SIGKILL (Ray's child cleanup)", "anchor SIGTERM"])
def test_whole_tree_dies(tmp_path, how):
    replica, anchor, service = start_tree(tmp_path)
    assert all(alive(p) for p in service)
    if how == "replica SIGKILL":
        replica.kill()
    elif how.startswith("anchor SIGKILL"):
        os.kill(anchor, signal.SIGKILL)
    else:
        os.kill(anchor, signal.SIGTERM)
    try:
        assert wait_gone(service), f"service processes survived: {[p for p in service if alive(p)]}"
    finally:
        replica.kill()
        replica.wait()


def test_exit_code_is_the_shells_and_leftovers_are_killed(tmp_path):
    marker = tmp_path / "bg"
    proc = subprocess.run(
        [sys.executable, "-m", "ray_dstack.serve.runtime.supervise", "--", "bash", "-c", f"sleep 300 & echo $! > {marker}; exit 7"],
        timeout=30,
    )
    assert proc.returncode == 7
    assert wait_gone([int(marker.read_text())], timeout=5)


def test_usage_error_without_a_command():
    proc = subprocess.run([sys.executable, "-m", "ray_dstack.serve.runtime.supervise"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_init_reports_the_shells_code_even_when_it_exits_at_once():
    """The namespace's init (PID 1) must see the shell's own exit code however soon it exits: a shell that
    ends before the init starts waiting was once reaped by Python's subprocess machinery, and the init said 1."""
    assert os.geteuid() == 0 and shutil.which("unshare"), "a PID namespace needs root and unshare (as .ci/run has)"
    init = [sys.executable, "-m", "ray_dstack.serve.runtime.supervise", "--init", "--"]
    codes = []
    for _ in range(20):
        proc = subprocess.run(["unshare", "--pid", "--fork", *init, "sh", "-c", "exit 7"], timeout=30)
        codes.append(proc.returncode)
    assert codes == [7] * 20
    killed = subprocess.run(["unshare", "--pid", "--fork", *init, "sh", "-c", "kill -TERM $$"], timeout=30)
    assert killed.returncode == 128 + signal.SIGTERM
