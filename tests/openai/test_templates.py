"""ChatTemplate renders real chat templates exactly like transformers' apply_chat_template, and stops hostile ones."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import jinja2
import pytest

from ray_dstack.openai.templates import ChatTemplate, TemplateError
from tests.servers.tiny_model import CHAT_TEMPLATE, tiny_model_dir

HUB = Path(__file__).parent.parent / "fixtures" / "hub"


def _token(value):
    return value["content"] if isinstance(value, dict) else value


def _fixture(repo: str):
    config = json.loads((HUB / repo / "tokenizer_config.json").read_text())
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next(t["template"] for t in template if t["name"] == "default")
    return template, _token(config.get("bos_token")), _token(config.get("eos_token"))


FIXTURES = {
    repo: _fixture(repo)
    for repo in (
        "mistralai/Mistral-7B-Instruct-v0.1",
        "meta-llama/Llama-2-7b-chat-hf",
        "HuggingFaceH4/zephyr-7b-beta",
        "Qwen/Qwen2.5-7B-Instruct",
        "meta-llama/Meta-Llama-3-8B-Instruct",
        "NousResearch/Hermes-2-Pro-Llama-3-8B",
        "teknium/OpenHermes-2.5-Mistral-7B",
    )
}
FIXTURES["tiny-model"] = (CHAT_TEMPLATE, "<s>", "</s>")
FIXTURES["acme/separate-jinja"] = ((HUB / "acme/separate-jinja/chat_template.jinja").read_text(), "<|begin_of_text|>", "<|end|>")
NO_SYSTEM = {"mistralai/Mistral-7B-Instruct-v0.1"}

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello!"}],
    "multi": [
        {"role": "user", "content": "What is Ray Serve?"},
        {"role": "assistant", "content": "  A library for serving models.  "},
        {"role": "user", "content": "And dstack?\nTell me more."},
    ],
    "system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi <b>&amp; \"quotes\" ü 日本"},
    ],
}


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(tiny_model_dir())


def hf_render(tokenizer, template, bos, eos, messages, add_generation_prompt=True, **kwargs):
    tokenizer.chat_template = template
    tokenizer.bos_token = bos
    tokenizer.eos_token = eos
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **kwargs)


@pytest.mark.parametrize("repo", sorted(FIXTURES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(hf_tokenizer, repo, conversation, add_generation_prompt):
    template, bos, eos = FIXTURES[repo]
    messages = CONVERSATIONS[conversation]
    ours = ChatTemplate(template, bos_token=bos, eos_token=eos)
    if conversation == "system" and repo in NO_SYSTEM:
        with pytest.raises(TemplateError) as err:
            ours.render(messages, add_generation_prompt=add_generation_prompt)
        with pytest.raises(jinja2.TemplateError) as hf_err:
            hf_render(hf_tokenizer, template, bos, eos, messages, add_generation_prompt)
        assert str(err.value) == str(hf_err.value)
        return
    expected = hf_render(hf_tokenizer, template, bos, eos, messages, add_generation_prompt)
    assert ours.render(messages, add_generation_prompt=add_generation_prompt) == expected
    assert ours.render(messages, add_generation_prompt=add_generation_prompt) == expected  # reusable


def test_known_renders():
    template, bos, eos = FIXTURES["mistralai/Mistral-7B-Instruct-v0.1"]
    msgs = CONVERSATIONS["multi"]
    assert ChatTemplate(template, bos_token=bos, eos_token=eos).render(msgs) == (
        "<s>[INST] What is Ray Serve? [/INST]  A library for serving models.  </s> [INST] And dstack?\nTell me more. [/INST]"
    )
    template, bos, eos = FIXTURES["meta-llama/Meta-Llama-3-8B-Instruct"]
    assert ChatTemplate(template, bos_token=bos, eos_token=eos).render(CONVERSATIONS["single"]) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    template, bos, eos = FIXTURES["HuggingFaceH4/zephyr-7b-beta"]
    assert ChatTemplate(template, bos_token=bos, eos_token=eos).render(CONVERSATIONS["single"]) == (
        "<|user|>\nHello!</s>\n<|assistant|>\n"
    )


def test_tools_and_tojson_match_transformers(hf_tokenizer):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & later",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "content": "{\"temp\": 3}"},
    ]
    for repo in ("Qwen/Qwen2.5-7B-Instruct",):
        template, bos, eos = FIXTURES[repo]
        expected = hf_render(hf_tokenizer, template, bos, eos, messages, tools=tools)
        assert ChatTemplate(template, bos_token=bos, eos_token=eos).render(messages, tools=tools) == expected
        assert '"description": "Weather <now> & later"' in expected  # tojson does not HTML-escape
    hermes = json.loads((HUB / "NousResearch/Hermes-2-Pro-Llama-3-8B/tokenizer_config.json").read_text())
    tool_use = next(t["template"] for t in hermes["chat_template"] if t["name"] == "tool_use")
    expected = hf_render(hf_tokenizer, tool_use, "<|begin_of_text|>", "<|im_end|>", messages, tools=tools)
    ours = ChatTemplate(tool_use, bos_token="<|begin_of_text|>", eos_token="<|im_end|>").render(messages, tools=tools)
    assert ours == expected


def test_helpers():
    t = ChatTemplate(
        "{% for m in messages %}{% if loop.index0 == 1 %}{% continue %}{% endif %}{% if loop.index0 > 2 %}"
        "{% break %}{% endif %}{{ m.content }};{% endfor %}{{ strftime_now('%Y') }}"
        "{% generation %}[{{ bos_token }}|{{ eos_token }}]{% endgeneration %}{{ {'a': '<é>'}|tojson }}"
        "{{ [1, 2]|tojson(indent=1) }}"
    )
    msgs = [{"role": "user", "content": str(i)} for i in range(5)]
    out = t.render(msgs)
    year = time.strftime("%Y")
    assert out == f"0;2;{year}[|]" + '{"a": "<é>"}' + "[\n 1,\n 2\n]"
    assert ChatTemplate("{{ x }}-{{ add_generation_prompt }}").render([], add_generation_prompt=False, x=1) == "1-False"


def test_raise_exception_and_errors():
    with pytest.raises(TemplateError) as err:
        ChatTemplate("{{ raise_exception('Only user and assistant roles are supported!') }}").render([])
    assert str(err.value) == "Only user and assistant roles are supported!"
    with pytest.raises(TemplateError, match="syntax error"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(TemplateError, match="has no attribute 'content'"):
        ChatTemplate("{{ messages[0].content.foo.bar }}").render([{"role": "user"}])
    with pytest.raises(TemplateError):
        ChatTemplate("{{ 1 / 0 }}").render([])
    with pytest.raises(TemplateError):
        ChatTemplate(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__['os'] }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ self._TemplateReference__context }}",
    "{{ ''.format.__self__.__class__ }}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{% set x = messages.append({'role': 'user'}) %}",
    "{% set d = {} %}{{ d.update({'a': 1}) }}",
])
def test_sandbox_blocks_python_internals(source):
    with pytest.raises(TemplateError) as err:
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])
    assert "not allowed" in str(err.value) or "unsafe" in str(err.value) or "undefined" in str(err.value)


@pytest.mark.parametrize("source", [
    "{% for i in range(10**9) %}x{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(99999) %}{% for j in range(99999) %}{% for k in range(99999) %}{% endfor %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ 'a' * 10**9 }}",
    "{{ ['a'] * 10**9 }}",
    "{{ 7 ** 99999999 }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% set big = 'a' * 900000 %}{% set x %}{% for i in range(100000) %}{{ big }}{% endfor %}{% endset %}",
    "{% set big = 'a' * 900000 %}{{ ([big] * 1000)|join }}",
    "{% set big = 'a' * 900000 %}{{ big|replace('a', 'bbbbbbbb') }}",
    "{% set big = 'a' * 900000 %}{{ big.replace('a', 'bbbbbbbb') }}",
    "{{ 'a'|center(10**9) }}",
    "{{ 'a'.ljust(10**9) }}",
    "{{ '{:>999999999}'.format('a') }}",
    "{{ '%999999999s' % 'a' }}",
    "{{ '%999999999s'|format('a') }}",
    "{% for i in range(100000) %}{{ 'abcdefghijklmnop' }}{% endfor %}",
])
def test_hostile_templates_are_bounded(source):
    t0 = time.monotonic()
    with pytest.raises(TemplateError) as err:
        ChatTemplate(source, max_render_seconds=0.5).render([{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 3
    assert "too" in str(err.value) or "larger" in str(err.value) or "longer" in str(err.value), str(err.value)


def test_limits_leave_normal_templates_alone():
    big_message = [{"role": "user", "content": "x" * 200_000}] * 3
    template, bos, eos = FIXTURES["Qwen/Qwen2.5-7B-Instruct"]
    assert len(ChatTemplate(template, bos_token=bos, eos_token=eos).render(big_message)) > 600_000
    assert ChatTemplate("{% for i in range(1000) %}{{ i }}{% endfor %}").render([]).startswith("0123")
    with pytest.raises(TemplateError, match="larger than 1000 characters"):
        ChatTemplate("{{ messages[0].content }}", max_output_chars=1000).render(big_message)


def test_concurrent_renders_are_independent():
    t = ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}", max_render_seconds=1)
    slow = ChatTemplate("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                        max_render_seconds=0.3)
    errors: list[Exception] = []

    def run_slow():
        try:
            slow.render([])
        except TemplateError as err:
            errors.append(err)

    thread = threading.Thread(target=run_slow)
    thread.start()
    for i in range(50):
        assert t.render([{"role": "user", "content": str(i)}]) == str(i)
    thread.join()
    assert len(errors) == 1
