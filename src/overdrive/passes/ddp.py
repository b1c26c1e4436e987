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

from torch import nn

from ..errors import PlanError
from ..rewrite.graph import ModuleGraph
from ..rewrite.manager import Pass, register_pass
from ..rewrite.plan import Plan
from ..rewrite.report import PassRecord
from .buffers import keep_buffers_in_sync, plain_buffers
from .ddp_comm import check_comm_hook, register_comm_hook


def on_meta(model: nn.Module) -> bool:
    """Any parameter or buffer on the meta device (replicate broadcasts both)."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def frozen(model: nn.Module) -> bool:
    """No parameter requires grad (a distillation teacher, an EMA copy): nothing to
    all-reduce — and torch's DDP refuses such a module at its first forward."""
    return not any(p.requires_grad for p in model.parameters())


FROZEN_NOTE = "no parameter requires grad (inference): nothing to all-reduce, ddp is a no-op"


def sync_size(plan: Plan) -> int:
    par = plan.parallel
    return par.dp_replicate * par.dp_shard * par.cp


# After compile (blocks are compiled before they are wrapped). The name is only given
# when compile is registered: passes/__init__.py imports it first; the manager refuses
# an order relative to an unknown pass.
@register_pass("ddp", after=("compile", "mixed_precision"))
class DDPPass(Pass):
    replaces_parameters = False  # replicate keeps the parameter objects

    def enabled(self, plan: Plan) -> bool:
        return plan.ddp is not None

    def check(self, graph: ModuleGraph, plan: Plan, env) -> None:
        tp = plan.parallel.tp
        if tp > 1 and sync_size(plan) > 1:
            raise PlanError(
                f"ddp with parallel.tp={tp} and {sync_size(plan)} data-parallel ranks is not "
                "supported: DDP cannot keep tensor-parallel (DTensor) parameters, its "
                "optimizer would step stale copies; use fsdp=od.FSDP() for dp × tp (the "
                "'fsdp+tp' preset, which is also what a tp plan naming no engine gets)")
        if not env.dry_run and on_meta(graph.model):
            raise PlanError(
                "ddp: the model is on the meta device, and every ddp rank holds the whole "
                "model; build it on a real device, or use fsdp, which materialises it sharded")
        if plan.ddp.comm_hook is not None:
            check_comm_hook(plan, env)

    def preview(self, graph: ModuleGraph, plan: Plan, env) -> PassRecord:
        rec = self.record(modules=[""], dry_run=True)
        if sync_size(plan) == 1:
            rec.note("one data-parallel rank: nothing to all-reduce, ddp is a no-op")
        elif frozen(graph.model):
            rec.note(FROZEN_NOTE)
        return rec

    def apply(self, model: nn.Module, graph: ModuleGraph, plan: Plan, env) -> PassRecord:
        rec = self.record()
        if sync_size(plan) == 1:
            rec.note("one data-parallel rank: nothing to all-reduce, ddp is a no-op")
            return rec
        if frozen(model):
            rec.note(FROZEN_NOTE)
            return rec
        from torch.distributed._composable import replicate

        cfg = plan.ddp
        kwargs = dict(bucket_cap_mb=cfg.bucket_cap_mb,
                      find_unused_parameters=cfg.find_unused_parameters,
                      static_graph=cfg.static_graph)
        if env.device.type != "cpu":
            kwargs["device_id"] = env.device
        env.ensure_process_group()  # every rank is a data rank (dp × cp; tp is refused)
        replicate(model, **kwargs)
        env.set_gradient_sync = model.set_requires_gradient_sync
        if cfg.broadcast_buffers and keep_buffers_in_sync(model, plain_buffers(model)):
            rec.note("buffers broadcast from rank 0 with each training forward "
                     "(broadcast_buffers=True, torch DDP's default)")
        if cfg.comm_hook is not None:
            rec.details.update(register_comm_hook(model, plan))
        rec.touch("")
        rec.details["sync_size"] = sync_size(plan)
        return rec
