"""Save step-1 completely, then start saving step-2 (keep_last=1) and get killed inside it
(OVERDRIVE_CKPT_TEST_HANG makes the save hang at a known stage)."""
import os
import sys

import torch

from tests.checkpoint.ckpt_util import CountingLoader, make_model, manual_runtime, train_step

root, overwrite = sys.argv[1], sys.argv[2] == "overwrite"
model = make_model(2)
rt = manual_runtime(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
loader = CountingLoader()
rt._loaders.append(loader)
train_step(rt, loader)
hang = os.environ.pop("OVERDRIVE_CKPT_TEST_HANG")
rt.save(f"{root}/step-1")
torch.save(dict(model.state_dict()), f"{root}/expected.pt")
train_step(rt, loader)
os.environ["OVERDRIVE_CKPT_TEST_HANG"] = hang
rt.save(f"{root}/step-1" if overwrite else f"{root}/step-2", keep_last=1)
print("unreachable: the save should hang", flush=True)
