"""`Coalesced` (ray_dstack/serve/transport/coalesce.py): what the reader has read leaves in one write, bytes and
order unchanged; a chunk is never held back for a second one; errors, backpressure and cancellation keep the
source's semantics. On asyncio and on uvloop (Serve's loop)."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from ray_dstack.serve.transport.coalesce import Coalesced, WriteBudget

LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


@pytest.fixture(params=sorted(LOOPS))
def run(request):
    return LOOPS[request.param]


class Source:
    """An async byte source fed by the test: `put` makes chunks readable, `end`/`fail` finish it."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.read = 0
        self.closed = False

    def put(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.queue.put_nowait(chunk)

    def end(self) -> None:
        self.queue.put_nowait(None)

    def fail(self, exc: BaseException) -> None:
        self.queue.put_nowait(exc)

    async def chunks(self):
        try:
            while True:
                item = self.queue.get_nowait() if not self.queue.empty() else await self.queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                self.read += 1
                yield item
        finally:
            self.closed = True


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_what_was_read_before_the_relay_asks_leaves_as_one_chunk(run):
    async def main():
        src = Source()
        relay = Coalesced(src.chunks())
        src.put(b"data: 1\n\n", b"data: 2\n\n", b"", b"data: 3\n\n")
        first = await relay.__anext__()  # the reader has read all three by the time it is asked
        src.put(b"data: 4\n\n")
        src.end()
        rest = [c async for c in relay]
        return first, rest, src.closed

    first, rest, closed = run(main())
    assert first == b"data: 1\n\ndata: 2\n\ndata: 3\n\n"
    assert rest == [b"data: 4\n\n"]
    assert closed


def test_a_lone_chunk_is_relayed_at_once_not_held_for_a_second(run):
    async def main():
        src = Source()
        relay = Coalesced(src.chunks())
        got = []
        for n in range(3):
            src.put(f"data: {n}\n\n".encode())
            got.append(await asyncio.wait_for(relay.__anext__(), 5))  # nothing else is coming: it must not wait
        src.end()
        got += [c async for c in relay]
        return got

    assert run(main()) == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]


def test_an_error_reaches_the_consumer_after_the_data_read_before_it(run):
    async def main():
        src = Source()
        relay = Coalesced(src.chunks())
        src.put(b"a", b"b")
        src.fail(ConnectionResetError("backend gone"))
        got = []
        with pytest.raises(ConnectionResetError, match="backend gone"):
            async for chunk in relay:
                got.append(chunk)
        return got

    assert run(main()) == [b"ab"]


def test_the_reader_stops_at_high_water_until_the_relay_takes_data(run):
    async def main():
        src = Source()
        relay = Coalesced(src.chunks(), high_water=10)
        src.put(*[b"12345"] * 10)
        first = await relay.__anext__()
        await settle()
        read_while_unconsumed = src.read  # 2 chunks taken, then the reader waits again at 10 bytes
        second = await relay.__anext__()
        src.end()
        rest = b"".join([c async for c in relay])
        return first, read_while_unconsumed, second, rest

    first, read_while_unconsumed, second, rest = run(main())
    assert first == b"1234512345"
    assert read_while_unconsumed == 4  # 10 bytes taken + 10 waiting, nothing more read
    assert second == b"1234512345"
    assert first + second + rest == b"12345" * 10


def test_a_cancelled_relay_stops_the_reader_and_closes_the_source(run):
    async def main():
        src = Source()
        relay = Coalesced(src.chunks())
        src.put(b"x")
        assert await relay.__anext__() == b"x"
        waiting = asyncio.ensure_future(relay.__anext__())
        await settle()
        waiting.cancel()  # the client went away while the relay waited for the next token
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await settle()
        return src.closed, relay._reader.done()

    assert run(main()) == (True, True)


def test_aclose_closes_the_source_whether_or_not_it_was_read(run):
    async def main():
        never = Source()
        unread = Coalesced(never.chunks())
        await unread.aclose()
        started = Source()
        gen = started.chunks()
        relay = Coalesced(gen)
        started.put(*[b"y"] * 3)
        await relay.__anext__()
        await relay.aclose()
        await relay.aclose()  # twice is harmless
        after = [c async for c in relay]
        return started.closed, after

    closed, after = run(main())
    assert closed
    assert after == []


def test_aclose_while_the_reader_waits_for_room_closes_the_source(run):
    async def main():
        src = Source()
        relay = Coalesced(src.chunks(), high_water=2)
        src.put(b"aa", b"bb")
        await relay.__anext__()
        await settle()  # the reader holds b"bb" and waits at high water, the source suspended at its yield
        await relay.aclose()
        return src.closed

    assert run(main())


def test_a_relay_dropped_without_aclose_stops_its_reader(run):
    async def main():
        src = Source()
        relay = Coalesced(src.chunks())
        src.put(b"z")
        await relay.__anext__()
        reader = relay._reader
        del relay  # the consumer just stopped: the reader waits for data that may never come
        await settle()
        return reader.done(), src.closed

    assert run(main()) == (True, True)


def test_a_busy_relay_holds_tokens_for_its_interval_but_never_the_first(run):
    budget = WriteBudget(writes_per_s=20)  # one stream: a write every 50 ms at most

    async def main():
        src = Source()
        relay = Coalesced(src.chunks(), budget=budget)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        src.put(b"first ")
        first = await relay.__anext__()
        t_first = loop.time() - t0
        assert budget.streams == 1

        async def produce():
            for n in range(5):
                await asyncio.sleep(0.004)
                src.put(b"%d " % n)

        producer = asyncio.ensure_future(produce())
        second = await relay.__anext__()
        t_second = loop.time() - t0
        await producer
        src.put(b"last")
        src.end()
        rest = [c async for c in relay]
        return first, t_first, second, t_second, rest, budget.streams

    first, t_first, second, t_second, rest, streams = run(main())
    assert first == b"first " and t_first < 0.04  # at once
    assert second == b"0 1 2 3 4 " and t_second >= 0.045  # held for the interval: five tokens, one write
    assert b"".join(rest) == b"last"
    assert streams == 0  # a finished stream leaves the budget


def test_an_idle_relay_holds_nothing():
    assert WriteBudget(writes_per_s=4000).hold_s() == 0.0  # no stream
    few = WriteBudget(writes_per_s=4000)
    few.streams = 3
    assert few.hold_s() == 0.0  # 0.75 ms: not worth a timer
    busy = WriteBudget(writes_per_s=4000)
    busy.streams = 64
    assert busy.hold_s() == pytest.approx(0.016)
    flooded = WriteBudget(writes_per_s=4000)
    flooded.streams = 10_000
    assert flooded.hold_s() == 0.05  # never more than MAX_HOLD_S
    assert WriteBudget(writes_per_s=0).hold_s() == 0.0  # 0 turns holding off


def test_a_cancelled_relay_leaves_the_budget(run):
    budget = WriteBudget(writes_per_s=4000)

    async def main():
        src = Source()
        relay = Coalesced(src.chunks(), budget=budget)
        src.put(b"x")
        await relay.__anext__()
        waiting = asyncio.ensure_future(relay.__anext__())
        await settle()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await relay.aclose()
        return budget.streams

    assert run(main()) == 0


def test_a_cancellation_inside_the_source_is_an_error_not_a_clean_end(run):
    async def main():
        async def source():
            yield b"a"
            waiter = asyncio.get_running_loop().create_future()
            waiter.cancel()  # e.g. a library's own timeout cancelling what the source awaits
            await waiter
            yield b"never"

        relay = Coalesced(source())
        got = []
        with pytest.raises(asyncio.CancelledError):
            async for chunk in relay:
                got.append(chunk)
        return got

    assert run(main()) == [b"a"]
