"""`ChunkedDecoder`: an HTTP/1.1 chunked body (RFC 9112 §7.1) decoded a read at a time, not a chunk at a time.

A model server streaming tokens writes one chunk per token. h11 (under httpcore, under httpx) hands each chunk
on as an event of its own, through its state machine and httpcore's and httpx's stream layers: ~8 µs of CPU per
token on the replica, more than all the rest of the relay (bench/RESULTS.md, "Relay tokens at engine speed").
This decoder takes whatever one `recv()` brought (16 tokens at 64 streams × 1,000 tokens/s) and returns all the
chunk data in it as one piece, so everything above it runs once per read. The chunks' syntax is h11's: a size of
1-20 hex digits, extensions after `;` (ignored), optional blanks, CRLF; data; CRLF. After the `0` chunk come
trailer lines up to an empty line, ignored (httpcore drops trailers too); unlike h11, which also takes a bare LF
there and parses each field, a trailer line must end in CRLF, as RFC 9112 writes it.
"""

from __future__ import annotations

import re

# h11's chunk header (h11/_abnf.py): size, extensions, optional whitespace; the CRLF is found separately.
_CHUNK_HEADER = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;[^\r\n]*)?[ \t]*")
# The longest chunk header or trailer line waited for (h11's limit for an incomplete event is 100 KiB).
MAX_LINE = 100 * 1024

_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedBodyError(ValueError):
    """The bytes are not a valid chunked body."""


class ChunkedDecoder:
    """Feed it the body's bytes as they come; it returns the data they complete (b"" when none) in order."""

    __slots__ = ("_state", "_left", "_pending", "_error")

    def __init__(self) -> None:
        self._state = _SIZE
        self._left = 0  # bytes of the current chunk's data still to come
        self._pending = b""  # an incomplete header, CRLF or trailer line, kept for the next feed
        self._error: ChunkedBodyError | None = None  # found after data the last feed returned: the next one raises

    @property
    def done(self) -> bool:
        """The last chunk and the trailer's end have been read."""
        return self._state == _DONE

    @property
    def failed(self) -> bool:
        """The bytes fed so far are not a chunked body: the next `feed` raises (the data before the fault came
        out first, as h11 hands it on)."""
        return self._error is not None

    @property
    def after_end(self) -> bytes:
        """Bytes that came after the body's end (an HTTP/1.1 server sends none before the next request)."""
        return self._pending if self._state == _DONE else b""

    def feed(self, data: bytes) -> bytes:
        """The chunk data in `data` (with what was pending before it). Bytes after the body's end are kept
        apart (`after_end`): the body is whole, but the connection cannot serve another request."""
        if self._error is not None:
            raise self._error
        if self._state == _DONE:
            self._pending += data
            return b""
        buf = self._pending + data if self._pending else data
        self._pending = b""
        out: list[bytes] = []
        try:
            self._decode(buf, out)
        except ChunkedBodyError as exc:
            if not out:
                raise
            self._error = exc
        return out[0] if len(out) == 1 else b"".join(out)

    def _decode(self, buf: bytes, out: list[bytes]) -> None:
        pos, end = 0, len(buf)
        state, left = self._state, self._left
        while pos < end:
            if state == _DATA:
                if end - pos <= left:  # the rest of the read is data of this chunk
                    out.append(buf[pos:] if pos else buf)
                    left -= end - pos
                    pos = end
                    break
                out.append(buf[pos:pos + left])
                pos += left
                left = 0
                state = _DATA_END
            elif state == _DATA_END:
                if end - pos < 2:
                    if buf[pos:] != b"\r":
                        raise ChunkedBodyError(f"malformed chunk end: {buf[pos:]!r} (expected CRLF)")
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise ChunkedBodyError(f"malformed chunk end: {buf[pos:pos + 2]!r} (expected CRLF)")
                pos += 2
                state = _SIZE
            else:  # _SIZE or _TRAILER: one line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > MAX_LINE:
                        raise ChunkedBodyError(f"chunk header or trailer line longer than {MAX_LINE} bytes")
                    break
                if state == _TRAILER:
                    if eol == pos:
                        pos += 2
                        state = _DONE
                        break
                else:
                    match = _CHUNK_HEADER.fullmatch(buf, pos, eol)
                    if match is None:
                        raise ChunkedBodyError(f"illegal chunk header: {buf[pos:eol]!r}")
                    left = int(match[1], 16)
                    state = _DATA if left else _TRAILER
                pos = eol + 2
        self._state, self._left = state, left
        if pos < end:
            self._pending = buf[pos:]
