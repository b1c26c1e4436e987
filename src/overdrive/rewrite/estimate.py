"""Per-rank memory under a plan's passes, worked out from the module graph alone.

Used by ``od.inspect``: parameters, gradients and optimizer state (AdamW-like: two fp32
states per trainable parameter) for each rank, and activations when a meta trace exists.
Each pass's decision says how it changes memory (a ``MemoryEffect``: shards, a storage
dtype, recomputed blocks); this module only composes them. The parameter bytes after each
pass of a dry run come from here too, and the one model of recomputed activation memory
(od.inspect's estimate and a budgeted choice of blocks to recompute).
"""

from __future__ import annotations

import math
from typing import Sequence

from torch import nn

from .graph import ModuleGraph
from .report import MemoryEstimate

OPTIMIZER_STATES = 2  # AdamW's exp_avg and exp_avg_sq
FP32 = 4


def _splits(effects: Sequence, name: str, scopes: list) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer): the products of the splits that apply to module
    ``name`` (an effect's ``modules`` cover their submodules too)."""
    p = g = o = 1
    for e, scope in zip(effects, scopes):
        if scope is None or _within(name, scope):
            p, g, o = p * e.parameters, g * e.gradients, o * e.optimizer
    return p, g, o


def _per_rank(graph: ModuleGraph, effects: Sequence) -> dict[str, float]:
    """Parameter, gradient and optimizer bytes on one rank under ``effects`` (when an
    effect splits the model between ranks, on the rank that holds the most)."""
    splits = [e.held for e in effects if e.held is not None]
    if not splits:
        return _held(graph, effects, None)
    full = _held(graph, effects, None)["full"]
    worst = max((_held(graph, effects, mods) for mods in splits[-1]),
                key=lambda m: m["parameters"])
    return {**worst, "full": full}


def memory_within(graph: ModuleGraph, effects: Sequence, modules: Sequence[str]
                  ) -> dict[str, float]:
    """Parameter, gradient and optimizer bytes per rank of just ``modules`` under
    ``effects`` (one share of a model split between ranks)."""
    return _held(graph, effects, modules)


def _within(name: str, modules) -> bool:
    """Is ``name`` one of ``modules`` or inside one ("" is the root)?"""
    if "" in modules or name in modules:
        return True
    parts = name.split(".")
    return any(".".join(parts[:i]) in modules for i in range(1, len(parts)))


def _held(graph: ModuleGraph, effects: Sequence, within: Sequence[str] | None
          ) -> dict[str, float]:
    """The bytes of the modules ``within`` (None: all) under ``effects``."""
    out = {"parameters": float(sum(e.parameter_bytes for e in effects)), "gradients": 0.0,
           "optimizer": 0.0, "full": 0}
    scopes = [None if e.modules is None else frozenset(e.modules) for e in effects]
    within = None if within is None else frozenset(within)
    for name, data in graph.g.nodes(data=True):
        nbytes, numel = data["bytes"], data["params"]
        if not numel or (within is not None and not _within(name, within)):
            continue
        if within is not None and not any(name == m or name.startswith(m + ".")
                                          for m in within):
            continue
        out["full"] += nbytes
        p, g, o = _splits(effects, name, scopes)
        out["parameters"] += nbytes / p
        if any(t.requires_grad for t in data["module"].parameters(recurse=False)):
            out["gradients"] += nbytes / g
            out["optimizer"] += numel * OPTIMIZER_STATES * FP32 / o
    return out


def parameter_bytes_per_rank(graph: ModuleGraph, effects: Sequence) -> int:
    """This rank's parameter bytes under the memory effects of the passes so far: a dry
    run's bytes after each pass."""
    return int(_per_rank(graph, effects)["parameters"])


def estimate_memory(graph: ModuleGraph, effects: Sequence, world_size: int,
                    trace=None, selective_kept: dict[str, int] | None = None
                    ) -> MemoryEstimate:
    """Per-rank memory under ``effects`` (the ``MemoryEffect`` of each pass's decision).
    ``selective_kept``: per block, the bytes it keeps under op-level (selective)
    recompute, measured by the caller; without it selective recompute counts as none."""
    notes: list[str] = [n for e in effects for n in e.notes]
    mem = _per_rank(graph, effects)
    if any(e.inference for e in effects):
        mem["gradients"] = mem["optimizer"] = 0
    else:
        notes.append("optimizer: AdamW-like, two fp32 states per trainable parameter")
    activations = None
    if trace is not None:
        split = math.prod(e.activation_split for e in effects)
        activations = _activation_bytes(graph, trace, effects, selective_kept) / split
        notes.append("activations: one micro-batch of the example inputs, from the meta trace")
        if any(e.selective for e in effects) and selective_kept is not None:
            notes.append("activations: op-level (selective) recompute keeps each block's "
                         "inputs and the outputs its policy saves (a meta run of the policy)")
        elif any(e.selective for e in effects):
            notes.append("activations: op-level (selective) recompute counted as none "
                         "(upper bound)")
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
    """Per block: (bytes it saves for backward, bytes it keeps when recomputed — its
    output, the next block's input, in the dtype the trace ran in)."""
    acts = {b: trace[b].activation_bytes for b in blocks}
    kept = {b: trace[b].output_bytes or sum(math.prod(s) for s in trace[b].output_shapes)
            * _element_size(graph.module(b)) for b in blocks}
    return acts, kept


def activation_estimate(total: int, blocks: list[str], acts: dict[str, int],
                        kept: dict[str, int], chosen: list[str]) -> int:
    """Peak saved-for-backward bytes when the ``chosen`` blocks are recomputed.

    A recomputed block keeps only its input until backward reaches it, then holds its
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


def _activation_bytes(graph: ModuleGraph, trace, effects: Sequence,
                      selective_kept: dict[str, int] | None = None) -> int:
    """Saved-for-backward bytes of one micro-batch when the effects' blocks recompute
    (op-level ones keep ``selective_kept`` bytes, when given)."""
    total = trace.activation_bytes
    chosen = {b for e in effects if not e.selective for b in e.checkpointed}
    selective = {b for e in effects if e.selective for b in e.checkpointed} \
        if selective_kept is not None else set()
    if not chosen and not selective:
        return total
    blocks = [b for b in graph.blocks() if b in trace.modules]
    acts, kept = block_activations(graph, trace, blocks)
    for b in selective - chosen:
        if b in kept and b in selective_kept:
            kept[b] = min(selective_kept[b], acts[b])
    return activation_estimate(total, blocks, acts, kept,
                               [b for b in blocks if b in chosen | selective])
