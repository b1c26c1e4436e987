"""Runtime: the transformed model plus the helpers a training loop calls.

Everything that can be decided once (which engine owns backward, whether a scaler is
needed, the autocast dtype) is decided in ``__init__``; the per-step methods only do the
work. What the passes handed on (``rewrite.contract.Handoff``: forward contexts, post-step
hooks, the gradient-sync switch, an engine, batch transforms, key maps) is consumed here
and in ``grad.py`` / ``data.py`` / ``checkpoint.py``; the runtime never imports a pass.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..dtypes import to_torch
from ..plan_spec import Plan
from ..rewrite.contract import Handoff
from ..rewrite.env import Env
from ..rewrite.report import Report
from . import collectives, data, grad, helpers, loss_norm, split, trigger
from .guards import NonFiniteGuard
from .keys import clean_key
from .ledger import make_ledger
from .step_metrics import StepMeter
from .tracking import Tracking, TrackingConfig

log = logging.getLogger("overdrive")


class Runtime:
    """What ``od.accelerate`` returns. Its public surface, all of it:

    loop
        ``model``, ``optimizer``, ``scheduler`` (both step only on real steps),
        ``backward(loss)``, ``forward_backward(batch)`` / ``evaluate(batch)`` (one
        pipeline step; any plan), ``accumulate()``, ``sync_gradients``, ``clip_grad_norm_``,
        ``clip_grad_value_``, ``autocast()``, ``scaler`` (fp16), ``step`` (real optimizer
        steps taken), ``post_step_hooks`` (``hook(model, optimizer)`` after each real
        step; append to it), ``log(metrics)`` / ``finish()`` (experiment tracking),
        ``profile(...)``
    data
        ``shard(dataloader, ...)``, ``shard_sequence(batch)`` (context parallel's split),
        ``split_between_processes(inputs)``
    collectives
        ``gather``, ``gather_for_metrics``, ``gather_object``, ``reduce``, ``broadcast``,
        ``pad_across_processes``, ``barrier``, ``set_trigger()`` / ``check_trigger()``
    checkpoint
        ``save``, ``load``, ``wait_for_save``, ``export``, ``state_dict()``, ``unwrap()``,
        ``register_for_checkpointing(*objects)``
    info
        ``plan``, ``report``, ``grad_accum``, ``device``, ``rank``, ``local_rank``,
        ``world_size``, ``dp_rank``, ``dp_size``, ``is_main``, ``is_local_main``, ``mesh``,
        ``run_dir``,
        ``print``, ``main_process_first()``, ``progress(iterable)``

    Everything else (names starting with ``_``) is the runtime's own.
    """

    def __init__(self, model: nn.Module, *, plan: Plan, report: Report, env: Env,
                 optimizer: Any = None, scheduler: Any = None, handoff: Handoff | None = None,
                 tracking: TrackingConfig | None = None, flops_model: nn.Module | None = None,
                 pipeline: Any = None, desync_timeout: float | None = 60.0):
        self.model = model
        self._pipeline = pipeline  # runtime/pipeline.PipelineRunner under parallel.pp > 1
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.plan = plan
        self.report = report
        self._env = env
        self._handoff = handoff if handoff is not None else Handoff()
        self._engine = self._handoff.engine
        # with Plan(global_batch_size=...) derived by the first rt.shard (_derive_grad_accum)
        self.grad_accum = plan.grad_accum
        self._grad_accum_derived = plan.global_batch_size is None
        # a resume onto another number of data ranks, logged once grad_accum is known
        self._elastic_note: tuple[int, int, int] | None = None
        self._loss_kind = loss_norm.LossKind.of(model)  # what loss_normalization counts
        self._autocast_dtype = self._choose_autocast_dtype()
        self._scaler = self._make_scaler()
        self.step = 0  # optimizer steps really taken (skipped micro-steps do not count)
        self._loaders: list[Any] = []  # every loader made by rt.shard (checkpointed)
        # positions rt.load found before the loaders were made: rt.shard takes them in order
        self._pending_loader_states: list[dict] = []
        self._active_loader = None  # the sharded loader being iterated (its last batch syncs)
        self._custom_objects: list[Any] = []  # rt.register_for_checkpointing, in order
        self._trigger = trigger.Trigger()
        self._grad_sync = grad.GradSync(self, self.grad_accum)
        self._dtensor_grads = _has_dtensor(model)
        self._guard = NonFiniteGuard(self)
        self._loss_parallel = self._make_loss_parallel(model, pipeline)
        # the collective ledger and its watchdog (ledger.py); None on a single process
        self._ledger = make_ledger(desync_timeout)
        if self._ledger is not None:
            weakref.finalize(self, self._ledger.stop)
            engine = self._handoff.engine_collectives
            if engine is not None and engine.forward_tap is not None:  # FSDP's forwards
                engine.forward_tap.listener = self._ledger.note_engine
        self._tracking, self._meter = self._make_tracking(tracking, flops_model)
        self._profiler = None  # the active rt.profile, stepped with the optimizer
        if optimizer is not None:
            self.optimizer = grad.Optimizer(optimizer, self)
        if scheduler is not None:
            self.scheduler = grad.Scheduler(scheduler, self)
        launched = dist.is_initialized() and dist.get_world_size() > 1
        helpers.configure_logging(dist.get_rank() if launched else 0)

    # -- identity -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._env.device

    @property
    def rank(self) -> int:
        return self._env.rank

    @property
    def local_rank(self) -> int:
        return self._env.local_rank

    @property
    def world_size(self) -> int:
        return self._env.world_size

    @property
    def dp_rank(self) -> int:
        return self._env.dp_rank

    @property
    def dp_size(self) -> int:
        return self._env.dp_size

    @property
    def is_main(self) -> bool:
        return self._env.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self._env.local_rank == 0

    @property
    def mesh(self):
        """The DeviceMesh (dims pp, dp_replicate, dp_shard, cp, tp; flattened dp, dp_shard_cp,
        dp_cp), or None for a single process that never needed one."""
        if not self._env.mesh_built and not self._env.distributed:
            return None
        return self._env.mesh

    @property
    def scaler(self):
        return self._scaler

    @property
    def post_step_hooks(self) -> list:
        """``hook(model, optimizer)`` run after each real optimizer step: the passes'
        hooks first (fp8's scale precompute), then whatever is appended."""
        return self._handoff.post_step_hooks

    # -- tracking (tracking.py, step_metrics.py, profile.py) -------------------------
    def _make_tracking(self, config: TrackingConfig | None, flops_model: nn.Module | None):
        config = config or TrackingConfig()
        tracking = Tracking(config, is_main=self.is_main, plan=self.plan)
        meter = StepMeter.for_runtime(self, config, tracking, flops_model) \
            if config.log_every else None
        return tracking, meter

    @property
    def run_dir(self):
        """Where rank 0's trackers write (created at the first logged row)."""
        return self._tracking.run_dir

    def log(self, metrics: dict, step: int | None = None) -> None:
        """Send ``metrics`` to the trackers (rank 0 only; other ranks return at once).

        ``step`` defaults to the optimizer step ``rt.step``. Tensor values are read to
        Python floats together, with one device→host copy.
        """
        if self._tracking.active:
            self._tracking.log(metrics, self.step if step is None else step)

    def finish(self) -> None:
        """Flush and close the trackers (also done at interpreter exit)."""
        self._tracking.finish()

    def profile(self, out_dir, *, wait: int = 1, warmup: int = 1, active: int = 3,
                ranks=(0,), memory: bool = False):
        """Profile ``active`` optimizer steps after ``wait`` + ``warmup`` steps with
        torch.profiler: a Chrome/Perfetto trace per profiled rank and a table of the top
        ops in ``out_dir``. Starts now; stops by itself after the active steps (or at the
        end of a ``with rt.profile(...):`` block). Ranks not in ``ranks`` do nothing."""
        from .profile import StepProfiler

        return StepProfiler.start(self, out_dir, wait=wait, warmup=warmup, active=active,
                                  ranks=ranks, memory=memory)

    # -- precision ------------------------------------------------------------------
    def _choose_autocast_dtype(self) -> torch.dtype | None:
        cfg = self.plan.autocast()  # None when an engine casts the parameters itself
        return None if cfg is None else to_torch(cfg.dtype)

    def _make_scaler(self):
        if self.plan.mixed_precision != "fp16" or self._engine is not None:
            return None  # an engine that owns backward scales the loss itself
        return torch.amp.GradScaler(self.device.type)

    def autocast(self):
        """``torch.autocast`` for the plan's mixed precision on this device (or a no-op)."""
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def _make_loss_parallel(self, model: nn.Module, pipeline: Any):
        """Parallel(loss_parallel=True): torch's loss_parallel() around the forward, the
        loss and the backward (loss_parallel.py); else a no-op context."""
        from .loss_parallel import LossParallel

        if not self.plan.parallel.loss_parallel or pipeline is not None:
            return contextlib.nullcontext
        owner = LossParallel()
        owner.hook(model)
        return owner

    # -- backward -------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """``loss.backward()`` scaled by 1/grad_accum (and by the fp16 scaler): the step's
        gradient is the mean of its micro-batch losses (``Plan.loss_normalization`` is for
        ``rt.forward_backward``).

        A NaN/inf loss outside fp16 raises ``NonFiniteError`` (guards.py) before the
        optimizer steps, or skips the step with ``Plan(skip_nonfinite=True)``.
        """
        self._run_backward(loss, loss, kwargs)

    def _run_backward(self, loss: torch.Tensor, shown: torch.Tensor, kwargs: dict) -> None:
        """Backward of ``loss``; ``shown`` is the value checked and logged (the same, but
        under loss_normalization="tokens" where the backward also undoes 1/grad_accum)."""
        value = self._guard.value(shown, "the loss")  # the float, where it was read
        if self._meter is not None:
            self._meter.on_backward(shown, value)
        ledger = self._ledger
        if ledger is None:
            return self._backward(loss, kwargs)
        if ledger.error is not None:
            ledger.raise_error()
        engine = self._handoff.engine_collectives
        if engine is not None:  # what DDP / FSDP2 issue in this backward: one entry
            if self._grad_sync._synced:
                ledger.note_engine(engine.synced_backward, synced=True)
            elif engine.unsynced_backward is not None:
                ledger.note_engine(engine.unsynced_backward)
        ledger.inside = "rt.backward"  # a peer stalled meanwhile names it
        try:
            self._backward(loss, kwargs)
        except RuntimeError as err:  # the engine's collective failed: a desync?
            ledger.diagnose(err)
            raise
        finally:
            ledger.inside = None
        return None

    def _backward(self, loss: torch.Tensor, kwargs: dict) -> None:
        if self._engine is not None:
            self._engine.backward(loss, **kwargs)
            return
        if self.grad_accum > 1:
            loss = loss / self.grad_accum
        if self._scaler is not None:
            loss = self._scaler.scale(loss)
        with self._loss_parallel():
            loss.backward(**kwargs)

    # -- one micro-step (steps.py) -----------------------------------------------------
    def forward_backward(self, batch: Any, loss_fn=None) -> torch.Tensor:
        """Forward and backward of ``batch`` under any plan; returns the (detached) loss.

        ``batch`` is what the loop would hand the model: a dict (``model(**batch)``), a
        tensor (``model(batch)``) or a tuple (``model(*batch)``). The loss is
        ``output.loss`` or ``loss_fn(output, batch)``. Under pp the batch is split into
        the schedule's micro-batches (``loss_fn`` then sees each micro-batch) and the
        mean loss over them is returned, the same on every pipeline rank.

        For a batch of an ``rt.shard`` loader carrying ``labels``, under
        ``Plan(loss_normalization="tokens")`` (or "auto", the default), the step's loss is
        its global token mean: the returned value is this micro-batch's share, whose mean
        over the step's micro-batches and the dp × cp ranks is that mean (loss_norm.py).
        """
        from . import steps

        return steps.forward_backward(self, batch, loss_fn)

    def evaluate(self, batch: Any, loss_fn=None) -> torch.Tensor:
        """The loss of ``batch`` without gradients (the schedule's forward-only path
        under pp)."""
        from . import steps

        return steps.evaluate(self, batch, loss_fn)

    # -- data (data.py) ---------------------------------------------------------------
    def shard(self, dataloader, *, split_batches: bool = False, even_batches: bool = True,
              dispatch: bool | None = None, device_placement: bool = True):
        """This data-parallel rank's share of ``dataloader``: a resumable sharded loader.

        Map-style data is sharded by index on every rank. An iterable dataset is read by
        global rank 0 and dealt out (``dispatch``, its default), or with
        ``dispatch=False`` read whole by every rank, each keeping its share; with loader
        workers there, every worker reads the whole stream too and keeps every
        ``num_workers``-th batch. A dataset that splits itself among workers (reads
        ``get_worker_info()``, as Hugging Face streaming datasets do) would be split
        twice and lose samples: use ``dispatch=True`` (rank 0's loader runs the workers
        as the dataset expects) or ``num_workers=0``. Iterable shards start their workers
        per epoch (``persistent_workers`` is not kept), so each sees the resume position.
        Sharding the same DataLoader again replaces its earlier sharded loader.
        """
        return data.shard(self, dataloader, split_batches=split_batches,
                          even_batches=even_batches, dispatch=dispatch,
                          device_placement=device_placement)

    # -- gradients (grad.py) ----------------------------------------------------------
    def accumulate(self) -> grad.GradSync:
        """``with rt.accumulate():`` around each micro-step of ``Plan(grad_accum=N)``."""
        if not self._grad_accum_derived:
            from ..errors import OverdriveError

            raise OverdriveError(
                f"rt.accumulate(): Plan(global_batch_size={self.plan.global_batch_size}) "
                "derives grad_accum from the training loader's batch size, and no loader was "
                "sharded yet; call rt.shard(train_loader) first (or set Plan(grad_accum=N) "
                "instead of global_batch_size)")
        return self._grad_sync

    @property
    def sync_gradients(self) -> bool:
        """True on the micro-step whose gradients are synced and stepped."""
        return self._grad_sync.sync

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0):
        """Clip the gradients; returns the global norm across every shard."""
        norm = grad.clip_grad_norm_(self, max_norm, norm_type)
        if norm is not None and self._engine is None:
            self._guard.value(norm, "the gradient norm")
        if self._meter is not None:
            self._meter.on_clip(norm)
        return norm

    def clip_grad_value_(self, clip_value: float) -> None:
        grad.clip_grad_value_(self, clip_value)

    # -- collectives (collectives.py) -------------------------------------------------
    def gather(self, x: Any) -> Any:
        """Every rank's tensors concatenated along dim 0 (nested structures kept)."""
        with self._collective("rt.gather"):
            return collectives.gather(x)

    def gather_for_metrics(self, x: Any) -> Any:
        """``gather`` over the data-parallel ranks without even_batches padding: the
        gathered values of a whole epoch are exactly the dataset."""
        loader = self._active_loader
        rows = (loader.batch_len, loader.n_real) if loader is not None else None
        with self._collective("rt.gather_for_metrics"):
            return collectives.gather_for_metrics(x, rows, group=self._dp_group())

    def gather_object(self, obj: Any) -> list:
        with self._collective("rt.gather_object"):
            return collectives.gather_object(obj)

    def reduce(self, x: Any, op: str = "sum") -> Any:
        with self._collective("rt.reduce"):
            return collectives.reduce(x, op)

    def broadcast(self, x: Any, src: int = 0) -> Any:
        with self._collective("rt.broadcast"):
            return collectives.broadcast(x, src)

    def pad_across_processes(self, x: Any, dim: int = 0, pad_index: int = 0,
                             pad_first: bool = False) -> Any:
        with self._collective("rt.pad_across_processes"):
            return collectives.pad_across_processes(x, dim, pad_index, pad_first)

    def _collective(self, name: str, *, entry_check: bool = False):
        """The ledger's span for a collective helper (every rank must call it)."""
        if self._ledger is None:
            return contextlib.nullcontext()
        return self._ledger.helper(name, entry_check=entry_check)

    def split_between_processes(self, inputs: Any, apply_padding: bool = False):
        """``with rt.split_between_processes(items) as mine:`` this data rank's share of a
        list, tuple, tensor (dim 0) or dict of those. With ``apply_padding=True`` every
        rank gets ``ceil(n / dp_size)`` items (the last one repeated), so the gathered
        results truncated to ``n`` are in input order (split.py)."""
        return split.split_between_processes(self, inputs, apply_padding)

    def set_trigger(self) -> None:
        """Raise this rank's flag; the next ``check_trigger()`` is True on every rank."""
        self._trigger.set()

    def check_trigger(self) -> bool:
        """True on every rank when any rank called ``set_trigger()`` since the last check
        (every rank calls this at the same point: it is one all-reduce)."""
        with self._collective("rt.check_trigger"):
            return self._trigger.check()

    def _dp_group(self):
        """The data-parallel process group (None: the default group is the dp group)."""
        if self.dp_size == self.world_size:
            return None
        return self._env.submesh("dp").get_group()

    def _loss_group(self):
        """The ranks whose losses make up one step's: dp × cp (None: the default group)."""
        if self.plan.parallel.cp == 1:
            return self._dp_group()
        if self.dp_size * self.plan.parallel.cp == self.world_size:
            return None
        return self._env.submesh("dp_cp").get_group()

    def _derive_grad_accum(self, loader) -> None:
        """``Plan(global_batch_size=G)``: grad_accum = G / (samples per micro-step of every
        data rank), from the first loader rt.shard makes (the training loader). Raises
        ``PlanError`` (changing nothing) when it does not divide."""
        from ..plan_spec import derive_grad_accum

        if self._grad_accum_derived:
            return
        gbs = self.plan.global_batch_size
        grad_accum = derive_grad_accum(gbs, loader.batch_size, self.dp_size, loader.split)
        self.grad_accum = grad_accum
        self._grad_sync.n = self.grad_accum
        self._grad_accum_derived = True
        if getattr(self.report, "steps", None) is not None:
            self.report.steps = replace(self.report.steps, grad_accum=grad_accum,
                                        batch_size=loader.batch_size)
        if self.is_main:
            log.info("overdrive: global_batch_size=%d over %d data rank(s) of batch %d: "
                     "grad_accum=%d", gbs, self.dp_size, loader.batch_size, self.grad_accum)
        self._log_elastic()

    def _log_elastic(self) -> None:
        """The line saying a checkpoint was resumed on another number of data ranks (once
        grad_accum is known)."""
        if self._elastic_note is None or not self._grad_accum_derived:
            return
        old_dp, old_ga, step = self._elastic_note
        self._elastic_note = None
        if self.is_main:
            log.info("overdrive: resumed elastically at step %d from %d to %d data rank(s), "
                     "grad_accum %d → %d", step, old_dp, self.dp_size, old_ga, self.grad_accum)

    # -- state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full, unwrapped model state with the original model's keys.

        Sharded parameters (DTensor, DeepSpeed ZeRO-3 partitions) are gathered one by one,
        so every rank gets the full state; every rank must call this together. Tensors are
        on the CPU. Under pp the stages of every pipeline rank are gathered too.
        """
        from .export import full_cpu

        if self._pipeline is not None:  # every stage's, gathered over the pp ranks
            return dict(self._pipeline.gathered_weights(self.model, True))
        return {self._model_key(key): full_cpu(value)
                for key, value in self.model.state_dict(keep_vars=True).items()}

    def _model_key(self, key: str) -> str:
        """A key of the transformed model as the user's model names it."""
        return self._handoff.to_model_key(clean_key(key))

    def unwrap(self) -> nn.Module:
        """The model as the user built it (passes act in place, so this is ``rt.model``)."""
        return self.model

    # -- context parallel -----------------------------------------------------------
    def shard_sequence(self, batch: Any) -> Any:
        """This cp rank's load-balanced slice of ``batch`` along the sequence (dim 1), with
        ``position_ids``; the batch itself when cp == 1. The passes' batch transforms
        (context parallel's split) run in pass order."""
        return self._handoff.transform_batch(batch)

    # -- checkpointing (checkpoint.py, export.py) -------------------------------------
    def save(self, path, *, keep_last: int | None = None, async_: bool = False) -> None:
        """Save the whole training state to ``path`` atomically (every rank calls this)."""
        from . import checkpoint

        with self._collective("rt.save", entry_check=True):
            checkpoint.save(self, path, keep_last=keep_last, async_=async_)

    def load(self, path, *, verify: bool = True) -> dict[str, Any]:
        """Restore what ``save`` wrote (on any number of ranks); returns its metadata."""
        from . import checkpoint

        with self._collective("rt.load", entry_check=True):
            return checkpoint.load(self, path, verify=verify)

    def register_for_checkpointing(self, *objects: Any) -> None:
        """Save these objects' ``state_dict()`` with ``rt.save`` and hand it back to their
        ``load_state_dict`` on ``rt.load``, in registration order (custom_state.py)."""
        from . import custom_state

        for obj in objects:
            custom_state.register(self._custom_objects, obj)

    def wait_for_save(self) -> None:
        """Block until a pending ``save(..., async_=True)`` is written and published."""
        from . import checkpoint

        checkpoint.wait_for_save(self)

    def export(self, directory, *, max_shard_size: int | str = "5GB",
               dtype: torch.dtype | None = None):
        """Consolidated safetensors weights (transformers layout), written by rank 0."""
        from . import export

        entries = None
        with self._collective("rt.export", entry_check=True):
            if self._pipeline is not None:  # every stage's weights, gathered on rank 0
                entries = self._pipeline.gathered_weights(self.model, self.is_main)
            return export.export(self.model, directory, max_shard_size=max_shard_size,
                                 dtype=dtype, is_main=self.is_main, entries=entries,
                                 key_of=self._model_key)

    # -- process helpers --------------------------------------------------------------
    def barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            with self._collective("rt.barrier"):
                collectives.barrier()

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs)

    def main_process_first(self):
        """``with rt.main_process_first():`` rank 0 runs the block before the others."""
        return helpers.main_process_first(self)

    def progress(self, iterable, **tqdm_kwargs: Any):
        """A tqdm progress bar on rank 0 only."""
        return helpers.progress(self, iterable, **tqdm_kwargs)

    def __repr__(self) -> str:
        return (f"Runtime(passes={self.report.names()}, rank={self.rank}/{self.world_size}, "
                f"device={self.device})")


def _has_dtensor(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
