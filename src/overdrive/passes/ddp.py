"""ddp: plain data parallel — every rank keeps the whole model, gradients are averaged.

Uses torch's composable ``replicate`` (``torch.distributed._composable.replicate``):
it runs DistributedDataParallel's reducer from forward hooks on the *user's module*
instead of wrapping it, so the root object stays the same, ``state_dict`` keys gain no
``module.`` prefix, and ``set_requires_gradient_sync`` gives the no_sync switch that
gradient accumulation needs. Gradients are averaged over ``dp_cp``: context-parallel
ranks hold the same weights and their losses cover different tokens.

One data rank (a single process, or tp/cp using every rank) leaves nothing to average, and
so does a model with no parameter that requires grad (a frozen distillation teacher
prepared with ``optimizer=None``; torch's DDP would refuse it at the first forward): the
pass is then a no-op that says so in its record.

Tensor parallelism with more than one data rank is refused (torchtitan refuses DDP with
>1-D meshes too): ``replicate`` localises DTensor parameters and re-creates them as new
``nn.Parameter`` objects after every forward, so the optimizer and DDP's reducer would
keep stepping the first ones — training silently stalls. fsdp composes with tp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import PlanError
from ..plan_spec import DDP
from ..rewrite.contract import Applied, Decision, EngineCollectives, Pass, PassContext
from ..rewrite.manager import register_pass
from .buffers import keep_buffers_in_sync, plain_buffers
from .ddp_comm import check_comm_hook, register_comm_hook, sync_summary


def on_meta(model: nn.Module) -> bool:
    """Any parameter or buffer on the meta device (replicate broadcasts both)."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def frozen(model: nn.Module) -> bool:
    """No parameter requires grad (a distillation teacher, an EMA copy): nothing to
    all-reduce — and torch's DDP refuses such a module at its first forward."""
    return not any(p.requires_grad for p in model.parameters())


FROZEN_NOTE = "no parameter requires grad (inference): nothing to all-reduce, ddp is a no-op"


def sync_size(parallel) -> int:
    return parallel.dp_replicate * parallel.dp_shard * parallel.cp


@dataclass(kw_only=True)
class DDPDecision(Decision):
    """``replicate`` the root over ``sync_size`` ranks, or nothing when that is one."""

    sync_size: int
    kwargs: dict[str, Any]
    comm_hook: str | None  # registered after replicate (ddp_comm.py)


# After compile (blocks are compiled before they are wrapped).
@register_pass("ddp", config=DDP, after=("compile", "mixed_precision"))
class DDPPass(Pass):
    replaces_parameters = False  # replicate keeps the parameter objects

    def check(self, ctx: PassContext) -> DDPDecision:
        graph, plan, env, cfg = ctx.graph, ctx.plan, ctx.env, ctx.cfg
        tp, n = plan.parallel.tp, sync_size(plan.parallel)
        if tp > 1 and n > 1:
            raise PlanError(
                f"ddp with parallel.tp={tp} and {n} data-parallel ranks is not "
                "supported: DDP cannot keep tensor-parallel (DTensor) parameters, its "
                "optimizer would step stale copies; use fsdp=od.FSDP() for dp × tp (the "
                "'fsdp+tp' preset, which is also what a tp plan naming no engine gets)")
        if not env.dry_run and on_meta(graph.model):
            raise PlanError(
                "ddp: the model is on the meta device, and every ddp rank holds the whole "
                "model; build it on a real device, or use fsdp, which materialises it sharded")
        if cfg.comm_hook is not None:
            check_comm_hook(plan, env)
        kwargs = dict(bucket_cap_mb=cfg.bucket_cap_mb,
                      find_unused_parameters=cfg.find_unused_parameters,
                      static_graph=cfg.static_graph)
        if n == 1:
            return DDPDecision(sync_size=1, kwargs=kwargs, comm_hook=None, notes=[
                "one data-parallel rank: nothing to all-reduce, ddp is a no-op"])
        if frozen(graph.model):
            return DDPDecision(sync_size=n, kwargs=kwargs, comm_hook=None, notes=[FROZEN_NOTE])
        return DDPDecision(modules=[""], sync_size=n, kwargs=kwargs, comm_hook=cfg.comm_hook,
                           details={"sync_size": n})

    def apply(self, model: nn.Module, decision: DDPDecision, ctx: PassContext) -> Applied:
        rec = self.preview(decision, ctx)
        if not decision.modules:  # one data rank, or nothing trainable
            return Applied(rec)
        from torch.distributed._composable import replicate

        kwargs = dict(decision.kwargs)
        if ctx.env.device.type != "cpu":
            kwargs["device_id"] = ctx.env.device
        ctx.env.ensure_process_group()  # every rank is a data rank (dp × cp; tp is refused)
        replicate(model, **kwargs)
        if ctx.cfg.broadcast_buffers and keep_buffers_in_sync(model, plain_buffers(model)):
            rec.note("buffers broadcast from rank 0 with each training forward "
                     "(broadcast_buffers=True, torch DDP's default)")
        details = register_comm_hook(model, ctx.plan)
        if decision.comm_hook is not None:
            rec.details.update(details)
        return Applied(rec, gradient_sync=model.set_requires_gradient_sync,
                       engine_collectives=EngineCollectives(sync_summary(model, ctx.plan)))
