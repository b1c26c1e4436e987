"""DDP communication hooks (``od.DDP(comm_hook=...)``): torch's own, registered on the
``replicate``-d model.

- ``"fp16"`` / ``"bf16"``: ``default_hooks.fp16_compress_hook`` / ``bf16_compress_hook`` —
  each bucket is cast down, all-reduced, cast back: half the bytes on the wire.
- ``"powersgd"``: ``powerSGD_hook.powerSGD_hook`` with a ``PowerSGDState`` of rank
  ``powersgd_rank``, plain all-reduce for the first ``powersgd_start_iter`` steps, error
  feedback and warm start on (torch's defaults). Its error-feedback memory lives in the
  hook state, per rank; it is not part of ``rt.save``.

``check_comm_hook`` refuses what the process group cannot do (bf16 anywhere but NCCL >=
2.10 and XCCL) before anything is touched.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..errors import PlanError
from ..plan import Plan


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
    """Register the plan's hook on a ``replicate``-d model; returns the record's details."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    cfg = plan.ddp
    if cfg.comm_hook == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return {"comm_hook": "fp16"}
    if cfg.comm_hook == "bf16":
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
        return {"comm_hook": "bf16"}
    state = powerSGD_hook.PowerSGDState(
        process_group=None, matrix_approximation_rank=cfg.powersgd_rank,
        start_powerSGD_iter=cfg.powersgd_start_iter)
    model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    return {"comm_hook": "powersgd", "powersgd_rank": cfg.powersgd_rank,
            "powersgd_start_iter": cfg.powersgd_start_iter}
