"""Runs a service's shell in its own process group and takes the whole group down with the replica.

    python -m ray_dstack.serve.supervise [--cleanup DIR] -- /bin/bash -c "<commands>"
    python -m ray_dstack.serve.supervise --init -- /bin/bash -c "<commands>"   (PID 1 of a PID namespace)

Two processes, because the replica can die in ways that leave no chance to clean up:
- the *anchor* (this process, the replica's direct child) asks for SIGTERM when the replica dies
  (PR_SET_PDEATHSIG) and forwards termination signals. Ray itself SIGKILLs a dying worker's direct
  children (`kill_child_processes_on_worker_exit`), so the anchor may vanish without running any code;
- the *guard* (forked by the anchor) leads a new session holding the shell and everything it starts,
  asks for SIGTERM when the anchor dies, is a subreaper so orphaned descendants stay under it, and on
  any termination signal kills the whole group, escalating to SIGKILL.
A parent-death signal alone would reach only the shell, not the model server it started. The exit
status is the shell's. `--cleanup DIR`: the guard removes DIR (the replica's working directory) once the
service is gone, so a replica that died without cleaning up leaves no directory either.

`--init` runs inside the PID namespace pasta creates for a replica's network namespace
(ray_dstack/serve/netns.py), where the command is PID 1: the kernel gives PID 1 no default action for
SIGTERM (an ordinary server as PID 1 would ignore it) and makes it the reaper of every orphan. So the init
forwards termination to every process of the namespace (`kill(-1)` there means "everyone but me"), reaps,
and dies with pasta (its parent) through a parent-death signal; when it exits the kernel kills whatever is
left in the namespace.
"""

from __future__ import annotations

import ctypes
import os
import shutil
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


def _remove(cleanup: str | None) -> None:
    if cleanup:
        shutil.rmtree(cleanup, ignore_errors=True)


def _guard(argv: list[str], anchor: int, cleanup: str | None) -> int:
    os.setsid()
    if not _die_with_parent(anchor):
        _remove(cleanup)
        return 1
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    # The child (the shell, or pasta holding the replica's namespaces) is told when the guard dies, even by
    # SIGKILL; pasta does not pass its own death on to the namespace it runs.
    # The guard has no threads, so preexec_fn is safe here.
    child = subprocess.Popen(argv, preexec_fn=lambda: _prctl(PR_SET_PDEATHSIG, signal.SIGTERM))  # noqa: PLW1509

    def on_signal(signum, _frame):
        _kill_own_group(KILL_GRACE_S)
        _remove(cleanup)
        os._exit(128 + signum)

    for signum in TERMINATING:
        signal.signal(signum, on_signal)
    code = child.wait()
    # The shell is gone; whatever it left running in its group goes with it.
    _kill_own_group(1.0)
    _remove(cleanup)
    return code if code >= 0 else 128 - code


def _end_namespace(grace_s: float) -> None:
    """SIGTERM every other process of this PID namespace, reap, then SIGKILL the rest."""
    try:
        os.kill(-1, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.05)
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _init(argv: list[str]) -> int:
    # kill(-1) outside a PID namespace would signal every process the user may signal: refuse.
    if os.getpid() != 1:
        print("supervise --init must run as PID 1 of its own PID namespace", file=sys.stderr)
        return 2
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # pasta died: take the namespace down

    class Stop(Exception):
        pass

    def on_signal(signum, _frame):
        raise Stop(signum)

    for signum in TERMINATING:  # before the child exists: a signal in between would be lost on PID 1
        signal.signal(signum, on_signal)
    try:
        child = subprocess.Popen(argv).pid
        while True:  # reap every orphan of the namespace until the service's shell exits
            pid, status = os.waitpid(-1, 0)
            if pid == child:
                code = os.waitstatus_to_exitcode(status)
                break
    except Stop as stop:
        for signum in TERMINATING:
            signal.signal(signum, signal.SIG_IGN)
        _end_namespace(KILL_GRACE_S)
        return 128 + stop.args[0]
    except ChildProcessError:
        code = 1
    _end_namespace(1.0)
    return code if code >= 0 else 128 - code


USAGE = "usage: python -m ray_dstack.serve.supervise [--cleanup DIR | --init] -- CMD [ARGS...]"


def main(argv: list[str]) -> int:
    init, cleanup = False, None
    while argv and argv[0] != "--":
        if argv[0] == "--init":
            init, argv = True, argv[1:]
        elif argv[0] == "--cleanup" and len(argv) > 1:
            cleanup, argv = argv[1], argv[2:]
        else:
            break
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    if init:
        return _init(argv)
    # The replica passes its pid, so a replica that died before we got here is noticed too.
    replica = int(os.environ.get(REPLICA_PID_ENV) or os.getppid())
    if not _die_with_parent(replica):
        _remove(cleanup)
        return 1
    anchor = os.getpid()
    guard = os.fork()
    if guard == 0:
        os._exit(_guard(argv, anchor, cleanup))

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
