"""DDP communication hooks (``od.DDP(comm_hook=...)``): torch's own, registered on the
``replicate``-d model.

- ``"fp16"`` / ``"bf16"``: ``default_hooks.fp16_compress_hook`` / ``bf16_compress_hook`` —
  each bucket is cast down, all-reduced, cast back: half the bytes on the wire.
- ``"powersgd"``: ``powerSGD_hook.powerSGD_hook`` with a ``PowerSGDState`` of rank
  ``powersgd_rank``, plain all-reduce for the first ``powersgd_start_iter`` steps, error
  feedback and warm start on (torch's defaults). Its error-feedback memory lives in the
  hook state, per rank; it is not part of ``rt.save``.

With no ``comm_hook`` DDP keeps its C++ built-in all-reduce: no Python runs per bucket.
The collective ledger sees the gradient sync as one entry per synced backward, noted by
the runtime (``sync_summary`` describes it, once).

``check_comm_hook`` refuses what the process group cannot do (bf16 anywhere but NCCL >=
2.10 and XCCL) before anything is touched.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..errors import PlanError
from ..plan_spec import Plan
from ..rewrite.contract import SyncCollective


def check_comm_hook(plan: Plan, env) -> None:
    """bf16 all-reduce exists only on NCCL >= 2.10 (cuda) and XCCL (xpu); torch's DDP
    refuses the hook elsewhere, at the first forward — here it is refused before."""
    if plan.ddp.comm_hook != "bf16" or env.dry_run:
        return
    kind = env.device.type
    if kind == "cuda" and dist.is_nccl_available():
        version = tuple(torch.cuda.nccl.version())
        if version >= (2, 10):
            return
        have = f"NCCL {'.'.join(map(str, version))}"
    elif kind == "xpu" and getattr(dist, "is_xccl_available", lambda: False)():
        return
    else:
        have = f"{env.backend} on {kind}"
    raise PlanError(
        f"ddp.comm_hook='bf16' needs bfloat16 all-reduce (NCCL >= 2.10 on cuda, or XCCL on "
        f"xpu); this run has {have}; use comm_hook='fp16' or 'powersgd'")


def register_comm_hook(model, plan: Plan) -> dict[str, Any]:
    """Register the plan's hook on a ``replicate``-d model; returns the record's details.
    Without one nothing is registered: DDP's C++ all-reduce is the fastest there is."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    cfg = plan.ddp
    details: dict[str, Any] = {"comm_hook": cfg.comm_hook}
    if cfg.comm_hook is None:
        return details
    if cfg.comm_hook == "fp16":
        state, hook = None, default_hooks.fp16_compress_hook
    elif cfg.comm_hook == "bf16":
        state, hook = None, default_hooks.bf16_compress_hook
    else:
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=cfg.powersgd_rank,
            start_powerSGD_iter=cfg.powersgd_start_iter)
        hook = powerSGD_hook.powerSGD_hook
        details.update(powersgd_rank=cfg.powersgd_rank,
                       powersgd_start_iter=cfg.powersgd_start_iter)
    model.register_comm_hook(state, hook)
    return details


def sync_summary(model, plan: Plan) -> SyncCollective:
    """The gradient sync of one backward as one ledger entry: every trainable
    parameter's gradient, all-reduced (in the comm hook's dtype), over its buckets."""
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = {"fp16": "float16", "bf16": "bfloat16"}.get(
        plan.ddp.comm_hook, str(params[0].dtype).removeprefix("torch.") if params else "")
    op = "powersgd all_reduce" if plan.ddp.comm_hook == "powersgd" else "all_reduce"
    return SyncCollective(op=op, dtype=dtype, numel=sum(p.numel() for p in params),
                          where=f"ddp gradient sync ({len(params)} gradients)")
