"""2 ranks save; rank 0 then damages what only one rank checks: rank 1's RNG state
(``rng``), then the last record of a DCP file (``record``). Every rank must raise a
CheckpointError (none waits alone in a collective) and keep its runtime as it was.
Each rank writes <out>/<case>-rank<r>.json: its error and whether it was untouched."""
import json
import shutil
import sys

import torch
import torch.distributed as dist

from tests.checkpoint.ckpt_util import (CountingLoader, allreduce_grads, assert_same_state,
                                        last_record, make_model, manual_runtime,
                                        replace_record, rewrite_pt, runtime_state, train_step)

out = sys.argv[1]
model = make_model(2, seed=0)
rt = manual_runtime(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
rt._loaders.append(CountingLoader())
train_step(rt, rt._loaders[0], allreduce_grads)
rt.save(f"{out}/ck")
for case in ("rng", "record"):
    if rt.rank == 0:
        shutil.copytree(f"{out}/ck", f"{out}/{case}")
        if case == "rng":
            rewrite_pt(f"{out}/{case}", "rank-1.pt",
                       lambda s: s.update(torch=torch.zeros(7, dtype=torch.uint8)))
        else:
            replace_record(f"{out}/{case}", last_record(f"{out}/{case}"), torch.zeros(3, 3))
    dist.barrier()
    train_step(rt, rt._loaders[0], allreduce_grads)  # differs from the checkpoint now
    before = runtime_state(rt)
    try:
        rt.load(f"{out}/{case}")
        error = None
    except Exception as e:  # noqa: BLE001 - the test checks it is a CheckpointError
        error = f"{type(e).__name__}: {e}"
    try:
        assert_same_state(before, runtime_state(rt))
        untouched = True
    except AssertionError:
        untouched = False
    with open(f"{out}/{case}-rank{rt.rank}.json", "w") as f:
        json.dump({"error": error, "untouched": untouched}, f)
dist.barrier()
