"""A small transformers Llama, its export, and its bytes: shared by the offload tests."""

from __future__ import annotations

import torch


def llama_config(layers: int = 8, hidden: int = 64, tied: bool = False, vocab: int = 256):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       tie_word_embeddings=tied, max_position_embeddings=256)


def build(cfg, meta: bool = False):
    from transformers import LlamaForCausalLM

    if meta:
        with torch.device("meta"):
            return LlamaForCausalLM(cfg).eval()
    return LlamaForCausalLM(cfg).eval()


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def block_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
