"""What one pipeline rank holds and moves: its stages' modules, the activations its
schedule keeps in flight, its FSDP units, its sends.

A rank holds the parameters, gradients and optimizer state of its stages (the pipeline
pass's split: the first stage also the token embedding, the last the final norm and
head). Its activations are one micro-batch's saved tensors of its stages — their blocks
(recomputed ones keep their input), plus the embedding's on the first stage and the
norm/head/loss on the last — times the micro-batches the schedule keeps in flight:

* GPipe runs every forward before any backward: all ``M`` micro-batches.
* 1F1B runs ``stages - rank - 1`` warm-up forwards, then alternates one forward and one
  backward: at most ``min(stages - rank, M)`` in flight (Narayanan et al. 2021, §2.2;
  torch's ``Schedule1F1B``).

The gradients exist from the first backward on (``zero_grad`` frees them), so a rank
holds ``k`` micro-batches' activations and all its gradients at once when it runs a
forward after its first backward (1F1B's steady state, ``M > k``); otherwise its peak is
the larger of ``k`` micro-batches before the first backward and ``k - 1`` with the
gradients.
"""

from __future__ import annotations

import math

from ..passes.pipeline import PipelineDecision, held_by_rank
from ..rewrite.estimate import activation_estimate, block_activations
from .checked import Checked
from .layout import Layout


def decision(checked: Checked) -> PipelineDecision | None:
    return checked.find(PipelineDecision)


def rank_modules(checked: Checked, rank: int) -> tuple[str, ...]:
    """The modules pipeline rank ``rank`` holds (all its stages')."""
    return held_by_rank(decision(checked).layout)[rank]


def in_flight(layout: Layout, rank: int) -> int:
    """Micro-batches whose activations rank ``rank`` holds at once."""
    if layout.schedule == "gpipe":
        return layout.grad_accum
    return min(layout.pp - rank, layout.grad_accum)


def holds_last_stage(checked: Checked, rank: int) -> bool:
    stages = decision(checked).layout
    return stages.rank_of(stages.num_stages - 1) == rank


def stage_activations(checked: Checked, trace, rank: int, split: int,
                      selective_kept: dict[str, int] | None = None) -> int:
    """Saved-for-backward bytes of one sequence on pipeline rank ``rank``'s stages
    (``selective_kept``: what each block keeps under selective recompute)."""
    stages = decision(checked).layout
    mine = stages.stages_of(rank)
    blocks = [b for s in mine for b in stages.stage_blocks(s) if b in trace.modules]
    every = [b for b in stages.blocks if b in trace.modules]
    acts, kept = block_activations(checked.graph, trace, blocks)
    if selective_kept is not None:
        kept = {b: min(selective_kept.get(b, kept[b]), acts[b]) for b in blocks}
    head = sum(trace[h].activation_bytes for h in stages.head if h in trace.modules)
    outside = trace.activation_bytes - sum(trace[b].activation_bytes for b in every)
    other = (head if 0 in mine else 0) + (
        outside - head if stages.num_stages - 1 in mine else 0)
    chosen = [b for b in blocks if b in set(checked.recomputed)]
    total = other + sum(acts.values())
    return activation_estimate(total, blocks, acts, kept, chosen) // split


def peak_activations(per_microbatch: int, grads: int, layout: Layout, rank: int
                     ) -> tuple[int, int]:
    """(activation bytes, gradient bytes) alive together at the rank's backward peak."""
    k = in_flight(layout, rank)
    if layout.grad_accum > k:  # a forward after the first backward: k in flight + grads
        return k * per_microbatch, grads
    if k * per_microbatch >= (k - 1) * per_microbatch + grads:
        return k * per_microbatch, 0
    return (k - 1) * per_microbatch, grads


def activation_bytes(checked: Checked, trace, layout: Layout, size: int) -> int:
    """One micro-batch's activation between stages (a block's output; replicated over tp
    unless sequence parallel shards it)."""
    stages = decision(checked).layout
    blocks = [b for b in stages.blocks if b in trace.modules]
    shape = trace[blocks[0]].output_shapes[0]
    tp = layout.tp if checked.tp is not None and checked.tp.sequence_parallel else 1
    return math.prod(shape) * layout.micro_batch * size // (tp * layout.cp)


def sends(checked: Checked, trace, layout: Layout, rank: int, size: int) -> int:
    """Bytes rank ``rank`` sends in one step: its stage's output activation to the next
    rank and the gradient of its input to the previous one, per micro-batch."""
    stages = decision(checked).layout
    act = activation_bytes(checked, trace, layout, size)
    mine = stages.stages_of(rank)
    out = 0
    for s in mine:
        if s + 1 < stages.num_stages and stages.rank_of(s + 1) != rank:
            out += act
        if s > 0 and stages.rank_of(s - 1) != rank:
            out += act
    return out * layout.grad_accum
