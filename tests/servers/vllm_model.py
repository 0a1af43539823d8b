"""A tiny random-weight Llama that vLLM's CPU backend can serve.

The same tokenizer and chat template as `tests.servers.tiny_model` (byte-level BPE trained locally, special
tokens, Zephyr-style template written into `tokenizer_config.json`), but a head size vLLM's CPU attention
accepts: it supports head sizes 32, 64, 80, 96, 112, 128, ... and not tiny_model's 16 (hidden 64 / 4 heads),
so here hidden 128 / 2 heads = 64. Weights are seeded and float32 (about 1.2 MB), so vLLM can run it in
float32 or bfloat16 on any x86 CPU. Nothing is downloaded.

`python -m tests.servers.vllm_model DIR` writes it, for trying vLLM by hand.
"""

from __future__ import annotations

from pathlib import Path

from tests.servers.tiny_model import SEED, build_tokenizer, save_model

HIDDEN = 128
HEADS = 2
HEAD_DIM = HIDDEN // HEADS  # 64: a head size vLLM's CPU attention kernels have
LAYERS = 2
MAX_POSITIONS = 2048


def build_vllm_model(path: str | Path) -> Path:
    """Build and save model + tokenizer into `path` (created); returns the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).eval()
    return save_model(model, tokenizer, path)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the tiny vLLM test model into a directory")
    parser.add_argument("path")
    print(build_vllm_model(parser.parse_args().path))
