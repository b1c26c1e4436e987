"""mixed_precision: run the model's forward under ``torch.autocast`` (bf16 / fp16).

Without a sharding engine (FSDP casts parameters through its ``MixedPrecisionPolicy``,
DeepSpeed through its config) mixed precision is autocast: the pass registers
``torch.autocast`` in ``env.forward_contexts``, which the runtime enters around the root
forward (the one mechanism for every pass's forward context, TE's fp8_autocast too) —
the module object, its class and its state_dict keys stay — so that matmuls run in the
low-precision dtype. A forward hook on the root returns floating outputs as fp32 (as
Accelerate's ``convert_outputs_to_fp32`` does) so losses and metrics computed outside the
model keep full precision. fp16 also needs loss scaling: the Runtime's GradScaler scales
the loss in ``rt.backward``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import BackendUnavailable
from ..rewrite.graph import ModuleGraph
from ..rewrite.manager import Pass, register_pass
from ..rewrite.plan import Plan
from ..rewrite.report import PassRecord

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
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
    """A forward-context factory (what ``env.forward_contexts`` holds) for autocast."""
    return lambda: torch.autocast(device_type, dtype=dtype)


@register_pass("mixed_precision",
               after=("casting", "fp8", "tensor_parallel", "context_parallel", "checkpointing",
                      "compile"),
               before=("fsdp", "ddp", "deepspeed"))
class MixedPrecision(Pass):
    """``torch.autocast`` around the root forward when no engine casts parameters."""

    def enabled(self, plan: Plan) -> bool:
        return (plan.mixed_precision != "no" and plan.fsdp is None
                and plan.deepspeed is None)

    def check(self, graph: ModuleGraph, plan: Plan, env: Any) -> None:
        if env.dry_run:
            return  # the real device is unknown
        if not torch.amp.is_autocast_available(env.device.type):
            raise BackendUnavailable(
                f"mixed_precision={plan.mixed_precision!r}: torch.autocast is not available "
                f"on device {env.device.type!r}; use mixed_precision='no'")

    def apply(self, model: nn.Module, graph: ModuleGraph, plan: Plan, env: Any) -> PassRecord:
        env.forward_contexts.append(autocast_context(env.device.type,
                                                     DTYPES[plan.mixed_precision]))
        model.register_forward_hook(_outputs_to_fp32_hook)
        return self._record(plan, env.device.type)

    def preview(self, graph: ModuleGraph, plan: Plan, env: Any) -> PassRecord:
        return self._record(plan, "<device>")

    def _record(self, plan: Plan, device_type: str) -> PassRecord:
        rec = self.record(modules=[""])
        rec.note(f"root forward under torch.autocast({device_type!r}, "
                 f"{DTYPES[plan.mixed_precision]}); floating outputs returned as fp32")
        if plan.mixed_precision == "fp16":
            rec.note("fp16: rt.backward scales the loss with the runtime's GradScaler")
        rec.details.update(dtype=plan.mixed_precision, device_type=device_type)
        return rec
