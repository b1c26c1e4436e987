"""Pipeline runtime: this rank's stages, torch's schedule, and one training micro-step.

``carve_parts`` cuts this rank's stages out of the model (``overdrive/stages.py`` does
the surgery); every part runs the model's own ``forward`` through ``StageIO``, which
hands it the current micro-batch of the batch ``rt.forward_backward`` was given. A
part's output is the activation after its last block; the last stage's is the loss
(``output.loss``, or ``loss_fn(output, micro_batch)``), so the schedule's loss function
only scales it. torch's ``PipelineStage`` runs each part; the stage subclass below tells
``StageIO`` which micro-batch a forward is for.

Inside ``rt.accumulate`` the micro-steps before the syncing one skip the stages' gradient
reduction at the schedule's end (torch's ``perform_reduce_grad``: FSDP's reduce-scatter),
as FSDP's own ``set_requires_gradient_sync(False)`` does without pp.

Losses are the mean over micro-batches (the single-process loss when every micro-batch
holds the same number of tokens), broadcast from the rank of the last stage so every
pipeline rank returns the same float. Gradients are the mean too: the schedule does not
rescale them (``scale_grads=False``); each micro-batch's loss is divided by the number of
micro-batches (and ``grad_accum``) before its backward.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ..errors import OverdriveError, PlanError
from ..stages import StageLayout, carve_stage
from ..plan_spec import SCHEDULE_CLASSES, SINGLE_STAGE_SCHEDULES, Plan

LossFn = Callable[[Any, Any], torch.Tensor] | None


# --------------------------------------------------------------------------- batches


def call_args(batch: Any) -> tuple[tuple, dict]:
    """How the loop would call the model: dict → ``model(**b)``, tensor → ``model(b)``,
    tuple/list → ``model(*b)``."""
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    raise OverdriveError(
        f"batch of type {type(batch).__name__} is not valid for rt.forward_backward / "
        "rt.evaluate; hand it a dict (model(**batch)), a tensor (model(batch)) or a tuple "
        "(model(*batch))")


def loss_of(output: Any, batch: Any, loss_fn: LossFn) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(output, batch)
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if not isinstance(loss, torch.Tensor):
        raise OverdriveError(
            f"the model's output ({type(output).__name__}) has no .loss; include the labels "
            "in the batch (transformers style) or pass loss_fn=lambda output, batch: ...")
    return loss


def batch_rows(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.ndim else None
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(
        batch, (tuple, list)) else ()
    for v in values:
        rows = batch_rows(v)
        if rows is not None:
            return rows
    return None


def split_batch(batch: Any, n: int, rows: int) -> list[Any]:
    """``batch`` cut into ``n`` equal micro-batches along dim 0 (tensors with ``rows``
    rows; everything else is handed to every micro-batch as is)."""
    if isinstance(batch, torch.Tensor) and batch.ndim and batch.shape[0] == rows:
        return list(batch.chunk(n))
    if isinstance(batch, dict):
        cols = {k: split_batch(v, n, rows) for k, v in batch.items()}
        out = []
        for i in range(n):
            piece = batch.copy()  # a BatchEncoding stays one
            for k in batch:
                piece[k] = cols[k][i]
            out.append(piece)
        return out
    if isinstance(batch, (tuple, list)):
        cols = [split_batch(v, n, rows) for v in batch]
        if hasattr(batch, "_fields"):  # namedtuple
            return [type(batch)(*(c[i] for c in cols)) for i in range(n)]
        return [type(batch)(c[i] for c in cols) for i in range(n)]
    return [batch] * n


def hidden_of(output: Any) -> torch.Tensor:
    """The activation a non-last stage sends on: its output tensor (``.logits`` of a
    model output, whose head is an identity there)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise OverdriveError(
        f"a pipeline stage's model output ({type(output).__name__}) holds no tensor to send "
        "to the next stage; the model should return a tensor, a tuple or an object with "
        ".logits")


# --------------------------------------------------------------------------- per step


@dataclass
class MicroBatches:
    """The micro-batches of the step being run, shared by this rank's stages."""

    calls: list[tuple[tuple, dict]]  # model(*args, **kwargs) of each micro-batch
    trimmed: list[tuple[tuple, dict]]  # the same without labels (stages before the last)
    batches: list[Any]  # each micro-batch as the user's loss_fn sees it
    loss_fn: LossFn
    losses: list[torch.Tensor] = field(default_factory=list)


@dataclass(eq=False)
class StageIO:
    """What a stage's forward reads and writes besides its activation."""

    stage: int
    is_first: bool
    is_last: bool
    step: MicroBatches | None = None  # None outside rt.forward_backward / rt.evaluate
    current: int | None = None  # the micro-batch being run (None: torch's shape inference)
    received: torch.Tensor | None = None  # the activation StageInput hands the model

    def run(self, forward: Callable, received: tuple) -> torch.Tensor:
        step = self.step
        if step is None:
            raise PlanError(
                "rt.model(...) cannot be called under parallel.pp > 1: each rank holds only "
                "its pipeline stages; call loss = rt.forward_backward(batch) to train and "
                "rt.evaluate(batch) for the loss without gradients")
        i = self.current if self.current is not None else 0
        args, kwargs = step.calls[i] if self.is_last else step.trimmed[i]
        self.received = None if self.is_first else received[0]
        try:
            out = forward(*args, **kwargs)
        finally:
            self.received = None
        if not self.is_last:
            return hidden_of(out)
        loss = loss_of(out, step.batches[i], step.loss_fn)
        if self.current is not None:
            step.losses.append(loss.detach().float().reshape(()))
        return loss.reshape(1)


def _without_labels(forward: Callable, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call without a ``labels`` argument: stages before the last must not compute
    a loss on activations."""
    if "labels" in kwargs:
        return args, {k: v for k, v in kwargs.items() if k != "labels"}
    try:
        bound = inspect.signature(forward).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return args, kwargs
    if "labels" not in bound.arguments:
        return args, kwargs
    bound.arguments.pop("labels")
    return bound.args, bound.kwargs


def _stage_forward(self: nn.Module, *received: Any, **_: Any) -> torch.Tensor:
    return self._overdrive_stage_io.run(self._overdrive_model_forward, received)


def _refuse_call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return StageIO(-1, False, False).run(None, ())


def _refuse_outside_schedule(module: nn.Module, args: Any) -> None:
    """Forward pre-hook, registered before any pass adds its own (fsdp's unshard):
    ``rt.model(...)`` is refused before anything runs."""
    if module._overdrive_stage_io.step is None:
        _refuse_call(module)


# --------------------------------------------------------------------------- parts


@dataclass(eq=False)
class StagePart:
    stage: int
    module: nn.Module
    io: StageIO
    blocks: tuple[str, ...]


def carve_parts(model: nn.Module, layout: StageLayout, pp_rank: int
                ) -> tuple[list[StagePart], nn.Module]:
    """This rank's stage parts, and the module holding all of them (``rt.model``: the
    state dict, optimizer and checkpoints see it; calling it is refused).

    With one stage per rank both are ``model`` itself, carved in place. With more, each
    stage is a shallow clone sharing the blocks, and so is the holder of them all."""
    stages = layout.stages_of(pp_rank)
    parts = []
    last = layout.num_stages - 1
    ios = [StageIO(s, s == 0, s == last) for s in stages]
    if len(stages) > 1:
        clones = [carve_stage(model, layout, [s], io) for s, io in zip(stages, ios)]
        holder = carve_stage(model, layout, stages, None, in_place=True)
        holder.forward = types.MethodType(_refuse_call, holder)
    else:
        holder = carve_stage(model, layout, stages, ios[0], in_place=True)
        clones = [holder]
    for s, io, module in zip(stages, ios, clones):
        module._overdrive_stage_io = io
        module._overdrive_model_forward = module.forward  # the model's own, bound
        module._overdrive_layout = layout
        module._overdrive_stage_index = s
        module.forward = types.MethodType(_stage_forward, module)
        module.register_forward_pre_hook(_refuse_outside_schedule)
        parts.append(StagePart(s, module, io, layout.stage_blocks(s)))
    holder._overdrive_layout = layout
    return parts, holder


def refresh_holder(holder: nn.Module, parts: list[StagePart]) -> None:
    """After the passes ran on each part: the holder's own (root-path) tensors point at
    the first part's, which a meta model's materialisation replaced."""
    if len(parts) == 1 and parts[0].module is holder:
        return
    src = dict(parts[0].module.named_modules(remove_duplicate=False))
    for name, mod in holder.named_modules(remove_duplicate=False):
        other = src.get(name)
        if other is None or other is mod:
            continue
        for key in list(mod._parameters):
            if key in other._parameters:
                mod._parameters[key] = other._parameters[key]
        for key in list(mod._buffers):
            if key in other._buffers:
                mod._buffers[key] = other._buffers[key]


# --------------------------------------------------------------------------- runner


def _stage_class():
    from torch.distributed.pipelining import PipelineStage

    class Stage(PipelineStage):
        """torch's stage, telling its ``StageIO`` which micro-batch each forward is."""

        def __init__(self, io: StageIO, syncing: Callable[[], bool], *args: Any,
                     **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._io = io
            self._syncing = syncing

        def perform_reduce_grad(self, grad_scale_factor: int):
            """torch reduces (FSDP: reduce-scatters) the stage's gradients after the
            schedule's last backward; inside ``rt.accumulate`` only the micro-step that
            syncs does: before it, FSDP keeps accumulating the unsharded gradients."""
            if self._syncing():
                super().perform_reduce_grad(grad_scale_factor)

        def forward_one_chunk(self, fwd_chunk_id: int, *args: Any, **kwargs: Any):
            self._io.current = fwd_chunk_id
            try:
                return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)
            finally:
                self._io.current = None

    return Stage


class PipelineRunner:
    """This rank's stages under one torch schedule; what ``rt.forward_backward`` runs."""

    def __init__(self, parts: list[StagePart], layout: StageLayout, plan: Plan, env,
                 param_order: list[str]):
        from torch.distributed.pipelining import schedules

        pipe = plan.pipeline
        self.parts, self.layout = parts, layout
        self.param_order = param_order  # the whole model's parameter names, in order
        self.microbatches = pipe.microbatches or layout.num_stages
        self.grad_accum = plan.grad_accum
        self.device = env.device
        self.group = env.submesh("pp").get_group()
        self.last_rank = layout.rank_of(layout.num_stages - 1)  # rank in the pp group
        self._scale = 1.0
        self.sync = True  # rt.accumulate: False on the micro-steps before the sync one
        Stage = _stage_class()
        self.stages = [Stage(p.io, self._syncing, p.module, p.stage, layout.num_stages, env.device,
                             group=self.group) for p in parts]
        cls = getattr(schedules, SCHEDULE_CLASSES[pipe.schedule])
        target = self.stages[0] if pipe.schedule in SINGLE_STAGE_SCHEDULES else self.stages
        self.schedule = cls(target, n_microbatches=self.microbatches,
                            loss_fn=self._scaled_loss, scale_grads=False)

    def _syncing(self) -> bool:
        return self.sync

    def set_gradient_sync(self, sync: bool) -> None:
        """``rt.accumulate``'s switch: whether this micro-step's schedule reduces the
        gradients over the data ranks at its end."""
        self.sync = sync

    def _scaled_loss(self, output: torch.Tensor, target: Any) -> torch.Tensor:
        return output.sum() * self._scale

    # -- steps ------------------------------------------------------------------------
    def forward_backward(self, batch: Any, loss_fn: LossFn) -> torch.Tensor:
        idx = self._begin(batch, loss_fn)
        self._scale = 1.0 / (self.microbatches * self.grad_accum)
        try:
            self.schedule.step(idx, target=idx, return_outputs=False)
            return self._mean_loss()
        finally:
            self._end()

    def evaluate(self, batch: Any, loss_fn: LossFn) -> torch.Tensor:
        idx = self._begin(batch, loss_fn)
        try:
            with torch.no_grad():
                self.schedule.eval(idx, target=idx)
            return self._mean_loss()
        finally:
            self._end()

    def _begin(self, batch: Any, loss_fn: LossFn) -> torch.Tensor:
        rows = batch_rows(batch)
        n = self.microbatches
        if rows is None or rows % n:
            raise PlanError(
                f"pipeline.microbatches={n} does not divide the local batch of {rows} rows; "
                f"use a batch size that is a multiple of {n}, or set "
                "od.Pipeline(microbatches=...) to a divisor of the batch size")
        pieces = split_batch(batch, n, rows)
        calls = [call_args(b) for b in pieces]
        fwd = self.parts[0].module._overdrive_model_forward
        trimmed = [_without_labels(fwd, a, k) for a, k in calls]
        step = MicroBatches(calls, trimmed, pieces, loss_fn)
        for p in self.parts:
            p.io.step = step
        self._step = step
        return torch.arange(rows, device=self.device)

    def _end(self) -> None:
        for p in self.parts:
            p.io.step, p.io.current, p.io.received = None, None, None

    def _mean_loss(self) -> torch.Tensor:
        losses = self._step.losses
        if losses:
            value = torch.stack(losses).mean().to(self.device)
        else:
            value = torch.zeros((), device=self.device)
        dist.broadcast(value, group=self.group, group_src=self.last_rank)
        return value

    # -- gradients --------------------------------------------------------------------
    def global_norm(self, local: torch.Tensor, norm_type: float) -> torch.Tensor:
        """The norm over every stage from this rank's stages' norm."""
        t = local.detach().clone().float()
        if norm_type == float("inf"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            return t.to(local.dtype)
        t = t ** norm_type
        dist.all_reduce(t, group=self.group)
        return (t ** (1.0 / norm_type)).to(local.dtype)

    # -- weights ----------------------------------------------------------------------
    def gathered_weights(self, holder: nn.Module, is_main: bool) -> list[tuple[str, Any]]:
        """Every stage's weights as full CPU tensors on the pp group's first rank, in the
        model's parameter order (buffers after); ``[]`` elsewhere. Every rank calls."""
        from .export import _unique_entries, full_cpu

        local = {k: full_cpu(t) for k, t in _unique_entries(holder)}
        parts: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(parts, local, group=self.group)
        if not is_main:
            return []
        merged: dict[str, Any] = {}
        for p in parts:
            for k, v in p.items():
                merged.setdefault(k, v)
        rank = {n: i for i, n in enumerate(self.param_order)}
        return sorted(merged.items(), key=lambda kv: rank.get(kv[0], len(rank)))
