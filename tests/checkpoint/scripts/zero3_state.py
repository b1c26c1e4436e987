"""DeepSpeed ZeRO-3 on 2 ranks, every parameter partitioned (persistence threshold 0):
rt.state_dict() and rt.export() hold the full weights. Rank 0 writes <out>/zero3.json.
"""
import json
import sys

import torch
import torch.distributed as dist

import overdrive as od
from tests.checkpoint.ckpt_util import make_model

out = sys.argv[1]
initial = make_model(2, seed=0).state_dict()
config = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
rt = od.accelerate(make_model(2, seed=0), {"deepspeed": {"zero_stage": 3, "config": config}},
                   optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
partition_shapes = sorted({tuple(p.data.shape) for p in rt.model.parameters()})
before = rt.state_dict()
x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(rt.rank))
rt.backward(rt.model(x, labels=x).loss)
rt.optimizer.step()
rt.optimizer.zero_grad()
after = rt.state_dict()
reference = rt._engine._zero3_consolidated_16bit_state_dict()  # DeepSpeed's own gather
rt.export(f"{out}/export", max_shard_size="40KB")
if rt.rank == 0:
    fresh = make_model(2, seed=5)
    od.load_weights(fresh, f"{out}/export")
    exported = fresh.state_dict()
    with open(f"{out}/zero3.json", "w") as f:
        json.dump({
            "partition_shapes": [list(s) for s in partition_shapes],
            "keys": sorted(after) == sorted(initial),
            "shapes": all(after[k].shape == initial[k].shape for k in initial),
            "before_equals_initial": all(torch.equal(before[k], initial[k]) for k in initial),
            "trained": any(not torch.equal(after[k], before[k]) for k in initial),
            "after_equals_deepspeed": all(torch.equal(after[k], reference[k].cpu())
                                          for k in reference),
            "export_equals_state_dict": all(torch.equal(exported[k], after[k]) for k in after),
        }, f)
dist.barrier()
