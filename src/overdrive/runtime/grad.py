"""Gradient accumulation, the optimizer/scheduler wrappers, gradient clipping.

``Plan(grad_accum=N)``: inside ``with rt.accumulate():`` micro-steps before the N-th (and
not the last batch of a sharded loader) turn the data-parallel gradient sync off through
the gradient-sync switch the data-parallel pass handed on; ``rt.optimizer.step()`` and ``rt.scheduler.step()`` do nothing
on those micro-steps. Which engine owns the step (a DeepSpeed engine, an fp16 GradScaler,
a plain optimizer) is decided once, when the wrapper is built.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import OverdriveError


class GradSync:
    """The accumulation counter; ``rt.accumulate()`` returns it as a context manager."""

    __slots__ = ("rt", "n", "micro", "sync", "_set_sync", "_synced", "_ds_boundary")

    def __init__(self, rt, n: int):
        self.rt, self.n, self.micro, self.sync = rt, n, 0, True
        self._set_sync = rt._handoff.gradient_sync
        self._synced = True  # what the data-parallel engine currently does
        engine = rt._engine
        self._ds_boundary = getattr(engine, "set_gradient_accumulation_boundary", None)

    def __enter__(self):
        if self.n == 1:
            return self
        self.micro += 1
        ledger = self.rt._ledger
        if ledger is not None:  # the micro-steps of a step are part of its ledger hash
            ledger.micro += 1
        loader = self.rt._active_loader
        sync = self.micro >= self.n or (loader is not None and loader.end_of_epoch)
        if sync:
            self.micro = 0
        self.sync = sync
        if self._set_sync is not None and sync != self._synced:
            self._set_sync(sync)
            self._synced = sync
        if self._ds_boundary is not None:
            self._ds_boundary(sync)
        return self

    def __exit__(self, *exc) -> None:
        return None


class Optimizer(torch.optim.Optimizer):
    """``rt.optimizer``: steps only on sync micro-steps; fp16 scaler, post-step hooks
    and ``rt.step`` are handled here. The wrapped optimizer is ``.optimizer``.

    (Subclasses ``torch.optim.Optimizer`` for isinstance checks; its ``__init__`` is not
    called — state and param groups are the wrapped optimizer's.)
    """

    def __init__(self, optimizer, rt):
        self.optimizer = optimizer
        self.rt = rt
        self._grad = rt._grad_sync
        self._scaler = rt.scaler
        self._engine = rt._engine
        self._hooks = rt.post_step_hooks  # the list itself: users may append later
        self._model = rt.model
        self.step_was_skipped = False  # the last real step was skipped by the fp16 scaler
        self.unscaled = False  # grads of this step already unscaled (clip before step)
        self._stepped = False  # set by the raw optimizer's step post-hook (fp16 only)
        self._fused_scaling, self._found_inf = False, None
        if self._scaler is not None:
            self._watch_steps(optimizer)

    # -- the step path ------------------------------------------------------------
    def step(self, closure=None):
        if self._engine is not None:
            if self._grad.sync:
                if self.rt._ledger is not None:
                    self.rt._ledger.point(self.rt.step + 1)
                self.rt._guard.allow_step()  # raises on a non-finite loss (no skipping here)
            self._engine.step()  # DeepSpeed counts accumulation boundaries itself
            if not self._grad.sync:
                return None
            # its fp16 loss scaler skips steps with inf/NaN grads: no hooks, no scheduler step
            applied = getattr(self._engine, "was_step_applied", None)
            self.step_was_skipped = callable(applied) and not applied()
            if self.step_was_skipped:
                return None
            return self._after_step(None)
        if not self._grad.sync:
            return None
        ledger = self.rt._ledger
        if ledger is not None:
            ledger.point(self.rt.step + 1)  # a sync point: the ranks compare here
        if not self.rt._guard.allow_step():  # skip_nonfinite: no step, gradients dropped
            self.step_was_skipped, self.unscaled = True, False
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.step_was_skipped = False
        if self._scaler is not None:
            out = self._scaled_step(closure)
            if self.step_was_skipped:  # inf/NaN grads: no step, no hooks, rt.step unchanged
                self.unscaled = False
                return out
        else:
            out = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        return self._after_step(out)

    def _watch_steps(self, optimizer) -> None:
        register = getattr(optimizer, "register_step_post_hook", None)
        if register is None:
            raise OverdriveError(
                f"mixed_precision='fp16' needs a torch.optim.Optimizer (one with "
                f"register_step_post_hook) to tell the steps the GradScaler skips; got "
                f"{type(optimizer).__name__}; use a torch optimizer or mixed_precision='bf16'")
        register(self._mark_stepped)
        # a fused optimizer takes the scaler's found_inf and skips on the device itself
        self._fused_scaling = bool(getattr(optimizer, "_step_supports_amp_scaling", False))

    def _mark_stepped(self, optimizer, args, kwargs) -> None:
        self._stepped = True
        if self._fused_scaling:  # GradScaler sets found_inf on it for the step's length only
            self._found_inf = getattr(optimizer, "found_inf", None)

    def _scaled_step(self, closure):
        """GradScaler's step, which calls the optimizer's only when the grads are finite.

        The optimizer's step post-hook tells whether it did, with no device→host read of
        the scale (GradScaler's own check is the only one). A fused optimizer is always
        called and skips on the device: there, reading its found_inf costs one sync.
        """
        self._stepped = False
        scaler = self._scaler
        out = scaler.step(self.optimizer) if closure is None else \
            scaler.step(self.optimizer, closure)
        if self._found_inf is not None:  # a fused step: it skipped on the device if inf
            self._stepped, self._found_inf = not bool(self._found_inf.item()), None
        scaler.update()
        self.step_was_skipped = not self._stepped
        return out

    def _after_step(self, out):
        for hook in self._hooks:
            hook(self._model, self.optimizer)
        self.rt.step += 1
        self.unscaled = False
        rt = self.rt
        if rt._meter is not None:
            rt._meter.on_step()
        if rt._profiler is not None:
            rt._profiler.step()
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not self._grad.sync:
            return  # the next micro-step keeps accumulating
        if self._engine is not None:
            self._engine.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    # -- the wrapped optimizer's face ---------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group) -> None:
        self.optimizer.add_param_group(param_group)

    def __getattr__(self, name: str) -> Any:
        if name == "optimizer":  # not set yet (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"overdrive.Optimizer({self.optimizer!r})"


class Scheduler:
    """``rt.scheduler``: steps only after a real optimizer step (not a skipped fp16 one)."""

    def __init__(self, scheduler, rt):
        self.scheduler = scheduler
        self._grad = rt._grad_sync
        self._opt = rt.optimizer

    def step(self, *args, **kwargs):
        if not self._grad.sync:
            return None
        if self._opt is not None and self._opt.step_was_skipped:
            return None
        return self.scheduler.step(*args, **kwargs)

    def state_dict(self):
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.scheduler.load_state_dict(state_dict)

    def __getattr__(self, name: str) -> Any:
        if name == "scheduler":
            raise AttributeError(name)
        return getattr(self.scheduler, name)


def raw_optimizer(opt: Any):
    """The torch optimizer under any wrapper: ``rt.optimizer`` (which subclasses
    ``torch.optim.Optimizer`` for isinstance checks) or an engine's optimizer such as
    DeepSpeed's ZeRO optimizer, which keeps the torch one as ``.optimizer``."""
    while isinstance(opt, Optimizer) or (
            opt is not None and not isinstance(opt, torch.optim.Optimizer)
            and isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer)):
        opt = opt.optimizer
    return opt


# --------------------------------------------------------------------------- clipping


def grads_of(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.grad is not None]


def unscale_once(rt) -> None:
    """Unscale fp16 gradients before they are read (once per optimizer step)."""
    opt = rt.optimizer
    if rt.scaler is None or opt is None or opt.unscaled:
        return
    rt.scaler.unscale_(opt.optimizer)
    opt.unscaled = True


def clip_grad_norm_(rt, max_norm: float, norm_type: float = 2.0) -> torch.Tensor | None:
    """Clip to ``max_norm`` and return the global gradient norm across all shards.

    DTensor (FSDP/TP) gradients give a partial norm; its ``full_tensor()`` is the norm of
    the whole model, identical to a single process's. On micro-steps that do not sync the
    gradients are partial and nothing is done (returns None).

    DeepSpeed clips inside ``engine.step`` with its ``gradient_clipping``: ``max_norm``
    must equal it (else an error says how to set it), and the norm returned is the one the
    engine computed last — at the previous step, as clipping comes before this step's.
    """
    if not rt._grad_sync.sync:
        return None
    engine = rt._engine
    if engine is not None:
        return _engine_norm(rt, engine, max_norm)
    unscale_once(rt)
    params = grads_of(rt.model)
    pipeline = rt._pipeline  # under pp: this rank's stages' norm, combined over stages
    if not rt._dtensor_grads:
        total = _norm([p.grad for p in params], norm_type)
        if pipeline is not None:
            total = pipeline.global_norm(total, norm_type)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total
    groups = _by_mesh(params)
    parts = [_norm([p.grad for p in group], norm_type) for group in groups.values()]
    parts = [n.full_tensor() if mesh is not None else n for mesh, n in zip(groups, parts)]
    total = parts[0] if len(parts) == 1 else torch.linalg.vector_norm(
        torch.stack([n.to(parts[0].device) for n in parts]), norm_type)
    if pipeline is not None:
        total = pipeline.global_norm(total, norm_type)
    for group in groups.values():  # torch's foreach kernels refuse DTensors mixed with tensors
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def _engine_norm(rt, engine, max_norm: float) -> torch.Tensor | None:
    clip = _engine_clipping(rt, engine)
    if float(max_norm) != clip:
        have = f"gradient_clipping={clip}" if clip else "no gradient clipping (0.0)"
        raise OverdriveError(
            f"rt.clip_grad_norm_(max_norm={max_norm}): the DeepSpeed engine clips inside "
            f"engine.step and is configured with {have}; set "
            f"od.DeepSpeed(gradient_clipping={max_norm}) in the plan (or gradient_clipping "
            f"in the DeepSpeed config), or call rt.clip_grad_norm_({clip})")
    get = getattr(engine, "get_global_grad_norm", None)
    norm = get() if get is not None else None
    return torch.as_tensor(norm) if norm is not None else None


def _engine_clipping(rt, engine) -> float:
    """The max norm the engine clips to (0.0: it does not clip)."""
    get = getattr(engine, "gradient_clipping", None)
    return float((get() if callable(get) else get) or 0.0)


def _norm(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    return torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite=False)


def _by_mesh(params: list[torch.Tensor]) -> dict[Any, list[torch.Tensor]]:
    """Parameters by the DeviceMesh of their DTensor gradient (None: plain tensors).

    TP without FSDP leaves norms and embeddings plain next to DTensor linears: each
    group's norm is taken alone (a DTensor's partial norm made whole by full_tensor())
    and the norms are combined like the norm of their concatenation.
    """
    from torch.distributed.tensor import DTensor

    out: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        mesh = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
        out.setdefault(mesh, []).append(p)
    return out or {None: []}


def clip_grad_value_(rt, clip_value: float) -> None:
    if not rt._grad_sync.sync:
        return None
    unscale_once(rt)
    torch.nn.utils.clip_grad_value_(grads_of(rt.model), clip_value)
    return None
