"""Pipeline scenarios on torchrun ranks; writes JSON (rank 0) for tests/pipeline.

    torchrun --nproc-per-node=N pp_worker.py OUT.json SCENARIO [SCENARIO ...]
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

import overdrive as od
from tests.pipeline.common import batches, full_state, hf_batches, hf_llama, llama, train_steps

PLANS = {
    "gpipe": dict(parallel=od.Parallel(pp=2), pipeline=od.Pipeline(schedule="gpipe")),
    "1f1b": dict(parallel=od.Parallel(pp=2), pipeline=od.Pipeline(schedule="1f1b")),
    "interleaved": dict(parallel=od.Parallel(pp=2), pipeline=od.Pipeline(
        schedule="interleaved-1f1b", stages_per_rank=2)),
    "looped": dict(parallel=od.Parallel(pp=2), pipeline=od.Pipeline(
        schedule="looped-bfs", stages_per_rank=2)),
    "zero_bubble": dict(parallel=od.Parallel(pp=2), pipeline=od.Pipeline(
        schedule="zero-bubble", stages_per_rank=2)),
    "zbv": dict(parallel=od.Parallel(pp=2), pipeline=od.Pipeline(
        schedule="zbv", stages_per_rank=2)),
    "pp_fsdp": dict(parallel=od.Parallel(pp=2, dp_shard=2), fsdp=od.FSDP(),
                    pipeline=od.Pipeline(schedule="1f1b")),
    "pp_tp": dict(parallel=od.Parallel(pp=2, dp_shard=1, tp=2),
                  pipeline=od.Pipeline(schedule="1f1b")),
}


EXPORT_DIR = "export"  # relative to the launch directory


def scenario(name: str) -> dict:
    if name == "hf":
        rt = od.accelerate(hf_llama(), "pp", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
        return {"losses": train_steps(rt, hf_batches(), clip=1.0), "state": full_state(rt)}
    n_layers = 8 if name in ("interleaved", "looped", "zero_bubble", "zbv") else 4
    torch.manual_seed(0)
    model = llama(n_layers)
    rt = od.accelerate(model, od.Plan(**PLANS[name]),
                       optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    losses = train_steps(rt, batches(), clip=1.0)
    out = {"losses": losses, "state": full_state(rt)}
    if name == "1f1b":
        out["eval"] = float(rt.evaluate(batches(1, seed=7)[0]))
        out["grads_after_eval"] = any(p.grad is not None for p in rt.model.parameters())
        out["export"] = str(rt.export(EXPORT_DIR))
    return out


def refusals() -> dict:
    rt = od.accelerate(llama(4), "pp", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    batch = batches(1, rows=3)[0]  # 3 rows, 2 micro-batches
    out = {}
    for key, call in (("indivisible", lambda: rt.forward_backward(batch)),
                      ("model_call", lambda: rt.model(**batches(1)[0]))):
        try:
            call()
            out[key] = None
        except od.PlanError as err:
            out[key] = str(err)
    out["still_trains"] = float(rt.forward_backward(batches(1)[0]))
    return out


def checkpoint(phase: str, ckpt: str) -> dict:
    """"save": 5 steps, saving after step 3; "resume": load it, run steps 4-5."""
    torch.manual_seed(0)
    rt = od.accelerate(llama(4), "pp", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    data = batches()
    if phase == "save":
        losses = train_steps(rt, data[:3], clip=1.0)
        rt.save(ckpt)
        losses += train_steps(rt, data[3:], clip=1.0)
        return {"losses": losses, "state_at_3": None}
    meta = rt.load(ckpt)
    return {"losses": train_steps(rt, data[rt.step:], clip=1.0), "step": rt.step,
            "meta_step": meta.get("step")}


def main() -> None:
    out, names = sys.argv[1], sys.argv[2:]
    results = {}
    for name in names:
        if name.startswith(("save:", "resume:")):
            phase, ckpt = name.split(":", 1)
            results[phase] = checkpoint(phase, ckpt)
            continue
        results[name] = refusals() if name == "refusals" else scenario(name)
    if dist.get_rank() == 0:
        with open(out, "w") as fh:
            json.dump(results, fh)
    dist.barrier()


if __name__ == "__main__":
    main()
