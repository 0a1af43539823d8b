"""Makes a replica's bind mounts, drops to the service's user, then execs the command (stand-alone: stdlib only).

    python -m ray_dstack.serve.runtime.enter [--bind SRC DST]... [--ro-bind SRC DST]... [--user UID:GID[:G,...]]
                                             -- CMD [ARGS...]

Runs as root in the replica's private mount namespace (`unshare --mount --propagation private --` before it:
ray_dstack/serve/runtime/host.py), so the mounts vanish with the namespace and are never seen on the node. A
target that does not exist is created (a directory, or an empty file for a file source), as a container runtime
does for `-v`; such a mount point stays on the node, empty. Mounts are made in the order given (parents first).
After mounting, the working directory is entered again by its path, so a working directory under a mount target
is the mounted one. `--user` switches the groups and uids last; the parent-death signal the supervisor asked for
is cleared by that switch, so it is asked for again. Exit codes: 126 a mount or the switch failed, 127 exec failed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
PR_SET_PDEATHSIG = 1

USAGE = ("usage: python -m ray_dstack.serve.runtime.enter [--bind SRC DST]... [--ro-bind SRC DST]... "
         "[--user UID:GID[:G,...]] -- CMD [ARGS...]")


class EnterError(Exception):
    pass


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _mount(libc: ctypes.CDLL, source: str | None, target: str, flags: int) -> None:
    if libc.mount(source.encode() if source else None, target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise EnterError(f"cannot mount {source} at {target}: {os.strerror(err)}")


def _mount_point(source: str, target: str) -> None:
    """Create `target` like its source (directory or empty file) when it is missing."""
    is_file = not os.path.isdir(source)
    if os.path.lexists(target):
        if os.path.isdir(target) == is_file:
            kind = "a file" if is_file else "a directory"
            raise EnterError(f"cannot mount {source} at {target}: the source is {kind}, the target is not")
        return
    try:
        if is_file:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "a"):
                pass
        else:
            os.makedirs(target, exist_ok=True)
    except OSError as exc:
        raise EnterError(f"cannot create the mount point {target}: {exc.strerror}") from None


def bind(binds: list[tuple[str, str, bool]]) -> None:
    libc = _libc()
    for source, target, read_only in binds:
        if not os.path.exists(source):
            raise EnterError(f"cannot mount {source} at {target}: {source} does not exist")
        _mount_point(source, target)
        _mount(libc, source, target, MS_BIND | MS_REC)
        if read_only:  # a bind mount takes MS_RDONLY only on a remount
            _mount(libc, None, target, MS_BIND | MS_REMOUNT | MS_RDONLY)


def parse_user(value: str) -> tuple[int, int, list[int]]:
    """`UID:GID[:G1,G2,...]` (numbers: the replica resolved the names) → (uid, gid, supplementary groups)."""
    parts = value.split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[:2]):
        raise EnterError(f"--user wants UID:GID[:G,...], got {value!r}")
    groups = [int(g) for g in parts[2].split(",") if g] if len(parts) == 3 else []
    return int(parts[0]), int(parts[1]), groups or [int(parts[1])]


def switch_user(uid: int, gid: int, groups: list[int]) -> None:
    parent = os.getppid()
    try:
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
    except OSError as exc:
        raise EnterError(f"cannot switch to uid {uid}, gid {gid}: {exc.strerror}") from None
    _libc().prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the supervisor died before we asked again
        raise EnterError("the replica's supervisor is gone")


def main(argv: list[str]) -> int:
    binds: list[tuple[str, str, bool]] = []
    user: str | None = None
    while argv and argv[0] != "--":
        if argv[0] in ("--bind", "--ro-bind") and len(argv) > 2:
            binds.append((argv[1], argv[2], argv[0] == "--ro-bind"))
            argv = argv[3:]
        elif argv[0] == "--user" and len(argv) > 1:
            user, argv = argv[1], argv[2:]
        else:
            break
    if argv[:1] != ["--"] or len(argv) < 2:
        print(USAGE, file=sys.stderr)
        return 2
    command = argv[1:]
    try:
        if binds:
            cwd = os.getcwd()
            bind(binds)
            os.chdir(cwd)  # by path again: a working directory under a target is now the mounted one
        if user is not None:
            switch_user(*parse_user(user))
    except EnterError as exc:
        print(f"ray-dstack: {exc}", file=sys.stderr)
        return 126
    # Python ignores these; an exec keeps ignored signals ignored (pasta then fails to start, a shell pipeline
    # would not end on a closed pipe). subprocess resets them the same way (restore_signals).
    for signum in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(signum, signal.SIG_DFL)
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"ray-dstack: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
