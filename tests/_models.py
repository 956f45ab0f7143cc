"""Tiny randomly initialised models of real architectures (Qwen3, Llama) for CPU tests."""

from __future__ import annotations

import torch


def tiny_qwen3(vocab_size: int = 256, attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        **overrides,
    )
    config._attn_implementation = attn_implementation
    model = Qwen3ForCausalLM(config).float().eval()
    return model


def tiny_llama(vocab_size: int = 256, attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        **overrides,
    )
    config._attn_implementation = attn_implementation
    model = LlamaForCausalLM(config).float().eval()
    return model
