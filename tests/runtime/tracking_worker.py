"""A 2-rank training run logging through jsonl, tensorboard and a custom od.Tracker.

Each rank also writes the losses its rt.backward saw (per optimizer step) to
losses_rank{R}.json, so the test can check the logged loss is their mean.
"""

import json
import os
import sys

import torch
from torch.utils.data import DataLoader, Dataset

import overdrive as od

out = sys.argv[1]
trackers = sys.argv[2].split(",")
# "exit": no rt.finish(), no profile: the last rows are completed at interpreter exit
at_exit = len(sys.argv) > 3 and sys.argv[3] == "exit"
STEPS, ACCUM, BATCH, SEQ = 4, 2, 4, 8


class Tokens(Dataset):
    def __len__(self):
        return 256

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, 32, (SEQ,), generator=g)
        return {"input_ids": ids, "labels": (ids + 1) % 32}


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 16)
        self.head = torch.nn.Linear(16, 32)

    def forward(self, input_ids, labels):
        logits = self.head(self.emb(input_ids))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


class Recorder(od.Tracker):
    name = "recorder"

    def __init__(self, path):
        self.path, self.rows, self.config = path, [], None

    def log_config(self, config):
        self.config = config

    def log(self, metrics, step):
        self.rows.append({"step": step, **metrics})

    def finish(self):
        with open(self.path, "w") as f:
            json.dump({"rows": self.rows, "config": self.config}, f)


torch.manual_seed(0)
rank = int(os.environ["RANK"])
run_config = {"lr": 0.05, "nested": {"a": [1, 2]}}
before = json.dumps(run_config)
custom = Recorder(os.path.join(out, f"recorder_rank{rank}.json"))
rt = od.accelerate(Model(), od.Plan(ddp=od.DDP(), grad_accum=ACCUM),
                   optimizer=lambda p: torch.optim.SGD(p, lr=0.05),
                   trackers=(*trackers, custom), run_dir=os.path.join(out, "run"),
                   run_config=run_config)
plan_before = rt.plan.to_dict()
loader = rt.shard(DataLoader(Tokens(), batch_size=BATCH))
seen, current = [], []
if not at_exit:
    rt.profile(os.path.join(out, "prof"), wait=0, warmup=1, active=1, ranks=None)  # steps 1-2
for batch in loader:
    with rt.accumulate():
        loss = rt.model(**batch)
        current.append(loss.item())
        rt.backward(loss)
        rt.clip_grad_norm_(1.0)
        rt.optimizer.step()
        rt.optimizer.zero_grad()
    if rt.sync_gradients:
        seen.append(current)
        current = []
    if rt.step == STEPS:
        break
rt.log({"eval_loss": torch.tensor(0.5), "epoch": 0})
assert json.dumps(run_config) == before, "run_config was mutated"
assert rt.plan.to_dict() == plan_before, "the plan was mutated"
with open(os.path.join(out, f"losses_rank{rank}.json"), "w") as f:
    json.dump(seen, f)
if not at_exit:
    rt.finish()
