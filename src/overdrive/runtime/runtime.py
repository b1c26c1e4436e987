"""Runtime: the transformed model plus the helpers a training loop calls.

Everything that can be decided once (which engine owns backward, whether a scaler is
needed, the autocast dtype) is decided in ``__init__``; the per-step methods only do the
work. Sections below group the helpers by the module that implements them.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..rewrite.plan import Plan
from ..rewrite.report import Report
from .state import Env

log = logging.getLogger("overdrive")

WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def clean_key(key: str) -> str:
    """A state-dict key without the prefixes wrappers add (compile, checkpoint wrappers)."""
    for prefix in WRAPPER_PREFIXES:
        key = key.replace(prefix, "")
    return key


class Runtime:
    """What ``od.accelerate`` returns: ``rt.model``, ``rt.optimizer``… and the helpers."""

    def __init__(self, model: nn.Module, *, plan: Plan, report: Report, env: Env,
                 optimizer: Any = None, scheduler: Any = None):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.plan = plan
        self.report = report
        self.env = env
        self.grad_accum = plan.grad_accum
        self._autocast_dtype = self._choose_autocast_dtype()
        self._scaler = self._make_scaler()
        self.step = 0  # optimizer steps really taken (skipped micro-steps do not count)
        self._loaders: list[Any] = []  # every loader made by rt.shard (checkpointed)

    # -- identity -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def local_rank(self) -> int:
        return self.env.local_rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def dp_rank(self) -> int:
        return self.env.dp_rank

    @property
    def dp_size(self) -> int:
        return self.env.dp_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.env.local_rank == 0

    @property
    def mesh(self):
        """The DeviceMesh (dims dp_replicate, dp_shard, cp, tp; flattened dp, dp_shard_cp,
        dp_cp), or None for a single process that never needed one."""
        if self.env._mesh is None and not self.env.distributed:
            return None
        return self.env.mesh

    @property
    def scaler(self):
        return self._scaler

    # -- precision ------------------------------------------------------------------
    def _choose_autocast_dtype(self) -> torch.dtype | None:
        if self.plan.mixed_precision == "no":
            return None
        if self.plan.fsdp is not None or self.plan.deepspeed is not None:
            return None  # the engine casts parameters itself (MixedPrecisionPolicy / DS config)
        return _AUTOCAST_DTYPES[self.plan.mixed_precision]

    def _make_scaler(self):
        if self.plan.mixed_precision != "fp16" or self.plan.deepspeed is not None:
            return None
        return torch.amp.GradScaler(self.device.type)

    def autocast(self):
        """``torch.autocast`` for the plan's mixed precision on this device (or a no-op)."""
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    # -- backward -------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """``loss.backward()`` scaled by 1/grad_accum (and by the fp16 scaler)."""
        if self.env.engine is not None:
            self.env.engine.backward(loss, **kwargs)
            return
        if self.grad_accum > 1:
            loss = loss / self.grad_accum
        if self._scaler is not None:
            loss = self._scaler.scale(loss)
        loss.backward(**kwargs)

    # -- state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full, unwrapped model state with the original model's keys.

        Sharded (DTensor) parameters are gathered; every rank must call this together.
        Tensors are on the CPU.
        """
        if _has_dtensor(self.model):
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                  get_model_state_dict)

            sd = get_model_state_dict(
                self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            sd = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return {clean_key(k): v for k, v in sd.items()}

    def unwrap(self) -> nn.Module:
        """The model as the user built it (passes act in place, so this is ``rt.model``)."""
        return self.model

    # -- checkpointing (checkpoint.py, export.py) -------------------------------------
    def save(self, path, *, keep_last: int | None = None, async_: bool = False) -> None:
        """Save the whole training state to ``path`` atomically (every rank calls this)."""
        from . import checkpoint

        checkpoint.save(self, path, keep_last=keep_last, async_=async_)

    def load(self, path, *, verify: bool = True) -> dict[str, Any]:
        """Restore what ``save`` wrote (on any number of ranks); returns its metadata."""
        from . import checkpoint

        return checkpoint.load(self, path, verify=verify)

    def wait_for_save(self) -> None:
        """Block until a pending ``save(..., async_=True)`` is written and published."""
        from . import checkpoint

        checkpoint.wait_for_save(self)

    def export(self, directory, *, max_shard_size: int | str = "5GB",
               dtype: torch.dtype | None = None):
        """Consolidated safetensors weights (transformers layout), written by rank 0."""
        from . import export

        return export.export(self.model, directory, max_shard_size=max_shard_size, dtype=dtype,
                             is_main=self.is_main)

    # -- process helpers --------------------------------------------------------------
    def barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs)

    def __repr__(self) -> str:
        return (f"Runtime(passes={self.report.names()}, rank={self.rank}/{self.world_size}, "
                f"device={self.device})")


def _has_dtensor(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
