"""Helpers shared by the checkpoint tests and their torchrun scripts.

``manual_runtime`` builds a Runtime around a model the test prepared itself (plain,
replicated on every rank, or fully_shard-ed by hand), so the checkpoint code is exercised
on several ranks without the ddp/fsdp passes.
"""

from __future__ import annotations

import os

import torch

import overdrive as od
from overdrive.models.llama import tiny
from overdrive.plan import resolve_for_world
from overdrive.rewrite.report import Report
from overdrive.runtime.runtime import Runtime
from overdrive.runtime.state import ensure_process_group, env_for

VOCAB = 64


def make_model(n_layers: int = 2, seed: int = 0, **kw) -> torch.nn.Module:
    kw = {"vocab_size": VOCAB, "dim": 32, "n_heads": 2, "max_seq_len": 16, **kw}
    model = tiny(n_layers, **kw)
    model.init_weights(seed=seed)
    return model


def manual_runtime(model, optimizer=None, scheduler=None, plan=None) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    plan = resolve_for_world(od.Plan() if plan is None else plan, world)  # as accelerate does
    if world > 1:
        ensure_process_group(torch.device("cpu"))
    env = env_for(plan, rank=int(os.environ.get("RANK", "0")),
              local_rank=int(os.environ.get("LOCAL_RANK", "0")), world_size=world,
              device=torch.device("cpu"))
    return Runtime(model, plan=plan, report=Report([]), env=env, optimizer=optimizer,
                   scheduler=scheduler)


class CountingLoader:
    """A resumable loader: batches drawn from the global torch RNG, position checkpointed."""

    def __init__(self, batch: int = 2, seq: int = 8):
        self.batch, self.seq, self.position = batch, seq, 0

    def next(self) -> torch.Tensor:
        self.position += 1
        return torch.randint(0, VOCAB, (self.batch, self.seq))

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def train_step(rt, loader: CountingLoader, sync=None) -> float:
    x = loader.next()
    with rt.autocast():
        loss = rt.model(x, labels=x).loss
    rt.backward(loss)
    if sync is not None:
        sync(rt.model)
    rt.optimizer.step()  # the runtime's wrapper: fp16 scaler step/update, rt.step += 1
    rt.optimizer.zero_grad()
    if rt.scheduler is not None:
        rt.scheduler.step()
    return loss.item()


def allreduce_grads(model) -> None:
    """A replicated model's manual data parallelism (the ddp pass is not needed)."""
    import torch.distributed as dist

    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()

