"""Per-rank memory under a plan's sharding, worked out from the module graph alone.

Used by ``od.inspect``: parameters, gradients and optimizer state (AdamW-like: two fp32
states per trainable parameter) for each rank, and activations when a meta trace exists.
The parameter bytes after each pass of a dry run come from here too, and the one model
of checkpointed activation memory (od.inspect's estimate and the budget checkpointing
mode's choice of blocks).
"""

from __future__ import annotations

import math

from torch import nn

from .graph import ModuleGraph
from .plan import Plan
from .report import MemoryEstimate, PassRecord, human_bytes

OPTIMIZER_STATES = 2  # AdamW's exp_avg and exp_avg_sq
FP32 = 4


def _record(records: list[PassRecord], name: str) -> PassRecord | None:
    return next((r for r in records if r.name == name), None)


def _tp_sharded(records: list[PassRecord]) -> set[str]:
    r = _record(records, "tensor_parallel")
    return set(r.details.get("sharded_modules", r.modules)) if r else set()


def _shard_factors(plan: Plan, records: list[PassRecord]) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer state) are each split over this many ranks
    once the data-parallel pass in ``records`` has run."""
    par = plan.parallel
    if _record(records, "fsdp") is not None:
        n = par.dp_shard * par.cp
        return n, n, n
    if _record(records, "deepspeed") is not None:
        dp, stage = par.dp_replicate * par.dp_shard, plan.deepspeed.zero_stage
        return dp if stage >= 3 else 1, dp if stage >= 2 else 1, dp if stage >= 1 else 1
    return 1, 1, 1


def _cast_delta(records: list[PassRecord]) -> int:
    """Bytes casting's smaller storage dtype saves (negative), from its record."""
    r = _record(records, "casting")
    if r is None:
        return 0
    return r.details.get("cast_weight_bytes_after", 0) - r.details.get("cast_weight_bytes_before", 0)


def _pipeline_ranks(records: list[PassRecord]) -> list[list[str]] | None:
    """Under pp, the modules each pipeline rank holds (from the pipeline pass's record)."""
    r = _record(records, "pipeline")
    if r is None or "stages" not in r.details:
        return None
    ranks: dict[int, list[str]] = {}
    for stage in r.details["stages"]:
        ranks.setdefault(stage["rank"], []).extend(stage["modules"])
    return [ranks[k] for k in sorted(ranks)]


def _per_rank(graph: ModuleGraph, plan: Plan, records: list[PassRecord]) -> dict[str, float]:
    """Parameter, gradient and optimizer bytes on one rank after the passes in ``records``
    (under pp: on the pipeline rank whose stages hold the most)."""
    ranks = _pipeline_ranks(records)
    if ranks is None:
        return _held(graph, plan, records, None)
    full = _held(graph, plan, records, None)["full"]
    worst = max((_held(graph, plan, records, mods) for mods in ranks),
                key=lambda m: m["parameters"])
    return {**worst, "full": full}


def _held(graph: ModuleGraph, plan: Plan, records: list[PassRecord],
          within: list[str] | None) -> dict[str, float]:
    tp, tp_modules = plan.parallel.tp, _tp_sharded(records)
    data_shard, grad_shard, opt_shard = _shard_factors(plan, records)
    out = {"parameters": _cast_delta(records), "gradients": 0.0, "optimizer": 0.0, "full": 0}
    for name, data in graph.g.nodes(data=True):
        nbytes, numel = data["bytes"], data["params"]
        if not numel:
            continue
        if within is not None and not any(name == m or name.startswith(m + ".")
                                          for m in within):
            continue
        out["full"] += nbytes
        split = tp if name in tp_modules else 1
        out["parameters"] += nbytes / split / data_shard
        if any(p.requires_grad for p in data["module"].parameters(recurse=False)):
            out["gradients"] += nbytes / split / grad_shard
            out["optimizer"] += numel * OPTIMIZER_STATES * FP32 / split / opt_shard
    return out


def parameter_bytes_per_rank(graph: ModuleGraph, plan: Plan, records: list[PassRecord]) -> int:
    """This rank's parameter bytes once the passes in ``records`` have run (casting's
    storage dtype, tensor-parallel and FSDP / ZeRO-3 shards): a dry run's bytes after."""
    return int(_per_rank(graph, plan, records)["parameters"])


def estimate_memory(graph: ModuleGraph, plan: Plan, records: list[PassRecord],
                    world_size: int, trace=None) -> MemoryEstimate:
    par = plan.parallel
    notes: list[str] = []
    if plan.fsdp is not None and par.dp_replicate > 1:
        notes.append(f"HSDP: sharded over {par.dp_shard * par.cp} ranks, replicated "
                     f"{par.dp_replicate}×")
    mem = _per_rank(graph, plan, records)
    pipe = _record(records, "pipeline")
    if pipe is not None and "stages" in pipe.details:
        for st in pipe.details["stages"]:
            held = _held(graph, plan, records, st["modules"])
            st["memory"] = {k: int(held[k]) for k in ("parameters", "gradients", "optimizer")}
            notes.append(
                f"pipeline stage {st['stage']} (rank {st['rank']}, blocks {st['blocks'][0]}-"
                f"{st['blocks'][-1]}): parameters {human_bytes(held['parameters'])}, "
                f"gradients {human_bytes(held['gradients'])}, optimizer "
                f"{human_bytes(held['optimizer'])} per rank")
        notes.append(f"pipeline: the heaviest pipeline rank is counted above; bubble "
                     f"{pipe.details.get('bubble_fraction')} ({pipe.details['schedule']}, "
                     f"{pipe.details['microbatches']} micro-batches)")
    if plan.deepspeed is not None and plan.mixed_precision != "no":
        notes.append("DeepSpeed also keeps an fp32 master copy of the parameters "
                     "(sharded with the optimizer state)")
    if plan.casting is not None or plan.offload is not None:
        mem["gradients"] = mem["optimizer"] = 0
        part = "casting" if plan.casting is not None else "offload"
        notes.append(f"{part} is an inference plan: no gradients, no optimizer state")
    else:
        notes.append("optimizer: AdamW-like, two fp32 states per trainable parameter")

    activations = None
    if trace is not None:
        activations = _activation_bytes(graph, trace, records) / (par.tp * par.cp)
        notes.append("activations: one micro-batch of the example inputs, from the meta trace")
        ckpt = _record(records, "checkpointing")
        if ckpt is not None and ckpt.details.get("mode") == "selective":
            notes.append("activations: selective checkpointing counted as none (upper bound)")
    return MemoryEstimate(world_size=world_size, parameters=int(mem["parameters"]),
                          gradients=int(mem["gradients"]), optimizer=int(mem["optimizer"]),
                          activations=None if activations is None else int(activations),
                          full_parameters=int(mem["full"]), notes=notes)


# --------------------------------------------------------------------------- activations


def _element_size(module: nn.Module) -> int:
    for p in module.parameters():
        if p.is_floating_point():
            return p.element_size()
    return 4


def block_activations(graph: ModuleGraph, trace, blocks: list[str]
                      ) -> tuple[dict[str, int], dict[str, int]]:
    """Per block: (bytes it saves for backward, bytes it keeps when checkpointed — its
    output, the next block's input, in the block's parameter dtype)."""
    acts = {b: trace[b].activation_bytes for b in blocks}
    kept = {b: sum(math.prod(s) for s in trace[b].output_shapes)
            * _element_size(graph.module(b)) for b in blocks}
    return acts, kept


def activation_estimate(total: int, blocks: list[str], acts: dict[str, int],
                        kept: dict[str, int], chosen: list[str]) -> int:
    """Peak saved-for-backward bytes when the ``chosen`` blocks are checkpointed.

    A checkpointed block keeps only its input until backward reaches it, then holds its
    recomputed activations while the blocks before it still hold theirs. Everything
    outside the blocks (embeddings, head, loss) is counted as live the whole time."""
    other = total - sum(acts.values())
    stored = {b: kept[b] if b in chosen else acts[b] for b in blocks}
    peak = other + sum(stored.values())  # end of forward
    running = other
    for b in blocks:  # backward reaches block b while blocks before it are still stored
        if b in chosen:
            peak = max(peak, running + kept[b] + acts[b])
        running += stored[b]
    return peak


def _activation_bytes(graph: ModuleGraph, trace, records: list[PassRecord]) -> int:
    """Saved-for-backward bytes of one micro-batch under the plan's checkpointing."""
    total = trace.activation_bytes
    ckpt = _record(records, "checkpointing")
    if ckpt is None or ckpt.details.get("mode") == "selective" or not ckpt.modules:
        return total
    blocks = [b for b in graph.blocks() if b in trace.modules]
    acts, kept = block_activations(graph, trace, blocks)
    return activation_estimate(total, blocks, acts, kept, [b for b in blocks
                                                           if b in ckpt.modules])
