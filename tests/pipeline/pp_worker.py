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
    "interleaved_fsdp": dict(parallel=od.Parallel(pp=2, dp_shard=2), fsdp=od.FSDP(),
                             pipeline=od.Pipeline(schedule="interleaved-1f1b",
                                                  stages_per_rank=2)),
    "ac": dict(parallel=od.Parallel(pp=2), checkpointing=od.Checkpointing(),
               pipeline=od.Pipeline(schedule="1f1b")),
    "accum": dict(parallel=od.Parallel(pp=2), grad_accum=2,
                  pipeline=od.Pipeline(schedule="gpipe", microbatches=2)),
    "accum_fsdp": dict(parallel=od.Parallel(pp=2, dp_shard=2), fsdp=od.FSDP(), grad_accum=2,
                       pipeline=od.Pipeline(schedule="1f1b", microbatches=2)),
    "compile": dict(parallel=od.Parallel(pp=2), compile=od.Compile(backend="aot_eager"),
                    pipeline=od.Pipeline(schedule="1f1b")),
}


class CountReduceScatters:
    """Counts FSDP's reduce-scatter calls (``dist.reduce_scatter_single``) while active."""

    def __enter__(self):
        self.calls, self._orig = 0, dist.reduce_scatter_single

        def counted(*a, **k):
            self.calls += 1
            return self._orig(*a, **k)

        dist.reduce_scatter_single = counted
        return self

    def __exit__(self, *exc):
        dist.reduce_scatter_single = self._orig


def accumulated_fsdp() -> dict:
    """pp2 x fsdp2 with grad_accum=2: the grads of the two halves sum before one
    reduce-scatter per optimizer step, as many as a grad_accum=1 step of the whole batch."""
    torch.manual_seed(0)
    rt = od.accelerate(llama(4), od.Plan(**PLANS["accum_fsdp"]),
                       optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    with CountReduceScatters() as accum:
        losses = accumulated(rt, batches())
    out = {"losses": losses, "state": full_state(rt)}
    torch.manual_seed(0)
    plain = PLANS["accum_fsdp"] | {"grad_accum": 1}
    rt1 = od.accelerate(llama(4), od.Plan(**plain),
                        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    with CountReduceScatters() as once:
        train_steps(rt1, batches(2), clip=1.0)
    out["reduce_scatters_per_step"] = {"accum": accum.calls / len(losses),
                                       "plain": once.calls / 2}
    return out


def accumulated(rt, data) -> list[float]:
    """grad_accum=2: each batch in two halves, one optimizer step per batch."""
    losses = []
    for batch in data:
        halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
        total = 0.0
        for half in halves:
            with rt.accumulate():
                total += float(rt.forward_backward(half)) / 2
                rt.clip_grad_norm_(1.0)
                rt.optimizer.step()
                rt.optimizer.zero_grad()
        losses.append(total)
    return losses


def meta_model() -> dict:
    """A meta-device model under fsdp+pp: each rank materialises its own stage only."""
    from overdrive.models.llama import Llama, LlamaConfig

    with torch.device("meta"):
        model = Llama(LlamaConfig(n_layers=4))
    full = sum(p.numel() for p in model.parameters())
    rt = od.accelerate(model, "fsdp+pp", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    held = sum(p.numel() for p in rt.model.parameters())
    on_meta = any(t.device.type == "meta" for t in (*rt.model.parameters(),
                                                    *rt.model.buffers()))
    losses = train_steps(rt, batches(2), clip=1.0)
    return {"full": full, "held": [held, rt.rank], "on_meta": on_meta, "losses": losses}


def sharded_batches() -> dict:
    """rt.shard: both pipeline ranks of the one data rank get the same batches."""
    from torch.utils.data import DataLoader

    rt = od.accelerate(llama(4), "pp")
    rows = []
    for dispatch in (False, True):
        data = torch.arange(32).reshape(16, 2)
        if dispatch:
            data = torch.utils.data.IterableDataset.__new__(_Stream)
        loader = rt.shard(DataLoader(data, batch_size=4), dispatch=dispatch if dispatch else None)
        rows.append([b.tolist() for b in loader])
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, rows)
    return {"same": all(r == every[0] for r in every), "batches": len(every[0][0]),
            "dp_size": rt.dp_size}


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(torch.arange(32).reshape(16, 2))


EXPORT_DIR = "export"  # relative to the launch directory


def scenario(name: str) -> dict:
    if name == "hf":
        rt = od.accelerate(hf_llama(), "pp", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
        return {"losses": train_steps(rt, hf_batches(), clip=1.0), "state": full_state(rt)}
    n_layers = 8 if name in ("interleaved", "looped", "zero_bubble", "zbv",
                             "interleaved_fsdp") else 4
    torch.manual_seed(0)
    model = llama(n_layers)
    rt = od.accelerate(model, od.Plan(**PLANS[name]),
                       optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    losses = train_steps(rt, batches(), clip=1.0) if name != "accum" else None
    if name == "accum":
        losses = accumulated(rt, batches())
    out = {"losses": losses, "state": full_state(rt)}
    if name == "compile":  # the blocks really ran compiled: dynamo captured graphs
        from torch._dynamo.utils import counters

        out["graphs"] = counters["stats"]["unique_graphs"]
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
    if phase == "from1":  # a single process's checkpoint, loaded under pp=2
        phase = "resume"
    if phase == "save":
        losses = train_steps(rt, data[:3], clip=1.0)
        rt.save(ckpt)
        losses += train_steps(rt, data[3:], clip=1.0)
        return {"losses": losses, "state_at_3": None}
    meta = rt.load(ckpt)
    return {"losses": train_steps(rt, data[rt.step:], clip=1.0), "step": rt.step,
            "meta_step": meta.get("step"), "saved_world": meta.get("world_size")}


def main() -> None:
    out, names = sys.argv[1], sys.argv[2:]
    results = {}
    for name in names:
        if name.startswith(("save:", "resume:", "from1:")):
            phase, ckpt = name.split(":", 1)
            results[phase] = checkpoint(phase, ckpt)
            continue
        special = {"refusals": refusals, "meta": meta_model, "shard": sharded_batches,
                   "accum_fsdp": accumulated_fsdp}
        results[name] = special[name]() if name in special else scenario(name)
    if dist.get_rank() == 0:
        with open(out, "w") as fh:
            json.dump(results, fh)
    dist.barrier()


if __name__ == "__main__":
    main()
