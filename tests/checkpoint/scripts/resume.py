"""Exact resume. ``full``: 6 steps, save after step 3. ``resume``: load, run steps 4-6.
Writes {"losses": [...], "batches": [...]} per rank to <out>/<phase>-rank<r>.json.

mode ``manual``: a model replicated on every rank with hand all-reduced gradients, batches
from the global RNG (so RNG restore is what makes them equal), dropout on; ``manual-fp16``
adds the fp16 GradScaler. ``ddp`` / ``fsdp`` / ``fp16``: od.accelerate with that plan and
rt.shard over a shuffled DataLoader.
"""
import json
import sys

import torch
import torch.distributed as dist

from tests.checkpoint.ckpt_util import (CountingLoader, allreduce_grads, make_model,
                                        manual_runtime, train_step)

mode, phase, out = sys.argv[1], sys.argv[2], sys.argv[3]


def build():
    import overdrive as od

    model = make_model(2, seed=0, dropout=0.1)
    opt = lambda p: torch.optim.AdamW(p, lr=1e-2)  # noqa: E731
    sched = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)  # noqa: E731
    if mode.startswith("manual"):
        plan = od.Plan(mixed_precision="fp16" if mode == "manual-fp16" else "no", seed=0)
        o = opt(model.parameters())
        rt = manual_runtime(model, o, sched(o), plan=plan)
        torch.manual_seed(1000 + rt.rank)  # ranks draw different batches
        loader = CountingLoader()
        rt._loaders.append(loader)
        sync = allreduce_grads if rt.world_size > 1 else None
        return rt, (lambda: (loader.next(),)), sync
    plan = {"ddp": "ddp", "fsdp": "fsdp", "fp16": {"mixed_precision": "fp16"},
            "deepspeed": {"deepspeed": 2}}[mode]
    rt = od.accelerate(model, plan, optimizer=opt, scheduler=sched)
    data = torch.utils.data.TensorDataset(torch.randint(0, 64, (64, 8),
                                                        generator=torch.Generator().manual_seed(0)))
    loader = torch.utils.data.DataLoader(data, batch_size=2, shuffle=True)
    sharded, state = rt.shard(loader), {}

    def next_batch():  # iterated lazily: after rt.load the loader starts at its position
        if "it" not in state:
            state["it"] = iter(sharded)
        return next(state["it"])

    return rt, next_batch, None


rt, next_batch, sync = build()


class Feed:  # train_step's loader interface over whichever source
    def next(self):
        return self.batch


losses, batches = [], []


def step():
    feed = Feed()
    feed.batch = next_batch()[0]
    batches.append(feed.batch.tolist())
    losses.append(train_step(rt, feed, sync))


if phase == "full":
    for i in range(6):
        step()
        if i == 2:
            rt.save(f"{out}/ck")
else:
    rt.load(f"{out}/ck")
    for _ in range(3):
        step()
    losses, batches = [None] * 3 + losses, [None] * 3 + batches
rank = dist.get_rank() if dist.is_initialized() else 0
with open(f"{out}/{phase}-rank{rank}.json", "w") as f:
    json.dump({"losses": losses, "batches": batches, "step": rt.step}, f)
