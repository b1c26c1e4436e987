"""Shared pieces of the pipeline tests: the model, data and the training loop, the same
in one process and on torchrun ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from overdrive.models.llama import tiny

STEPS = 5


def llama(n_layers: int = 4):
    return tiny(n_layers=n_layers)


def hf_llama(n_layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, attn_implementation="sdpa", use_cache=False)
    return LlamaForCausalLM(cfg)


def hf_batches(n: int = STEPS) -> list[dict]:
    """transformers' convention: the labels are the inputs (its loss shifts them)."""
    return [{"input_ids": b["input_ids"] % 128, "labels": b["input_ids"] % 128}
            for b in batches(n)]


def batches(n: int = STEPS, rows: int = 4, seq: int = 16, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (rows, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids})  # the model shifts them
    return out


def train_steps(rt, data: list[dict], clip: float | None = None) -> list[float]:
    losses = []
    for batch in data:
        loss = rt.forward_backward(batch)
        if clip is not None:
            rt.clip_grad_norm_(clip)
        rt.optimizer.step()
        rt.optimizer.zero_grad()
        losses.append(float(loss))
    return losses


def full_state(rt) -> dict[str, list]:
    """Every parameter of the whole model, gathered from all stages, as nested lists
    (rank 0 returns them; others an empty dict)."""
    local = {k: v.tolist() for k, v in rt.state_dict().items()}
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return local
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict[str, list] = {}
    for p in parts:
        merged.update(p)
    return merged
