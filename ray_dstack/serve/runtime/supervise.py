"""Runs a service's shell in its own process group and takes the whole group down with the replica.

    python -m ray_dstack.serve.runtime.supervise [--cleanup PATH]... -- /bin/bash -c "<commands>"
    python -m ray_dstack.serve.runtime.supervise --init [--connector SOCKET] -- /bin/bash -c "<commands>"   (PID 1)

Two processes, because the replica can die in ways that leave no chance to clean up:
- the *anchor* (this process, the replica's direct child) asks for SIGTERM when the replica dies
  (PR_SET_PDEATHSIG) and forwards termination signals. Ray itself SIGKILLs a dying worker's direct
  children (`kill_child_processes_on_worker_exit`), so the anchor may vanish without running any code;
- the *guard* (forked by the anchor) leads a new session holding the shell and everything it starts,
  asks for SIGTERM when the anchor dies, is a subreaper so orphaned descendants stay under it, and on
  any termination signal kills the whole group, escalating to SIGKILL.
A parent-death signal alone would reach only the shell, not the model server it started. The exit
status is the shell's. `--cleanup PATH` (repeatable): the guard removes PATH (the replica's working
directory, the namespace connector's socket) once the service is gone, so a replica that died without
cleaning up leaves nothing either.

`--init` runs inside the PID namespace pasta creates for a replica's network namespace
(ray_dstack/serve/runtime/netns.py), where the command is PID 1: the kernel gives PID 1 no default action for
SIGTERM (an ordinary server as PID 1 would ignore it) and makes it the reaper of every orphan. So the init
forwards termination to every process of the namespace (`kill(-1)` there means "everyone but me"), reaps,
and dies with pasta (its parent) through a parent-death signal; when it exits the kernel kills whatever is
left in the namespace. `--connector PATH`: the init also hands out connections to the namespace's loopback
over a Unix socket at PATH, so the replica's data path bypasses pasta (ray_dstack/serve/transport/netns_connect.py has
why and the protocol). `--user UID:GID[:G,...]` (dstack's `user`): the init runs the commands as that user. pasta
as root leaves its user namespace without a uid map (measured with Debian 12's pasta: its own write is refused),
so nobody in it can change uid; the guard (`--map-ids`, root outside) writes an identity map for it, and the
init, which started before the map and so holds no capability, executes itself again to get them: it then
switches the shell to the user and can still signal every process of the namespace. The commands see their real
uid (`id -un`) and have exactly that user's file access.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
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


def _terminate(kill, grace_s: float) -> None:
    """`kill(SIGTERM)`, reap children until none is left or `grace_s` passed, then `kill(SIGKILL)`."""
    try:
        kill(signal.SIGTERM)
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
        kill(signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_own_group(grace_s: float) -> None:
    """SIGTERM the guard's group (the service), reap, then SIGKILL what is left. The guard survives."""
    for signum in TERMINATING:
        signal.signal(signum, signal.SIG_IGN)
    pgid = os.getpgid(0)
    _terminate(lambda signum: os.killpg(pgid, signum), grace_s)


def _remove(cleanup: list[str]) -> None:
    for path in cleanup:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass


CONNECT_TIMEOUT_S = 10.0


def _hand_out_connection(client: socket.socket) -> None:
    """One request of the connector protocol: b"<port>\\n" → a socket connected to 127.0.0.1:<port> here."""
    with client:
        try:
            client.settimeout(CONNECT_TIMEOUT_S)
            port = int(client.recv(16).strip())
            with socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT_S) as conn:
                socket.send_fds(client, [b"ok"], [conn.fileno()])
            return
        except ValueError:
            error = b"error %d a port number, then a newline" % errno.EINVAL
        except OSError as exc:
            error = b"error %d %s" % (exc.errno or errno.EIO, str(exc.strerror or exc).encode())
        try:
            client.sendall(error)
        except OSError:
            pass  # the replica gave up waiting


def serve_connector(path: str) -> socket.socket:
    """Listen on the Unix socket `path` (mode 0600) and answer each request in a thread of its own."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    listener.listen(128)

    def accept_forever() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=_hand_out_connection, args=(client,), daemon=True).start()

    threading.Thread(target=accept_forever, name="connector", daemon=True).start()
    return listener


NAMESPACE_START_S = 10.0


def _is_namespace_init(pid: str) -> bool:
    """Whether `pid` is PID 1 of a PID namespace below ours (its last NSpid is 1)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            nspid = next((line.split()[1:] for line in fh if line.startswith("NSpid:")), [])
    except OSError:
        return False
    return len(nspid) > 1 and nspid[-1] == "1"


def _namespace_init(parent: int, timeout_s: float) -> int | None:
    """The child of `parent` (pasta) that is the init of the PID namespace it created. pasta also forks
    short-lived helpers into the namespace's network (to configure it): the first child listed is not always
    the init."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as fh:
                children = fh.read().split()
        except OSError:
            return None  # the parent is gone
        init = next((child for child in children if _is_namespace_init(child)), None)
        if init is not None:
            return int(init)
        time.sleep(0.01)
    return None


IDENTITY_MAP = "0 0 4294967295\n"


def _map_ids(init: int) -> None:
    """An identity uid/gid map for the user namespace of pasta's child (written once, by root outside it)."""
    try:
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{init}/{name}", "w") as fh:
                fh.write(IDENTITY_MAP)
    except OSError as exc:
        print(f"supervise: could not map the namespace's user ids ({exc.strerror}): `user` cannot be switched to",
              file=sys.stderr)


def _executed(pid: int, pasta: int, timeout_s: float) -> bool:
    """Wait until `pid` (pasta's namespace child) runs the init rather than pasta's own code."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if os.readlink(f"/proc/{pid}/exe") != os.readlink(f"/proc/{pasta}/exe"):
                return True
        except OSError:
            return False  # gone
        time.sleep(0.01)
    return False


def _setup_namespace(pasta: int, *, proc: bool, map_ids: bool) -> None:
    """The namespace's /proc and id map, once pasta has set the namespace up: pasta's child runs the init only
    after pasta configured its network, which reads /proc/<child>/ns/net in the mount namespace they share; a
    /proc of the new PID namespace mounted before that makes the path vanish and pasta wait for it forever."""
    init = _namespace_init(pasta, NAMESPACE_START_S)
    if init is None or not _executed(init, pasta, NAMESPACE_START_S):
        print("supervise: pasta started no namespace: /proc not mounted, ids not mapped", file=sys.stderr)
        return
    if map_ids:
        _map_ids(init)
    if proc:
        _mount_namespace_proc(init)


def _mount_namespace_proc(init: int) -> None:
    """Give the PID namespace pasta created its own /proc, in the private mount namespace pasta runs in
    (`unshare --mount` before it: ray_dstack/serve/runtime/netns.py). Without it the service's processes see the node's
    /proc, where /proc/<their pid> is another process or none (vLLM reads /proc/<getpid()>/status and fails).
    Done from here because inside the namespace the commands hold no capability; the init waits for it."""
    done = subprocess.run(["nsenter", "--target", str(init), "--pid", "--mount", "--",
                           "mount", "-t", "proc", "proc", "/proc"], stdin=subprocess.DEVNULL, timeout=30)
    if done.returncode != 0:
        print(f"supervise: could not mount the namespace's /proc (exit {done.returncode})", file=sys.stderr)


def _guard(argv: list[str], anchor: int, cleanup: list[str], namespace_proc: bool = False,
           map_ids: bool = False) -> int:
    os.setsid()
    if not _die_with_parent(anchor):
        _remove(cleanup)
        return 1
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    # The child (the shell, or pasta holding the replica's namespaces) is told when the guard dies, even by
    # SIGKILL; pasta does not pass its own death on to the namespace it runs.
    # The guard has no threads, so preexec_fn is safe here.
    child = subprocess.Popen(argv, preexec_fn=lambda: _prctl(PR_SET_PDEATHSIG, signal.SIGTERM))  # noqa: PLW1509
    if namespace_proc or map_ids:
        _setup_namespace(child.pid, proc=namespace_proc, map_ids=map_ids)

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
    _terminate(lambda signum: os.kill(-1, signum), grace_s)


def _wait_for_own_proc(timeout_s: float) -> None:
    """Until the guard mounted this PID namespace's /proc (then /proc/self is PID 1: this process)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if os.readlink("/proc/self") == "1":
                return
        except OSError:
            pass
        time.sleep(0.01)
    print("supervise --init: this namespace's /proc was not mounted; its processes see the node's /proc",
          file=sys.stderr)


def _capable() -> bool:
    """Whether this process holds CAP_SETUID (in its user namespace)."""
    try:
        with open("/proc/self/status") as fh:
            caps = next(line for line in fh if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caps.split()[1], 16) & (1 << 7))


def _wait_for_id_map(timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open("/proc/self/uid_map") as fh:
                if fh.read().strip():
                    return True
        except OSError:
            return False
        time.sleep(0.01)
    return False


def parse_user(value: str) -> tuple[int, int, list[int]]:
    """`UID:GID[:G1,G2,...]` (as ray_dstack/serve/runtime/enter.py takes it; stand-alone here too)."""
    uid, gid, *rest = value.split(":")
    groups = [int(g) for g in rest[0].split(",") if g] if rest else []
    return int(uid), int(gid), groups or [int(gid)]


def _init(argv: list[str], connector: str | None, own_proc: bool = False, user: str | None = None,
          reexec: list[str] | None = None) -> int:
    # kill(-1) outside a PID namespace would signal every process the user may signal: refuse.
    if os.getpid() != 1:
        print("supervise --init must run as PID 1 of its own PID namespace", file=sys.stderr)
        return 2
    if own_proc:
        _wait_for_own_proc(NAMESPACE_START_S)
    if user is not None and not _capable():
        if reexec is None or not _wait_for_id_map(NAMESPACE_START_S):
            print(f"supervise --init: the namespace's user ids were not mapped: cannot run the commands as {user}",
                  file=sys.stderr)
            return 126
        # Capabilities are granted at exec: only an exec after the map makes this init root in its namespace.
        os.execv(sys.executable, [sys.executable, "-m", "ray_dstack.serve.runtime.supervise", *reexec])
    # The connector's socket is the guard's to remove (`--cleanup`), with the replica's other leftovers.
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # pasta died: take the namespace down

    class Stop(Exception):
        pass

    def on_signal(signum, _frame):
        raise Stop(signum)

    for signum in TERMINATING:  # before the child exists: a signal in between would be lost on PID 1
        signal.signal(signum, on_signal)
    try:
        # The Popen object is kept until the loop below has reaped the shell: a dropped Popen reaps its child in
        # __del__ if it already exited, and on a busy node the shell may exit that soon (`exit 7` at once); the
        # loop would then never see it and report 1 instead of the shell's code.
        if user is None:
            shell = subprocess.Popen(argv)
        else:
            uid, gid, groups = parse_user(user)
            try:
                shell = subprocess.Popen(argv, user=uid, group=gid, extra_groups=groups)
            except (OSError, subprocess.SubprocessError) as exc:
                print(f"ray-dstack: cannot run the commands as uid {uid}, gid {gid}: {exc}", file=sys.stderr)
                return 126
        child = shell.pid
        if connector:
            serve_connector(connector)
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


USAGE = ("usage: python -m ray_dstack.serve.runtime.supervise [--cleanup PATH]... [--namespace-proc] [--map-ids] "
         "-- CMD [ARGS...]\n"
         "       python -m ray_dstack.serve.runtime.supervise --init [--connector SOCKET] [--own-proc] "
         "[--user UID:GID[:G,...]] -- CMD [ARGS...]")


def main(argv: list[str]) -> int:
    init, cleanup, connector, own_proc, namespace_proc = False, [], None, False, False
    user, map_ids, reexec = None, False, list(argv)
    while argv and argv[0] != "--":
        if argv[0] == "--init":
            init, argv = True, argv[1:]
        elif argv[0] == "--cleanup" and len(argv) > 1:
            cleanup, argv = [*cleanup, argv[1]], argv[2:]
        elif argv[0] == "--connector" and len(argv) > 1:
            connector, argv = argv[1], argv[2:]
        elif argv[0] == "--own-proc":  # the init: wait for the guard to mount this namespace's /proc
            own_proc, argv = True, argv[1:]
        elif argv[0] == "--namespace-proc":  # the guard: the command is `unshare --mount ... pasta ...`
            namespace_proc, argv = True, argv[1:]
        elif argv[0] == "--map-ids":  # the guard: an identity map for pasta's user namespace
            map_ids, argv = True, argv[1:]
        elif argv[0] == "--user" and len(argv) > 1:  # the init: run the commands as this user
            user, argv = argv[1], argv[2:]
        elif argv[0] == "--reexec":  # the init, executed again: no further exec
            reexec, argv = None, argv[1:]
        else:
            break
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    if init:
        return _init(argv, connector, own_proc, user, None if reexec is None else ["--reexec", *reexec])
    # The replica passes its pid, so a replica that died before we got here is noticed too.
    replica = int(os.environ.get(REPLICA_PID_ENV) or os.getppid())
    if not _die_with_parent(replica):
        _remove(cleanup)
        return 1
    anchor = os.getpid()
    guard = os.fork()
    if guard == 0:
        os._exit(_guard(argv, anchor, cleanup, namespace_proc, map_ids))

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
