"""The meta trace of a deep model from two shallow ones.

Tracing an 80-block model on meta costs seconds; its blocks are identical, so a model cut
to its first block and to its first two gives everything: the second block's records
repeat for blocks 2..n-1, and every total is ``t1 + (n - 1) × (t2 − t1)``. Used when the
repeated blocks are one stack of same-shaped blocks in an ``nn.ModuleList``; otherwise
the whole model is traced. The user's model is never changed: the cut copies share the
block modules but own their containers.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from torch import nn

from ..rewrite.graph import group_by_parent
from ..rewrite.trace import ModuleTrace, Trace, meta_copy, trace_model


def _signature(module: nn.Module) -> list:
    return [(n, tuple(p.shape), p.dtype) for n, p in module.named_parameters()]


def _cut(model: nn.Module, parent: str, keep: int) -> nn.Module:
    """A copy of ``model`` whose ``parent`` ModuleList holds its first ``keep`` blocks."""
    root = copy.copy(model)
    root._modules = dict(model._modules)
    node, path = root, parent.split(".")
    for i, part in enumerate(path):
        child = node._modules[part]
        if i == len(path) - 1:
            node._modules[part] = nn.ModuleList(list(child)[:keep])
        else:
            child = copy.copy(child)
            child._modules = dict(child._modules)
            node._modules[part] = child
            node = child
    return root


def uniform_stack(model: nn.Module, blocks: list[str], least: int = 4) -> str | None:
    """The ``nn.ModuleList`` holding ``blocks`` when they are one stack of at least
    ``least`` same-shaped blocks (the first may differ), else None."""
    groups = group_by_parent(blocks)
    parent = groups[0][0].rpartition(".")[0] if len(groups) == 1 else None
    container = model.get_submodule(parent) if parent else None
    usable = (isinstance(container, nn.ModuleList) and len(blocks) >= least
              and [f"{parent}.{i}" for i in range(len(container))] == blocks
              and all(_signature(b) == _signature(container[1]) for b in container[1:]))
    return parent if usable else None


def stack_trace(model: nn.Module, args, blocks: list[str], dtype=None) -> Trace:
    parent = uniform_stack(model, blocks)
    if parent is None:
        whole = meta_copy(model)
        return trace_model(whole.to(dtype) if dtype is not None else whole, args)
    t1, t2 = (trace_model(_cast(_cut(model, parent, k), dtype), args) for k in (1, 2))
    return _extend(t1, t2, parent, len(blocks))


def _cast(model: nn.Module, dtype):
    model = meta_copy(model)
    return model.to(dtype) if dtype is not None else model


def _extend(t1: Trace, t2: Trace, parent: str, n: int) -> Trace:
    second = f"{parent}.1"
    inside = {k: v for k, v in t2.modules.items() if k == second or k.startswith(second + ".")}
    span = len(inside)
    last_order = max(v.order for v in inside.values())
    modules: dict[str, ModuleTrace] = {}
    for name, rec in t2.modules.items():
        if name in inside:
            continue
        order = rec.order + (n - 2) * span if rec.order > last_order else rec.order
        modules[name] = replace(rec, order=order)
    for i in range(1, n):
        for name, rec in inside.items():
            new = f"{parent}.{i}" + name[len(second):]
            modules[new] = replace(rec, name=new, order=rec.order + (i - 1) * span,
                                   output_shapes=list(rec.output_shapes))
    for name in modules:  # the containers of the stack (the root among them) grow with it
        if name in t1.modules and not name.startswith(parent + "."):
            a, b = t1.modules[name], t2.modules[name]
            modules[name] = replace(modules[name],
                                    flops=a.flops + (n - 1) * (b.flops - a.flops),
                                    activation_bytes=a.activation_bytes + (n - 1) * (
                                        b.activation_bytes - a.activation_bytes))

    def grow(a: int, b: int) -> int:
        return a + (n - 1) * (b - a)

    return Trace(modules=modules, forward_flops=grow(t1.forward_flops, t2.forward_flops),
                 backward_flops=grow(t1.backward_flops, t2.backward_flops),
                 activation_bytes=grow(t1.activation_bytes, t2.activation_bytes))
