"""Shared pieces of the pipeline tests: the model, data and the training loop, the same
in one process and on torchrun ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from overdrive.models.llama import tiny

STEPS = 5


def llama(n_layers: int = 4):
    return tiny(n_layers=n_layers)


def batches(n: int = STEPS, rows: int = 4, seq: int = 16, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (rows, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids.roll(-1, dims=1)})
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
