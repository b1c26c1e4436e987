"""Buffers kept equal across data-parallel ranks, as torch DDP's ``broadcast_buffers``.

Parameters are synchronised through their gradients; buffers that a training forward
updates (BatchNorm's running stats) are not, so each rank would drift to statistics of
its own data and a checkpoint would keep whichever rank's copy it happened to write.
Like DDP, rank 0's buffers are broadcast once when the model is wrapped and then with
every training forward — after it rather than before (DDP's moment), so that between
steps, where a checkpoint is written, every rank already holds rank 0's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def running_stat_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The buffers a training forward updates: BatchNorm-style running statistics."""
    out: list[torch.Tensor] = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            out += [b for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                    if b is not None]
    return out


def plain_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Every buffer that is a plain tensor (DTensor buffers are placed by their plan)."""
    return [b for b in model.buffers() if not hasattr(b, "_local_tensor")]


def broadcast(buffers: list[torch.Tensor], src: int = 0) -> None:
    with torch.no_grad():
        for b in buffers:
            dist.broadcast(b, src=src)


def keep_buffers_in_sync(model: nn.Module, buffers: list[torch.Tensor]) -> bool:
    """Broadcast ``buffers`` from rank 0 now and after each training forward of
    ``model``; False (nothing registered) when there are none."""
    if not buffers:
        return False
    broadcast(buffers)

    def post_forward(module: nn.Module, args, output) -> None:
        if module.training and torch.is_grad_enabled():
            broadcast(buffers)

    model.register_forward_hook(post_forward)
    return True
