"""Runs one replica's container in the foreground and removes it whatever ends the run.

    python -m ray_dstack.serve.runtime.container_run --runtime PATH --name NAME [--secret-dir DIR] -- RUN-ARGV...

The replica starts this under `ray_dstack.serve.runtime.supervise` (as it starts a service's shell), so it dies with
the replica. `RUN-ARGV` is `podman run ...`/`docker run ...` without `-d`: the container's output comes out
here, line by line, into the replica's log, and this process exits when the container does (the replica's
health check then fails and Serve replaces the replica). Why not rely on `--rm` alone: the container belongs
to the runtime (conmon, dockerd), not to this process group, so killing the group leaves it running. Hence:
- on SIGTERM/SIGINT/SIGHUP (the supervisor's group kill; the replica stopping, crashing, being deleted, or
  its node's Ray stopping) the container is removed by name (`rm -f`, with a short stop timeout);
- on the container's own exit, the same `rm -f` makes sure nothing is left;
- `--secret-dir` (the env file) is deleted as soon as the container exists, and again at exit.
Imports no other ray_dstack module: it runs as a stand-alone program.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import threading
import time

STOP_TIMEOUT_S = 3  # within the supervisor's 5 s grace before its SIGKILL
TERMINATING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def remove_container(runtime: str, name: str) -> None:
    subprocess.run([runtime, "rm", "-f", "-t", str(STOP_TIMEOUT_S), name], stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)


def container_exists(runtime: str, name: str) -> bool:
    return subprocess.run([runtime, "container", "inspect", "--format", "{{.Id}}", name], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30).returncode == 0


def _forget_secrets_once_created(runtime: str, name: str, secret_dir: str | None, child: subprocess.Popen) -> None:
    if not secret_dir:
        return
    # `run` reads the env file while it creates the container; afterwards the file is not needed.
    while child.poll() is None and not container_exists(runtime, name):
        time.sleep(0.2)
    shutil.rmtree(secret_dir, ignore_errors=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_dstack.serve.runtime.container_run")
    parser.add_argument("--runtime", required=True, help="the runtime's executable")
    parser.add_argument("--name", required=True, help="the container's name")
    parser.add_argument("--secret-dir", help="directory with the env file, deleted once the container exists")
    parser.add_argument("run", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    run = args.run[1:] if args.run[:1] == ["--"] else args.run
    if not run:
        parser.error("the run command is missing")
    removing = threading.Event()

    def on_signal(signum, _frame):
        if not removing.is_set():
            removing.set()
            remove_container(args.runtime, args.name)

    for signum in TERMINATING:
        signal.signal(signum, on_signal)
    # A leftover of the same name (a replica restarted with the same id) would make `run` fail.
    remove_container(args.runtime, args.name)
    child = subprocess.Popen(run, stdin=subprocess.DEVNULL)
    watcher = threading.Thread(target=_forget_secrets_once_created,
                               args=(args.runtime, args.name, args.secret_dir, child), daemon=True)
    watcher.start()
    while True:
        try:
            code = child.wait()
            break
        except InterruptedError:
            continue
    # Its last `inspect` may still be running: let it end first, so nothing of this run touches the runtime after
    # the final `rm`.
    watcher.join()
    if args.secret_dir:
        shutil.rmtree(args.secret_dir, ignore_errors=True)
    if not removing.is_set():
        removing.set()
        remove_container(args.runtime, args.name)
    print(f"container {args.name} exited with code {code}", flush=True)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
