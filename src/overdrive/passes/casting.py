"""casting: layerwise casting for inference — store weights small, compute in bf16.

The weights of every Linear and Conv1d/2d/3d (except those whose qualified name contains
a ``skip`` fragment: norms, embeddings, the output head by default) are stored in the
``storage`` dtype (float8_e4m3fn: a quarter of fp32, half of bf16). Each forward computes
from a *temporary* upcast copy::

    F.linear(x.to(compute), self.weight.to(compute), bias)

The stored weight is never cast back and forth (Accelerate's layerwise-casting hooks call
``module.to`` twice per forward, which about doubles the forward time on CPU). The module
keeps its object, its parameter names and so its state_dict keys: only its class is
switched to a subclass whose ``forward`` does the upcast.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PlanError
from ..rewrite.graph import ModuleGraph, tensor_bytes
from ..rewrite.manager import Pass, register_pass
from ..rewrite.plan import Plan
from ..rewrite.report import PassRecord

FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


class _UpcastForward:
    """Mixin: forward from a temporary ``compute``-dtype copy of the stored weight.

    The output has the input's dtype, so the layers around a cast layer see what they saw
    before (a bf16 model stays bf16 throughout; an fp32 one only computes these in bf16).
    """

    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.compute_dtype
        weight = self.weight.to(c)
        bias = None if self.bias is None else self.bias.to(c)
        if isinstance(self, nn.Linear):
            out = F.linear(x.to(c), weight, bias)
        else:
            out = self._conv_forward(x.to(c), weight, bias)
        return out.to(x.dtype)


class CastLinear(_UpcastForward, nn.Linear):
    pass


class CastConv1d(_UpcastForward, nn.Conv1d):
    pass


class CastConv2d(_UpcastForward, nn.Conv2d):
    pass


class CastConv3d(_UpcastForward, nn.Conv3d):
    pass


CAST_CLASSES: dict[type, type] = {nn.Linear: CastLinear, nn.Conv1d: CastConv1d,
                                  nn.Conv2d: CastConv2d, nn.Conv3d: CastConv3d}


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _base(module: nn.Module) -> type | None:
    """The torch class (Linear, ConvNd) whose forward the module runs, if any."""
    for base in CAST_CLASSES:
        if type(module) is base:
            return base
    return None


def select(graph: ModuleGraph, skip: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """(modules to cast, {skipped module: reason}); touches nothing."""
    candidates = [n for n in graph.modules_of_type(*CAST_CLASSES) if n]
    owners: dict[int, set[str]] = {}
    for name in graph.names():
        for p in graph.module(name).parameters(recurse=False):
            owners.setdefault(id(p), set()).add(name)
    cast, skipped = [], {}
    for name in candidates:
        module = graph.module(name)
        hit = next((frag for frag in skip if frag in name), None)
        if hit is not None:
            skipped[name] = f"name contains {hit!r} (casting.skip)"
        elif _base(module) is None:
            skipped[name] = (f"{type(module).__name__} is a subclass (its forward may differ); "
                             "only plain Linear / Conv1d / Conv2d / Conv3d are cast")
        else:
            cast.append(name)
    chosen = set(cast)
    for name in list(cast):  # a weight shared with a module we keep must keep its dtype
        shared = {o for p in graph.module(name).parameters(recurse=False)
                  for o in owners[id(p)]} - chosen
        if shared:
            cast.remove(name)
            skipped[name] = f"its weight is shared with {', '.join(sorted(shared))}"
    return cast, skipped


@torch.no_grad()
def cast_module(module: nn.Module, storage: torch.dtype, compute: torch.dtype) -> None:
    """Store ``module.weight`` in ``storage`` and switch its class to the upcasting one."""
    w = module.weight
    frozen = storage in FLOAT8 or not w.requires_grad  # float8 cannot hold gradients
    module.weight = nn.Parameter(w.detach().to(storage), requires_grad=not frozen)
    module.__class__ = CAST_CLASSES[_base(module)]
    module.compute_dtype = compute


@register_pass("casting", before=("fp8",))
class LayerwiseCasting(Pass):
    """Inference: Linear/Conv weights stored in ``storage``, computed in ``compute``."""

    replaces_parameters = True

    def enabled(self, plan: Plan) -> bool:
        return plan.casting is not None

    def check(self, graph: ModuleGraph, plan: Plan, env: Any) -> None:
        cast, skipped = select(graph, tuple(plan.casting.skip))
        if not cast:
            why = "; ".join(f"{n}: {r}" for n, r in list(skipped.items())[:6])
            raise PlanError(
                "casting: no Linear / Conv1d / Conv2d / Conv3d module is left to cast"
                + (f" ({why})" if why else " (the model has none)")
                + f"; casting.skip={tuple(plan.casting.skip)!r} — narrow it")

    def apply(self, model: nn.Module, graph: ModuleGraph, plan: Plan, env: Any) -> PassRecord:
        cfg = plan.casting
        storage, compute = _dtype(cfg.storage), _dtype(cfg.compute)
        cast, skipped = select(graph, tuple(cfg.skip))
        before = sum(tensor_bytes(graph.module(n).weight) for n in cast)
        for name in cast:
            cast_module(model.get_submodule(name), storage, compute)
        after = sum(tensor_bytes(model.get_submodule(n).weight) for n in cast)
        return self._record(cast, skipped, cfg, before, after)

    def preview(self, graph: ModuleGraph, plan: Plan, env: Any) -> PassRecord:
        cfg = plan.casting
        cast, skipped = select(graph, tuple(cfg.skip))
        before = sum(tensor_bytes(graph.module(n).weight) for n in cast)
        after = sum(graph.module(n).weight.numel() for n in cast) * _dtype(cfg.storage).itemsize
        return self._record(cast, skipped, cfg, before, after)

    def _record(self, cast, skipped, cfg, before: int, after: int) -> PassRecord:
        rec = self.record(modules=list(cast))
        rec.note(f"{len(cast)} layer weight(s) stored as {cfg.storage}, computed in "
                 f"{cfg.compute} from a temporary copy")
        for name, reason in skipped.items():
            rec.note(f"{name} skipped: {reason}")
        rec.details.update(storage=cfg.storage, compute=cfg.compute, skipped=dict(skipped),
                           cast_weight_bytes_before=before, cast_weight_bytes_after=after)
        return rec
