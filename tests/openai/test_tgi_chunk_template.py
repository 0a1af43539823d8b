"""The TGI adapter's per-token chunks (`_ChunkTemplate`, ray_dstack/openai/tgi.py) are byte for byte what
`json.dumps` of the whole chunk gives, whatever the token's text and the model's name."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from ray_dstack.openai.tgi import _SLOT, _ChunkTemplate


def chat_chunk(model: str, text: str, usage: bool) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": model,
            "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}],
            **({"usage": None} if usage else {})}


def expected(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


@settings(max_examples=300, deadline=None)
@given(st.text(), st.text(), st.booleans())
def test_a_rendered_chunk_equals_json_dumps(model, text, usage):
    template = _ChunkTemplate(chat_chunk(model, _SLOT, usage))
    assert template.render(text) == expected(chat_chunk(model, text, usage))


def test_texts_that_need_escaping():
    template = _ChunkTemplate(chat_chunk('a "model" \\ é', _SLOT, False))
    for text in ['say "hi"', "back\\slash", "é 中文 😀", "tab\tnew\nline\x01", "", _SLOT[1:-1]]:
        assert template.render(text) == expected(chat_chunk('a "model" \\ é', text, False))


def test_a_model_named_like_the_slot_does_not_move_the_text():
    template = _ChunkTemplate(chat_chunk(_SLOT, _SLOT, True))
    assert template.render("tok") == expected(chat_chunk(_SLOT, "tok", True))
