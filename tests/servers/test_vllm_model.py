"""The vLLM test model: a head size vLLM's CPU attention supports, a real tokenizer and chat template, and
weights that transformers itself loads and runs."""

from __future__ import annotations

import json

import pytest

from tests.servers.tiny_model import CHAT_TEMPLATE
from tests.servers.vllm_model import HEAD_DIM, build_vllm_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_vllm_model(tmp_path_factory.mktemp("vllm-model") / "m")


def test_shape_vllm_cpu_accepts(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] == config["head_dim"] == HEAD_DIM == 64
    assert config["vocab_size"] == 1000


def test_tokenizer_and_template_load_and_run(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello world"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt == "<s><|user|>\nhello world</s>\n<|assistant|>\n"
    text = "the quick brown fox é 日本"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 5
