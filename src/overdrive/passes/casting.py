"""casting: layerwise casting for inference — store weights small, compute in bf16.

The weights of every Linear and Conv1d/2d/3d (except those whose qualified name contains
a ``skip`` fragment: norms, embeddings, the output head by default) are stored in the
``storage`` dtype (float8_e4m3fn: a quarter of fp32, half of bf16). Each forward computes
with one of two kernels (``casting_kernels.py``; the decision records which ran, and on
what machine): a *temporary* upcast copy, roughly::

    F.linear(x.to(compute), upcast(self.weight), bias)

or, on GPUs with fp8 tensor cores, ``torch._scaled_mm`` on the float8 weight itself
(the input quantized to float8 per row). ``Casting.kernel`` = "auto" | "copy" |
"scaled_mm" picks; "auto" takes the fused kernel only where it is the faster one.

The stored weight is never cast back and forth (Accelerate's layerwise-casting hooks call
``module.to`` twice per forward, which about doubles the forward time on CPU), and the
upcast itself moves the float8 bits through float16 with vectorised integer ops (see
``upcast``), exact and about 3x faster than torch's float8 conversion on CPU. The module
keeps its object, its parameter names and so its state_dict keys: only its class is
switched to a subclass whose ``forward`` does the upcast. Weights that do not fit the
storage range (|w| > 448 for e4m3) are left alone rather than clipped.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..dtypes import to_torch
from ..errors import PlanError
from ..plan_spec import Casting
from ..rewrite.contract import Decision, MemoryEffect, Pass, PassContext
from ..rewrite.graph import ModuleGraph, parameter_owners, tensor_bytes
from ..rewrite.manager import register_pass
from .casting_kernels import (FLOAT8, KernelChoice, UpcastScratch, choose_kernel, device_kind,
                              fused_misfit, scaled_mm, upcast)


class _UpcastForward:
    """Mixin: forward from a temporary ``compute``-dtype copy of the stored weight.

    The output has the input's dtype, so the layers around a cast layer see what they saw
    before (a bf16 model stays bf16 throughout; an fp32 one only computes these in bf16).
    """

    compute_dtype: torch.dtype
    upcast_scratch: UpcastScratch | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.compute_dtype
        scratch = self.upcast_scratch
        if scratch is not None and scratch.applies(self.weight, x):
            weight, scale = scratch.upcast(self.weight, c)
        else:
            weight, scale = upcast(self.weight, c)
        inp = x.to(c)
        if scale != 1.0:  # exact either way: a power of two
            # on whichever is smaller (the weight copy for long inputs); fp16 always on
            # the weight: scaled activations could overflow fp16's range
            if c == torch.float16 or inp.numel() > weight.numel():
                weight.mul_(scale)
            else:
                inp = inp * scale
        bias = None if self.bias is None else self.bias.to(c)
        return self._compute(inp, weight, bias).to(x.dtype)


class CastLinear(_UpcastForward, nn.Linear):
    def _compute(self, x, weight, bias):
        return F.linear(x, weight, bias)


class FusedCastLinear(CastLinear):
    """A cast Linear that multiplies its float8 weight directly (``torch._scaled_mm``),
    quantizing its input per forward; the copy path wherever an autograd graph runs
    through the input (``_scaled_mm`` has no backward)."""

    fused_rowwise: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return super().forward(x)
        c = self.compute_dtype
        flat = x.reshape(-1, x.shape[-1]).to(c)
        out = scaled_mm(flat, self.weight, c, self.fused_rowwise)
        if self.bias is not None:
            out = out + self.bias.to(c)
        return out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype)


class _CastConv(_UpcastForward):
    def _compute(self, x, weight, bias):
        return self._conv_forward(x, weight, bias)


class CastConv1d(_CastConv, nn.Conv1d):
    pass


class CastConv2d(_CastConv, nn.Conv2d):
    pass


class CastConv3d(_CastConv, nn.Conv3d):
    pass


def _hf_conv1d() -> type | None:
    """transformers' ``Conv1D`` (GPT-2's projections: a Linear with the weight
    transposed), when transformers is installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # noqa: BLE001 - transformers is optional
        return None
    return Conv1D


def _cast_hf_conv1d(conv1d: type) -> type:
    def _compute(self, x, weight, bias):
        flat = x.reshape(-1, x.size(-1))
        out = flat @ weight if bias is None else torch.addmm(bias, flat, weight)
        return out.view(*x.shape[:-1], self.nf)

    return type("CastHFConv1D", (_UpcastForward, conv1d), {"_compute": _compute})


CAST_CLASSES: dict[type, type] = {nn.Linear: CastLinear, nn.Conv1d: CastConv1d,
                                  nn.Conv2d: CastConv2d, nn.Conv3d: CastConv3d}
if _hf_conv1d() is not None:
    CAST_CLASSES[_hf_conv1d()] = _cast_hf_conv1d(_hf_conv1d())


def _base(module: nn.Module) -> type | None:
    """The torch class (Linear, ConvNd) whose forward the module runs, if any."""
    for base in CAST_CLASSES:
        if type(module) is base:
            return base
    return None


def _out_of_range(weight: torch.Tensor, storage: torch.dtype) -> bool:
    """Would storing ``weight`` clip it (or is it not finite)? Unknown on meta: False."""
    if weight.device.type == "meta" or storage not in FLOAT8:
        return False
    return not bool((weight.detach().abs() <= torch.finfo(storage).max).all())


def _forward_source(cls: type) -> str:
    src = _SOURCES.get(cls)
    if src is None:
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            src = ""
        _SOURCES[cls] = src
    return src


_SOURCES: dict[type, str] = {}


def _weight_reader(graph: ModuleGraph, name: str) -> str | None:
    """The enclosing module whose own forward reads ``<child>.weight`` of ``name``
    (T5's feed-forward checks ``self.wo.weight.dtype``; nn.TransformerEncoderLayer's
    fast path and nn.MultiheadAttention hand ``linear1.weight`` / ``out_proj.weight`` to
    fused kernels). Found from the forward's source, before anything is cast."""
    parts = name.split(".")
    for depth in range(1, min(len(parts), 3) + 1):
        owner, rel = ".".join(parts[:-depth]), ".".join(parts[-depth:])
        module = graph.module(owner)
        pattern = r"\bself\." + re.escape(rel) + r"\.(weight|bias)\b"
        if re.search(pattern, _forward_source(type(module))):
            return f"{owner or '<root>'} ({type(module).__name__})"
    return None


def _probe_input(module: nn.Module) -> torch.Tensor:
    """A small meta input the layer accepts: (2, in) features, or one image/sequence
    large enough for its kernel."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        dims = len(module.kernel_size)
        side = [k * d + 1 for k, d in zip(module.kernel_size, module.dilation)]
        return torch.empty(1, module.in_channels, *side[:dims], device="meta")
    in_features = module.weight.shape[1 if isinstance(module, nn.Linear) else 0]  # Conv1D: (in, out)
    return torch.empty(2, in_features, device="meta")


def probe_failure(module: nn.Module, storage: torch.dtype) -> str | None:
    """Cast a meta copy of ``module`` and run its forward on a meta input; the error
    text when that fails. The user's module and weights are not touched."""
    from ..rewrite.trace import meta_copy

    try:
        probe = meta_copy(module)
        cast_module(probe, storage, torch.bfloat16)
        with torch.no_grad():
            probe(_probe_input(module))
    except Exception as err:  # noqa: BLE001 - any failure means: do not cast this layer
        return f"{type(err).__name__}: {str(err)[:120]}"
    return None


def _probed(probes: dict, module: nn.Module, storage: torch.dtype) -> str | None:
    key = (type(module), repr(module), tuple(module.weight.shape))
    if key not in probes:
        probes[key] = probe_failure(module, storage)
    return probes[key]


def select(graph: ModuleGraph, skip: tuple[str, ...],
           storage: torch.dtype) -> tuple[list[str], dict[str, str]]:
    """(modules to cast, {skipped module: reason}); touches nothing."""
    candidates = [n for n in graph.modules_of_type(*CAST_CLASSES) if n]
    owners = parameter_owners(graph.model)
    cast, skipped = [], {}
    probes: dict[tuple, str | None] = {}  # one probe per distinct layer configuration
    for name in candidates:
        module = graph.module(name)
        hit = next((frag for frag in skip if frag in name), None)
        if hit is not None:
            skipped[name] = f"name contains {hit!r} (casting.skip)"
        elif _base(module) is None:
            skipped[name] = (f"{type(module).__name__} is a subclass (its forward may differ); "
                             "only plain Linear / Conv1d / Conv2d / Conv3d and "
                             "transformers' Conv1D are cast")
        elif (reader := _weight_reader(graph, name)) is not None:
            skipped[name] = (f"{reader} reads its weight directly (dtype or a functional "
                             "call): a stored float8 weight would reach that code")
        elif _out_of_range(module.weight, storage):
            skipped[name] = (f"weights outside {storage}'s range "
                             f"±{torch.finfo(storage).max:g} (or not finite) would be clipped")
        elif (failure := _probed(probes, module, storage)) is not None:
            skipped[name] = f"a one-layer probe of the cast layer failed on meta ({failure})"
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
def cast_module(module: nn.Module, storage: torch.dtype, compute: torch.dtype,
                fused: KernelChoice | None = None, scratch: UpcastScratch | None = None) -> None:
    """Store ``module.weight`` in ``storage`` and switch its class to the upcasting one
    (``FusedCastLinear`` with a ``scaled_mm`` choice); ``scratch``: the CPU copy path's
    shared buffers."""
    w = module.weight
    frozen = storage in FLOAT8 or not w.requires_grad  # float8 cannot hold gradients
    module.weight = nn.Parameter(w.detach().to(storage), requires_grad=not frozen)
    module.__class__ = FusedCastLinear if fused is not None else CAST_CLASSES[_base(module)]
    module.compute_dtype = compute
    if fused is not None:
        module.fused_rowwise = fused.rowwise
    if scratch is not None:
        module.upcast_scratch = scratch


@dataclass(kw_only=True)
class CastingDecision(Decision):
    """``modules``: the layers whose weights are stored in ``storage`` and computed in
    ``compute``; ``skipped``: the candidates left alone, with the reason."""

    storage: str
    compute: str
    skipped: dict[str, str]
    kernel: KernelChoice
    fused: list[str]  # the layers on the scaled_mm path (the others take the copy path)


def kernel_notes(choice: KernelChoice, fused: list[str], misfits: dict[str, str],
                 compute: str) -> list[str]:
    notes = [f"kernel {choice.kernel} on {choice.machine}: {choice.reason}"]
    if choice.kernel == "scaled_mm":
        notes.append(f"{len(fused)} layer(s) multiply the float8 weight directly "
                     "(torch._scaled_mm)")
        notes += [f"{name} takes the copy path: {why}" for name, why in misfits.items()]
    else:
        notes.append(f"each forward computes in {compute} from a temporary upcast copy")
    return notes


def decide(graph: ModuleGraph, cfg: Casting, device: torch.device) -> CastingDecision:
    storage, compute = to_torch(cfg.storage), to_torch(cfg.compute)
    cast, skipped = select(graph, tuple(cfg.skip), storage)
    choice = choose_kernel(cfg.kernel, storage, compute, device_kind(device, compute))
    misfits = {n: why for n in cast if (why := fused_misfit(graph.module(n))) is not None} \
        if choice.kernel == "scaled_mm" else {}
    fused = [n for n in cast if choice.kernel == "scaled_mm" and n not in misfits]
    before = sum(tensor_bytes(graph.module(n).weight) for n in cast)
    after = sum(graph.module(n).weight.numel() for n in cast) * storage.itemsize
    notes = [f"{len(cast)} layer weight(s) stored as {cfg.storage}, computed in "
             f"{cfg.compute}"]
    notes += kernel_notes(choice, fused, misfits, cfg.compute)
    notes += [f"{name} skipped: {reason}" for name, reason in skipped.items()]
    return CastingDecision(
        modules=list(cast), notes=notes, storage=cfg.storage, compute=cfg.compute,
        skipped=dict(skipped), kernel=choice, fused=fused,
        details=dict(storage=cfg.storage, compute=cfg.compute, skipped=dict(skipped),
                     kernel=choice.kernel, machine=choice.machine,
                     kernel_reason=choice.reason, fused_layers=len(fused),
                     copy_layers=len(cast) - len(fused),
                     cast_weight_bytes_before=before, cast_weight_bytes_after=after),
        memory=MemoryEffect(parameter_bytes=after - before, inference=True, notes=(
            "casting is an inference plan: no gradients, no optimizer state",)))


def run_device(ctx: PassContext) -> torch.device:
    """The device the cast layers will run on; od.inspect's dry run does not know it, and
    resolves it as this machine would (as the fp8 pass does): the GPU if there is one."""
    if ctx.env.dry_run or ctx.env.device.type == "meta":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return ctx.env.device


@register_pass("casting", config=Casting, before=("fp8",))
class LayerwiseCasting(Pass):
    """Inference: Linear/Conv weights stored in ``storage``, computed in ``compute``."""

    replaces_parameters = True

    def check(self, ctx: PassContext) -> CastingDecision:
        decision = decide(ctx.graph, ctx.cfg, run_device(ctx))
        if not decision.modules:
            why = "; ".join(f"{n}: {r}" for n, r in list(decision.skipped.items())[:6])
            raise PlanError(
                "casting: no Linear / Conv1d / Conv2d / Conv3d / Conv1D module is left to cast"
                + (f" ({why})" if why else " (the model has none)")
                + f"; casting.skip={tuple(ctx.cfg.skip)!r} — narrow it")
        return decision

    def apply(self, model: nn.Module, decision: CastingDecision, ctx: PassContext) -> None:
        storage, compute = to_torch(decision.storage), to_torch(decision.compute)
        fused = set(decision.fused)
        scratch = UpcastScratch()  # one per model: its cast layers run one after another
        for name in decision.modules:
            cast_module(model.get_submodule(name), storage, compute,
                        fused=decision.kernel if name in fused else None, scratch=scratch)
