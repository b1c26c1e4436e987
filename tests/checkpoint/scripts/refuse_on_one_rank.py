"""2 ranks save; then a load that only rank 1 refuses (it has a loader more than the
checkpoint): every rank must raise instead of rank 0 waiting alone in DCP's collectives.
Each rank writes <out>/refused-rank<r>.json with its error."""
import json
import sys

import torch
import torch.distributed as dist

import overdrive as od
from tests.checkpoint.ckpt_util import CountingLoader, make_model, manual_runtime

out = sys.argv[1]
model = make_model(2, seed=0)
rt = manual_runtime(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
rt._loaders.append(CountingLoader())
rt.save(f"{out}/ck")
if rt.rank == 1:
    rt._loaders.append(CountingLoader())
try:
    rt.load(f"{out}/ck")
    error = None
except od.CheckpointError as e:
    error = f"{type(e).__name__}: {e}"
with open(f"{out}/refused-rank{rt.rank}.json", "w") as f:
    json.dump({"error": error}, f)
dist.barrier()
