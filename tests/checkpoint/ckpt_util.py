"""Helpers shared by the checkpoint tests and their torchrun scripts.

``manual_runtime`` builds a Runtime around a model the test prepared itself (plain,
replicated on every rank, or fully_shard-ed by hand), so the checkpoint code is exercised
on several ranks without the ddp/fsdp passes.
"""

from __future__ import annotations

import copy
import os
import random

import torch

import overdrive as od
from overdrive.models.llama import tiny
from overdrive.plan_spec import resolve_for_world
from overdrive.rewrite.report import Report
from overdrive.runtime.runtime import Runtime
from overdrive.runtime.state import ensure_process_group, env_for

VOCAB = 64


def make_model(n_layers: int = 2, seed: int = 0, **kw) -> torch.nn.Module:
    kw = {"vocab_size": VOCAB, "dim": 32, "n_heads": 2, "max_seq_len": 16, **kw}
    model = tiny(n_layers, **kw)
    model.init_weights(seed=seed)
    return model


def manual_runtime(model, optimizer=None, scheduler=None, plan=None) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    plan = resolve_for_world(od.Plan() if plan is None else plan, world)  # as accelerate does
    if world > 1:
        ensure_process_group(torch.device("cpu"))
    env = env_for(plan, rank=int(os.environ.get("RANK", "0")),
              local_rank=int(os.environ.get("LOCAL_RANK", "0")), world_size=world,
              device=torch.device("cpu"))
    return Runtime(model, plan=plan, report=Report([]), env=env, optimizer=optimizer,
                   scheduler=scheduler)


class CountingLoader:
    """A resumable loader: batches drawn from the global torch RNG, position checkpointed."""

    def __init__(self, batch: int = 2, seq: int = 8):
        self.batch, self.seq, self.position = batch, seq, 0

    def next(self) -> torch.Tensor:
        self.position += 1
        return torch.randint(0, VOCAB, (self.batch, self.seq))

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def trained_runtime(seed: int = 0):
    """A 2-layer model under a manual runtime with AdamW and a CountingLoader, after one
    training step (so optimizer state exists): (rt, loader)."""
    model = make_model(2, seed=seed)
    rt = manual_runtime(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    loader = CountingLoader()
    rt._loaders.append(loader)
    train_step(rt, loader)
    return rt, loader


def train_step(rt, loader: CountingLoader, sync=None) -> float:
    x = loader.next()
    with rt.autocast():
        loss = rt.model(x, labels=x).loss
    rt.backward(loss)
    if sync is not None:
        sync(rt.model)
    rt.optimizer.step()  # the runtime's wrapper: fp16 scaler step/update, rt.step += 1
    rt.optimizer.zero_grad()
    if rt.scheduler is not None:
        rt.scheduler.step()
    return loss.item()


def allreduce_grads(model) -> None:
    """A replicated model's manual data parallelism (the ddp pass is not needed)."""
    import torch.distributed as dist

    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def runtime_state(rt) -> dict:
    """What a refused load must leave as it was: model, optimizer, scheduler, scaler,
    counters, loader positions, RNG."""
    return {
        "model": {k: v.clone() for k, v in rt.model.state_dict().items()},
        "optim": copy.deepcopy(rt.optimizer.state_dict()),
        "scheduler": rt.scheduler.state_dict() if rt.scheduler is not None else None,
        "scaler": rt.scaler.state_dict() if rt.scaler is not None else None,
        "step": rt.step, "grad_accum": rt.grad_accum,
        "loaders": [ld.position for ld in rt._loaders],
        "rng": (torch.get_rng_state(), random.getstate()),
        "pending": list(rt._pending_loader_states),
    }


def assert_same_state(a: dict, b: dict) -> None:
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pid, st in a["optim"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optim"]["state"][pid][k]), (pid, k)
    assert a["optim"]["param_groups"] == b["optim"]["param_groups"]
    for k in ("scheduler", "scaler", "step", "grad_accum", "loaders", "pending"):
        assert a[k] == b[k], k
    assert torch.equal(a["rng"][0], b["rng"][0]) and a["rng"][1] == b["rng"][1]


# --------------------------------------------------------------------------- tampering


def fix_manifest(ck, *names) -> None:
    """What an attacker who edits files also does: make the manifest agree."""
    import json
    from pathlib import Path

    from overdrive.runtime import checkpoint_files as cf

    ck = Path(ck)
    manifest = json.loads((ck / cf.MANIFEST).read_text())
    for name in names:
        manifest["files"][name] = {"size": (ck / name).stat().st_size,
                                   "crc32": cf.crc32_file(ck / name)}
    (ck / cf.MANIFEST).write_text(json.dumps(manifest))


class Evil:
    """Unpickling it would run a shell command: weights_only must refuse it."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def last_record(ck) -> str:
    """The key whose DCP record comes last in ``__0_0.distcp`` (read after the others)."""
    import pickle
    from pathlib import Path

    with open(Path(ck) / ".metadata", "rb") as f:
        md = pickle.load(f)  # our own test file
    infos = [(info.offset, idx.fqn) for idx, info in md.storage_data.items()
             if info.relative_path == "__0_0.distcp"]
    return max(infos)[1]


def replace_record(ck, fqn: str, obj=None, *, edit=None, raw: bytes | None = None) -> None:
    """Rewrite ``fqn``'s DCP record as ``torch.save(obj)`` (or of ``edit(saved tensor)``, or
    the bytes ``raw``); the other records of its file move, ``.metadata`` and the manifest
    follow (a consistent, crafted checkpoint)."""
    import io
    import pickle
    from pathlib import Path

    ck = Path(ck)
    with open(ck / ".metadata", "rb") as f:
        md = pickle.load(f)
    target = next(i for i in md.storage_data if i.fqn == fqn)
    rel = md.storage_data[target].relative_path
    data = (ck / rel).read_bytes()
    out = bytearray()
    for i in sorted((i for i, info in md.storage_data.items() if info.relative_path == rel),
                    key=lambda i: md.storage_data[i].offset):
        info = md.storage_data[i]
        if i == target and raw is not None:
            record = raw
        elif i == target:
            record = data[info.offset:info.offset + info.length]
            if edit is not None:
                obj = edit(torch.load(io.BytesIO(record), weights_only=True))
            buf = io.BytesIO()
            torch.save(obj, buf)
            record = buf.getvalue()
        else:
            record = data[info.offset:info.offset + info.length]
        info.offset, info.length = len(out), len(record)
        out += record
    (ck / rel).write_bytes(bytes(out))
    with open(ck / ".metadata", "wb") as f:
        pickle.dump(md, f)
    fix_manifest(ck, rel, ".metadata")


def rewrite_pt(ck, name: str, edit) -> None:
    """``edit(state)`` on a ``.pt`` file of the checkpoint, manifest fixed."""
    from pathlib import Path

    path = Path(ck) / name
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    fix_manifest(ck, name)
