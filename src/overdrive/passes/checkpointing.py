"""Activation checkpointing of the repeated blocks, applied in place.

Each chosen block keeps its object, class and parameter names: its ``forward`` is
replaced on the instance by one shared function that runs the original forward under
``torch.utils.checkpoint.checkpoint`` (non-reentrant, RNG state preserved, so dropout
masks are replayed exactly). No ``_checkpoint_wrapped_module.`` appears in any key, and
because every block's new ``forward`` is the same function, identical blocks still share
one compiled graph when the compile pass runs next.

While a block trains, caching is off inside it (``use_cache=False``, no KV cache, by
name or by position), as transformers' own gradient checkpointing does: the recompute
would update the cache a second time. In eval or under ``no_grad`` the block runs as is.
BatchNorm-style running stats are put back after the recompute, so a step updates them
once.

Modes:
  full       every block
  every      every N-th block (``every=2``: blocks 2, 4, … counting from 1)
  selective  every block, op-level (torchtitan's policy): attention outputs and every
             second matmul's are saved, the other matmuls and everything else (norms,
             activations, RoPE, residual adds) are recomputed
  budget     the fewest blocks so the traced activation memory fits ``budget_bytes``
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts)

from ..errors import PlanError
from ..plan_spec import Checkpointing
from ..rewrite.contract import Decision, MemoryEffect, Pass, PassContext
from ..rewrite.estimate import activation_estimate, block_activations
from ..rewrite.graph import ModuleGraph
from ..rewrite.manager import register_pass
from ..rewrite.trace import trace_model
from .buffers import running_stat_buffers

_MARK = "_overdrive_checkpointed"
_INNER = "_overdrive_inner_forward"  # an instance-level forward that was there before us

# Selective checkpointing is torchtitan's op-level policy. Matmuls alternate: the first,
# third, … of each block are saved, the others recomputed (about half the matmul
# activations for about half a block's matmul FLOPs again). The other compute-intensive
# ops (attention, convolutions) are always saved, and so are max reductions: fp8 scales
# come from an amax, and a recompute must reuse the forward's. Everything else (norms,
# activations, RoPE, residual adds) is recomputed.
_ATEN = torch.ops.aten
MATMUL_OPS = {_ATEN.mm.default, _ATEN.addmm.default, _ATEN.bmm.default,
              _ATEN.baddbmm.default, _ATEN._scaled_mm.default}
SAVE_OPS = {
    _ATEN.convolution.default, _ATEN.max.default, _ATEN.amax.default,
} | {getattr(_ATEN, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable") if hasattr(_ATEN, name)}
if hasattr(torch.ops, "_c10d_functional"):  # tensor/sequence parallel's reduce-scatter
    SAVE_OPS.add(torch.ops._c10d_functional.reduce_scatter_tensor.default)


# --------------------------------------------------------------------------- in-place wrap


def selective_policy(counts: dict[str, int]):
    """The policy of one checkpointed call. ``counts`` numbers the matmuls of the forward
    and of the recompute separately, so both pick the same ones."""
    def policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
        if func in MATMUL_OPS:
            phase = "recompute" if ctx.is_recompute else "forward"
            counts[phase] += 1
            keep = counts[phase] % 2 == 1
        else:
            keep = func in SAVE_OPS
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _selective_context():
    return create_selective_checkpoint_contexts(selective_policy(collections.Counter()))


def _original_forward(module: nn.Module):
    inner = module.__dict__.get(_INNER)
    return inner if inner is not None else type(module).forward.__get__(module)


# A KV cache handed to a block is updated by its forward; the recompute would update it a
# second time (and see a longer cache). Like transformers' own gradient checkpointing,
# caching is off inside a checkpointed block while it trains.
_CACHE_KWARGS = ("cache", "past_key_value", "past_key_values", "layer_past")


@functools.lru_cache(maxsize=256)
def _positional_names(fn: Any) -> tuple[str, ...]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return ()
    return tuple(p.name for p in params
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _no_cache(name: str, value: Any) -> Any:
    if name == "use_cache" and value:
        return False
    if name in _CACHE_KWARGS and value is not None:
        return None
    return value


def _training_call(forward: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``args``/``kwargs`` with the cache arguments off, by name or by position
    (GPT-2 hands its cache to each block positionally)."""
    names = _positional_names(getattr(forward, "__func__", forward))
    if getattr(forward, "__self__", None) is not None and names[:1] == ("self",):
        names = names[1:]
    args = tuple(_no_cache(n, a) for n, a in zip(names, args)) + args[len(names):]
    return args, {k: _no_cache(k, v) for k, v in kwargs.items()}


@contextlib.contextmanager
def _restoring(buffers: list[torch.Tensor]):
    """The recompute runs BatchNorm in training mode again: put its running stats back
    afterwards so one step updates them once, as without checkpointing."""
    saved = [b.detach().clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


@contextlib.contextmanager
def _recompute_restoring(rec: Any, stats: list[torch.Tensor]):
    with _restoring(stats), rec:  # the copies run outside the selective mode
        yield


def _restoring_contexts(stats: list[torch.Tensor], selective: bool):
    fwd, rec = (_selective_context() if selective
                else (contextlib.nullcontext(), contextlib.nullcontext()))
    return fwd, _recompute_restoring(rec, stats)


def _contexts(module: nn.Module, selective: bool):
    """The ``context_fn`` of one checkpointed call, or None when the defaults do.
    (torch.compile accepts a module-level ``context_fn``, hence no closures.)"""
    stats = running_stat_buffers(module)
    if stats:
        return functools.partial(_restoring_contexts, stats, selective)
    return _selective_context if selective else None


def _run_checkpointed(self: nn.Module, selective: bool, args: tuple, kwargs: dict) -> Any:
    forward = _original_forward(self)
    if not (self.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)  # no backward will replay it: run as is, cache too
    args, kwargs = _training_call(forward, args, kwargs)
    context_fn = _contexts(self, selective)
    extra = {} if context_fn is None else {"context_fn": context_fn}
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True,
                      **extra, **kwargs)


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return _run_checkpointed(self, False, args, kwargs)


def _selective_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return _run_checkpointed(self, True, args, kwargs)


def checkpoint_block(module: nn.Module, selective: bool = False) -> None:
    """Make ``module`` recompute its activations in backward; same object, same keys."""
    if "forward" in module.__dict__:
        module.__dict__[_INNER] = module.__dict__["forward"]
    fn = _selective_forward if selective else _checkpointed_forward
    module.forward = types.MethodType(fn, module)
    setattr(module, _MARK, "selective" if selective else "full")


def is_checkpointed(module: nn.Module) -> bool:
    return _MARK in module.__dict__


# --------------------------------------------------------------------------- budget


def _example_inputs(ac: Checkpointing, env: Any) -> Any:
    if getattr(env, "example_inputs", None) is not None:
        return env.example_inputs
    shape = ac.budget_input_shape
    if shape is not None:
        return torch.zeros(tuple(shape), dtype=torch.long)  # token ids
    raise PlanError(
        "checkpointing.mode='budget' needs to know the input size to trace activation memory: "
        "set checkpointing.budget_input_shape=(batch, seq_len) (integer token ids), or, in a "
        "dry run, pass od.inspect(model, plan, example_inputs=...)"
    )


def choose_budget_blocks(graph: ModuleGraph, ac: Checkpointing, env: Any
                         ) -> tuple[list[str], dict]:
    """The fewest blocks (most saving first) whose checkpointing fits ``budget_bytes``."""
    trace = trace_model(graph.model, _example_inputs(ac, env), backward=False)
    blocks = [b for b in graph.blocks() if b in trace.modules]
    acts, kept = block_activations(graph, trace, blocks)
    order = sorted(blocks, key=lambda b: (-(acts[b] - kept[b]), blocks.index(b)))
    facts = {"traced_activation_bytes": trace.activation_bytes, "budget_bytes": ac.budget_bytes}
    for k in range(len(order) + 1):
        chosen = order[:k]
        estimate = activation_estimate(trace.activation_bytes, blocks, acts, kept, chosen)
        if estimate <= ac.budget_bytes:
            facts["estimated_activation_bytes"] = estimate
            return sorted(chosen, key=blocks.index), facts
    floor = activation_estimate(trace.activation_bytes, blocks, acts, kept, order)
    raise PlanError(
        f"checkpointing.budget_bytes={ac.budget_bytes} cannot be met: traced activations are "
        f"{trace.activation_bytes} bytes and checkpointing all {len(blocks)} blocks still needs "
        f"about {floor}; raise budget_bytes to >= {floor} or shrink the batch"
    )


# --------------------------------------------------------------------------- the pass


def _every(blocks: list[str], n: int) -> list[str]:
    return [b for i, b in enumerate(blocks, 1) if i % n == 0]


@dataclass(kw_only=True)
class CheckpointingDecision(Decision):
    """``modules``: the blocks whose forward is recomputed in backward, in ``mode``."""

    mode: str
    selective: bool


def _check_config(graph: ModuleGraph, ac: Checkpointing, blocks: list[str]) -> None:
    if not blocks:
        raise PlanError(
            f"checkpointing: blocks: no repeated blocks found in "
            f"{type(graph.model).__name__}; name them with Plan(blocks=('layers.*',)) "
            "(qualified names or globs of the modules to checkpoint)"
        )
    if not isinstance(ac.every, int) or isinstance(ac.every, bool) or ac.every < 1:
        raise PlanError(f"checkpointing.every={ac.every!r} is not valid; use an integer >= 1")
    if ac.mode == "every" and ac.every > len(blocks):
        raise PlanError(
            f"checkpointing.every={ac.every} with mode='every' selects none of the "
            f"{len(blocks)} blocks; use every <= {len(blocks)}"
        )
    shape = ac.budget_input_shape
    if shape is not None and (isinstance(shape, (str, bytes)) or not all(
            isinstance(s, int) and s > 0 for s in shape)):
        raise PlanError(f"checkpointing.budget_input_shape={shape!r} is not valid; use a "
                        "tuple of positive integers such as (8, 2048)")
    done = [b for b in blocks if is_checkpointed(graph.module(b))]
    if done:
        raise PlanError(f"checkpointing: block {done[0]!r} is already checkpointed by "
                        "overdrive; apply the plan to a fresh model")


def decide(graph: ModuleGraph, ac: Checkpointing, env: Any) -> CheckpointingDecision:
    """The blocks to recompute and why, from the graph, the config (and, for a budget, a
    meta trace of the example inputs)."""
    blocks = graph.blocks()
    facts: dict[str, Any] = {}
    if ac.mode == "every":
        chosen, facts = _every(blocks, ac.every), {"every": ac.every}
    elif ac.mode == "budget":
        chosen, facts = choose_budget_blocks(graph, ac, env)
    else:
        chosen = list(blocks)
    notes = [f"{ac.mode}: {len(chosen)} of {len(blocks)} blocks checkpointed "
             "(non-reentrant, RNG state preserved)",
             "caching is off inside checkpointed blocks while training (use_cache=False, "
             "no KV cache), as transformers' own gradient checkpointing does: a recompute "
             "must not update the cache twice"]
    with_stats = [b for b in chosen if running_stat_buffers(graph.module(b))]
    if with_stats:
        notes.append(f"{len(with_stats)} checkpointed blocks hold BatchNorm running stats: "
                     "the recompute puts them back, so each step updates them once")
    if ac.mode == "selective":
        notes.append("selective: attention and every second matmul saved, other ops "
                     "recomputed")
    if ac.mode == "budget":
        notes.append(f"budget: traced activations {facts['traced_activation_bytes']} B → "
                     f"about {facts['estimated_activation_bytes']} B "
                     f"(budget {facts['budget_bytes']} B)")
    selective = ac.mode == "selective"
    return CheckpointingDecision(
        modules=list(chosen), notes=notes, mode=ac.mode, selective=selective,
        details={"mode": ac.mode, **facts},
        memory=MemoryEffect(checkpointed=tuple(chosen), selective=selective))


@register_pass("checkpointing", config=Checkpointing,
               after=("tensor_parallel", "context_parallel"), before=("compile",))
class ActivationCheckpointing(Pass):
    """Wrap the repeated blocks' forward in ``torch.utils.checkpoint`` (in place)."""

    def check(self, ctx: PassContext) -> CheckpointingDecision:
        _check_config(ctx.graph, ctx.cfg, ctx.graph.blocks())
        return decide(ctx.graph, ctx.cfg, ctx.env)

    def apply(self, model: nn.Module, decision: CheckpointingDecision,
              ctx: PassContext) -> None:
        for name in decision.modules:
            checkpoint_block(ctx.graph.module(name), selective=decision.selective)


__all__ = ["ActivationCheckpointing", "CheckpointingDecision", "decide", "checkpoint_block", "is_checkpointed",
           "choose_budget_blocks", "selective_policy", "SAVE_OPS", "MATMUL_OPS"]
