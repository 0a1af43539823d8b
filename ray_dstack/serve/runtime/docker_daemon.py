"""A replica's own Docker daemon (dstack's `docker: true` on a node without one): podman's Docker-compatible API.

    python -m ray_dstack.serve.runtime.docker_daemon --podman PATH --namespace NS --socket PATH

Runs `podman --namespace NS system service --time=0 unix://PATH` in the foreground and, when it ends (a
termination signal from the replica or its supervisor, or the service's own exit), removes every container and
pod the commands made through it. The libpod namespace NS is the replica's own: the commands see only their
containers (`docker ps`), and what they leave behind is exactly what `rm -af` in NS removes, while images stay
shared with the node (a pulled image is pulled once per node, as the replicas' own images).
The replica starts this under `ray_dstack.serve.runtime.supervise` (runtime/docker_access.py), so it also runs
when the replica dies without stopping. Its containers belong to conmon, not to this process group: killing
the group alone would leave them running. The node's runtime settings reach the service through
CONTAINERS_CONF (runtime/docker_access.py writes it). Imports no other ray_dstack module.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

STOP_TIMEOUT_S = "0"  # at once: all of it must finish within the supervisor's 5 s grace before its SIGKILL
TERMINATING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def remove_everything(podman: str, namespace: str) -> None:
    for what in (["rm", "-a", "-f", "-t", STOP_TIMEOUT_S], ["pod", "rm", "-a", "-f", "-t", STOP_TIMEOUT_S]):
        subprocess.run([podman, "--namespace", namespace, *what], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_dstack.serve.runtime.docker_daemon")
    parser.add_argument("--podman", required=True, help="podman's executable")
    parser.add_argument("--namespace", required=True, help="the replica's libpod namespace")
    parser.add_argument("--socket", required=True, help="where the Docker API listens (a Unix socket path)")
    args = parser.parse_args(argv)
    stopping = False

    def on_signal(_signum, _frame):
        nonlocal stopping
        stopping = True
        if service.poll() is None:
            service.terminate()

    # A replica of the same id whose whole process tree was SIGKILLed (this program included) left its
    # containers, and a socket that would make `system service` fail.
    remove_everything(args.podman, args.namespace)
    try:
        os.unlink(args.socket)
    except FileNotFoundError:
        pass
    service = subprocess.Popen([args.podman, "--namespace", args.namespace, "system", "service", "--time=0",
                                f"unix://{args.socket}"], stdin=subprocess.DEVNULL)
    for signum in TERMINATING:
        signal.signal(signum, on_signal)
    while True:
        try:
            code = service.wait()
            break
        except InterruptedError:
            continue
    for signum in TERMINATING:  # the cleanup below must finish
        signal.signal(signum, signal.SIG_IGN)
    remove_everything(args.podman, args.namespace)
    try:
        os.unlink(args.socket)
    except FileNotFoundError:
        pass
    if not stopping:
        print(f"docker_daemon: podman system service exited with code {code}", flush=True)
    return 0 if stopping else (code if code > 0 else 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
