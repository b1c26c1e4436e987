"""What a block keeps for backward under selective (op-level) recompute.

The checkpointing pass's selective policy (``passes/checkpointing.py``, torchtitan's)
saves the outputs of every other matmul and of attention and max reductions; the rest is
recomputed in backward. A non-reentrant checkpoint also keeps the block's inputs. This
module runs the block forward on meta under a dispatch mode that asks that same policy
about every op, and adds up the bytes of what it would save (each storage once) — so
the estimate of a selective plan follows the policy that will run, not a rule of thumb.
A uniform stack of blocks is measured on its first two; otherwise every block is.
"""

from __future__ import annotations

import collections

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import CheckpointPolicy
from torch.utils.flop_counter import flop_registry

from ..passes.checkpointing import MATMUL_OPS, selective_policy
from ..rewrite.trace import FusedAttentionOnMeta, _to_meta, meta_copy
from .stack_trace import _cut, uniform_stack


class _Forward:
    is_recompute = False


class _SavedBySelective(TorchDispatchMode):
    """Inside a block: the bytes of the op outputs the selective policy saves."""

    def __init__(self):
        super().__init__()
        self.block: str | None = None
        self.policy = None
        self.saved: dict[str, int] = collections.defaultdict(int)
        self.recomputed_flops: dict[str, int] = collections.defaultdict(int)
        self._seen: set[int] = set()
        self._alive: list = []

    def enter(self, block: str, inputs) -> None:
        self.block, self.policy = block, selective_policy(collections.Counter())
        self._seen, self._alive = set(), []
        self._count(inputs)  # the checkpoint keeps the block's inputs

    def _count(self, tree) -> None:
        for t in tree_leaves(tree):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and \
                    not isinstance(t, nn.Parameter):
                storage = t.untyped_storage()
                if storage._cdata not in self._seen:
                    self._seen.add(storage._cdata)
                    self._alive.append(storage)  # a freed storage's address is reused
                    self.saved[self.block] += storage.nbytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.block is None:
            return out
        if self.policy(_Forward(), func, *args) == CheckpointPolicy.MUST_SAVE:
            self._count(out)
        elif func in MATMUL_OPS and func.overloadpacket in flop_registry:
            self.recomputed_flops[self.block] += int(
                flop_registry[func.overloadpacket](*args, **kwargs, out_val=out))
        return out


def selective_kept(model: nn.Module, args, blocks: list[str], dtype=None
                   ) -> tuple[dict[str, int], dict[str, int]]:
    """Per block: (the bytes it keeps under selective recompute, the FLOPs of the matmuls
    its backward recomputes) for one forward of ``args`` (a meta run; ``dtype``: the
    compute dtype the model is cast to). The other recomputed ops are elementwise (norms,
    activations, RoPE): their FLOPs are not counted, as the trace does not count them."""
    parent = uniform_stack(model, blocks)
    run = meta_copy(_cut(model, parent, 2) if parent else model)
    run = run.to(dtype) if dtype is not None else run
    measured = [f"{parent}.0", f"{parent}.1"] if parent else blocks
    mode = _SavedBySelective()
    params = {id(p) for p in run.parameters()} | {id(b) for b in run.buffers()}

    def pre(name):
        def hook(module, inputs, kwargs):
            mode.enter(name, [t for t in tree_leaves((inputs, kwargs))
                              if isinstance(t, torch.Tensor) and id(t) not in params
                              and (t._base is None or id(t._base) not in params)])
        return hook

    def post(module, inputs, output):
        mode.block = None

    handles = []
    for name in measured:
        block = run.get_submodule(name)
        handles += [block.register_forward_pre_hook(pre(name), with_kwargs=True),
                    block.register_forward_hook(post)]
    try:
        inputs = _to_meta(args)
        with FusedAttentionOnMeta(), mode:
            if isinstance(inputs, dict):
                run(**inputs)
            elif isinstance(inputs, (tuple, list)):
                run(*inputs)
            else:
                run(inputs)
    finally:
        for h in handles:
            h.remove()
    source = {b: measured[min(i, 1)] for i, b in enumerate(blocks)} if parent else {
        b: b for b in blocks}  # a stack: the first block may differ, the rest repeat the 2nd
    return ({b: mode.saved[s] for b, s in source.items()},
            {b: mode.recomputed_flops[s] for b, s in source.items()})
