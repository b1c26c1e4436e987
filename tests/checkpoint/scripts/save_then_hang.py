"""Save step-1 completely, then start saving step-2 (keep_last=1) and get killed inside it.

``HANG_AT=<stage>:<file>`` makes the second save hang at a known stage (this script
patches the save's own steps; nothing in overdrive knows about it): ``write`` before the
tensors are written, ``rename`` before the finished directory is published, ``swap``
between renaming the old checkpoint aside and renaming the new one into place. On
reaching it, the script touches ``file`` and sleeps until killed."""
import os
import sys
import time
from pathlib import Path

import torch

import overdrive.runtime.checkpoint_files as cf
from tests.checkpoint.ckpt_util import CountingLoader, make_model, manual_runtime, train_step


def hang_at(stage: str, signal_file: str) -> None:
    def hang(*_args, **_kwargs):
        Path(signal_file).write_text(stage)
        while True:
            time.sleep(1)

    if stage == "write":
        cf.ChecksumWriter = hang
    elif stage == "rename":
        cf.publish = hang
    elif stage == "swap":
        rename = os.rename

        def rename_then_hang(src, dst, *args, **kwargs):
            rename(src, dst, *args, **kwargs)
            if Path(dst).name.startswith(cf.aside_prefix(Path(src))):
                hang()

        cf.os.rename = rename_then_hang
    else:
        raise SystemExit(f"unknown stage {stage!r}")


root, overwrite = sys.argv[1], sys.argv[2] == "overwrite"
model = make_model(2)
rt = manual_runtime(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
loader = CountingLoader()
rt._loaders.append(loader)
train_step(rt, loader)
rt.save(f"{root}/step-1")
torch.save(dict(model.state_dict()), f"{root}/expected.pt")
train_step(rt, loader)
hang_at(*os.environ["HANG_AT"].split(":", 1))
rt.save(f"{root}/step-1" if overwrite else f"{root}/step-2", keep_last=1)
print("unreachable: the save should hang", flush=True)
