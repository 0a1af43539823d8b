"""httpcore's network backend on the event loop's own transports: what a replica's client reads its model
server's stream with.

httpcore's default backend wraps every socket read in anyio: a `fail_after` cancel scope for the read timeout,
an exception-mapping context manager, and anyio's stream on top of asyncio's. A replica relaying a stream pays
that once per chunk: at 64 streams it was ~10 % of the replica's CPU (py-spy; bench/RESULTS.md, History: "the
replica's reads without anyio"), on the core the model server shares. Here a read is a buffer pop when data is
already there, and otherwise one future with one timer (`loop.call_later`) for the read timeout. A connection's
"was it closed while idle?" check (httpcore asks it of every idle connection when it picks one) is a flag, not a
`poll()`. What one step of the loop writes (a request's head, then its body) leaves in one send().

Semantics are httpcore's: `read` returns b"" at end of stream, raises `ReadTimeout` when nothing came within
the timeout and `ReadError` when the connection failed; `write` raises `WriteTimeout`/`WriteError`; connecting
raises `ConnectTimeout`/`ConnectError`. Closing a stream closes the socket, so the server sees the disconnect.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import httpcore

# Stop reading the socket beyond this much unread data (the consumer is slower than the server) and resume below
# a quarter of it; writes that add up to this much are sent at once rather than at the end of the loop's step.
HIGH_WATER = 1 << 16
_TIMED_OUT = object()


class _Protocol(asyncio.Protocol):
    """The transport's callbacks: buffer what arrives, wake the one reader or writer waiting."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.eof = False
        self.error: BaseException | None = None
        self.reader: asyncio.Future | None = None
        self.writer: asyncio.Future | None = None
        self.write_paused = False
        self.read_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        # Nobody is reading now (a relay holding its tokens back, serve/transport/coalesce.py): what comes next
        # waits in the socket and arrives with one recv() when the reader has taken this, not one per segment.
        if not self.read_paused and self.transport is not None and (
                self.buffered > HIGH_WATER or self.reader is None):
            self.read_paused = True
            self.transport.pause_reading()
        _wake(self.reader)

    def eof_received(self) -> bool:
        self.eof = True
        _wake(self.reader)
        return False  # the transport closes itself: an HTTP/1.1 client has nothing to send after the server's EOF

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if exc is not None:
            self.error = exc
        _wake(self.reader)
        _wake(self.writer)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        _wake(self.writer)


def _wake(waiter: asyncio.Future | None, value: object = None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(value)


async def _wait(protocol: _Protocol, attr: str, timeout: float | None) -> bool:
    """Wait until the protocol wakes `attr`'s waiter; False when `timeout` passed first."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    setattr(protocol, attr, waiter)
    timer = loop.call_later(timeout, _wake, waiter, _TIMED_OUT) if timeout is not None else None
    try:
        return await waiter is not _TIMED_OUT
    finally:
        setattr(protocol, attr, None)
        if timer is not None:
            timer.cancel()


class LoopStream(httpcore.AsyncNetworkStream):
    """One connection: an asyncio transport and its `_Protocol`."""

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._unsent: list[bytes] | None = None
        self._unsent_size = 0

    @classmethod
    async def from_socket(cls, sock: socket.socket,
                          socket_options: Iterable[tuple[int, int, int | bytes]] | None = None) -> LoopStream:
        """Wrap a connected socket (made non-blocking here), with TCP_NODELAY and `socket_options` set on it."""
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            return await _connect(lambda: loop.create_connection(_Protocol, sock=sock), "a connected socket", None,
                                  socket_options)
        except httpcore.ConnectError:
            sock.close()
            raise

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        p = self._protocol
        while not p.chunks:
            if p.error is not None:
                raise httpcore.ReadError(str(p.error) or type(p.error).__name__)
            if p.eof:
                return b""
            if not await _wait(p, "reader", timeout):
                raise httpcore.ReadTimeout(f"no data from the server within {timeout} s")
        data = p.chunks.popleft()
        if len(data) > max_bytes:
            p.chunks.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        elif p.chunks:  # more arrived meanwhile: hand over as much as fits in one read
            parts = [data]
            size = len(data)
            while p.chunks and size + len(p.chunks[0]) <= max_bytes:
                size += len(p.chunks[0])
                parts.append(p.chunks.popleft())
            if len(parts) > 1:
                data = b"".join(parts)
        p.buffered -= len(data)
        if p.read_paused and p.buffered <= HIGH_WATER // 4 and p.transport is not None:
            p.read_paused = False
            p.transport.resume_reading()
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        p = self._protocol
        self._check_writable()
        # httpcore writes a request's head and its body separately, one right after the other: sent together at
        # the end of this step of the loop, they cost one send() (and one wake-up of the server), not two.
        if self._unsent is None:
            self._unsent = [buffer]
            self._unsent_size = len(buffer)
            asyncio.get_running_loop().call_soon(self._send_unsent)
        else:
            self._unsent.append(buffer)
            self._unsent_size += len(buffer)
        if self._unsent_size >= HIGH_WATER:
            self._send_unsent()  # large writes go now, so the transport's flow control sees them
        while p.write_paused:
            self._check_writable()  # closed meanwhile (aclose, a reset): nothing will resume writing
            if not await _wait(p, "writer", timeout):
                raise httpcore.WriteTimeout(f"the server took nothing within {timeout} s")

    def _check_writable(self) -> None:
        p = self._protocol
        if p.error is not None or self._transport.is_closing():
            raise httpcore.WriteError(str(p.error) if p.error else "the connection is closed")

    def _send_unsent(self) -> None:
        unsent, self._unsent = self._unsent, None
        if unsent and not self._transport.is_closing():
            if len(unsent) == 1:
                self._transport.write(unsent[0])
            elif self._unsent_size < HIGH_WATER:
                self._transport.write(b"".join(unsent))
            else:
                self._transport.writelines(unsent)

    async def aclose(self) -> None:
        self._send_unsent()
        # `close()` would keep the socket open until unsent data drains (a server that stopped reading holds it
        # forever); the connection is being discarded, so unsent data is dropped with it.
        if self._transport.get_write_buffer_size():
            self._transport.abort()
        else:
            self._transport.close()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> LoopStream:
        loop = asyncio.get_running_loop()
        self._send_unsent()
        p = self._protocol
        if p.read_paused:  # the TLS transport takes over reading: the plain one must not stay paused
            p.read_paused = False
            self._transport.resume_reading()
        p.transport = None  # no pause during the handshake: data it delivers must not pause the plain transport
        try:
            async with asyncio.timeout(timeout):
                transport = await loop.start_tls(self._transport, self._protocol, ssl_context,
                                                 server_hostname=server_hostname)
        except TimeoutError as exc:
            self._transport.abort()
            raise httpcore.ConnectTimeout(f"TLS handshake not done within {timeout} s") from exc
        except (OSError, ssl.SSLError) as exc:
            self._transport.abort()
            raise httpcore.ConnectError(str(exc)) from exc
        p.transport = transport  # start_tls does not call connection_made: pause/resume reading go through it now
        return LoopStream(transport, p)  # type: ignore[arg-type]

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # an idle keep-alive connection the server closed, or sent something on
            return bool(self._protocol.chunks) or self._protocol.eof
        if info == "ssl_object":
            return self._transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._transport.get_extra_info("sockname")
        if info == "server_addr":
            return self._transport.get_extra_info("peername")
        if info == "socket":
            return self._transport.get_extra_info("socket")
        return None


class LoopBackend(httpcore.AsyncNetworkBackend):
    """Opens `LoopStream`s (TCP with TCP_NODELAY, as asyncio sets it, or Unix sockets)."""

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[tuple[int, int, int | bytes]] | None = None) -> LoopStream:
        loop = asyncio.get_running_loop()
        local_addr = (local_address, 0) if local_address else None
        return await _connect(lambda: loop.create_connection(_Protocol, host, port, local_addr=local_addr),
                              f"{host}:{port}", timeout, socket_options)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[tuple[int, int, int | bytes]] | None = None) -> LoopStream:
        loop = asyncio.get_running_loop()
        return await _connect(lambda: loop.create_unix_connection(_Protocol, path), path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def _connect(open_transport: Callable[[], Awaitable[tuple[asyncio.BaseTransport, asyncio.BaseProtocol]]],
                   where: str, timeout: float | None,
                   options: Iterable[tuple[int, int, int | bytes]] | None) -> LoopStream:
    """The one way a `LoopStream` is opened: httpcore's connect errors, TCP_NODELAY and the socket options."""
    try:
        async with asyncio.timeout(timeout):
            transport, protocol = await open_transport()
    except TimeoutError as exc:
        raise httpcore.ConnectTimeout(f"no connection to {where} within {timeout} s") from exc
    except OSError as exc:
        raise httpcore.ConnectError(str(exc)) from exc
    _apply(transport, options)
    return LoopStream(transport, protocol)  # type: ignore[arg-type]


def _apply(transport: asyncio.BaseTransport, options: Iterable[tuple[int, int, int | bytes]] | None) -> None:
    sock = transport.get_extra_info("socket")
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a request's head and body never wait on Nagle
    for option in options or ():
        sock.setsockopt(*option)
