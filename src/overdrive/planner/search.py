"""``od.plan``: every layout of the world, checked by the real passes, costed, ranked.

1. Trace the model once on meta (one sequence of ``seq_len``, in the compute dtype): the
   FLOPs and saved activations the cost model scales by the micro-batch.
2. Enumerate pp × dp_replicate × dp_shard × cp × tp = world_size (powers of the factors
   that divide it; tp within a node), × recompute mode × micro-batch (the rest is gradient
   accumulation, the global batch stays) × fp8 (where the hardware has it) × FSDP's
   reshard_after_forward, within ``allow``.
3. Drop layouts whose parameter + gradient + optimizer bytes alone (16 bytes a parameter,
   over the ranks that shard them) exceed the memory: a lower bound, no check needed.
4. Run every pass's ``check`` once per mesh layout (cached), cost every variant from those
   decisions, then re-check each variant that would be proposed with its own exact plan —
   a layout some pass refuses is never proposed.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from ..errors import BackendUnavailable, PlanError
from ..rewrite.report import human_bytes
from ..rewrite.graph import ModuleGraph
from ..rewrite.trace import meta_copy
from .candidate import Candidate, Candidates
from .checked import Checked, check_plan
from .comm import step_comm
from .cost import step_time
from .hardware import Hardware, parse_bytes, resolve_hardware
from .layout import AC_MODES, Layout
from .memory import estimate_step_memory
from .selective import selective_kept
from .stack_trace import stack_trace

OBJECTIVES = ("throughput", "memory")
ALLOW_KEYS = ("pp", "dp_replicate", "dp_shard", "cp", "tp", "ac", "micro_batch", "fp8",
              "reshard_after_forward", "engine", "schedule")
SCHEDULES = ("1f1b", "gpipe")  # the pipeline schedules searched (planner/pipeline.py)


class Model:
    """The meta model, its trace and the check cache a search shares."""

    def __init__(self, model: nn.Module, seq_len: int, compute_dtype: torch.dtype | None,
                 example=None):
        on_meta = all(p.device.type == "meta" for p in model.parameters())
        self.shadow = model if on_meta else meta_copy(model)
        ids = example if example is not None else torch.zeros(1, seq_len, dtype=torch.long,
                                                               device="meta")
        args = ids if isinstance(ids, (tuple, dict)) else (ids, ids)
        self.graph = ModuleGraph(self.shadow)
        self.trace = stack_trace(self.shadow, args, self.graph.blocks(), compute_dtype)
        self.checks: dict[Any, Checked | Exception] = {}
        self._args, self._dtype, self._selective = args, compute_dtype, None

    def selective(self) -> tuple[dict[str, int], dict[str, int]]:
        """Per block: bytes kept and matmul FLOPs recomputed under selective recompute."""
        if self._selective is None:
            self._selective = selective_kept(self.shadow, self._args, self.graph.blocks(),
                                             self._dtype)
        return self._selective

    def check(self, layout: Layout, world_size: int) -> Checked:
        key = layout
        if key not in self.checks:
            try:
                self.checks[key] = check_plan(self.shadow, layout.to_plan(), world_size,
                                              graph=self.graph)
            except (PlanError, BackendUnavailable) as err:
                self.checks[key] = err
        got = self.checks[key]
        if isinstance(got, Exception):
            raise got
        return got


def evaluate(model: Model, layout: Layout, hw: Hardware, memory_per_rank: int,
             global_batch: int, seq_len: int, checked: Checked | None = None,
             pp_rank: int | None = None) -> Candidate:
    """The predicted memory, bytes and time of ``layout`` (checked unless given). Under
    pp the memory and bytes are pipeline rank ``pp_rank``'s (None: the busiest rank's)."""
    checked = checked or model.check(layout, layout.world_size)
    trace = model.trace
    compute_size = 2 if layout.mixed_precision != "no" else 4
    dtype = "bf16" if layout.mixed_precision != "no" else "fp32"
    kept, recompute = model.selective() if layout.ac == "selective" else (None, None)
    mem = estimate_step_memory(checked, trace, layout, hw.foreach_optimizer, pp_rank, kept)
    comm = step_comm(checked, trace, layout, compute_size, pp_rank)
    params_on_rank = mem.optimizer // 8  # two fp32 states per trainable parameter
    t = step_time(checked, trace, layout, comm, hw, dtype, params_on_rank, recompute)
    step = t.step
    tokens = global_batch * seq_len
    model_flops = (trace.forward_flops + trace.backward_flops) * global_batch
    mfu = model_flops / step / (layout.world_size * hw.peak("bf16"))
    why = t.dominant
    if mem.total > 0.9 * memory_per_rank:
        why = f"memory: {human_bytes(mem.total)} of {human_bytes(memory_per_rank)}"
    return Candidate(plan=checked.plan, layout=layout, memory=mem, comm=comm.as_dict(),
                     bubble=t.bubble, step_seconds=step, tokens_per_second=tokens / step,
                     mfu=mfu, why=why, world_size=layout.world_size,
                     memory_per_rank=memory_per_rank,
                     details={"compute_s": t.compute, "overlapped_comm_s": t.overlapped,
                              "exposed_comm_s": t.exposed, "optimizer_s": t.optimizer,
                              "comm_calls": {f"{k}/{d}": n for (k, d), n in comm.calls.items()}})


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _allowed(allow: dict, key: str, values: Iterable) -> list:
    values = list(values)
    if key not in allow:
        return values
    given = allow[key]
    given = given if isinstance(given, (tuple, list, set, frozenset)) else (given,)
    return [v for v in values if v in given]


def mesh_layouts(world_size: int, hw: Hardware, seq_len: int, global_batch: int,
                 allow: dict) -> list[tuple[int, int, int, int, int]]:
    out = []
    divs = _divisors(world_size)
    for pp in _allowed(allow, "pp", divs):
        for tp in _allowed(allow, "tp", [d for d in divs if d <= hw.gpus_per_node]):
            for cp in _allowed(allow, "cp", divs):
                rest = world_size // (pp * tp * cp) if world_size % (pp * tp * cp) == 0 else 0
                if not rest or seq_len % (2 * cp):
                    continue
                for rep in _allowed(allow, "dp_replicate", _divisors(rest)):
                    shard = rest // rep
                    if shard not in _allowed(allow, "dp_shard", [shard]):
                        continue
                    if global_batch % (rep * shard):
                        continue
                    if pp > 1 and cp > 1:
                        continue  # the plan refuses cp with pp
                    out.append((pp, rep, shard, cp, tp))
    return out


def _engines(pp, rep, shard, cp, tp) -> list[str | None]:
    if rep * shard * cp == 1 and pp == 1:
        return ["fsdp"] if tp > 1 else [None]
    if shard == 1 and cp == 1 and tp == 1 and pp == 1:
        return ["ddp", "fsdp"]
    return ["fsdp"]


def _lower_bound(full_params: int, elsize: int, sizes, engine) -> float:
    pp, rep, shard, cp, tp = sizes
    states = full_params / elsize * (4 + 4 + 8)  # fp32 parameters, gradients, AdamW
    split = pp * tp * (shard * cp if engine == "fsdp" else 1)
    return states / split


def variants(sizes, engine, local_batch: int, hw: Hardware, allow: dict,
             mixed_precision: str) -> list[Layout]:
    pp, rep, shard, cp, tp = sizes
    out = []
    mbs_choices = [d for d in _divisors(local_batch) if d & (d - 1) == 0 or d == local_batch]
    for mbs in _allowed(allow, "micro_batch", mbs_choices):
        accum = local_batch // mbs
        if pp > 1 and accum < pp:
            continue  # fewer micro-batches than stages: most ranks idle
        for ac in _allowed(allow, "ac", AC_MODES):
            for fp8 in _allowed(allow, "fp8", (False, True) if hw.has_fp8 else (False,)):
                for raf in _allowed(allow, "reshard_after_forward",
                                    (True, False) if engine == "fsdp" else (True,)):
                    for schedule in (_allowed(allow, "schedule", SCHEDULES) if pp > 1
                                     else ("1f1b",)):
                        out.append(Layout(pp=pp, dp_replicate=rep, dp_shard=shard, cp=cp,
                                          tp=tp, engine=engine, ac=ac, micro_batch=mbs,
                                          grad_accum=accum, fp8=fp8,
                                          reshard_after_forward=raf,
                                          mixed_precision=mixed_precision,
                                          schedule=schedule))
    return out


def _batch(batch: Any) -> tuple[int, int, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in batch):
        return batch[0], batch[1], None
    if isinstance(batch, torch.Tensor) and batch.ndim == 2:
        return batch.shape[0], batch.shape[1], batch[:1].to("meta")
    raise PlanError(f"batch={batch!r} is not valid; give (global_batch_size, seq_len) such as "
                    "(512, 4096), or example token ids of shape (global_batch, seq_len)")


def plan(model: nn.Module, *, world_size: int, memory_per_rank: int | str | None = None,
         batch: Any, hardware: str | Hardware = "h100", objective: str = "throughput",
         allow: dict | None = None, top: int = 5) -> Candidates:
    """The ``top`` layouts of ``model`` for ``world_size`` ranks that fit
    ``memory_per_rank`` (default: the hardware's), best first (fastest for
    ``objective="throughput"``, smallest for ``"memory"``). Raises PlanError naming the
    smallest memory that would fit and the closest candidate when none fits."""
    if not isinstance(model, nn.Module):
        raise PlanError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise PlanError(f"world_size={world_size!r} is not valid; use an integer >= 1")
    if objective not in OBJECTIVES:
        raise PlanError(f"objective={objective!r} is not valid; choose one of {OBJECTIVES}")
    if not isinstance(top, int) or top < 1:
        raise PlanError(f"top={top!r} is not valid; use an integer >= 1")
    allow = dict(allow or {})
    unknown = [k for k in allow if k not in ALLOW_KEYS]
    if unknown:
        raise PlanError(f"allow: unknown key {unknown[0]!r}; valid keys: {', '.join(ALLOW_KEYS)}")
    hw = resolve_hardware(hardware)
    if memory_per_rank is None:
        if hw.memory is None:
            raise PlanError(f"memory_per_rank is required for hardware {hw.name!r}")
        memory_per_rank = hw.memory
    budget = parse_bytes(memory_per_rank)
    global_batch, seq_len, example = _batch(batch)
    mixed = "no" if "bf16" not in hw.flops else "bf16"
    meta = Model(model, seq_len, torch.bfloat16 if mixed == "bf16" else None, example)
    kwargs = dict(world_size=world_size, budget=budget, global_batch=global_batch,
                  seq_len=seq_len, hw=hw, objective=objective, top=top, mixed_precision=mixed)
    # first without pipeline and context parallelism (unless allow names them): they pay
    # a bubble / K-V traffic and are worth it only when nothing else fits
    first = {"pp": (1,), "cp": (1,), **allow}
    if first != allow:
        try:
            return search(meta, allow=first, **kwargs)
        except PlanError:
            pass
    return search(meta, allow=allow, **kwargs)


def search(meta: Model, *, world_size: int, budget: int, global_batch: int, seq_len: int,
           hw: Hardware, objective: str, allow: dict, top: int, mixed_precision: str,
           prune: bool = True) -> Candidates:
    params = list(meta.shadow.parameters())
    full = sum(p.numel() * p.element_size() for p in params)
    elsize = params[0].element_size() if params else 4
    scored: list[Candidate] = []
    refusals: list[str] = []
    for sizes in mesh_layouts(world_size, hw, seq_len, global_batch, allow):
        pp, rep, shard, cp, tp = sizes
        local = global_batch // (rep * shard)
        for engine in _allowed(allow, "engine", _engines(*sizes)):
            if prune and _lower_bound(full, elsize, sizes, engine) > budget:
                continue
            base = Layout(pp=pp, dp_replicate=rep, dp_shard=shard, cp=cp, tp=tp,
                          engine=engine, micro_batch=1, grad_accum=max(pp, 1),
                          mixed_precision=mixed_precision)
            try:
                checked = meta.check(base, world_size)
            except (PlanError, BackendUnavailable) as err:
                refusals.append(f"{base.name()}: {err}")
                continue
            rough: dict[str, Checked] = {}
            for lay in variants(sizes, engine, local, hw, allow, mixed_precision):
                if lay.ac not in rough:
                    rough[lay.ac] = _rough(checked, lay)
                scored.append(evaluate(meta, lay, hw, budget, global_batch, seq_len,
                                       checked=rough[lay.ac]))
    if not scored and prune:  # all beyond the bound: cost them to name the closest
        return search(meta, world_size=world_size, budget=budget, global_batch=global_batch,
                      seq_len=seq_len, hw=hw, objective=objective, allow=allow, top=top,
                      mixed_precision=mixed_precision, prune=False)
    if not scored:
        raise PlanError(_nothing_checked(world_size, refusals))
    key = (lambda c: c.step_seconds) if objective == "throughput" else (
        lambda c: c.memory.total)
    fitting = sorted((c for c in scored if c.fits), key=key)
    chosen = Candidates()
    for rough in fitting:  # re-check each proposal with its exact plan
        try:
            exact = evaluate(meta, rough.layout, hw, budget, global_batch, seq_len)
        except (PlanError, BackendUnavailable):
            continue
        if exact.fits:
            chosen.append(exact)
        if len(chosen) >= top:
            break
    if not chosen:
        raise PlanError(_nothing_fits(scored, budget, world_size))
    chosen.sort(key=key)
    return chosen


def _rough(base: Checked, layout: Layout) -> Checked:
    """The base layout's decisions standing in for a variant's while ranking (the
    variant is checked for real before it is proposed): the recomputed blocks follow
    the variant's mode."""
    from dataclasses import replace as dc_replace

    from ..passes.checkpointing import CheckpointingDecision
    from ..rewrite.contract import MemoryEffect

    if layout.ac == "none":
        return base
    blocks = base.graph.blocks()
    chosen = blocks[1::2] if layout.ac == "every" else blocks  # full / selective: every block
    d = CheckpointingDecision(modules=list(chosen), mode=layout.ac,
                              selective=layout.ac == "selective",
                              memory=MemoryEffect(checkpointed=tuple(chosen),
                                                  selective=layout.ac == "selective"))
    return dc_replace(base, decisions=[*base.decisions, d])


def _nothing_checked(world_size: int, refusals: list[str]) -> str:
    first = refusals[0] if refusals else "every layout exceeds the memory before any check"
    return (f"od.plan: no layout of {world_size} ranks passes the passes' checks "
            f"({len(refusals)} refused); first refusal: {first}")


def _nothing_fits(scored: list[Candidate], budget: int, world_size: int) -> str:
    best = min(scored, key=lambda c: c.memory.total)
    return (f"od.plan: no layout of {world_size} ranks fits memory_per_rank="
            f"{human_bytes(budget)}; the smallest that would fit needs "
            f"{human_bytes(best.memory.total)} per rank: {best.layout.name()} "
            f"(micro-batch {best.layout.micro_batch}) — {human_bytes(best.memory.parameters)} "
            f"parameters, {human_bytes(best.memory.optimizer)} optimizer, "
            f"{human_bytes(best.memory.activations)} activations. Give more memory per "
            "rank, more ranks, a smaller batch or sequence, or widen allow=")
