"""Functions od.launch runs in the launch tests (importable, so pickled by reference)."""

from __future__ import annotations

import os
import time


def rank_and_world(offset: int = 0, *, scale: int = 1) -> dict:
    """Every rank sums its rank over the group: rank 0 returns what it saw."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return {"rank": int(os.environ["RANK"]), "world": dist.get_world_size(),
            "sum": t.item(), "value": (offset + 1) * scale}


def rank1_raises() -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    dist.barrier()
    if dist.get_rank() == 1:
        raise ValueError(f"boom on purpose at {time.time()}")
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for a rank that is gone
    time.sleep(600)


def rank1_exits() -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    dist.barrier()
    if dist.get_rank() == 1:
        with open(os.environ["EXIT_STAMP"], "w") as f:
            f.write(str(time.time()))
        os._exit(3)
    time.sleep(600)


def accelerate_and_train(steps: int, run_dir: str) -> list:
    """A 2-rank od.accelerate run inside od.launch; rank 0 returns its logged losses."""
    import json

    import torch

    import overdrive as od

    torch.manual_seed(0)
    rt = od.accelerate(torch.nn.Linear(4, 1), od.Plan(ddp=od.DDP()),
                       optimizer=lambda p: torch.optim.SGD(p, lr=0.1), run_dir=run_dir)
    for _ in range(steps):
        x = torch.randn(8, 4)
        loss = rt.model(x).pow(2).mean()
        rt.backward(loss)
        rt.optimizer.step()
        rt.optimizer.zero_grad()
    rt.finish()
    if rt.rank != 0:
        return []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]
