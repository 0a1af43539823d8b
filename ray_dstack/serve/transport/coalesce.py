"""A streamed answer relayed in as few writes as the load calls for: `Coalesced`.

Every chunk a replica relays costs the same on its way out whatever its size: one pass through Serve's ASGI
wrapper and uvicorn (whose socket `send()` was the largest item of the replica's profile), and one HTTP chunk for
HAProxy to parse and forward. At the rates GPU engines stream (64 streams × 1,000 tokens/s), one token per chunk
cost ~100 µs of CPU per token on the replica's node (bench/RESULTS.md, "Relay tokens at engine speed").

Two things keep that cost bounded:
- the stream's source (the model server's body, or an adapter's events) is read by a task of its own, and each
  step of the relay takes everything read since the last one, as one write, bytes unchanged and in order;
- a write budget per process (`WriteBudget`, `RAY_DSTACK_RELAY_WRITES_PER_S`, default 4,000): with S streams
  relayed at once, a stream writes at most every S / budget seconds (at most 50 ms; under 1 ms counts as none).
  A token arriving sooner waits, and leaves with those that arrive meanwhile (they wait in the socket, so the
  reader too wakes once per write; what reaches the socket during a hold may leave with the next write, so a
  token waits at most two intervals). The first chunk of a stream is never held back; a stream slower than its
  interval (64 streams at 50 tokens/s, the bench's standard point, against 16 ms) sees
  every token go out as it comes. So the cost per token falls as load rises.

Semantics of the source are kept: an exception it raises reaches the consumer after the data read before it;
backpressure holds (the reader stops after `HIGH_WATER` unread bytes, so a slow client slows the model server
as before); closing or cancelling the consumer cancels the reader, whose source then runs its own cleanup
(closing the upstream connection, so the model server stops generating).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import anyio

from ray_dstack.openai.streams import close_quietly

# Unread bytes at which the reader waits for the relay to take them (a slow client, HAProxy's buffers full).
HIGH_WATER = 1 << 16
# The writes per second a replica process spends on streams before it holds tokens back: each stream then writes
# at most every `streams / WRITES_PER_S` seconds (never longer than MAX_HOLD_S), so the relay's CPU stays bounded
# however fast the model server streams. Below that rate every chunk goes out as it comes.
WRITES_PER_S_ENV = "RAY_DSTACK_RELAY_WRITES_PER_S"
DEFAULT_WRITES_PER_S = 4000.0
MAX_HOLD_S = 0.05
MIN_HOLD_S = 0.001  # a shorter hold saves nothing worth a timer


class WriteBudget:
    """The streams a process relays now, and how long each may hold its tokens for the writes to fit the budget."""

    def __init__(self, writes_per_s: float, max_hold_s: float = MAX_HOLD_S) -> None:
        self.writes_per_s = writes_per_s
        self.max_hold_s = max_hold_s
        self.streams = 0

    def hold_s(self) -> float:
        if self.writes_per_s <= 0:
            return 0.0
        hold = min(self.max_hold_s, self.streams / self.writes_per_s)
        return hold if hold >= MIN_HOLD_S else 0.0


def _budget_from_env() -> WriteBudget:
    try:
        rate = float(os.environ.get(WRITES_PER_S_ENV, DEFAULT_WRITES_PER_S))
    except ValueError:
        rate = DEFAULT_WRITES_PER_S
    return WriteBudget(rate)


BUDGET = _budget_from_env()


class _Buffer:
    """What the reader and the relay share (the reader holds this, not the `Coalesced`, so dropping the
    `Coalesced` can stop the reader)."""

    __slots__ = ("chunks", "size", "waiting", "room", "error", "finished", "holding", "stopped")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.waiting: asyncio.Future | None = None  # the relay, waiting for data
        self.room: asyncio.Future | None = None  # the reader, waiting for the relay to take data
        self.error: BaseException | None = None
        self.finished = False
        self.holding = False  # the relay holds back a write: the reader lets data wait in the socket meanwhile
        self.stopped = False  # the relay cancelled the reader (any other cancellation is the source's error)


class Coalesced(AsyncIterator[bytes]):
    """`source`'s bytes, each step returning everything read since the last one (never an empty chunk)."""

    def __init__(self, source: AsyncIterator[bytes], *, high_water: int = HIGH_WATER,
                 budget: WriteBudget | None = None) -> None:
        self._source = source
        self._high_water = high_water
        self._budget = BUDGET if budget is None else budget
        self._buffer = _Buffer()
        self._reader: asyncio.Task | None = None
        self._closed = False
        self._counted = False  # in the budget's streams
        self._last_write = 0.0  # the loop's time of the last chunk handed out (0: none yet)

    def __aiter__(self) -> "Coalesced":
        return self

    async def __anext__(self) -> bytes:
        buffer = self._buffer
        loop = asyncio.get_running_loop()
        if self._reader is None:
            if self._closed:
                raise StopAsyncIteration
            self._reader = loop.create_task(_read(self._source, buffer, self._high_water))
            self._budget.streams += 1
            self._counted = True
        try:
            while not buffer.chunks:
                if buffer.finished:
                    self._uncount()
                    error, buffer.error = buffer.error, None
                    if error is not None:
                        raise error
                    raise StopAsyncIteration
                buffer.waiting = loop.create_future()
                try:
                    await buffer.waiting
                finally:
                    buffer.waiting = None
            if self._last_write and not buffer.finished:
                due = self._last_write + self._budget.hold_s()
                if loop.time() < due:  # a busy relay: what arrives until then leaves with this chunk
                    buffer.holding = True
                    try:
                        await asyncio.sleep(due - loop.time())
                    finally:
                        buffer.holding = False
                    _wake(buffer.room)
                    await asyncio.sleep(0)  # the reader takes in what waited in the socket before the write
        except BaseException as exc:
            if not isinstance(exc, StopAsyncIteration):
                # Cancelled (the client went away): nobody will ask again, so the reader stops now.
                self._stop_reader()
                self._uncount()
            raise
        self._last_write = loop.time()
        chunks = buffer.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        buffer.chunks = []
        buffer.size = 0
        _wake(buffer.room)
        return data

    async def aclose(self) -> None:
        """Stop reading and let the source clean up (an upstream response is closed); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._uncount()
        with anyio.CancelScope(shield=True):  # also when the consumer's scope is being cancelled
            if self._reader is None:
                await _close(self._source)
                return
            self._stop_reader()
            try:
                await self._reader
            except BaseException:  # noqa: BLE001 - the reader's own cancellation, or an error already handed on
                pass
            await _close(self._source)  # a reader cancelled before its first step never reached its cleanup

    def _stop_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._buffer.stopped = True
            self._reader.cancel()

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self._budget.streams -= 1

    def __del__(self) -> None:
        # Dropped without `aclose` (a consumer that just stopped): the reader must not hold the upstream open.
        self._uncount()
        reader = self._reader
        if reader is not None and not reader.done():
            self._buffer.stopped = True
            try:
                reader.get_loop().call_soon_threadsafe(reader.cancel)
            except RuntimeError:  # the loop is closed: so is everything it ran
                pass


async def _read(source: AsyncIterator[bytes], buffer: _Buffer, high_water: int) -> None:
    try:
        async for chunk in source:
            if not chunk:
                continue
            buffer.chunks.append(chunk)
            buffer.size += len(chunk)
            _wake(buffer.waiting)
            while buffer.size >= high_water or buffer.holding:
                buffer.room = asyncio.get_running_loop().create_future()
                try:
                    await buffer.room
                finally:
                    buffer.room = None
    except asyncio.CancelledError as exc:
        if not buffer.stopped:  # not the relay's doing: the source's own failure, for the consumer to see
            buffer.error = exc
            return
        # Cancelled while waiting for room, the source sits at a `yield`: close it (its cleanup runs).
        await _close(source)
        raise
    except BaseException as exc:  # noqa: BLE001 - handed to the relay, in order after the data
        buffer.error = exc
    finally:
        buffer.finished = True
        _wake(buffer.waiting)


async def _close(source: AsyncIterator[bytes]) -> None:
    await close_quietly(getattr(source, "aclose", None))


def _wake(waiter: asyncio.Future | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
