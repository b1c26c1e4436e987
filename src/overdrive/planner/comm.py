"""Bytes each rank moves in one optimizer step, per collective kind and mesh dim.

The convention (the tests count the same way): an all-gather moves its gathered output,
a reduce-scatter its unreduced input, an all-reduce / broadcast / send its tensor.

* FSDP (``fully_shard`` per unit): every micro-batch all-gathers each unit in forward and,
  with ``reshard_after_forward``, again in backward (not the root, which FSDP2 keeps
  unsharded); the gradients are reduce-scattered once per step (the non-sync micro-steps
  skip it), and with HSDP the shards are all-reduced over ``dp_replicate``. Dim 0 of every
  parameter is padded to a multiple of the shard count, as FSDP2 pads it.
* DDP: the gradients are all-reduced once per step; plain buffers are broadcast after each
  training forward (overdrive's buffer sync; torch DDP's own C++ buffer broadcast before
  the forward moves ~164 bytes more, not modelled).
* TP (the styles the tensor-parallel pass picked): colwise → all-reduce of the input's
  gradient in backward; rowwise / embedding_rowwise → all-reduce of the output in forward;
  colwise_rep → all-gather of the output in forward and all-reduce of the input's gradient;
  sequence parallel turns each all-reduce into an all-gather + reduce-scatter pair. A
  recomputed block repeats its forward collectives but the last (torch's non-reentrant
  checkpoint stops recomputing at the last saved tensor, before the output reduction).
* CP: each attention all-gathers K and V in forward and reduce-scatters their gradients.
* PP (per pipeline rank): each micro-batch's stage output is sent to the next rank and its
  input's gradient to the previous one; the step's loss (4 bytes) is broadcast over pp.
  FSDP under pp gathers each unit M + 1 times (planner/pipeline.py).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from .checked import Checked
from .layout import Layout
from . import pipeline
from .memory import fsdp_shards, padded_numel, unit_bytes


@dataclass
class Comm:
    """{kind: {mesh dim: bytes}} and the number of calls, for one step on one rank."""

    bytes: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    calls: dict[tuple[str, str], int] = field(default_factory=dict)
    overlapped: set[tuple[str, str]] = field(default_factory=set)

    def add(self, kind: str, dim: str, nbytes: int, calls: int = 1, overlap: bool = False):
        if nbytes <= 0 or calls <= 0:
            return
        self.bytes[kind][dim] = self.bytes[kind].get(dim, 0) + int(nbytes)
        self.calls[(kind, dim)] = self.calls.get((kind, dim), 0) + calls
        if overlap:
            self.overlapped.add((kind, dim))

    def by_kind(self) -> dict[str, int]:
        return {k: sum(v.values()) for k, v in self.bytes.items()}

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {k: dict(v) for k, v in self.bytes.items()}


def step_comm(checked: Checked, trace, layout: Layout, compute_size: int,
              pp_rank: int | None = None) -> Comm:
    """One rank's bytes; under pp, pipeline rank ``pp_rank``'s (None: the rank that
    moves the most)."""
    if layout.pp > 1 and pp_rank is None:
        return max((step_comm(checked, trace, layout, compute_size, r)
                    for r in range(layout.pp)), key=lambda c: sum(c.by_kind().values()))
    held = pipeline.rank_modules(checked, pp_rank) if layout.pp > 1 else None
    comm = Comm()
    _fsdp(comm, checked, layout, held)
    _ddp(comm, checked, layout)
    _tp(comm, checked, trace, layout, compute_size)
    _cp(comm, checked, trace, layout, compute_size)
    _pp(comm, checked, trace, layout, compute_size, pp_rank)
    return comm


def _fsdp(comm: Comm, checked: Checked, layout: Layout, held=None) -> None:
    """``held``: a pipeline rank's modules. Under pp torch's stage keeps each unit
    unsharded after its first backward, so a unit is gathered before the first action
    (forward) and again after every forward that resharded it: ``M + 1`` times per step
    with ``reshard_after_forward`` (the stage's root unit too), once without."""
    if checked.fsdp is None:
        return
    shards, rep = fsdp_shards(layout), layout.dp_replicate
    dim = "dp_shard" if layout.cp == 1 else "dp_shard_cp"
    micro = layout.grad_accum
    units = unit_bytes(checked, layout, held)
    if shards > 1:
        for i, (gather, reduce) in enumerate(units):
            if held is not None:
                times = micro + 1 if layout.reshard_after_forward else 1
            else:
                root = i == len(units) - 1
                times = micro * (2 if layout.reshard_after_forward and not root else 1)
            comm.add("all_gather", dim, gather * times, calls=times, overlap=True)
            comm.add("reduce_scatter", dim, reduce, overlap=True)
    if rep > 1:
        key = ("hsdp", shards, held)
        if key not in checked.cache:
            groups = [[p for p in params if held is None or any(
                p.module == m or p.module.startswith(m + ".") for m in held)]
                for params in checked.units()]
            checked.cache[key] = [
                sum(padded_numel(p, shards) // shards * _reduce_size(checked, p)
                    for p in params if p.trainable) for params in groups if params]
        for shard in checked.cache[key]:
            comm.add("all_reduce", "dp_replicate", shard, overlap=True)


def _reduce_size(checked: Checked, p) -> int:
    from ..dtypes import to_torch

    name = checked.fsdp.reduce_dtype
    return p.element_size if name is None else to_torch(name).itemsize


def _ddp(comm: Comm, checked: Checked, layout: Layout) -> None:
    if checked.ddp is None:
        return
    grads = sum(p.numel * p.element_size for p in checked.params if p.trainable)
    comm.add("all_reduce", "dp", grads, calls=max(1, math.ceil(
        grads / (checked.ddp.kwargs.get("bucket_cap_mb", 25) * 2 ** 20))), overlap=True)
    buffers = [b for b in checked.graph.model.buffers() if not hasattr(b, "_local_tensor")]
    nbytes = sum(b.numel() * b.element_size() for b in buffers)
    # overdrive's buffer sync after each training forward (passes/buffers.py); torch
    # DDP's own C++ buffer broadcast adds ~164 bytes a forward, not modelled
    comm.add("broadcast", "dp", nbytes * layout.grad_accum,
             calls=len(buffers) * layout.grad_accum)


def _tokens(trace, name: str) -> tuple[int, int]:
    """(tokens, features) of the first output of ``name`` in the one-sequence trace."""
    shape = trace[name].output_shapes[0]
    return math.prod(shape[:-1]), shape[-1]


def _tp(comm: Comm, checked: Checked, trace, layout: Layout, size: int) -> None:
    tp = checked.tp
    if tp is None or layout.tp == 1:
        return
    key = ("tp", checked.recomputed, size, id(trace))
    if key not in checked.cache:
        checked.cache[key] = _tp_per_sequence(checked, trace, size)
    for (kind, phase), (nbytes, calls) in checked.cache[key].items():
        comm.add(kind, "tp", nbytes * layout.micro_batch // layout.cp * layout.grad_accum,
                 calls=calls * layout.grad_accum)


def _tp_per_sequence(checked: Checked, trace, size: int) -> dict:
    """{(kind, phase): (bytes, calls)} of one sequence's forward, replay and backward."""
    tp = checked.tp
    sp = tp.sequence_parallel
    recomputed = checked.recomputed
    last = _last_forward_collective(tp.styles, recomputed, trace)
    out: dict[tuple[str, str], list[int]] = {}

    def add(kind: str, phase: str, nbytes: int, times: int = 1) -> None:
        entry = out.setdefault((kind, phase), [0, 0])
        entry[0] += nbytes * times
        entry[1] += times

    for name, style in tp.styles.items():
        if name not in trace.modules or not trace[name].output_shapes:
            continue
        tokens, out_features = _tokens(trace, name)
        weight = getattr(checked.graph.module(name), "weight", None)
        in_features = weight.shape[1] if weight is not None and weight.ndim == 2 and \
            style not in ("embedding_rowwise",) else out_features
        inp, outb = tokens * in_features * size, tokens * out_features * size
        replayed = name not in last and any(name.startswith(b + ".") for b in recomputed)
        forwards = 2 if replayed else 1
        if style in ("colwise", "colwise_rep"):
            if sp and style == "colwise":
                add("all_gather", "fwd", inp, forwards)
                add("reduce_scatter", "bwd", inp)
            else:
                add("all_reduce", "bwd", inp)
            if style == "colwise_rep" and name != tp.loss_head:
                add("all_gather", "fwd", outb, forwards)  # loss parallel: stays sharded
        elif style in ("rowwise", "rowwise_rep", "embedding_rowwise"):
            if sp and style != "rowwise_rep":
                add("reduce_scatter", "fwd", outb, forwards)
                add("all_gather", "bwd", outb)
            else:
                add("all_reduce", "fwd", outb, forwards)
    return {k: tuple(v) for k, v in out.items()}


def _last_forward_collective(styles: dict, recomputed, trace) -> set[str]:
    """Per recomputed block, the module of its last forward collective: torch's
    non-reentrant checkpoint stops recomputing once the last saved tensor is rebuilt, so
    the block's final output reduction is not replayed."""
    forward = ("rowwise", "rowwise_rep", "embedding_rowwise", "colwise_rep")
    last: dict[str, tuple[int, str]] = {}
    for name, style in styles.items():
        if style not in forward or name not in trace.modules:
            continue
        for b in recomputed:
            if name.startswith(b + "."):
                order = trace[name].order
                if b not in last or order > last[b][0]:
                    last[b] = (order, name)
    return {n for _, n in last.values()}


def _cp(comm: Comm, checked: Checked, trace, layout: Layout, size: int) -> None:
    from ..passes.context_parallel import ContextParallelDecision

    cp = checked.find(ContextParallelDecision)
    if cp is None or layout.cp == 1:
        return
    blocks = [b for b in cp.modules if b in trace.modules]
    for b in blocks:
        tokens, features = _tokens(trace, b)
        kv = 2 * tokens * features * layout.micro_batch * size // layout.tp
        comm.add("all_gather", "cp", kv * layout.grad_accum, calls=2 * layout.grad_accum)
        comm.add("reduce_scatter", "cp", kv * layout.grad_accum, calls=2 * layout.grad_accum)


def _pp(comm: Comm, checked: Checked, trace, layout: Layout, size: int, rank) -> None:
    """Pipeline rank ``rank`` sends its stage's output activation forward and its input's
    gradient backward, one per micro-batch each; the step's mean loss (fp32) is broadcast
    from the last stage's rank over the pp group."""
    if layout.pp == 1:
        return
    sent = pipeline.sends(checked, trace, layout, rank, size)
    hops = sent // max(1, pipeline.activation_bytes(checked, trace, layout, size))
    comm.add("send_recv", "pp", sent, calls=hops)
    comm.add("broadcast", "pp", 4)
