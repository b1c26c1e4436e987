"""torchrun worker: many zoo cells in one launch (torch and transformers import once).

    torchrun --nproc-per-node=2 tests/models/dist_worker.py OUT.json llama,gpt2 fsdp,ddp

Every rank runs every cell; rank 0 writes the results (a JSON list of CellResult dicts).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tests.models import zoo


def _sum(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def _buffers_agree(model: torch.nn.Module) -> bool:
    """Every rank's running stats equal rank 0's (what a checkpoint then saves)."""
    from overdrive.passes.buffers import running_stat_buffers

    same = torch.ones(())
    for b in running_stat_buffers(model):
        theirs = b.detach().clone()
        dist.broadcast(theirs, src=0)
        same *= float(torch.equal(theirs, b))
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())


def main(out: str, models: str, plans: str) -> None:
    logging.getLogger("overdrive").setLevel(logging.WARNING)
    results = []
    for model in models.split(","):
        for plan in plans.split(","):
            torch._dynamo.reset()
            res = zoo.run_cell(model, plan, {**zoo.DIST_PLANS, **zoo.SP_PLANS}[plan](), world_size=zoo.DIST_WORLD,
                               reduce=_sum, buffers_agree=_buffers_agree)
            results.append(res.to_dict())
            if dist.is_initialized():
                dist.barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:4])
