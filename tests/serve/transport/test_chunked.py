"""`ChunkedDecoder` (ray_dstack/serve/transport/chunked.py) reads what h11 reads: the same data from the same
bytes however they are split into reads, and an error where the bytes are not a chunked body."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_dstack.serve.transport.chunked import MAX_LINE, ChunkedBodyError, ChunkedDecoder

HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"


def h11_body(body: bytes) -> bytes:
    """The data h11 reads from a response with this chunked `body` (raises on what h11 rejects)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(HEAD + body)
    data = []
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            data.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(data)
        elif event is h11.NEED_DATA:
            raise AssertionError("h11 wants more data")


def decode(body: bytes, cuts: list[int]) -> tuple[bytes, bool]:
    decoder = ChunkedDecoder()
    out = []
    last = 0
    for cut in sorted(set(cuts)) + [len(body)]:
        out.append(decoder.feed(body[last:cut]))
        last = cut
    return b"".join(out), decoder.done


chunk_ext = st.sampled_from([b"", b";a=1", b";name", b';q="x y"', b" ", b"\t", b";x \t"])
size_text = st.sampled_from(["%x", "%X", "%04x"])
trailer = st.lists(st.sampled_from([b"x-checksum: abc", b"x-n: 1", b"etag: \"v1\""]), max_size=2)


@st.composite
def chunked_bodies(draw):
    payloads = draw(st.lists(st.binary(min_size=1, max_size=300), max_size=12))
    parts = []
    for payload in payloads:
        parts.append((draw(size_text) % len(payload)).encode() + draw(chunk_ext) + b"\r\n" + payload + b"\r\n")
    parts.append(b"0" + draw(chunk_ext) + b"\r\n" + b"".join(t + b"\r\n" for t in draw(trailer)) + b"\r\n")
    return b"".join(parts), b"".join(payloads)


@settings(max_examples=400, deadline=None)
@given(chunked_bodies(), st.lists(st.integers(min_value=0, max_value=4000), max_size=20))
def test_data_equals_h11s_for_any_split_into_reads(body_and_data, cuts):
    body, data = body_and_data
    assert h11_body(body) == data
    assert decode(body, [c for c in cuts if c <= len(body)]) == (data, True)


def test_many_chunks_in_one_read_come_out_as_one_piece():
    tokens = [b"data: {\"t\": %d}\n\n" % i for i in range(16)]
    body = b"".join(b"%x\r\n%s\r\n" % (len(t), t) for t in tokens)
    decoder = ChunkedDecoder()
    assert decoder.feed(body) == b"".join(tokens)
    assert not decoder.done
    assert decoder.feed(b"0\r\n\r\n") == b"" and decoder.done


def test_a_chunk_split_anywhere_is_handed_on_as_it_comes():
    decoder = ChunkedDecoder()
    assert decoder.feed(b"a") == b""
    assert decoder.feed(b"\r") == b""
    assert decoder.feed(b"\n0123") == b"0123"
    assert decoder.feed(b"456789\r") == b"456789"
    assert decoder.feed(b"\n0\r\n\r") == b""
    assert not decoder.done
    assert decoder.feed(b"\n") == b"" and decoder.done


@pytest.mark.parametrize("body, message", [
    (b"zz\r\nhello\r\n", "illegal chunk header"),
    (b"-5\r\nhello\r\n", "illegal chunk header"),
    (b"0x5\r\nhello\r\n", "illegal chunk header"),
    (b"\r\n", "illegal chunk header"),
    (b"1" * 21 + b"\r\n", "illegal chunk header"),
    (b"5\r\nhelloXY", "malformed chunk end"),
    (b"5\r\nhello\rX", "malformed chunk end"),
    (b"5\r\nhelloX", "malformed chunk end"),
])
def test_what_is_not_a_chunked_body_is_an_error(body, message):
    with pytest.raises(ChunkedBodyError, match=message):
        decoder = ChunkedDecoder()
        decoder.feed(body)
        decoder.feed(b"")
    with pytest.raises(Exception):  # noqa: B017 - h11 rejects it too (its own error type)
        h11_body(body + b"0\r\n\r\n" if b"0\r\n\r\n" not in body else body)


def test_data_before_a_fault_comes_out_first_and_the_next_feed_raises():
    decoder = ChunkedDecoder()
    assert decoder.feed(b"2\r\nok\r\n3\r\nabc\r\nzz\r\n") == b"okabc"
    assert decoder.failed and not decoder.done
    with pytest.raises(ChunkedBodyError, match="illegal chunk header"):
        decoder.feed(b"")
    with pytest.raises(ChunkedBodyError):
        decoder.feed(b"0\r\n\r\n")


def test_bytes_after_the_end_are_kept_apart_from_the_body():
    decoder = ChunkedDecoder()
    assert decoder.feed(b"2\r\nok\r\n0\r\n\r\nHTTP/1.1") == b"ok"
    assert decoder.done and decoder.after_end == b"HTTP/1.1"
    assert decoder.feed(b" 200") == b"" and decoder.after_end == b"HTTP/1.1 200"
    clean = ChunkedDecoder()
    clean.feed(b"0\r\n\r\n")
    assert clean.done and clean.after_end == b""


def test_a_header_line_without_end_is_refused_past_the_limit():
    decoder = ChunkedDecoder()
    assert decoder.feed(b"5;" + b"x" * (MAX_LINE - 10)) == b""
    with pytest.raises(ChunkedBodyError, match="longer than"):
        decoder.feed(b"x" * 20)
