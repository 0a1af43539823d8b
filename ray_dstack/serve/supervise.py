"""Runs a service's shell in its own process group and takes the whole group down with the replica.

    python -m ray_dstack.serve.supervise -- /bin/bash -c "<commands>"

Two processes, because the replica can die in ways that leave no chance to clean up:
- the *anchor* (this process, the replica's direct child) asks for SIGTERM when the replica dies
  (PR_SET_PDEATHSIG) and forwards termination signals. Ray itself SIGKILLs a dying worker's direct
  children (`kill_child_processes_on_worker_exit`), so the anchor may vanish without running any code;
- the *guard* (forked by the anchor) leads a new session holding the shell and everything it starts,
  asks for SIGTERM when the anchor dies, is a subreaper so orphaned descendants stay under it, and on
  any termination signal kills the whole group, escalating to SIGKILL.
A parent-death signal alone would reach only the shell, not the model server it started. The exit
status is the shell's.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
KILL_GRACE_S = 5.0
REPLICA_PID_ENV = "RAY_DSTACK_REPLICA_PID"
TERMINATING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _prctl(option: int, value: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the replica's own cleanup still applies
        pass


def _die_with_parent(expected_parent: int) -> bool:
    """Ask for SIGTERM when the parent dies; False if it already died before we asked."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    return os.getppid() == expected_parent


def _kill_own_group(grace_s: float) -> None:
    """SIGTERM the guard's group (the service), reap, then SIGKILL what is left. The guard survives."""
    for signum in TERMINATING:
        signal.signal(signum, signal.SIG_IGN)
    pgid = os.getpgid(0)
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # every descendant is gone
        if pid == 0:
            time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _guard(argv: list[str], anchor: int) -> int:
    os.setsid()
    if not _die_with_parent(anchor):
        return 1
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    child = subprocess.Popen(argv)

    def on_signal(signum, _frame):
        _kill_own_group(KILL_GRACE_S)
        os._exit(128 + signum)

    for signum in TERMINATING:
        signal.signal(signum, on_signal)
    code = child.wait()
    # The shell is gone; whatever it left running in its group goes with it.
    _kill_own_group(1.0)
    return code if code >= 0 else 128 - code


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m ray_dstack.serve.supervise -- CMD [ARGS...]", file=sys.stderr)
        return 2
    # The replica passes its pid, so a replica that died before we got here is noticed too.
    replica = int(os.environ.get(REPLICA_PID_ENV) or os.getppid())
    if not _die_with_parent(replica):
        return 1
    anchor = os.getpid()
    guard = os.fork()
    if guard == 0:
        os._exit(_guard(argv, anchor))

    def forward(_signum, _frame):
        try:
            os.kill(guard, signal.SIGTERM)
        except ProcessLookupError:
            pass

    for signum in TERMINATING:
        signal.signal(signum, forward)
    while True:
        try:
            _, status = os.waitpid(guard, 0)
            break
        except InterruptedError:
            continue
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
