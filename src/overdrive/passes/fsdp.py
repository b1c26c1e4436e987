"""fsdp: FSDP2 ``fully_shard`` per block, then the leftover modules, then the root.

The torchtitan recipe, found generically from the module graph: every repeated block is
its own unit; modules with parameters defined *before* the blocks (embeddings) are one
unit each; those defined *after* them (final norm + lm_head) share one unit, since they
run back to back; the root takes whatever is left. Sharding is over ``dp_shard_cp``, or
the 2-D ``(dp_replicate, dp_shard_cp)`` mesh for HSDP; DTensor parameters from the
tensor-parallel pass compose with it (2-D dp × tp).

A model built on the meta device is sharded first and only then materialised
(``to_empty`` + ``init_weights``/``reset_parameters``): no rank ever holds it whole.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..dtypes import to_torch, torch_name
from ..errors import PlanError
from ..plan_spec import FSDP, Plan
from ..rewrite.contract import (Applied, CollectiveTap, Decision, EngineCollectives,
                                MemoryEffect, Pass, PassContext, SyncCollective)
from ..rewrite.graph import ModuleGraph, parameter_owners
from ..rewrite.manager import register_pass
from .buffers import keep_buffers_in_sync, running_stat_buffers


def param_dtype_name(plan: Plan) -> str | None:
    """FSDP.param_dtype when set, else the plan's mixed precision (FSDP casts it:
    ``who_casts``)."""
    return plan.fsdp.param_dtype or torch_name(plan.mixed_precision)


def shard_units(graph: ModuleGraph) -> tuple[list[list[str]], list[str]]:
    """The groups ``fully_shard`` wraps before the root, in order, and notes.

    Blocks one by one; leftover modules with parameters before the first block one by
    one; those after the blocks together. Modules that hold blocks, and modules sharing
    (tied) parameters with another unit, are left to the root.
    """
    blocks = graph.blocks()
    notes: list[str] = []
    if not blocks:
        return [], ["no repeated blocks found: the whole model is one FSDP unit (root)"]
    order = {n: i for i, n in enumerate(graph.names())}
    first_block = min(order[b] for b in blocks)
    leftovers = _outermost(
        [n for n in graph.non_block_leaves() if n and not _holds_block(n, blocks)])
    tied = _tied(graph, leftovers)
    if tied:
        notes.append(f"{', '.join(sorted(tied))} share parameters: left to the root unit")
    leftovers = [n for n in leftovers if n not in tied]
    before = [[n] for n in leftovers if order[n] < first_block]
    after = [n for n in leftovers if order[n] > first_block]
    return before + [[b] for b in blocks] + ([after] if after else []), notes


def _holds_block(name: str, blocks: list[str]) -> bool:
    return any(_within(b, name) and b != name for b in blocks)


def _outermost(names: list[str]) -> list[str]:
    chosen = set(names)
    return [n for n in names if not any(
        n.startswith(other + ".") for other in chosen if other != n)]


def _tied(graph: ModuleGraph, units: list[str]) -> set[str]:
    """Units holding a parameter that some module outside the unit also holds (tied
    embeddings: ``lm_head.weight is embed_tokens.weight``)."""
    owners = parameter_owners(graph.model)
    tied = set()
    for unit in units:
        for p in graph.module(unit).parameters():
            if not all(_within(n, unit) for n in owners[id(p)]):
                tied.add(unit)
    return tied


def _within(name: str, unit: str) -> bool:
    return name == unit or name.startswith(unit + ".")


def _on_meta(model: nn.Module) -> bool:
    return any(t.device.type == "meta" for t in (*model.parameters(), *model.buffers()))


def _missing_initialisers(model: nn.Module) -> list[str]:
    """Modules owning tensors that nothing would initialise after ``to_empty``."""
    if callable(getattr(model, "init_weights", None)):
        return []
    return [name or "<root>" for name, m in model.named_modules()
            if (any(True for _ in m.parameters(recurse=False))
                or any(True for _ in m.buffers(recurse=False)))
            and not callable(getattr(m, "reset_parameters", None))]


def _uninitialisable(missing: list[str]) -> str:
    shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
    return (f"fsdp: the model is on the meta device and {shown} cannot be initialised after "
            "sharding (no init_weights() on the model, no reset_parameters() on those "
            "modules); add model.init_weights() or build the model on a real device")


@contextlib.contextmanager
def _shard_rng(env):
    """Random init of sharded parameters. Where DTensor's RNG works (cuda-like devices,
    which have ``set_rng_state``) its offset tracker makes every shard the slice of the
    full tensor's init. Elsewhere (CPU) every rank would draw from the same stream —
    equal shards, duplicated heads that never diverge — so ``PlacementSeeds`` seeds each
    draw by where the tensor's shard sits instead."""
    if hasattr(getattr(torch, env.device.type, None), "set_rng_state"):
        yield
        return
    with torch.random.fork_rng(devices=[]), PlacementSeeds(_agreed_seed()):
        yield


def _agreed_seed() -> int:
    """Rank 0's initial seed, so replicas agree even if ranks were seeded differently."""
    import torch.distributed as dist

    seed = torch.tensor([torch.initial_seed() % 2**62])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(seed, src=0)
    return int(seed.item())


def _mix(*values: int) -> int:
    h = 0
    for v in values:
        h = (h * 1_000_003 + v) % 2**62
    return h


class PlacementSeeds(TorchFunctionMode):
    """CPU stand-in for DTensor's RNG tracker during init. Before each op on a DTensor
    the CPU generator is seeded from (base seed, op count, this rank's coordinate on every
    mesh dim the tensor is not replicated on — Shard, or FSDP's _StridedShard): shards
    over any dim (dp_shard, tp) differ, replicas (HSDP's dp_replicate, tp peers of an
    unsharded weight) draw the same numbers. After the op it is reseeded from (base,
    count) alone, so draws on plain tensors stay in step across ranks. Every rank runs the
    same init code, so the counts agree. (A generator passed explicitly to an init call
    is the caller's: it is not reseeded.)"""

    def __init__(self, base: int):
        super().__init__()
        self.base, self.count = base, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        kwargs = kwargs or {}
        target = args[0] if args else None
        if not isinstance(target, DTensor):
            return func(*args, **kwargs)
        self.count += 1
        coords = target.device_mesh.get_coordinate() or []
        where = [0 if p.is_replicate() else c + 1 for p, c in zip(target.placements, coords)]
        torch.default_generator.manual_seed(_mix(self.base, self.count, *where))
        try:
            return func(*args, **kwargs)
        finally:
            torch.default_generator.manual_seed(_mix(self.base, self.count))


@dataclass(kw_only=True)
class FSDPDecision(Decision):
    """``units``: the module groups ``fully_shard`` wraps, in order, then the root;
    ``mesh_dims``: the mesh it shards over; ``materialise``: the model is on meta."""

    units: list[list[str]]
    mesh_dims: tuple[str, ...]
    param_dtype: str | None
    reduce_dtype: str | None
    reshard_after_forward: bool
    offload: bool
    materialise: bool


def decide(graph: ModuleGraph, plan: Plan) -> FSDPDecision:
    cfg, par = plan.fsdp, plan.parallel
    units, notes = shard_units(graph)
    hsdp = par.dp_replicate > 1
    shard, rep = par.dp_shard * par.cp, par.dp_replicate
    memory_notes = (f"HSDP: sharded over {shard} ranks, replicated {rep}×",) if hsdp else ()
    decision = FSDPDecision(
        modules=[n for u in units for n in u] + [""], notes=notes,
        units=[list(u) for u in units] + [[""]],
        mesh_dims=("dp_replicate", "dp_shard_cp") if hsdp else ("dp_shard_cp",),
        param_dtype=param_dtype_name(plan), reduce_dtype=cfg.reduce_dtype,
        reshard_after_forward=cfg.reshard_after_forward, offload=cfg.offload,
        materialise=_on_meta(graph.model),
        memory=MemoryEffect(parameters=shard, gradients=shard, optimizer=shard,
                            notes=memory_notes))
    decision.details.update(units=decision.units, shard_size=shard, replicate_size=rep,
                            param_dtype=decision.param_dtype, reduce_dtype=cfg.reduce_dtype,
                            reshard_after_forward=cfg.reshard_after_forward,
                            offload=cfg.offload)
    return decision


# After compile (blocks are compiled before they are wrapped).
@register_pass("fsdp", config=FSDP, after=("compile", "mixed_precision"))
class FSDPPass(Pass):
    replaces_parameters = True

    def check(self, ctx: PassContext) -> FSDPDecision:
        graph, plan, env, cfg = ctx.graph, ctx.plan, ctx.env, ctx.cfg
        if cfg.offload and plan.parallel.tp > 1:
            raise PlanError(
                f"fsdp.offload=True with parallel.tp={plan.parallel.tp} is not supported "
                "(FSDP2 CPU offload of tensor-parallel DTensors); set offload=False or tp=1")
        if cfg.offload and plan.fp8 is not None:
            raise PlanError(
                "fsdp.offload=True with fp8 is not supported (float8 all-gather needs the "
                "parameters on the accelerator); set offload=False or drop fp8")
        if cfg.offload and not env.dry_run and env.device.type == "cpu":
            raise PlanError(
                "fsdp.offload=True is not valid on a CPU device: parameters already live in "
                "host memory; set offload=False (offload is for cuda/xpu runs)")
        # od.inspect plans for the real run: whether it can initialise is a note there
        missing = _missing_initialisers(graph.model) if _on_meta(graph.model) and (
            not env.dry_run or env.model_on_meta) else []
        if missing and not env.dry_run:
            raise PlanError(_uninitialisable(missing))
        decision = decide(graph, plan)
        if missing:
            decision.notes.append(
                f"od.accelerate will refuse this meta model: {_uninitialisable(missing)}")
        return decision

    def apply(self, model: nn.Module, decision: FSDPDecision, ctx: PassContext) -> Applied:
        from torch.distributed.fsdp import fully_shard

        mesh = ctx.env.submesh(*decision.mesh_dims)
        kwargs = dict(mesh=mesh, reshard_after_forward=decision.reshard_after_forward,
                      mp_policy=_mp_policy(decision),
                      offload_policy=_offload_policy(decision, ctx.env))
        for unit in decision.units[:-1]:  # the last unit is the root
            modules = [ctx.graph.module(n) for n in unit]
            fully_shard(modules if len(modules) > 1 else modules[0], **kwargs)
        fully_shard(model, **kwargs)
        rec = self.preview(decision, ctx)
        if decision.materialise:
            rec.note(_materialise(model, ctx.env))
        if keep_buffers_in_sync(model, running_stat_buffers(model)):
            rec.note("running stats (BatchNorm) broadcast from rank 0 before each training "
                     "forward: every rank holds and saves the same ones")
        rec.details["mesh"] = dict(zip(mesh.mesh_dim_names, mesh.shape))
        # under pp each pipeline rank shards other stages' units: their summaries differ
        # by design, so the ledger (which compares neighbours) gets none
        engine = None if ctx.plan.parallel.pp > 1 else _engine_collectives(model, decision)
        return Applied(rec, gradient_sync=model.set_requires_gradient_sync,
                       engine_collectives=engine)


def _engine_collectives(model: nn.Module, decision: FSDPDecision) -> EngineCollectives:
    """FSDP2's all-gathers and reduce-scatters as the ledger sees them: one entry per
    forward of the root (a pre-hook on it, a Python call beside FSDP's own per-unit
    hooks) and one per backward (noted by rt.backward) — every unit's collectives
    summarised, computed once here."""
    params = [p for p in model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)  # global sizes: the same on every rank
    own = str(params[0].dtype).removeprefix("torch.") if params else ""
    param = torch_name(decision.param_dtype) or own
    reduce = torch_name(decision.reduce_dtype) or param
    count = len(decision.units)
    units = f"{count} unit{'s' if count != 1 else ''}"
    gather = SyncCollective("all_gather", param, numel, f"fsdp forward ({units})")
    tap = CollectiveTap(gather)
    model.register_forward_pre_hook(tap)
    regather = SyncCollective("all_gather", param, numel,
                              f"fsdp backward, no gradient sync ({units})")
    return EngineCollectives(
        synced_backward=SyncCollective("all_gather+reduce_scatter", reduce, numel,
                                       f"fsdp backward ({units})"),
        unsynced_backward=regather if decision.reshard_after_forward else None,
        forward_tap=tap)


def _mp_policy(decision: FSDPDecision):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=to_torch(decision.param_dtype),
                                reduce_dtype=to_torch(decision.reduce_dtype))


def _offload_policy(decision: FSDPDecision, env):
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    if not decision.offload:
        return OffloadPolicy()
    return CPUOffloadPolicy(pin_memory=env.device.type == "cuda")


def _materialise(model: nn.Module, env) -> str:
    """Allocate this rank's shards on the device, then initialise them in place."""
    model.to_empty(device=env.device)
    with torch.no_grad(), _shard_rng(env):
        if callable(getattr(model, "init_weights", None)):
            model.init_weights()
            return "materialised from the meta device: to_empty + model.init_weights()"
        for m in model.modules():
            if callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
    return "materialised from the meta device: to_empty + reset_parameters() per module"

