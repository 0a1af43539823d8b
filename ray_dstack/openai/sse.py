"""Server-sent events read from bytes: the `data` of each event, for adapters that parse a backend's stream.

The TGI adapter reads one event per token. httpx-sse decodes every chunk to text, splits it into lines in an async
generator of its own and builds a `ServerSentEvent` per event: ~2 async-generator hops and a text decode per line,
a large part of the adapter's cost per token at engine speed (bench/RESULTS.md, "Relay tokens at engine speed").
`SSEDataReader` does the framing of the SSE specification (WHATWG HTML, "Parsing an event stream") on the bytes
as they come, with no per-line objects: lines end in CRLF, LF or CR (a CR at the end of a piece ends its line at
once; an LF starting the next piece is then its CRLF's); a line starting with `:` is a comment; `data` lines of one event are
joined with LF; a blank line dispatches the event; an event with no `data` line dispatches nothing; a UTF-8 BOM
at the very start is skipped; an unfinished event at the end of the stream is dropped. Other fields (`event`,
`id`, `retry`) are not needed by the adapters and are ignored.
"""

from __future__ import annotations

_BOM = b"\xef\xbb\xbf"


class SSEDataReader:
    """Feed it the stream's bytes in any pieces; `feed` returns the `data` of every event completed by them."""

    def __init__(self) -> None:
        self._rest = b""  # an unfinished line
        self._data: list[bytes] = []  # `data` values of the event being read
        self._started = False
        self._skip_lf = False  # the last piece ended in CR: an LF starting the next one belongs to it

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        buf = self._rest + chunk if self._rest else chunk
        if not self._started:
            if len(buf) < len(_BOM) and _BOM.startswith(buf):
                self._rest = buf
                return []
            self._started = True
            if buf.startswith(_BOM):
                buf = buf[len(_BOM):]
        if b"\r" in buf:
            self._skip_lf = buf.endswith(b"\r")  # it ends the line now, whatever comes next
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events: list[bytes] = []
        data = self._data
        pos = 0
        while True:
            end = buf.find(b"\n", pos)
            if end < 0:
                break
            line = buf[pos:end]
            pos = end + 1
            if not line:
                if data:
                    events.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data = self._data = []
                continue
            if line.startswith(b"data"):
                if line.startswith(b"data: "):
                    data.append(line[6:])
                    continue
                if line == b"data" or line[4:5] == b":":
                    data.append(line[5:])
                    continue
            # a comment (`:...`), another field, or a line that is not a field: nothing for `data`
        self._rest = buf[pos:]
        return events
