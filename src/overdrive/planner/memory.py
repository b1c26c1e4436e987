"""Per-rank peak memory of one training step under a checked layout.

Parameters, gradients and optimizer state come from ``rewrite.estimate`` (the passes'
MemoryEffects, composed there and only there); activations from the same estimate over a
meta trace of one sequence, times the micro-batch. This module adds what a step holds on
top — FSDP's unsharded units, DDP's gradient buckets, the loss's logits temporaries, the
optimizer's scratch — and takes the peak of the two phases of a step:

    forward/backward:  P + O + A + (G while accumulating) + unsharded units + buffers + T
    optimizer step:    P + O + G + buffers + optimizer scratch

Under pp every pipeline rank is costed on its own (its stages, the micro-batches its
schedule keeps in flight: planner/pipeline.py); a candidate carries the highest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..dtypes import to_torch
from ..rewrite.estimate import estimate_memory, memory_within
from . import pipeline
from .checked import Checked, Param
from .layout import Layout


@dataclass(frozen=True)
class Memory:
    """Per-rank bytes at the step's peak, by part."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    fsdp_buffers: int  # unsharded units (all-gather) and the reduce-scatter input
    temporaries: int  # logits / loss gradients, DDP buckets, optimizer scratch
    phase: str  # "backward" or "optimizer": where the peak is

    @property
    def total(self) -> int:
        return (self.parameters + self.gradients + self.optimizer + self.activations
                + self.fsdp_buffers + self.temporaries)

    def as_dict(self) -> dict[str, int | str]:
        return {"parameters": self.parameters, "gradients": self.gradients,
                "optimizer": self.optimizer, "activations": self.activations,
                "fsdp_buffers": self.fsdp_buffers, "temporaries": self.temporaries,
                "total": self.total, "phase": self.phase}


def padded_numel(p: Param, shards: int) -> int:
    """FSDP2 pads dim 0 of every parameter to a multiple of the shard count."""
    if shards <= 1 or not p.shape:
        return p.numel
    return math.ceil(p.shape[0] / shards) * shards * math.prod(p.shape[1:])


def _dtype_size(name: str | None, default: int) -> int:
    return default if name is None else to_torch(name).itemsize


def fsdp_shards(layout: Layout) -> int:
    return layout.dp_shard * layout.cp


def unit_bytes(checked: Checked, layout: Layout, held=None) -> list[tuple[int, int]]:
    """Per FSDP unit: (unsharded bytes in the all-gather dtype, unsharded gradient bytes
    in the reduce dtype). ``held``: only the units of these modules (a pipeline rank's;
    the modules outside the blocks form the stage's root unit)."""
    fsdp, n = checked.fsdp, fsdp_shards(layout)
    key = ("unit_bytes", n, held)
    if key in checked.cache:
        return checked.cache[key]
    out = []
    for params in checked.units():
        if held is not None:
            params = [p for p in params if _held_by(p.module, held)]
            if not params:
                continue
        gather = sum(padded_numel(p, n) * _dtype_size(fsdp.param_dtype, p.element_size)
                     for p in params)
        reduce = sum(padded_numel(p, n) * _dtype_size(fsdp.reduce_dtype, p.element_size)
                     for p in params if p.trainable)
        out.append((gather, reduce))
    checked.cache[key] = out
    return out


def _fsdp_buffers(checked: Checked, layout: Layout) -> int:
    """Bytes FSDP holds unsharded at the backward's peak (also with one shard: FSDP2
    copies each unit into its unsharded buffers).

    The unit whose backward runs and the one it prefetches are unsharded, with the running
    unit's unsharded gradient before its reduce-scatter. Without recompute the peak is at
    the start of backward (all activations alive): the last unit and the one before it;
    with recompute, any pair of neighbouring units. Without reshard_after_forward every
    unit stays unsharded from its forward to its backward."""
    if checked.fsdp is None:
        return 0
    units = [u for u in unit_bytes(checked, layout) if u[0]]
    if not units:
        return 0
    gathers = [g for g, _ in units]
    reduces = [r for _, r in units]
    if not layout.reshard_after_forward:
        return sum(gathers) + max(reduces)
    pairs = [(gathers[i] + gathers[i - 1] + reduces[i]) for i in range(1, len(units))] or \
        [gathers[0] + reduces[0]]
    return max(pairs) if checked.recomputed else pairs[-1]


def _logits_temporaries(checked: Checked, trace, layout: Layout) -> int:
    """The loss's largest transients: the logits' fp32 copy and its gradient (b·s·V·4
    twice), on this rank's slice of the sequence (CP) and, where the plan leaves the head's
    output sharded (loss parallel, or a plain colwise head), of the vocabulary (TP); a
    gathered head (colwise_rep) gives every TP rank the whole vocabulary."""
    head = _head(trace)
    if head is None:
        return 0
    tokens_vocab = sum(math.prod(s) for s in trace[head].output_shapes)
    tp = layout.tp if _vocab_sharded(checked, head) else 1
    return 2 * tokens_vocab * 4 * layout.micro_batch // (tp * layout.cp)


def _vocab_sharded(checked: Checked, head: str) -> bool:
    tp = checked.tp
    if tp is None:
        return False
    return tp.styles.get(head) == "colwise" or tp.loss_head == head


_HEADS: dict[int, str | None] = {}


def _head(trace) -> str | None:
    """The last leaf module called (no submodules traced): the output layer."""
    key = id(trace)
    if key not in _HEADS:
        parents = {n.rpartition(".")[0] for n in trace.modules if n}
        leaves = [n for n in trace.call_order if n and n not in parents]
        _HEADS[key] = leaves[-1] if leaves else None
    return _HEADS[key]


def estimate_step_memory(checked: Checked, trace, layout: Layout, foreach: bool,
                         pp_rank: int | None = None,
                         selective_kept: dict[str, int] | None = None) -> Memory:
    """The step's peak on one rank: ``trace`` is a meta trace of one sequence (the
    micro-batch scales it), in the compute dtype. Under pp, on pipeline rank ``pp_rank``
    (None: the rank with the highest peak). ``selective_kept``: per block, what it keeps
    under selective recompute (planner/selective.py)."""
    if layout.pp > 1:
        if pp_rank is None:
            return max((_pipeline_step_memory(checked, trace, layout, foreach, r,
                                              selective_kept)
                        for r in range(layout.pp)), key=lambda m: m.total)
        return _pipeline_step_memory(checked, trace, layout, foreach, pp_rank, selective_kept)
    key = ("estimate", checked.recomputed, id(trace), selective_kept is not None)
    if key not in checked.cache:
        checked.cache[key] = estimate_memory(checked.graph, checked.effects,
                                             layout.world_size, trace=trace,
                                             selective_kept=selective_kept)
    est = checked.cache[key]
    params, grads, opt = est.parameters, est.gradients, est.optimizer
    acts = (est.activations or 0) * layout.micro_batch
    fsdp_fb = _fsdp_buffers(checked, layout)
    buckets = grads if checked.ddp is not None else 0
    logits = _logits_temporaries(checked, trace, layout)
    accumulating = _accumulated_grads(checked, layout, grads)
    backward = acts + accumulating + fsdp_fb + logits + buckets
    scratch = _optimizer_scratch(checked, layout, foreach)
    optimizer = grads + buckets + scratch
    if backward >= optimizer:
        return Memory(params, accumulating, opt, acts, fsdp_fb, logits + buckets, "backward")
    return Memory(params, grads, opt, 0, 0, buckets + scratch, "optimizer")


def _pipeline_step_memory(checked: Checked, trace, layout: Layout, foreach: bool,
                          rank: int, selective_kept: dict[str, int] | None = None) -> Memory:
    """Pipeline rank ``rank``'s peak (planner/pipeline.py): its stages' parameters,
    gradients and optimizer state; the activations its schedule keeps in flight, with the
    gradients when it runs a forward after its first backward. Under FSDP, torch's
    pipeline stage keeps every unit unsharded after its first backward
    (``set_reshard_after_backward(False)``) and the gradients unsharded until the
    schedule's end (``set_requires_gradient_sync(False)``, one reduce-scatter)."""
    key = ("pp_rank", rank, checked.recomputed, id(trace), selective_kept is not None)
    if key not in checked.cache:
        held = pipeline.rank_modules(checked, rank)
        within = memory_within(checked.graph, checked.effects, held)
        split = math.prod(e.activation_split for e in checked.effects)
        checked.cache[key] = (held, within, pipeline.stage_activations(
            checked, trace, rank, split, selective_kept))
    held, within, per_sequence = checked.cache[key]
    params, grads, opt = (int(within[k]) for k in ("parameters", "gradients", "optimizer"))
    mine = [p for p in checked.params if _held_by(p.module, held)]
    live_grads, fsdp_fb = grads, 0
    if checked.fsdp is not None:
        units = unit_bytes(checked, layout, held)
        fsdp_fb = sum(g for g, _ in units)
        live_grads = sum(r for _, r in units)
    acts, with_grads = pipeline.peak_activations(per_sequence * layout.micro_batch,
                                                 live_grads, layout, rank)
    logits = _logits_temporaries(checked, trace, layout) \
        if pipeline.holds_last_stage(checked, rank) else 0
    backward = acts + with_grads + fsdp_fb + logits
    scratch = _optimizer_scratch(checked, layout, foreach, mine)
    if backward >= grads + scratch:
        return Memory(params, with_grads, opt, acts, fsdp_fb, logits, "backward")
    return Memory(params, grads, opt, 0, 0, scratch, "optimizer")


def _held_by(module: str, held) -> bool:
    return any(module == m or module.startswith(m + ".") for m in held)


def _accumulated_grads(checked: Checked, layout: Layout, grads: int) -> int:
    """Gradients alive during a later micro-step's backward: FSDP2 keeps the unsharded
    ones across its non-sync micro-steps (reduce-scattered only at the last)."""
    if layout.grad_accum == 1 or layout.pp > 1:
        return 0
    if checked.fsdp is not None:
        return sum(r for _, r in unit_bytes(checked, layout))
    return grads


def _optimizer_scratch(checked: Checked, layout: Layout, foreach: bool,
                       params: list[Param] | None = None) -> int:
    """AdamW's temporaries: multi-tensor (foreach) makes one fp32 list the size of the
    shards; the single-tensor loop two tensors the size of the largest parameter.
    ``params``: this rank's (a pipeline stage's), default all."""
    n = fsdp_shards(layout) if checked.fsdp is not None else 1
    key = ("scratch", n, foreach, None if params is None else tuple(p.name for p in params))
    if key not in checked.cache:
        chosen = checked.params if params is None else params
        sizes = [padded_numel(p, n) // n * 4 for p in chosen if p.trainable]
        checked.cache[key] = 0 if not sizes else sum(sizes) if foreach else 2 * max(sizes)
    return checked.cache[key]
