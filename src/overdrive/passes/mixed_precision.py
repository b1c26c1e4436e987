"""mixed_precision: run the model's forward under ``torch.autocast`` (bf16 / fp16).

Without a sharding engine (FSDP casts parameters through its ``MixedPrecisionPolicy``,
DeepSpeed through its config) mixed precision is autocast: the pass registers
``torch.autocast`` as a forward context (``Applied.forward_contexts``), which the
runtime enters around the root forward (the one mechanism for every pass's forward context, TE's fp8_autocast too) —
the module object, its class and its state_dict keys stay — so that matmuls run in the
low-precision dtype. A forward hook on the root returns floating outputs as fp32 (as
Accelerate's ``convert_outputs_to_fp32`` does) so losses and metrics computed outside the
model keep full precision. fp16 also needs loss scaling: the Runtime's GradScaler scales
the loss in ``rt.backward``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..dtypes import to_torch
from ..errors import BackendUnavailable
from ..plan_spec import AutocastConfig
from ..rewrite.contract import Applied, Decision, Pass, PassContext
from ..rewrite.manager import register_pass

LOW = (torch.bfloat16, torch.float16)


def outputs_to_fp32(obj: Any) -> Any:
    """``obj`` with every bf16/fp16 tensor inside (tuples, lists, dicts, dataclasses such
    as ``CausalLMOutput`` or transformers' ``ModelOutput``) converted to fp32."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.dtype in LOW else obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: outputs_to_fp32(getattr(obj, f.name))
                   for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, Mapping):
        return type(obj)({k: outputs_to_fp32(v) for k, v in obj.items()})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(outputs_to_fp32(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(outputs_to_fp32(v) for v in obj)
    return obj


def _outputs_to_fp32_hook(module: nn.Module, args: Any, out: Any) -> Any:
    return outputs_to_fp32(out)


def autocast_context(device_type: str, dtype: torch.dtype):
    """A forward-context factory (what ``Applied.forward_contexts`` holds) for autocast."""
    return lambda: torch.autocast(device_type, dtype=dtype)


@dataclass(kw_only=True)
class AutocastDecision(Decision):
    """Autocast of the root forward to ``dtype`` on ``device_type`` (unknown in a dry run)."""

    dtype: str
    device_type: str


@register_pass("mixed_precision", config=AutocastConfig,
               after=("casting", "fp8", "tensor_parallel", "context_parallel", "checkpointing",
                      "compile"),
               before=("fsdp", "ddp", "deepspeed"))
class MixedPrecision(Pass):
    """``torch.autocast`` around the root forward when no engine casts parameters (the
    plan holds an ``AutocastConfig`` exactly then: ``plan.who_casts``)."""

    def check(self, ctx: PassContext) -> AutocastDecision:
        cfg, env = ctx.cfg, ctx.env
        if not env.dry_run and not torch.amp.is_autocast_available(env.device.type):
            raise BackendUnavailable(
                f"mixed_precision={cfg.dtype!r}: torch.autocast is not available "
                f"on device {env.device.type!r}; use mixed_precision='no'")
        device_type = "<device>" if env.dry_run else env.device.type
        notes = [f"root forward under torch.autocast({device_type!r}, {to_torch(cfg.dtype)}); "
                 "floating outputs returned as fp32"]
        if cfg.dtype == "fp16":
            notes.append("fp16: rt.backward scales the loss with the runtime's GradScaler")
        return AutocastDecision(modules=[""], notes=notes, dtype=cfg.dtype,
                                device_type=device_type,
                                details={"dtype": cfg.dtype, "device_type": device_type})

    def apply(self, model: nn.Module, decision: AutocastDecision, ctx: PassContext) -> Applied:
        model.register_forward_hook(_outputs_to_fp32_hook)
        context = autocast_context(decision.device_type, to_torch(decision.dtype))
        return Applied(self.preview(decision, ctx), forward_contexts=[context])
