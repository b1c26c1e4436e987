"""DDP communication hooks (``od.DDP(comm_hook=...)``): torch's own, registered on the
``replicate``-d model.

- ``"fp16"`` / ``"bf16"``: ``default_hooks.fp16_compress_hook`` / ``bf16_compress_hook`` —
  each bucket is cast down, all-reduced, cast back: half the bytes on the wire.
- ``"powersgd"``: ``powerSGD_hook.powerSGD_hook`` with a ``PowerSGDState`` of rank
  ``powersgd_rank``, plain all-reduce for the first ``powersgd_start_iter`` steps, error
  feedback and warm start on (torch's defaults). Its error-feedback memory lives in the
  hook state, per rank; it is not part of ``rt.save``.

Every bucket goes through one registered hook that first reports it to a
``CollectiveTap`` the pass hands on (the runtime's collective ledger notes it, so a rank
whose backward skips a bucket all-reduce is caught at the next optimizer step), then
reduces it with the plan's hook — torch's plain ``allreduce_hook`` when there is none.

``check_comm_hook`` refuses what the process group cannot do (bf16 anywhere but NCCL >=
2.10 and XCCL) before anything is touched.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..errors import PlanError
from ..plan_spec import Plan
from ..rewrite.contract import CollectiveTap


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


def register_comm_hook(model, plan: Plan, tap: CollectiveTap) -> dict[str, Any]:
    """Register the plan's hook (torch's plain all-reduce when it names none) on a
    ``replicate``-d model, each bucket reported to ``tap`` first; returns the record's
    details. DDP takes one hook: the report and the reduction are the same one."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    cfg = plan.ddp
    details: dict[str, Any] = {"comm_hook": cfg.comm_hook}
    if cfg.comm_hook is None:
        state, hook = None, default_hooks.allreduce_hook  # what DDP's built-in does
    elif cfg.comm_hook == "fp16":
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
    model.register_comm_hook(_Reported(tap, state, hook), _reported_hook)
    return details


class _Reported:
    """A comm hook's state with the tap its buckets are reported to."""

    __slots__ = ("tap", "state", "hook")

    def __init__(self, tap: CollectiveTap, state: Any, hook):
        self.tap, self.state, self.hook = tap, state, hook


def _reported_hook(reported: _Reported, bucket):  # DDP refuses a string annotation
    """Report the bucket (op, dtype, shape, its index) to the tap, then reduce it with the
    plan's hook. Runs when the bucket is ready in backward, on every rank that syncs."""
    reported.tap("all_reduce", bucket.buffer(), f"ddp bucket {bucket.index()}")
    return reported.hook(reported.state, bucket)
