"""Runs on every rank under torchrun: data-parallel scenarios, one after another.

argv: OUT_JSON SCENARIO [SCENARIO ...]. Each scenario trains a small model for a few SGD
steps on the same global batches the single-process reference uses (this rank takes its
slice by rt.dp_rank) and records the global mean loss per step, this rank's parameter
bytes and whether the state_dict keys survived. Rank 0 writes {scenario: result}.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

import overdrive as od
from overdrive.models.llama import Llama, LlamaConfig
from dp_common import LR, global_batches, llama_config, make_hf, make_llama


def plan_for(name: str) -> od.Plan:
    return {
        "ddp": od.Plan(ddp=od.DDP()),
        "ddp_auto": od.Plan(),  # resolve_for_world turns ddp on
        "ddp_accum": od.Plan(ddp=od.DDP(), grad_accum=2),
        "fsdp": od.Plan(fsdp=od.FSDP()),
        "fsdp_accum": od.Plan(fsdp=od.FSDP(reshard_after_forward=False), grad_accum=2),
        "fsdp_meta": od.Plan(fsdp=od.FSDP()),
        "fsdp_hf": od.Plan(fsdp=od.FSDP()),
        "hsdp": od.Plan(fsdp=od.FSDP(), parallel=od.Parallel(dp_replicate=2, dp_shard=2)),
        "zero1": od.Plan(deepspeed=od.DeepSpeed(zero_stage=1)),
        "zero2": od.Plan(deepspeed=od.DeepSpeed(zero_stage=2)),
        "zero3": od.Plan(deepspeed=od.DeepSpeed(zero_stage=3)),
        "zero2_accum": od.Plan(deepspeed=od.DeepSpeed(zero_stage=2), grad_accum=2),
    }[name]


def build(name: str) -> torch.nn.Module:
    if name == "fsdp_hf":
        return make_hf()
    if name == "fsdp_meta":
        with torch.device("meta"):
            return Llama(LlamaConfig(**llama_config()))
    return make_llama()


def local_bytes(model: torch.nn.Module) -> int:
    """Parameter bytes this rank holds: DTensor shards, ZeRO-3 partitions, or whole."""
    total = 0
    for p in model.parameters():
        t = getattr(p, "ds_tensor", None)  # ZeRO-3 partition
        if t is None:
            t = getattr(p, "_local_tensor", p)
        total += t.numel() * t.element_size()
    return total


def init_stats(rt) -> dict:
    """What the materialised meta model holds: gathered (on rank 0), before any step."""
    sd = rt.state_dict()  # full on rank 0, empty elsewhere
    shard = rt.model.embed_tokens.weight.to_local()
    return {
        "finite": all(torch.isfinite(v).all().item() for v in sd.values()),
        "norms_one": all(bool((v == 1).all()) for k, v in sd.items() if "norm" in k),
        "embed_std": sd["embed_tokens.weight"].std().item() if sd else None,
        "shard_sums": _gather(round(shard.sum().item(), 6)),
    }


def mesh_facts(spec: str) -> dict:
    """``mesh:dp_replicate,dp_shard,cp,tp``: the Env's mesh views and data rank here."""
    from overdrive.runtime.state import make_env

    sizes = dict(zip(("dp_replicate", "dp_shard", "cp", "tp"), map(int, spec.split(","))))
    _, env = make_env(od.Plan(parallel=od.Parallel(**sizes)))
    views = {n: [env.submesh(n).size(), env.submesh(n).get_local_rank()]
             for n in ("dp_replicate", "dp_shard", "cp", "tp", "dp", "dp_shard_cp", "dp_cp")}
    hsdp = env.submesh("dp_replicate", "dp_shard_cp")
    return {"views": _gather(views), "dp_rank": _gather(env.dp_rank),
            "hsdp_shape": list(hsdp.shape), "dp_size": env.dp_size}


def ddp_tp_refused() -> dict:
    """ddp over dp=2 with tp=2: replicate would re-create the DTensor parameters every
    forward, so it is refused in check. A plan naming no engine gets fsdp instead."""
    from tests.helpers import refusal_outcome

    def sgd(p):
        return torch.optim.SGD(p, lr=LR)

    asked = od.Plan(ddp=od.DDP(), parallel=od.Parallel(dp_shard=2, tp=2))
    implied = od.accelerate(make_llama(), od.Plan(parallel=od.Parallel(dp_shard=2, tp=2)),
                            optimizer=sgd)
    return {"asked": refusal_outcome(make_llama, asked, sgd),
            "implied_passes": implied.report.names()}


def run(name: str) -> dict:
    if name.startswith("mesh:"):
        return mesh_facts(name[5:])
    if name == "ddp_tp_refused":
        return ddp_tp_refused()
    torch.manual_seed(0)  # the meta model's init_weights() draws from the global RNG
    model = build(name)
    keys = list(model.state_dict())
    plan = plan_for(name)
    rt = od.accelerate(model, plan, optimizer=lambda p: torch.optim.SGD(p, lr=LR))
    assert rt.model is model, "the root module object must stay the same"
    return train(name, model, rt, keys)


def train(name: str, model, rt, keys) -> dict:
    init = init_stats(rt) if name == "fsdp_meta" else None
    accum = rt.plan.grad_accum
    losses = []
    for batch in global_batches():
        mine = batch.chunk(rt.dp_size)[rt.dp_rank]
        step_loss = torch.zeros(())
        for i, micro in enumerate(mine.chunk(accum)):
            if rt.env.set_gradient_sync is not None:
                rt.env.set_gradient_sync(i == accum - 1)
            loss = rt.model(input_ids=micro, labels=micro).loss
            rt.backward(loss)
            if rt.env.engine is not None:
                rt.env.engine.step()  # every micro-step: DeepSpeed counts the boundaries
            step_loss += loss.detach() / accum
        if rt.env.engine is None:
            rt.optimizer.step()
            rt.optimizer.zero_grad()
        dist.all_reduce(step_loss)
        losses.append(step_loss.item() / dist.get_world_size())
    record = rt.report.passes[-1] if len(rt.report) else None
    sd = rt.state_dict() if rt.env.engine is None else model.state_dict()
    return {
        "losses": losses,
        "local_bytes": local_bytes(model),
        "bytes_after": record.bytes_after if record else None,
        "passes": rt.report.names(),
        "keys_kept": list(sd) == keys,
        "dp": [rt.dp_rank, rt.dp_size],
        "units": record.details.get("units") if record else None,
        "init": init,
        "sync_group": _ddp_group_size(model) if rt.plan.ddp is not None else None,
        "finite": all(torch.isfinite(v).all().item() for v in sd.values()
                      if torch.is_tensor(v) and v.is_floating_point()),
    }


def main() -> None:
    out, names = sys.argv[1], sys.argv[2:]
    results = {}
    for name in names:
        results[name] = run(name)
        if "local_bytes" in results[name]:
            results[name]["rank_bytes"] = _gather(results[name]["local_bytes"])
    if dist.get_rank() == 0:
        with open(out, "w") as fh:
            json.dump(results, fh)
    dist.barrier()
    dist.destroy_process_group()


def _ddp_group_size(model) -> int:
    """Ranks DDP's reducer averages over (replicate builds it at the first forward)."""
    from torch.distributed._composable import replicate

    return replicate.state(model)._ddp.process_group.size()


def _gather(value: int) -> list[int]:
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, value)
    return got


if __name__ == "__main__":
    main()
