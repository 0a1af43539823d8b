"""Connections into a replica's network namespace that bypass pasta: the namespace hands out its own sockets.

pasta maps a host port to the service's port by splicing two TCP sockets in user space, and it does not set
TCP_NODELAY on the socket it opens inside the namespace. On a keep-alive connection the replica's request
arrives in two writes (head, then body): pasta forwards the head, Nagle holds the body until the head is
acknowledged, and the model server's kernel delays that ACK (it is waiting for the body) by up to 40 ms.
Measured: 43-46 ms added to every request but a connection's first (bench/RESULTS.md, [2.2]).

So the data path does not use pasta at all. The namespace's init (`supervise --init --connector PATH`, PID 1
inside it) listens on a Unix socket at PATH (a file on the host's filesystem, which every network namespace
shares) and, asked for a port, connects to 127.0.0.1:PORT *inside* the namespace and sends the connected
socket back over the Unix socket (SCM_RIGHTS). The replica then owns an ordinary loopback TCP connection to
its model server, as if the server ran on the node: no copy, no splice, TCP_NODELAY set by the client. It
needs no privilege (no setns). pasta still gives the namespace its outbound network and keeps the host port
mapping (a person on the node may `curl` it).

This module is the replica's side: `NamespaceConnector` (one connection, blocking) and `NamespaceBackend`
(httpcore's network backend, so httpx pools keep such connections alive). The init's side lives in
ray_dstack/serve/runtime/supervise.py, which imports nothing of ray_dstack: the two agree on the protocol below.

    replica → init:  b"<port>\\n"
    init → replica:  b"ok" with one file descriptor, or b"error <errno> <message>" without one
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable
from pathlib import Path

import httpcore

from ray_dstack.serve.transport.loop_stream import LoopStream

# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107
REPLY_MAX = 512


def connector_for(workspace: Path, port: int, warn: Callable[[str], object]) -> NamespaceConnector | None:
    """The connector of a replica whose working directory is `workspace`: its socket lies next to it (not in
    it: the commands' files stay theirs). None, with a warning, when that path is too long for a Unix socket
    (the replica then reaches its service through pasta's port mapping, slower: see above)."""
    path = f"{workspace}.sock"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        warn(f"the namespace connector's socket path {path!r} is longer than {MAX_SOCKET_PATH} bytes; "
             "this replica reaches its service through pasta's port mapping (set a shorter $RAY_DSTACK_WORK_ROOT)")
        return None
    return NamespaceConnector(path, port)


class NamespaceConnector:
    """Asks a namespace's init for a TCP connection to `port` on the namespace's loopback."""

    def __init__(self, path: str, port: int) -> None:
        self.path = path
        self.port = port

    def connect(self, timeout: float | None) -> socket.socket:
        """A connected TCP socket inside the namespace. Raises ConnectionRefusedError while nothing listens
        there (as a direct connect would), OSError when the init is not there (yet)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
            unix.settimeout(timeout)
            unix.connect(self.path)
            unix.sendall(b"%d\n" % self.port)
            reply, fds, _flags, _addr = socket.recv_fds(unix, REPLY_MAX, 1)
        if fds:
            sock = socket.socket(fileno=fds[0])
            for extra in fds[1:]:
                os.close(extra)
            if reply == b"ok":
                sock.setblocking(True)  # the init connected it with a timeout: the fd came non-blocking
                return sock
            sock.close()
        raise _reply_error(reply, self.port)

    async def open(self, timeout: float | None) -> socket.socket:
        # Only when a pool opens a connection (they are kept alive), so a thread hop is cheap enough.
        return await asyncio.to_thread(self.connect, timeout)

    async def accepts(self, timeout: float = 2.0) -> bool:
        """Whether the service listens on its port inside the namespace (the readiness of a plain service)."""
        try:
            sock = await self.open(timeout)
        except OSError:
            return False
        sock.close()
        return True


def _reply_error(reply: bytes, port: int) -> OSError:
    parts = reply.decode(errors="replace").split(" ", 2)
    if len(parts) == 3 and parts[0] == "error" and parts[1].isdigit():
        code = int(parts[1])
        if code == errno.ECONNREFUSED:
            return ConnectionRefusedError(code, f"nothing listens on port {port} in the replica's namespace")
        return OSError(code, parts[2])
    return OSError(errno.EPROTO, f"unexpected answer from the namespace's init: {reply[:80]!r}")


class NamespaceBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend for a client whose every connection goes into one namespace: the host
    and port of the URL are ignored (the connector knows the service's port)."""

    def __init__(self, connector: NamespaceConnector) -> None:
        self.connector = connector

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options=None) -> httpcore.AsyncNetworkStream:
        try:
            sock = await self.connector.open(timeout)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        return await LoopStream.from_socket(sock, socket_options)  # TCP_NODELAY, as on any replica connection

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options=None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("a namespace connection is TCP only")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
