"""Per-rank peak memory of one training step under a checked layout.

Parameters, gradients and optimizer state come from ``rewrite.estimate`` (the passes'
MemoryEffects, composed there and only there); activations from the same estimate over a
meta trace of one sequence, times the micro-batch. This module adds what a step holds on
top — FSDP's unsharded units, DDP's gradient buckets, the loss's logits temporaries, the
optimizer's scratch — and takes the peak of the two phases of a step:

    forward/backward:  P + O + A + (G while accumulating) + unsharded units + buffers + T
    optimizer step:    P + O + G + buffers + optimizer scratch
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..dtypes import to_torch
from ..rewrite.estimate import estimate_memory
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


def unit_bytes(checked: Checked, layout: Layout) -> list[tuple[int, int]]:
    """Per FSDP unit: (unsharded bytes in the all-gather dtype, unsharded gradient bytes
    in the reduce dtype)."""
    fsdp, n = checked.fsdp, fsdp_shards(layout)
    if ("unit_bytes", n) in checked.cache:
        return checked.cache[("unit_bytes", n)]
    out = []
    for params in checked.units():
        gather = sum(padded_numel(p, n) * _dtype_size(fsdp.param_dtype, p.element_size)
                     for p in params)
        reduce = sum(padded_numel(p, n) * _dtype_size(fsdp.reduce_dtype, p.element_size)
                     for p in params if p.trainable)
        out.append((gather, reduce))
    checked.cache[("unit_bytes", n)] = out
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
    twice), on this rank's slice of the vocabulary (TP) and sequence (CP)."""
    head = _head(trace)
    if head is None:
        return 0
    tokens_vocab = sum(math.prod(s) for s in trace[head].output_shapes)
    tp = layout.tp if checked.tp is not None and checked.tp.styles.get(head) == "colwise" else 1
    return 2 * tokens_vocab * 4 * layout.micro_batch // (tp * layout.cp)


_HEADS: dict[int, str | None] = {}


def _head(trace) -> str | None:
    """The last leaf module called (no submodules traced): the output layer."""
    key = id(trace)
    if key not in _HEADS:
        parents = {n.rpartition(".")[0] for n in trace.modules if n}
        leaves = [n for n in trace.call_order if n and n not in parents]
        _HEADS[key] = leaves[-1] if leaves else None
    return _HEADS[key]


def estimate_step_memory(checked: Checked, trace, layout: Layout, foreach: bool) -> Memory:
    """The step's peak on one rank: ``trace`` is a meta trace of one sequence (the
    micro-batch scales it), in the compute dtype."""
    key = ("estimate", checked.recomputed, id(trace))
    if key not in checked.cache:
        checked.cache[key] = estimate_memory(checked.graph, checked.effects,
                                             layout.world_size, trace=trace)
    est = checked.cache[key]
    params, grads, opt = est.parameters, est.gradients, est.optimizer
    acts = (est.activations or 0) * layout.micro_batch
    if layout.pp > 1:  # 1F1B: the first stage holds up to pp micro-batches in flight
        acts = acts * min(layout.pp, layout.grad_accum) // layout.pp
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


def _accumulated_grads(checked: Checked, layout: Layout, grads: int) -> int:
    """Gradients alive during a later micro-step's backward: FSDP2 keeps the unsharded
    ones across its non-sync micro-steps (reduce-scattered only at the last)."""
    if layout.grad_accum == 1 or layout.pp > 1:
        return 0
    if checked.fsdp is not None:
        return sum(r for _, r in unit_bytes(checked, layout))
    return grads


def _optimizer_scratch(checked: Checked, layout: Layout, foreach: bool) -> int:
    """AdamW's temporaries: multi-tensor (foreach) makes one fp32 list the size of the
    shards; the single-tensor loop two tensors the size of the largest parameter."""
    n = fsdp_shards(layout) if checked.fsdp is not None else 1
    key = ("scratch", n, foreach)
    if key not in checked.cache:
        sizes = [padded_numel(p, n) // n * 4 for p in checked.params if p.trainable]
        checked.cache[key] = 0 if not sizes else sum(sizes) if foreach else 2 * max(sizes)
    return checked.cache[key]
