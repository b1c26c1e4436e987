"""Pipeline scenarios on torchrun ranks; writes JSON (rank 0) for tests/pipeline.

    torchrun --nproc-per-node=N pp_worker.py OUT.json SCENARIO [SCENARIO ...]
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

import overdrive as od
from tests.pipeline.common import batches, full_state, hf_batches, hf_llama, llama, train_steps

PLANS = {
    "gpipe": dict(parallel=od.Parallel(pp=2), pipeline=od.Pipeline(schedule="gpipe")),
    "1f1b": dict(parallel=od.Parallel(pp=2), pipeline=od.Pipeline(schedule="1f1b")),
    "interleaved": dict(parallel=od.Parallel(pp=2), pipeline=od.Pipeline(
        schedule="interleaved-1f1b", stages_per_rank=2)),
    "looped": dict(parallel=od.Parallel(pp=2), pipeline=od.Pipeline(
        schedule="looped-bfs", stages_per_rank=2)),
    "zero_bubble": dict(parallel=od.Parallel(pp=2), pipeline=od.Pipeline(
        schedule="zero-bubble", stages_per_rank=2)),
    "zbv": dict(parallel=od.Parallel(pp=2), pipeline=od.Pipeline(
        schedule="zbv", stages_per_rank=2)),
    "pp_fsdp": dict(parallel=od.Parallel(pp=2, dp_shard=2), fsdp=od.FSDP(),
                    pipeline=od.Pipeline(schedule="1f1b")),
    "pp_tp": dict(parallel=od.Parallel(pp=2, dp_shard=1, tp=2),
                  pipeline=od.Pipeline(schedule="1f1b")),
}


def scenario(name: str) -> dict:
    if name == "hf":
        rt = od.accelerate(hf_llama(), "pp", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
        return {"losses": train_steps(rt, hf_batches(), clip=1.0), "state": full_state(rt)}
    n_layers = 8 if name in ("interleaved", "looped", "zero_bubble", "zbv") else 4
    torch.manual_seed(0)
    model = llama(n_layers)
    rt = od.accelerate(model, od.Plan(**PLANS[name]),
                       optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    losses = train_steps(rt, batches(), clip=1.0)
    return {"losses": losses, "state": full_state(rt)}


def main() -> None:
    out, names = sys.argv[1], sys.argv[2:]
    results = {}
    for name in names:
        results[name] = scenario(name)
    if dist.get_rank() == 0:
        with open(out, "w") as fh:
            json.dump(results, fh)
    dist.barrier()


if __name__ == "__main__":
    main()
