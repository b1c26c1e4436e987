"""What a real step does, counted independently of the planner: the bytes each collective
moves (a TorchDispatchMode over torch.distributed's c10d and functional collectives — the
ops every torch.distributed call, DDP's C++ reducer, FSDP2 and DTensor dispatch to), by
kind and by the size of the group, with the planner's convention (an all-gather counts its
gathered output, a reduce-scatter its unreduced input)."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

# op name → (kind, which tensor to count: "out" the gathered output, "in" the input)
KINDS = {
    "allreduce_": ("all_reduce", "in"), "all_reduce": ("all_reduce", "in"),
    "_allgather_base_": ("all_gather", "out"), "allgather_": ("all_gather", "out"),
    "all_gather_into_tensor": ("all_gather", "out"),
    "allgather_into_tensor_coalesced_": ("all_gather", "out"),
    "_reduce_scatter_base_": ("reduce_scatter", "in"), "reduce_scatter_": ("reduce_scatter", "in"),
    "reduce_scatter_tensor": ("reduce_scatter", "in"),
    "broadcast_": ("broadcast", "in"), "send": ("send_recv", "in"),
}


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


class CollectiveBytes(TorchDispatchMode):
    """Counts {kind: bytes} of every collective dispatched inside the ``with``."""

    def __init__(self):
        super().__init__()
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.sizes: dict[str, list[int]] = defaultdict(list)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        ns = func.namespace
        out = func(*args, **kwargs)
        if ns in ("c10d", "_c10d_functional") and name in KINDS:
            kind, which = KINDS[name]
            if ns == "_c10d_functional":  # functional ops: (input, ...) -> output
                n = _nbytes(_tensors(args[0] if which == "in" else out))
            elif name in ("_reduce_scatter_base_", "reduce_scatter_"):
                n = _nbytes(_tensors(args[1]))  # c10d (output, input, ...): the input
            else:  # other c10d ops: the first argument is the tensor (or the outputs)
                n = _nbytes(_tensors(args[0]))
            self.bytes[kind] += n
            self.calls[kind] += 1
            self.sizes[kind].append(n)
            if kind == "broadcast" and __import__("os").environ.get("DEBUG_BCAST"):
                import traceback; traceback.print_stack(limit=8)
        return out
