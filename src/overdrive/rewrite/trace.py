"""Meta-device trace: per-module call order, output shapes, FLOPs and activation bytes.

Runs one forward (and, for FLOPs, one backward) of a meta-device copy of the model with
example inputs. No real weights are touched and nothing is allocated: meta tensors carry
shapes only. Activation bytes are what autograd saves for backward inside each module
(counted with ``saved_tensors_hooks``), which is what recomputing activations trades away.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import flop_counter
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


class FusedAttentionOnMeta(TorchFunctionMode):
    """On meta tensors ``F.scaled_dot_product_attention`` falls back to the math path,
    which materialises the (s × s) score matrix and would make the activation estimate
    describe a kernel no GPU run uses. Route mask-free calls to the fused (flash) op,
    whose saved tensors are O(s), like the flash/cuDNN kernels on real devices."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            if q.device.type == "meta" and mask is None and not kwargs.get("enable_gqa") \
                    and q.shape[-1] == v.shape[-1] and q.shape[1] == k.shape[1]:
                dropout = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
                causal = kwargs.get("is_causal", args[5] if len(args) > 5 else False)
                return _FLASH(q, k, v, dropout, causal, scale=kwargs.get("scale"))[0]
        return func(*args, **kwargs)


def _flash_cpu_flop(query, key, value,  # shapes, not tensors
                    *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _flash_cpu_backward_flop(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def _flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts the CPU flash-attention ops the meta trace routes
    to; the formulas are handed to this counter only (torch's global table is left alone)."""
    return FlopCounterMode(display=False, custom_mapping={
        _FLASH: _flash_cpu_flop,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
            _flash_cpu_backward_flop})


@dataclass
class ModuleTrace:
    name: str
    order: int  # position in call order (first call)
    calls: int = 0
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)
    flops: int = 0  # forward FLOPs, this module and below
    activation_bytes: int = 0  # bytes saved for backward, this module and below
    output_bytes: int = 0  # bytes of its first output, in the dtype it ran in


@dataclass
class Trace:
    modules: dict[str, ModuleTrace]
    forward_flops: int
    backward_flops: int
    activation_bytes: int

    @property
    def call_order(self) -> list[str]:
        return sorted(self.modules, key=lambda n: self.modules[n].order)

    def __getitem__(self, name: str) -> ModuleTrace:
        return self.modules[name]

    def summary(self) -> dict[str, Any]:
        return {
            "forward_flops": self.forward_flops,
            "backward_flops": self.backward_flops,
            "activation_bytes": self.activation_bytes,
            "modules": len(self.modules),
        }


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers live on the meta device.

    Weights are never copied: each tensor is replaced by an empty meta tensor of the same
    shape and dtype before ``deepcopy`` reaches it. Tied weights stay tied.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"),
                                       requires_grad=p.requires_grad)
    for b in model.buffers():
        if id(b) not in memo:
            memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _to_meta(x: Any) -> Any:
    return tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, x)


def _shapes(out: Any) -> list[tuple[int, ...]]:
    leaves, _ = tree_flatten(out)
    return [tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor)]


def _first_loss(out: Any) -> torch.Tensor | None:
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if dataclasses.is_dataclass(out):
        out = [getattr(out, f.name) for f in dataclasses.fields(out)]
    elif hasattr(out, "to_tuple"):  # transformers' ModelOutput
        out = out.to_tuple()
    leaves, _ = tree_flatten(out)
    for t in leaves:
        if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point():
            return t
    return None


def trace_model(model: nn.Module, example_inputs: Any, *, backward: bool = True) -> Trace:
    """Trace ``model`` (copied to meta unless it is already there) with ``example_inputs``.

    ``example_inputs`` is a tensor, a tuple of positional arguments, or a dict of keyword
    arguments. Tensors are moved to meta.
    """
    on_meta = all(p.device.type == "meta" for p in model.parameters())
    meta_model = model if on_meta else meta_copy(model)
    inputs = _to_meta(example_inputs)
    if isinstance(inputs, dict):
        args, kwargs = (), inputs
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    else:
        args, kwargs = (inputs,), {}

    names = {m: n for n, m in meta_model.named_modules()}
    records: dict[str, ModuleTrace] = {}
    stack: list[str] = []
    saved_ids: set[int] = set()
    counter = _flop_counter()

    def pre_hook(module, _args):
        name = names[module]
        rec = records.get(name)
        if rec is None:
            rec = records[name] = ModuleTrace(name, order=len(records))
        rec.calls += 1
        stack.append(name)

    def post_hook(module, _args, out):
        name = stack.pop()
        records[name].output_shapes = _shapes(out)
        first = next((t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)), None)
        records[name].output_bytes = 0 if first is None else first.numel() * first.element_size()

    param_ids = {id(p) for p in meta_model.parameters()}

    def pack(t: torch.Tensor):
        is_weight = id(t) in param_ids or id(t._base) in param_ids
        if not is_weight and id(t) not in saved_ids:
            saved_ids.add(id(t))
            size = t.numel() * t.element_size()
            for name in stack:  # counts toward every enclosing module
                records[name].activation_bytes += size
        return t

    handles = [m.register_forward_pre_hook(pre_hook) for m in meta_model.modules()]
    handles += [m.register_forward_hook(post_hook) for m in meta_model.modules()]
    try:
        with counter, FusedAttentionOnMeta(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = meta_model(*args, **kwargs)
        forward_flops = counter.get_total_flops()
        backward_flops = 0
        loss = _first_loss(out) if backward else None
        trainable = [p for p in meta_model.parameters() if p.requires_grad]
        if loss is not None and loss.requires_grad and trainable:
            # autograd.grad, not backward(): a meta model traced in place is the user's
            # own, and must not be left holding (meta) .grad tensors
            with _flop_counter() as bwd_counter, FusedAttentionOnMeta():
                torch.autograd.grad(loss.sum(), trainable, allow_unused=True)
            backward_flops = bwd_counter.get_total_flops()
    finally:
        for h in handles:
            h.remove()

    per_module = counter.get_flop_counts()  # keys: "<RootClass>.<qualified name>"
    root_name = type(meta_model).__name__
    for name, rec in records.items():
        key = root_name if name == "" else f"{root_name}.{name}"
        rec.flops = int(sum(per_module.get(key, {}).values()))
    root = records.get("")
    return Trace(
        modules=records,
        forward_flops=int(forward_flops),
        backward_flops=int(backward_flops),
        activation_bytes=root.activation_bytes if root else 0,
    )
