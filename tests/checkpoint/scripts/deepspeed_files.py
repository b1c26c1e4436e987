"""One process, ZeRO-2: which files rt.save fsynced, and how rt.load treats tampered or
unlisted DeepSpeed files. Writes <out>/deepspeed_files.json.

(A script, not an in-process test: DeepSpeed keeps global state that outlives the test's
process group.)
"""
import json
import os
import shutil
import sys
from pathlib import Path

import torch

import overdrive as od
from overdrive.runtime import checkpoint_files as cf
from tests.checkpoint.ckpt_util import CountingLoader, make_model, train_step

out = sys.argv[1]
os.chdir(out)
model = make_model(2, seed=0)
rt = od.accelerate(model, {"deepspeed": 2}, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
loader = CountingLoader()
rt._loaders.append(loader)
train_step(rt, loader)

synced, real_fsync = [], os.fsync


def recording_fsync(fd):
    synced.append(os.readlink(f"/proc/self/fd/{fd}"))
    real_fsync(fd)


os.fsync = recording_fsync
rt.save(f"{out}/ck")
os.fsync = real_fsync
ck = f"{out}/ck"
ds_files = [n for n in cf.data_files(Path(ck)) if n.startswith("deepspeed/")]
tmp_rel = sorted({p.split(".ck.tmp-", 1)[1].partition("/")[2] for p in synced if ".ck.tmp-" in p})


def fix_manifest(name):
    manifest_path = Path(ck) / cf.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][name] = {"size": os.path.getsize(f"{ck}/{name}"),
                               "crc32": cf.crc32_file(Path(ck) / name)}
    manifest_path.write_text(json.dumps(manifest))


def load_error():
    try:
        rt.load(ck)
        return None
    except od.CheckpointError as e:
        return f"{type(e).__name__}: {e}"


before = {k: v.clone() for k, v in rt.model.state_dict().items()}
train_step(rt, loader)
clean = load_error()
restored = all(torch.equal(v, before[k]) for k, v in rt.model.state_dict().items())


class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


shutil.copytree(ck, f"{out}/pristine")
optim = next(n for n in ds_files if n.endswith("optim_states.pt"))
state = torch.load(f"{ck}/{optim}", weights_only=False)
state["optimizer_state_dict"]["evil"] = Evil()
torch.save(state, f"{ck}/{optim}")
fix_manifest(optim)  # crc32 is no signature: whoever edits the file fixes the manifest too
tampered = load_error()
shutil.rmtree(ck)
shutil.copytree(f"{out}/pristine", ck)
Path(f"{ck}/deepspeed/state/extra.pt").write_bytes(b"x")
unlisted = load_error()
Path(f"{out}/deepspeed_files.json").write_text(json.dumps({
    "ds_files": ds_files, "synced": tmp_rel, "clean": clean, "restored": restored,
    "tampered": tampered, "pwned": os.path.exists(f"{out}/PWNED"), "unlisted": unlisted}))
