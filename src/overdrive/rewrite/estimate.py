"""Per-rank memory under a plan's sharding, worked out from the module graph alone.

Used by ``od.inspect``: parameters, gradients and optimizer state (AdamW-like: two fp32
states per trainable parameter) for each rank, and activations when a meta trace exists.
"""

from __future__ import annotations

from .graph import ModuleGraph
from .plan import Plan
from .report import MemoryEstimate, PassRecord

OPTIMIZER_STATES = 2  # AdamW's exp_avg and exp_avg_sq
FP32 = 4


def _tp_sharded(records: list[PassRecord]) -> set[str]:
    for r in records:
        if r.name == "tensor_parallel":
            return set(r.details.get("sharded_modules", r.modules))
    return set()


def _checkpointed(records: list[PassRecord]) -> tuple[set[str], str | None]:
    for r in records:
        if r.name == "checkpointing":
            return set(r.modules), r.details.get("mode")
    return set(), None


def estimate_memory(graph: ModuleGraph, plan: Plan, records: list[PassRecord],
                    world_size: int, trace=None) -> MemoryEstimate:
    par = plan.parallel
    tp_modules = _tp_sharded(records)
    notes: list[str] = []

    data_shard, grad_shard, opt_shard = 1, 1, 1
    if plan.fsdp is not None:
        data_shard = grad_shard = opt_shard = par.dp_shard * par.cp
        if par.dp_replicate > 1:
            notes.append(f"HSDP: sharded over {data_shard} ranks, replicated {par.dp_replicate}×")
    elif plan.deepspeed is not None:
        dp = par.dp_replicate * par.dp_shard
        stage = plan.deepspeed.zero_stage
        opt_shard = dp if stage >= 1 else 1
        grad_shard = dp if stage >= 2 else 1
        data_shard = dp if stage >= 3 else 1

    params = grads = opt = 0
    full = 0
    for name, data in graph.g.nodes(data=True):
        nbytes, numel = data["bytes"], data["params"]
        if not numel:
            continue
        full += nbytes
        tp = par.tp if name in tp_modules else 1
        trainable = any(p.requires_grad for p in data["module"].parameters(recurse=False))
        params += nbytes / tp / data_shard
        if trainable:
            grads += nbytes / tp / grad_shard
            opt += numel * OPTIMIZER_STATES * FP32 / tp / opt_shard
    if plan.deepspeed is not None and plan.mixed_precision != "no":
        notes.append("DeepSpeed also keeps an fp32 master copy of the parameters "
                     "(sharded with the optimizer state)")
    notes.append("optimizer: AdamW-like, two fp32 states per trainable parameter")

    activations = None
    if trace is not None:
        activations = _activation_bytes(graph, trace, records) / (par.tp * par.cp)
        notes.append("activations: one micro-batch of the example inputs, from the meta trace")
    return MemoryEstimate(world_size=world_size, parameters=int(params), gradients=int(grads),
                          optimizer=int(opt), activations=None if activations is None
                          else int(activations), full_parameters=int(full), notes=notes)


def _activation_bytes(graph: ModuleGraph, trace, records: list[PassRecord]) -> float:
    """Saved-for-backward bytes; checkpointed blocks keep only their output (the next
    block's input) plus, at recompute time, one block's own activations."""
    total = trace.activation_bytes
    ckpt, mode = _checkpointed(records)
    if not ckpt or mode == "selective":
        return total
    peak = 0
    for name in ckpt:
        if name not in trace.modules:
            continue
        t = trace.modules[name]
        kept = sum(_numel(s) for s in t.output_shapes) * 2  # bf16/fp32 mix: 2 bytes low bound
        total -= max(t.activation_bytes - kept, 0)
        peak = max(peak, t.activation_bytes)
    return total + peak


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
