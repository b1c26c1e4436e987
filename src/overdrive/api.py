"""``accelerate`` and ``inspect``: the one call, and its dry run.

The flow (docs/architecture.md): resolve the plan → inspect the model → order the
passes → check every pass → (only then) mutate: place the model, apply the passes,
build the optimizer.
"""

from __future__ import annotations

import logging
import os
import types
import weakref
from typing import Any, Callable

import torch
from torch import nn

from . import passes as _builtin_passes  # noqa: F401  (registers the built-in passes)
from .errors import PlanError
from .rewrite.estimate import estimate_memory
from .rewrite.graph import ModuleGraph
from .rewrite.manager import PassManager
from .plan_spec import Plan, derive_grad_accum, resolve_plan
from .rewrite.report import Report, StepLayout
from .rewrite.trace import meta_copy, trace_model
from .runtime.grad import raw_optimizer
from .runtime.runtime import Runtime
from .runtime.state import make_env
from .runtime.tracking import resolve_tracking

log = logging.getLogger("overdrive")

OptimizerArg = torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None


def accelerate(model: nn.Module, plan: Plan | dict | str | None = None, *,
               optimizer: OptimizerArg = None, scheduler: Any = None,
               trackers: Any = ("jsonl",), run_dir: Any = None, run_config: dict | None = None,
               log_every: int = 1, timeout: float | None = None,
               desync_timeout: float | None = 60.0,
               weights: str | os.PathLike | None = None, batch: Any = None) -> Runtime:
    """Transform ``model`` in place according to ``plan`` and return a ``Runtime``.

    ``optimizer`` may be an optimizer or a factory ``params -> optimizer``; a factory is
    called after sharding, which FSDP/TP need. ``scheduler`` may be a scheduler or a
    factory ``optimizer -> scheduler``. ``weights``: a safetensors file or export
    directory streamed into the (typically meta-device) model one tensor at a time, each
    straight to its final place; its keys are checked before anything is touched.

    ``trackers`` (built-in names "jsonl", "tensorboard", "wandb", "mlflow", "trackio", or
    ``od.Tracker`` instances; ``()`` for none) receive ``rt.log`` rows and, every
    ``log_every`` optimizer steps (0: never), the built-in step metrics, on rank 0, in
    ``run_dir`` (default ``runs/<timestamp>``, created at the first row); ``run_config``
    and the resolved plan are logged once.

    ``timeout``: the process-group timeout in seconds when overdrive starts the process
    group (default: OVERDRIVE_PG_TIMEOUT, else 600 — generous, for first-step compiles).
    ``desync_timeout``: seconds ranks may stand still at different places before every
    rank raises ``DesyncError`` (docs/reliability.md); None turns that check off (the
    ledger still compares the collectives the ranks issued).

    ``plan="auto"`` asks the planner (``od.plan``) for the best layout of this world and
    device memory for ``batch=(global_batch_size, seq_len)``; ``rt.report.choice`` says
    which it chose and why (its micro-batch per rank and gradient accumulation).
    """
    if not isinstance(model, nn.Module):
        raise PlanError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_seconds("timeout", timeout)
    _check_seconds("desync_timeout", desync_timeout)
    tracking = resolve_tracking(trackers, run_dir, run_config, log_every)
    model_name = type(model).__name__  # fully_shard / replicate rename the class
    choice = None
    if isinstance(plan, str) and plan == "auto":
        from .planner.auto import auto_plan

        plan, choice = auto_plan(model, batch)
    plan = resolve_plan(plan)
    source = _weights_source(model, weights)
    if source is None:
        _check_meta_device(model, plan)
    elif plan.fsdp is not None or plan.deepspeed is not None:
        raise PlanError(f"weights= streams a checkpoint into the model on one process; with "
                        f"{plan.data_parallel} load it after sharding instead "
                        "(od.load_weights(rt.model, path))")
    plan, env = make_env(plan, timeout=timeout)
    env.weights = source
    graph = ModuleGraph(model, plan.blocks)
    graph.blocks()  # resolves a user override now: a bad glob is refused before mutation
    manager = PassManager(plan)
    _check_not_transformed(model, manager.names(), plan)
    _check_optimizer_arg(optimizer, manager, plan)
    param_names = {id(p): n for n, p in model.named_parameters()}
    # set before check: an engine pass checks that it has an optimizer
    env.optimizer_factory = _optimizer_factory(optimizer, param_names, model)
    decisions = manager.check_all(graph, env)
    flops_model = _flops_model(model, tracking, env)

    # ---- nothing above this line mutates the model ----
    if source is not None and plan.offload is None:
        _stream_weights(model, source, env)
    _place_model(model, plan, env)
    pipeline = None
    user_model = model
    if plan.parallel.pp > 1:
        model, records, handoff, pipeline = _apply_pipeline(model, graph, manager, plan, env)
    else:
        records, handoff = manager.apply_all(model, graph, env, decisions)
        _enter_forward_contexts(model, handoff.forward_contexts)
    _APPLIED[user_model] = (*_APPLIED.get(user_model, ()), *manager.names())

    opt = handoff.optimizer  # an engine may have built it
    if opt is None and env.optimizer_factory is not None:
        opt = env.optimizer_factory(model)
    sched = scheduler
    if callable(scheduler) and not _is_scheduler(scheduler):
        # torch schedulers need a torch optimizer: under DeepSpeed, the one ZeRO steps
        sched = scheduler(raw_optimizer(opt))
    report = Report(records, model=model_name, plan=plan.to_dict(),
                    blocks=graph.blocks(), steps=step_layout(plan, env),
                    choice=choice)
    rt = Runtime(model, plan=plan, report=report, env=env, optimizer=opt, scheduler=sched,
                 handoff=handoff, tracking=tracking, flops_model=flops_model,
                 pipeline=pipeline, desync_timeout=desync_timeout)
    if rt.is_main:
        if choice is not None:
            log.info("overdrive: plan='auto' chose %s (%s)", choice["chosen"], choice["why"])
        log.info("overdrive: applied %s", " → ".join(report.names()) or "no passes")
    return rt


def inspect(model: nn.Module, plan: Plan | dict | str | None = None, *,
            world_size: int | None = None, example_inputs: Any = None) -> Report:
    """What ``accelerate`` would do, worked out on a meta-device copy; touches nothing.

    Runs plan resolution, block detection, ordering and every pass's ``check`` against a
    ``world_size``-rank world, and estimates per-rank memory. With ``example_inputs`` the
    model is also traced on meta (FLOPs, activation bytes), and budget checkpointing
    chooses its blocks from that trace.
    """
    if not isinstance(model, nn.Module):
        raise PlanError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    plan = resolve_plan(plan)
    plan, env = make_env(plan, world_size=world_size, dry_run=True)
    manager = PassManager(plan)
    _check_not_transformed(model, manager.names(), plan)
    on_meta = all(p.device.type == "meta" for p in model.parameters())
    env.model_on_meta = on_meta
    shadow = model if on_meta else meta_copy(model)
    graph = ModuleGraph(shadow, plan.blocks)
    graph.blocks()
    env.example_inputs = example_inputs  # a pass may trace with them (budgeted recompute)
    env.model_on_meta = on_meta  # the shadow is on meta; the user's model may not be
    steps = step_layout(plan, env, example_inputs)  # a batch that does not divide: refused
    decisions = manager.check_all(graph, env)
    records = manager.preview_all(graph, env, decisions)
    trace = trace_model(shadow, example_inputs) if example_inputs is not None else None
    effects = [d.memory for d in decisions if d.memory is not None]
    kept = None
    if trace is not None and any(e.selective for e in effects):
        from .planner.selective import selective_kept  # what the policy keeps, on meta

        kept = selective_kept(shadow, example_inputs, graph.blocks())[0]
    memory = estimate_memory(graph, effects, env.world_size, trace=trace,
                             selective_kept=kept)
    _stage_memory(graph, effects, records)
    return Report(records, model=type(model).__name__, plan=plan.to_dict(),
                  blocks=graph.blocks(), memory=memory, dry_run=True, trace=trace,
                  steps=steps)


# --------------------------------------------------------------------------- helpers


def step_layout(plan: Plan, env, example_inputs: Any = None) -> StepLayout:
    """The step's layout for the report. With ``global_batch_size``, grad_accum is
    derived from ``example_inputs``' rows (od.inspect) or left to rt.shard."""
    from .runtime.pipeline import batch_rows

    batch = batch_rows(example_inputs) if example_inputs is not None else None
    accum: int | None = plan.grad_accum
    if plan.global_batch_size is not None:
        accum = None if batch is None else \
            derive_grad_accum(plan.global_batch_size, batch, env.dp_size)
    return StepLayout(dp_size=env.dp_size, cp=plan.parallel.cp, grad_accum=accum,
                      global_batch_size=plan.global_batch_size, batch_size=batch,
                      loss_normalization=plan.loss_normalization)


def _stage_memory(graph: ModuleGraph, effects: list, records: list) -> None:
    """Each pipeline stage's parameter, gradient and optimizer bytes per rank, after every
    pass (a record listing ``stages`` with their ``modules``)."""
    from .rewrite.estimate import memory_within

    for rec in records:
        for st in rec.details.get("stages", ()):
            if isinstance(st, dict) and "modules" in st:
                held = memory_within(graph, effects, st["modules"])
                st["memory"] = {k: int(held[k]) for k in ("parameters", "gradients",
                                                           "optimizer")}


def _check_seconds(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise PlanError(f"{name}={value!r} is not valid; give a number of seconds > 0 "
                        f"(e.g. {name}=60){' or None to turn the check off' if name == 'desync_timeout' else ''}")


def _apply_pipeline(model: nn.Module, graph: ModuleGraph, manager: PassManager, plan: Plan,
                    env):
    """Carve this rank's stages, decide and apply every pass on each stage as its own
    model part (a stage's decisions are its own: its blocks, its fsdp units), and build the
    schedule. Returns the module holding the stages (``rt.model``), the first part's pass
    records, the parts' hand-offs as one and the runner."""
    from .rewrite.contract import Handoff
    from .runtime.pipeline import PipelineRunner, carve_parts, refresh_holder
    from .runtime.state import mesh_coordinates
    from .stages import check_pipeline

    layout = check_pipeline(graph, plan)
    pp_rank = mesh_coordinates(env.rank, plan.parallel)["pp"]
    order = [n for n, _ in model.named_parameters()]
    parts, holder = carve_parts(model, layout, pp_rank)
    records, handoff = None, Handoff()
    for part in parts:
        part_graph = ModuleGraph(part.module, part.blocks)
        recs, part_handoff = manager.apply_all(part.module, part_graph, env,
                                               manager.check_all(part_graph, env))
        _enter_forward_contexts(part.module, part_handoff.forward_contexts)
        if records is None:
            records, handoff = recs, part_handoff
        else:  # hooks run on rt.model (the holder): each once
            handoff.post_step_hooks += [h for h in part_handoff.post_step_hooks
                                        if h not in handoff.post_step_hooks]
    refresh_holder(holder, parts)
    runner = PipelineRunner(parts, layout, plan, env, order)
    handoff.gradient_sync = runner.set_gradient_sync  # the stages reduce their own grads
    return holder, records, handoff, runner


def _flops_model(model: nn.Module, tracking, env) -> nn.Module | None:
    """A meta copy of the untransformed model for the step metrics' FLOP count (TFLOP/s,
    MFU), made only where they are logged and the device's peak is known."""
    from .runtime.peaks import peak_flops

    if not tracking.log_every or peak_flops(env.device) is None:
        return None
    try:
        return meta_copy(model)
    except Exception as err:  # noqa: BLE001 — MFU is optional
        log.info("overdrive: no TFLOP/s or MFU (the model cannot be copied to meta: %s)", err)
        return None


def _check_optimizer_arg(optimizer: OptimizerArg, manager: PassManager, plan: Plan) -> None:
    if optimizer is None:
        return
    instance = isinstance(optimizer, torch.optim.Optimizer)
    if not (instance or callable(optimizer)):
        raise PlanError(
            f"optimizer={optimizer!r} is not valid; pass a torch.optim.Optimizer or a "
            "factory such as lambda params: torch.optim.AdamW(params, lr=3e-4)"
        )
    if plan.offload is not None:
        raise PlanError(
            "offload is an inference pass: accelerate() got an optimizer with an offload "
            "plan; drop the optimizer (offloaded weights are not trained)")
    if plan.casting is not None:
        raise PlanError(
            "casting is an inference pass: accelerate() got an optimizer with a casting plan; "
            "drop the optimizer, or use fp8 / mixed_precision for training"
        )
    replacing = [p.name for p in manager.passes if p.replaces_parameters]
    if instance and optimizer.state and replacing:
        raise PlanError(
            f"optimizer already holds state, but pass(es) {', '.join(replacing)} replace "
            "the parameters; pass a factory (lambda params: ...) so the optimizer is "
            "built after sharding"
        )


def _optimizer_factory(optimizer: OptimizerArg, param_names: dict[int, str],
                       model: nn.Module) -> Callable[[nn.Module], Any] | None:
    """A function ``model -> optimizer`` to run after the passes.

    A factory is called with the transformed parameters. An optimizer instance is rebuilt
    over the transformed parameters, matched by name (passes keep the names), so param
    groups and hyper-parameters survive sharding.
    """
    if optimizer is None:
        return None
    if not isinstance(optimizer, torch.optim.Optimizer):
        return lambda m: optimizer(m.parameters())
    groups = [[param_names[id(p)] for p in g["params"]] for g in optimizer.param_groups]

    def rebuild(m: nn.Module):
        current = dict(m.named_parameters(remove_duplicate=False))
        if all(current.get(n) is p for g, names in zip(optimizer.param_groups, groups)
               for n, p in zip(names, g["params"])):
            return optimizer  # the passes kept every parameter object
        new_groups = []
        for g, names in zip(optimizer.param_groups, groups):
            ng = {k: v for k, v in g.items() if k != "params"}
            # under pp a rank holds only its stages' parameters
            ng["params"] = [current[n] for n in names if n in current]
            new_groups.append(ng)
        return type(optimizer)(new_groups, **optimizer.defaults)

    return rebuild


# the passes od.accelerate applied to each live model, in order (nothing is set on the model)
_APPLIED: "weakref.WeakKeyDictionary[nn.Module, tuple[str, ...]]" = weakref.WeakKeyDictionary()


def _check_not_transformed(model: nn.Module, names: list[str], plan: Plan) -> None:
    """Refuse to transform a model a second time in the same way: a second autocast
    wrapper recurses, a second fully_shard trips torch's asserts, a DDP wrapper wrapped
    again renames every key (``module.``)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        raise PlanError(
            f"model: {type(model.module).__name__} is wrapped in torch's "
            "DistributedDataParallel; pass the module it wraps (model.module) to "
            "od.accelerate: the plan's ddp / fsdp does the wrapping, and the state_dict "
            "keys stay the model's own (no 'module.' prefix)")
    done = _APPLIED.get(model, ())
    again = [n for n in names if n in done]
    if again:
        raise PlanError(
            f"model: od.accelerate already applied {', '.join(done)} to this "
            f"{type(model).__name__}; the plan would apply {', '.join(again)} a second time. "
            "Call od.accelerate once per model with the whole plan (its passes compose), "
            "or build a fresh model")
    if plan.data_parallel is not None:
        from torch.distributed.fsdp import FSDPModule

        sharded = [n or "<root>" for n, m in model.named_modules() if isinstance(m, FSDPModule)]
        if sharded:
            raise PlanError(
                f"model: fully_shard was already applied to {', '.join(sharded[:3])}; the "
                f"plan's {plan.data_parallel} would shard or wrap it again. Pass the model "
                "before fully_shard and let the plan shard it, or drop the plan's "
                f"{plan.data_parallel}")


def _check_meta_device(model: nn.Module, plan: Plan) -> None:
    """A model on the meta device has no weights: only fsdp materialises it (shard by
    shard, after sharding). A partly-meta model is refused even then: ``to_empty`` would
    wipe the real weights it holds."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    meta = [n for n, t in tensors if t.device.type == "meta"]
    if not meta:
        return
    real = [n for n, t in tensors if t.device.type != "meta"]
    if real:
        raise PlanError(
            f"model: {len(meta)} tensor(s) are on the meta device ({', '.join(meta[:3])}) "
            f"and {len(real)} are not ({', '.join(real[:3])}); materialising the meta ones "
            "would wipe the real weights. Build the whole model on the meta device (for "
            "fsdp) or on a real one, or fill it first with od.load_weights(model, path)")
    if plan.fsdp is None:
        raise PlanError(
            f"model: {type(model).__name__} is on the meta device (no weights) and the plan "
            f"has no fsdp, the only pass that materialises a meta model (shard by shard); "
            "build the model on a real device, use an fsdp plan (e.g. 'fsdp'), or load its "
            "weights first with od.load_weights(model, path)")


def _weights_source(model: nn.Module, weights):
    """``weights=``'s entries, matched against the model's keys (refused before any
    mutation: CheckpointMismatch lists missing / unexpected / differently shaped keys)."""
    if weights is None:
        return None
    from .passes.offload import meta_buffer_problems
    from .runtime.weights import check_keys, open_weights
    from .safetensors_io import WeightsSource

    bad = meta_buffer_problems(model)
    if bad:
        raise PlanError(f"weights=: buffer(s) {', '.join(bad[:4])} are on the meta device and "
                        "in no checkpoint (non-persistent); build the model with its buffers "
                        "on a real device (only parameters on meta)")
    entries = open_weights(weights)
    chosen = check_keys(model, entries, f"in {os.fspath(weights)}")
    return WeightsSource(os.fspath(weights), entries, chosen)


def _stream_weights(model: nn.Module, source, env) -> None:
    """No offload: every tensor straight to the runtime's device, one at a time."""
    from .passes.offload import place
    from .passes.offload_placement import DeviceMap, tensor_devices

    device = str(env.device)
    entries = {"": device}
    dmap = DeviceMap(entries, tensor_devices(model, entries), execution_device=device)
    place(model, dmap, None, None, source)


def _place_model(model: nn.Module, plan: Plan, env) -> None:
    """Move a real (non-meta) model to the runtime's device; meta models stay for fsdp."""
    if plan.offload is not None:
        return  # the offload pass places every tensor itself
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    if any(d.type == "meta" for d in devices):
        return  # materialised by the fsdp pass after sharding
    if devices and devices != {env.device}:
        model.to(env.device)


def _call_in(contexts: list, fn: Callable, args: tuple, kwargs: dict) -> Any:
    """``fn(*args, **kwargs)`` inside every context, first outermost (plain nested
    ``with``: torch.compile traces it, e.g. a full-model compile under autocast)."""
    if not contexts:
        return fn(*args, **kwargs)
    with contexts[0]():
        return _call_in(contexts[1:], fn, args, kwargs)


def _forward_in_contexts(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return _call_in(self._overdrive_forward_contexts, self._overdrive_context_forward,
                    args, kwargs)


def _enter_forward_contexts(model: nn.Module, contexts: list) -> None:
    """Run the root forward inside the contexts the passes handed on (TE's fp8_autocast,
    torch.autocast), in pass order.

    The forward is wrapped in place on the instance: class, hooks and keys stay.
    """
    if not contexts:
        return
    if "_overdrive_context_forward" in model.__dict__:  # an earlier od.accelerate wrapped it
        contexts = [*model._overdrive_forward_contexts, *contexts]  # theirs stay outermost
    else:
        model._overdrive_context_forward = model.forward
    model._overdrive_forward_contexts = contexts
    model.forward = types.MethodType(_forward_in_contexts, model)


def _is_scheduler(obj: Any) -> bool:
    return hasattr(obj, "step") and hasattr(obj, "state_dict")
