"""Closeable byte streams for the adapters' answers (a stream must release its upstream request however the
consumer stops)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

import anyio

SSE_DONE = b"data: [DONE]\n\n"


async def close_quietly(closer: Callable[[], Awaitable[object]] | None) -> None:
    """Run an async close even inside a cancelled scope (client disconnect), never raising."""
    if closer is None:
        return
    with anyio.CancelScope(shield=True):
        try:
            await closer()
        except Exception:  # noqa: BLE001 - closing must not mask the original outcome
            pass


class ByteStream(AsyncIterator[bytes]):
    """An `AsyncIterator[bytes]` whose `aclose()` always releases the upstream request.

    A plain async generator that was never iterated does not run its `finally` on `aclose()`; this wrapper
    also calls `on_close` (e.g. `httpx.Response.aclose`), so the upstream connection is closed — and the
    backend sees the disconnect and stops generating — however the consumer stops: exhausted, `aclose()`d,
    or cancelled mid-iteration (Starlette cancels the body iterator when the client goes away).
    """

    def __init__(self, gen: AsyncGenerator[bytes, None], on_close: Callable[[], Awaitable[object]] | None = None):
        self._gen = gen
        self._on_close = on_close
        self._closed = False

    def __aiter__(self) -> "ByteStream":
        return self

    async def __anext__(self) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        try:
            return await self._gen.__anext__()
        except StopAsyncIteration:
            await self.aclose()
            raise
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with anyio.CancelScope(shield=True):
                await self._gen.aclose()
        except Exception:  # noqa: BLE001
            pass
        finally:
            await close_quietly(self._on_close)

    async def __aenter__(self) -> "ByteStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
