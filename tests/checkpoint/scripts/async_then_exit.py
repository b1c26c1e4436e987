"""Start an async rt.save and exit without waiting for it (``plain``: just exit; ``destroy``:
wait until this rank's writes are done, destroy the process group, then exit). Rank 0
writes the state the checkpoint must hold to <out>/expected.pt.
"""
import os
import sys
import time

import torch
import torch.distributed as dist

from tests.checkpoint.ckpt_util import CountingLoader, allreduce_grads, make_model, \
    manual_runtime, train_step

mode, out = sys.argv[1], sys.argv[2]
model = make_model(2, seed=0)
rt = manual_runtime(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
loader = CountingLoader()
rt._loaders.append(loader)
sync = allreduce_grads if rt.world_size > 1 else None
for _ in range(2):
    train_step(rt, loader, sync)
if rt.rank == 0:
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{out}/expected.pt")
rt.save(f"{out}/ck", async_=True)
train_step(rt, loader, sync)  # training goes on while it writes; the state saved is step 2
if mode == "destroy":
    while not rt._pending_save.future.done():
        time.sleep(0.05)
    dist.barrier()
    dist.destroy_process_group()
del rt  # a dropped runtime does not drop its save
print("exiting", os.getpid(), flush=True)
