"""Test hosts of our own on one machine: Linux network namespaces joined by a bridge.

Raylets started by `ray.cluster_utils.Cluster` all share this machine's loopback, so two service processes
that listen on the same fixed port cannot run side by side, while on a real cluster each node has its own
network. Here each simulated node gets a network namespace (`ip netns`) with its own address on a private
bridge: a `python -m http.server 8000` in one namespace does not collide with another's, exactly like two
machines. The test process stays in the host namespace and reaches every node through the bridge.

Needs root (CAP_NET_ADMIN) and iproute2; this machine and CI run as root. Every namespace, link and
process is removed on teardown: everything still running in a namespace is killed (`ip netns pids`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

IP = shutil.which("ip") or "/usr/sbin/ip"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


@dataclass
class Host:
    name: str
    netns: str
    ip: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    def argv(self, *argv: str) -> list[str]:
        """`argv` run inside this host's network namespace."""
        return [IP, "netns", "exec", self.netns, *argv]

    def pids(self) -> list[int]:
        out = _ip("netns", "pids", self.netns, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_everything(self) -> None:
        """Kill every process in the namespace at once, like a machine losing power."""
        for _ in range(5):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)


@dataclass
class NetnsLab:
    """A bridge in the host namespace (address `<subnet>.254`) and hosts `<subnet>.1`, `.2`, ..."""

    tag: str
    subnet: str
    hosts: dict[str, Host] = field(default_factory=dict)

    @property
    def bridge(self) -> str:
        return f"rdb{self.tag}"

    @classmethod
    def create(cls) -> "NetnsLab":
        tag = str(os.getpid())[-7:]
        lab = cls(tag=tag, subnet=f"10.213.{int(tag) % 250}")
        lab._remove_links()  # left by a run of the same pid that died before its teardown
        _ip("link", "add", lab.bridge, "type", "bridge")
        _ip("addr", "add", f"{lab.subnet}.254/24", "dev", lab.bridge)
        _ip("link", "set", lab.bridge, "up")
        return lab

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 1
        host = Host(name=name, netns=f"rdlab{self.tag}-{index}", ip=f"{self.subnet}.{index}")
        veth = f"rdv{self.tag}-{index}"
        _ip("netns", "add", host.netns)
        self.hosts[name] = host
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")
        return host

    def popen(self, host: Host, argv: list[str], *, env: dict[str, str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                host.argv(*argv), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        host.processes.append(proc)
        return proc

    def teardown(self) -> None:
        for host in self.hosts.values():
            host.kill_everything()
            for proc in host.processes:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            _ip("netns", "delete", host.netns, check=False)
        self.hosts.clear()
        self._remove_links()

    def _remove_links(self) -> None:
        _ip("link", "delete", self.bridge, check=False)
        for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
            name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
            if name.startswith(f"rdv{self.tag}-"):
                _ip("link", "delete", name, check=False)
        for line in _ip("netns", "list", check=False).stdout.splitlines():
            netns = line.split()[0] if line.strip() else ""
            if netns.startswith(f"rdlab{self.tag}-"):
                Host(name=netns, netns=netns, ip="").kill_everything()
                _ip("netns", "delete", netns, check=False)
