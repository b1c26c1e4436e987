"""Non-finite guards: a NaN/inf loss or gradient norm stops the step, before it is taken.

``rt.backward`` and ``rt.clip_grad_norm_`` report each value here; ``rt.optimizer.step``
asks ``allow_step()`` before stepping. Outside fp16 (whose GradScaler already skips inf
steps) a non-finite value raises ``NonFiniteError`` naming the step, the parameters
untouched; with ``Plan(skip_nonfinite=True)`` the step is skipped instead (gradients
zeroed, logged, ``rt.step`` unchanged).

The cost is one finiteness read per value that is already synchronised with it: on the
CPU the value is read at once (``float(loss)``, no device to wait for), and a raise names
the micro-step. On an accelerator the flags are folded on the device (no sync) and read
once, at the optimizer step — one host read per step, not per micro-step. With
``skip_nonfinite`` every rank must skip the same steps, so the flag is max-reduced over
the data-parallel ranks at the step (one small all-reduce; raising needs none: the rank
that raises ends the launch).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist

from ..errors import NonFiniteError
from .ledger import collective

log = logging.getLogger("overdrive")


class NonFiniteGuard:
    __slots__ = ("rt", "skip", "enabled", "_bad", "_what", "skipped")

    def __init__(self, rt):
        self.rt = rt
        self.skip = bool(getattr(rt.plan, "skip_nonfinite", False))
        self.enabled = rt.scaler is None  # fp16: the GradScaler skips inf steps itself
        self._bad = None  # False/True (CPU) or a bool tensor on the device; None: nothing seen
        self._what: str | None = None  # what was non-finite (CPU: known at once)
        self.skipped = 0  # steps skipped so far

    def value(self, t: torch.Tensor, what: str) -> float | None:
        """Record ``t`` (a loss or a norm); on the CPU a non-finite one raises at once.
        Returns the value where it was read (a CPU scalar: the step meter records that
        float instead of reading the tensor again), else None."""
        if not self.enabled:
            return None
        if t.is_cpu:  # (not t.device.type: building a torch.device costs µs per step)
            # item() reads past autograd without a detached copy (that copy cost µs a step)
            scalar = t.numel() == 1
            v = t.item() if scalar else float(t.detach().sum())
            if not math.isfinite(v):
                if not self.skip:
                    raise NonFiniteError(self._message(what, v))
                self._bad, self._what = True, self._what or f"{what} is {v}"
            return v if scalar else None
        flag = ~torch.isfinite(t.detach()).all()
        self._bad = flag if self._bad is None or self._bad is False else self._bad | flag
        self._what = self._what or what
        return None

    def allow_step(self) -> bool:
        """Read the step's flag once: True to step; False when skipping; raises otherwise."""
        bad, what = self._bad, self._what
        self._bad = self._what = None
        if not self.enabled or (bad is None and not self.skip):
            return True
        if self.skip and self._dp_world() > 1:
            bad = self._any_rank(bad)
        if bad is None or not bool(bad):
            return True
        what = what or "a loss or gradient norm on another rank is non-finite"
        if not self.skip:
            raise NonFiniteError(self._message(what, None))
        self.skipped += 1
        log.warning("overdrive: skipped optimizer step %d: %s (skip_nonfinite=True; %d "
                    "skipped so far)", self.rt.step + 1, what, self.skipped)
        return False

    def _message(self, what: str, v: float | None) -> str:
        grad = self.rt._grad_sync
        micro = f" (micro-step {grad.micro or grad.n} of {grad.n})" if grad.n > 1 else ""
        shown = f"{what} is {v}" if v is not None else what
        return (f"{shown} at optimizer step {self.rt.step + 1}{micro}; the step was not taken "
                "and the parameters are unchanged. Lower the learning rate, check the data, "
                "or set Plan(skip_nonfinite=True) to skip such steps")

    def _dp_world(self) -> int:
        return self.rt.dp_size if dist.is_initialized() else 1

    def _any_rank(self, bad) -> torch.Tensor:
        from .collectives import comm_device

        group = self.rt._dp_group()
        flag = torch.zeros((), dtype=torch.int32, device=comm_device(group))
        if bad is not None:
            flag += torch.as_tensor(bad).to(flag.device, torch.int32)
        collective("all_reduce", dist.all_reduce, flag, op=dist.ReduceOp.MAX, group=group,
                   tensor=flag)
        return flag
