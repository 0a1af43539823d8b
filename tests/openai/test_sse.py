"""`SSEDataReader` (ray_dstack/openai/sse.py) frames server-sent events as the SSE specification does: checked against
httpx-sse's decoder (what the TGI adapter used before) on generated streams cut into arbitrary pieces, and on the
cases the specification spells out."""

from __future__ import annotations


from hypothesis import given, settings
from hypothesis import strategies as st
from httpx_sse._decoders import SSEDecoder, SSELineDecoder

from ray_dstack.openai.sse import SSEDataReader


def reference(stream: bytes) -> list[str]:
    """The non-empty `data` of each event, as httpx-sse dispatches them."""
    lines = SSELineDecoder()
    decoder = SSEDecoder()
    text = stream.decode("utf-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    out = []
    for line in lines.decode(text) + lines.flush():
        event = decoder.decode(line.rstrip("\n"))
        if event is not None and event.data:
            out.append(event.data)
    return out


def ours(pieces: list[bytes]) -> list[str]:
    reader = SSEDataReader()
    return [d.decode() for piece in pieces for d in reader.feed(piece) if d]


def cut(stream: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({p % (len(stream) + 1) for p in points} | {0, len(stream)})
    return [stream[a:b] for a, b in zip(bounds, bounds[1:])]


line_end = st.sampled_from(["\n", "\r\n", "\r"])
value = st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=12)
field_line = st.one_of(
    st.builds(lambda v: f"data: {v}", value),
    st.builds(lambda v: f"data:{v}", value),
    st.just("data"),
    st.builds(lambda v: f": {v}", value),  # a comment
    st.builds(lambda v: f"event: {v}", value),
    st.builds(lambda v: f"id: {v}", value.filter(lambda v: "\0" not in v)),
    st.builds(lambda v: f"retry: {v}", st.integers(0, 9999).map(str)),
    st.builds(lambda v: f"datax: {v}", value),
)
event = st.lists(st.tuples(field_line, line_end), min_size=1, max_size=4)


@st.composite
def streams(draw) -> bytes:
    parts = []
    for lines in draw(st.lists(event, max_size=6)):
        parts += [line + end for line, end in lines]
        parts.append(draw(line_end))  # the blank line that dispatches
    if draw(st.booleans()):
        parts.append("data: unfinished")  # no blank line: never dispatched
    text = "".join(parts)
    return (("\ufeff" if draw(st.booleans()) else "") + text).encode()


@settings(max_examples=400, deadline=None)
@given(streams(), st.lists(st.integers(0, 10_000), max_size=8))
def test_events_match_httpx_sse_however_the_stream_is_cut(stream, points):
    assert ours(cut(stream, points)) == reference(stream)


def test_one_event_per_token_in_the_common_framing():
    reader = SSEDataReader()
    assert reader.feed(b'data: {"a":1}\n\ndata: {"a":2}\n\ndata: {"a"') == [b'{"a":1}', b'{"a":2}']
    assert reader.feed(b':3}\n\n') == [b'{"a":3}']


def test_multi_line_data_comments_and_crlf():
    reader = SSEDataReader()
    assert reader.feed(b": keep-alive\r\ndata: one\r\ndata:two\r\nid: 7\r\n\r\nevent: x\r\n\r\n") == [b"one\ntwo"]


def test_a_cr_at_the_end_of_a_piece_waits_for_a_possible_lf():
    reader = SSEDataReader()
    assert reader.feed(b"data: a\r") == []
    assert reader.feed(b"\n\r") == [b"a"]  # CRLF ended the line, the CR ended the event
    assert reader.feed(b"\ndata: b\r\r") == [b"b"]  # that CR's LF belonged to it: no extra blank line


def test_a_bom_split_across_pieces_is_skipped():
    reader = SSEDataReader()
    assert reader.feed(b"\xef") == []
    assert reader.feed(b"\xbb\xbfdata: x\n\n") == [b"x"]
