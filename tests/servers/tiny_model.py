"""A tiny random-weight chat model that runs real inference on CPU in milliseconds.

`build_tiny_model(path)` writes a `LlamaForCausalLM` (hidden 64, 2 layers, 4 heads, seeded weights) with a
byte-level BPE tokenizer trained here on a small corpus, special tokens `<s>`, `</s>`, `<unk>`, `<pad>` and
`<|system|>`/`<|user|>`/`<|assistant|>`, and a Zephyr-style chat template, with `save_pretrained` (about
600 KB). The chat template is written into `tokenizer_config.json` (where the Hub reader looks; no separate
`chat_template.jinja`), with `tokenizer_class: PreTrainedTokenizerFast` so transformers 4.57 loads it.

The end-of-sequence row of `lm_head` is scaled up so that sampling reaches `</s>` within a few dozen
tokens for many seeds — tests need all three finish reasons from a random model.

`tiny_model_dir()` builds once per process (in a temp dir) and returns the path; the pytest fixture
`tiny_model_path` does the same for a test session. Building takes well under a second.
"""

from __future__ import annotations

import functools
import json
import random
import tempfile
from pathlib import Path

import pytest

MODEL_ID = "ray-dstack/tiny-random-llama"
SEED = 1234
VOCAB_SIZE = 1000
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
EOS_BOOST = 4.0
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_WORDS = (
    "the a an one two three model server token stream chat user assistant system hello world answer question "
    "ray serve dstack service replica gateway request response prompt template python quick brown fox jumps "
    "over lazy dog red green blue cat sat on mat why how what when where who is are was were be been good "
    "day night sun moon star tree river mountain city road car train plane ship data code test run build"
).split()


def _corpus(n_lines: int = 3000) -> list[str]:
    rng = random.Random(SEED)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        line = " ".join(words)
        if rng.random() < 0.3:
            line = line.capitalize() + rng.choice([".", "?", "!", ",", ":"])
        if rng.random() < 0.1:
            line += f" {rng.randint(0, 9999)} é ü ñ 日本 😀"
        lines.append(line)
    return lines


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(path: str | Path) -> Path:
    """Build and save the model + tokenizer into `path` (created); returns the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] *= EOS_BOOST
    model.eval()
    return save_model(model, tokenizer, path)


def save_model(model, tokenizer, path: Path) -> Path:
    """Weights and tokenizer into `path`, with the chat template in tokenizer_config.json, the one place both
    transformers 4.57 and the newer one vLLM brings read it (4.57 may write chat_template.jinja instead)."""
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    config_path = path / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["chat_template"] = CHAT_TEMPLATE
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config["model_input_names"] = ["input_ids", "attention_mask"]
    if isinstance(tok_config.get("extra_special_tokens"), list):
        del tok_config["extra_special_tokens"]
    config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return path


@functools.lru_cache(maxsize=None)
def tiny_model_dir() -> Path:
    """The model built once per process in a temporary directory."""
    return build_tiny_model(Path(tempfile.mkdtemp(prefix="ray-dstack-tiny-model-")) / "model")


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    return tiny_model_dir()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the tiny test model into a directory")
    parser.add_argument("path")
    print(build_tiny_model(parser.parse_args().path))
