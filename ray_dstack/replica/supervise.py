"""Runs a service's shell in its own process group and takes the whole group down with it.

    python -m ray_dstack.replica.supervise -- /bin/bash -c "<commands>"

Why a supervisor: a parent-death signal reaches only the direct child of the dying replica, while the
service's commands fork descendants (a model server, its workers). The supervisor asks the kernel for
SIGTERM when the replica dies (PR_SET_PDEATHSIG), becomes a subreaper so orphaned descendants stay under
it, and on any termination signal kills the whole process group, escalating to SIGKILL. Its exit status is
the shell's.
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


def _prctl(option: int, value: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the replica's own cleanup still applies
        pass


def _kill_group(pgid: int, grace_s: float) -> None:
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m ray_dstack.replica.supervise -- CMD [ARGS...]", file=sys.stderr)
        return 2
    parent = os.getppid()
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the replica died before prctl took effect
        return 1
    _prctl(PR_SET_CHILD_SUBREAPER, 1)

    child = subprocess.Popen(argv, start_new_session=True)
    pgid = child.pid

    def on_signal(signum, _frame):
        _kill_group(pgid, KILL_GRACE_S)
        sys.exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)

    code = child.wait()
    # The shell is gone; whatever it left running in its group goes with it.
    _kill_group(pgid, 1.0)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
