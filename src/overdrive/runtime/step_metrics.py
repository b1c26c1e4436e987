"""Built-in step metrics: every ``log_every`` optimizer steps, one row and one log line.

The runtime feeds the meter from the places that already see the numbers: ``rt.backward``
(the loss, kept on the device as a running sum: no sync), ``rt.clip_grad_norm_`` (the
norm), ``rt.shard``'s loader (samples and tokens, from shapes) and the optimizer step.
On a logged step the data-parallel (× context-parallel) ranks add up ``[loss sum,
micro-steps, samples, tokens]`` in one all-reduce of four numbers, and rank 0 reads them (and the grad norm)
with one device→host copy. Between logged steps the meter costs a tensor add per
micro-step and a few integer additions.

Row keys: ``loss`` (mean over the micro-steps of the interval and the data-parallel
× context-parallel ranks: under ``loss_normalization="tokens"`` the exact global token
mean, ``runtime/loss_norm.py``), ``grad_norm``, ``lr``, ``step_seconds``,
``samples_per_s``, ``tokens_per_s`` (both global), ``tflops`` and ``mfu`` (per device, where a peak is known: FLOPs from the
meta-device trace of the first batch), ``memory_allocated_gb`` and ``memory_peak_gb``
(the accelerator's; on CPU the process's peak resident memory).

The same numbers go to rank 0's "overdrive" logger as one compact line, at most every
``LINE_INTERVAL_S`` seconds (a fast loop logs every row, but prints a line twice a second).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from .grad import raw_optimizer

log = logging.getLogger("overdrive")

_GB = 1024 ** 3
# the log line comes at most this often (every row still reaches the trackers): a line per
# step of a fast loop would cost more than the step and scroll past unread
LINE_INTERVAL_S = 0.5
RSS_INTERVAL_S = 1.0  # the CPU peak-RSS reading is refreshed at most this often


class StepMeter:
    """Accumulates one logging interval; ``rt._meter`` (None when step metrics are off)."""

    def __init__(self, rt, every: int, tracking, *, peak: float | None = None,
                 shadow: torch.nn.Module | None = None):
        self.rt, self.every, self.tracking = rt, every, tracking
        self._peak = peak
        self._shadow = shadow  # meta copy of the model, traced once for FLOPs (peak known)
        self._flops_per_token: float | None = None
        self._cuda = rt.device.type == "cuda"
        # fixed for the runtime's life: read once, not through properties on every row;
        # _dp counts the ranks whose losses make up a step: dp × cp (cp peers see the
        # same samples, so their sample and token counts are divided by cp)
        self._cp = rt.plan.parallel.cp if getattr(rt, "plan", None) is not None else 1
        self._main, self._dp = rt.is_main, rt.dp_size * self._cp
        self._rss = _PeakRss()
        self._opt = None  # the torch optimizer whose lr is logged (found at the first row)
        self._line_at = -LINE_INTERVAL_S  # when the last log line was printed
        self._group = self._group_known = None
        self._reset()
        self._t_last: float | None = None

    @classmethod
    def for_runtime(cls, rt, config, tracking, flops_model=None) -> "StepMeter":
        from .peaks import peak_flops

        peak = peak_flops(rt.device)
        return cls(rt, config.log_every, tracking, peak=peak,
                   shadow=flops_model if peak is not None else None)

    def _reset(self) -> None:
        self._losses: list[torch.Tensor] = []  # detached, summed on the logged step
        self._samples = self._tokens = self._steps = 0
        self._norm = None

    # -- feeds --------------------------------------------------------------------
    def on_batch(self, batch: Any, n_real: int, rows: int) -> None:
        if self._t_last is None:
            self._t_last = time.perf_counter()
        self._samples += n_real
        tokens = token_count(batch)
        if tokens and rows:
            self._tokens += tokens * n_real // rows
        if self._shadow is not None:
            self._trace_flops(batch, tokens or rows)

    def on_backward(self, loss: Any) -> None:
        if self._t_last is None:
            self._t_last = time.perf_counter()
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach())

    def on_clip(self, norm: Any) -> None:
        if norm is not None:
            self._norm = norm

    def on_step(self) -> None:
        self._steps += 1
        if self.rt.step % self.every:
            return
        self._emit()

    # -- a logged step ------------------------------------------------------------
    def _emit(self) -> None:
        now = time.perf_counter()
        elapsed = now - (self._t_last if self._t_last is not None else now)
        if not self._main and self._dp == 1:  # nothing to add up, nothing to log
            self._reset()
            self._t_last = now
            return
        loss_sum, micro, samples, tokens, norm = self._reduced()
        steps = self._steps
        self._reset()
        self._t_last = now
        if not self._main:
            return
        row: dict[str, float] = {}
        if micro:
            row["loss"] = loss_sum / micro
        if norm is not None:
            row["grad_norm"] = norm
        lr = self._lr()
        if lr is not None:
            row["lr"] = lr
        if elapsed > 0:
            row["step_seconds"] = elapsed / steps
            if samples:
                row["samples_per_s"] = samples / elapsed
            if tokens:
                row["tokens_per_s"] = tokens / elapsed
            if self._peak is not None and self._flops_per_token:
                per_device = self._flops_per_token * (tokens or samples) / self.rt.world_size
                row["tflops"] = per_device / elapsed / 1e12
                row["mfu"] = per_device / elapsed / self._peak
        if self._cuda:
            row.update(memory(True))
        else:
            row.update(self._rss.read(now))
        self.tracking.log_row(row, self.rt.step)
        if now - self._line_at >= LINE_INTERVAL_S and log.isEnabledFor(logging.INFO):
            self._line_at = now
            log.info("%s", format_line(self.rt.step, row))

    def _reduced(self) -> tuple[float, int, int, int, float | None]:
        """(loss sum, micro-steps, samples, tokens) summed over the data-parallel (× cp)
        ranks and the grad norm: one all-reduce (several ranks) and one device→host copy."""
        losses, norm = self._losses, self._norm
        micro, samples, tokens = len(losses), self._samples, self._tokens
        dp = self._dp
        if dp == 1 and not isinstance(norm, torch.Tensor):
            if micro == 1:
                return losses[0].item(), 1, samples, tokens, _float(norm)
            if micro == 0:
                return 0.0, 0, samples, tokens, _float(norm)
        loss = None
        if losses:
            loss = losses[0].reshape(1).float() if micro == 1 else \
                torch.stack([t.reshape(()).float() for t in losses]).sum().reshape(1)
            if hasattr(loss, "full_tensor"):  # a DTensor loss (loss parallel)
                loss = loss.full_tensor()
        if dp > 1:
            device = loss.device if loss is not None else self.rt.device
            counts = torch.tensor([micro, samples, tokens], dtype=torch.float64, device=device)
            packed = counts if loss is None else torch.cat([loss.double(), counts])
            ledger = self.rt._ledger
            if ledger is not None:  # every rank logs the same steps: a collective like any
                ledger.note("all_reduce", packed, "step metrics")
            try:
                dist.all_reduce(packed, group=self._dp_group())
            except RuntimeError as err:
                if ledger is not None:
                    ledger.diagnose(err)  # raises DesyncError when the ranks disagree
                raise
            if not self._main:
                return 0.0, 0, 0, 0, None
        else:
            packed = loss if loss is not None else torch.zeros(0)
        values = _read(packed, norm)
        if isinstance(norm, torch.Tensor):
            norm = values.pop()
        if dp > 1:
            if loss is None:
                values.insert(0, 0.0)
            loss_sum, micro, samples, tokens = values
            samples, tokens = samples / self._cp, tokens / self._cp  # counted by every cp peer
        else:
            loss_sum = values[0] if values else 0.0
        return loss_sum, int(micro), int(samples), int(tokens), _float(norm)

    def _dp_group(self):
        if not self._group_known:
            self._group, self._group_known = self.rt._loss_group(), True
        return self._group

    def _lr(self) -> float | None:
        if self._opt is None:
            self._opt = raw_optimizer(self.rt.optimizer)
        groups = getattr(self._opt, "param_groups", None)
        if not groups or "lr" not in groups[0]:
            return None
        return float(groups[0]["lr"])

    def _trace_flops(self, batch: Any, units: int) -> None:
        """FLOPs per token (or sample) of forward+backward, from a meta trace of the first
        batch; a model the trace cannot run just gets no TFLOP/s and MFU."""
        shadow, self._shadow = self._shadow, None
        from ..rewrite.trace import trace_model

        try:
            trace = trace_model(shadow, batch)
        except Exception as err:  # noqa: BLE001 — MFU is optional, the run is not
            log.info("overdrive: no TFLOP/s or MFU (the meta trace of the first batch "
                     "failed: %s: %s)", type(err).__name__, err)
            return
        if units:
            self._flops_per_token = (trace.forward_flops + trace.backward_flops) / units


# --------------------------------------------------------------------------- helpers


def _float(x: Any) -> float | None:
    return None if x is None else float(x)


def _read(values: torch.Tensor, norm: Any) -> list[float]:
    """``values`` (1-d) and, when it is a tensor, the grad norm last: one host copy."""
    if isinstance(norm, torch.Tensor):
        if hasattr(norm, "full_tensor"):  # a DTensor norm (FSDP/TP)
            norm = norm.full_tensor()
        norm = norm.detach().reshape(1).to(device=values.device, dtype=values.dtype)
        values = torch.cat([values, norm]) if values.numel() else norm
    return values.tolist()


def token_count(batch: Any) -> int:
    """Tokens in a batch: ``input_ids``'s elements, else those of the first integer
    tensor with two or more dimensions; 0 when there is none."""
    if isinstance(batch, dict):
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor):
            return ids.numel()
        values = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        values = list(batch)
    else:
        values = [batch]
    for v in values:
        if isinstance(v, torch.Tensor) and v.ndim >= 2 and not v.is_floating_point() \
                and not v.is_complex() and v.dtype != torch.bool:
            return v.numel()
    return 0


def memory(cuda: bool) -> dict[str, float]:
    """The accelerator's allocated and peak memory (GB); on CPU, peak resident memory."""
    if cuda:
        return {"memory_allocated_gb": torch.cuda.memory_allocated() / _GB,
                "memory_peak_gb": torch.cuda.max_memory_allocated() / _GB}
    try:
        import resource
    except ImportError:  # Windows
        return {}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"memory_peak_gb": peak / (_GB if sys.platform == "darwin" else _GB / 1024)}


class _PeakRss:
    """The process's peak resident memory, read at most every ``RSS_INTERVAL_S``: a
    ``getrusage`` call costs about a microsecond, a fifth of a logged row's own cost, and
    a peak changes slowly (a row may show the peak of up to that long ago)."""

    def __init__(self):
        self._at = -RSS_INTERVAL_S
        self._value: dict[str, float] = {}

    def read(self, now: float) -> dict[str, float]:
        if now - self._at >= RSS_INTERVAL_S:
            self._at, self._value = now, memory(False)
        return self._value


def format_line(step: int, row: dict[str, float]) -> str:
    """``step 12 | loss 2.3141 | grad_norm 0.812 | lr 3.00e-04 | 51.2k tok/s | ...``"""
    parts = [f"step {step}"]
    if "loss" in row:
        parts.append(f"loss {row['loss']:.4f}")
    if "grad_norm" in row:
        parts.append(f"grad_norm {row['grad_norm']:.3f}")
    if "lr" in row:
        parts.append(f"lr {row['lr']:.2e}")
    if "tokens_per_s" in row:
        parts.append(f"{_si(row['tokens_per_s'])} tok/s")
    elif "samples_per_s" in row:
        parts.append(f"{_si(row['samples_per_s'])} samples/s")
    if "step_seconds" in row:
        parts.append(f"{row['step_seconds']:.3f} s/step")
    if "tflops" in row:
        parts.append(f"{row['tflops']:.1f} TFLOP/s mfu {row['mfu']:.1%}")
    if "memory_allocated_gb" in row:
        parts.append(f"mem {row['memory_allocated_gb']:.2f}/{row['memory_peak_gb']:.2f} GB")
    elif "memory_peak_gb" in row:
        parts.append(f"rss peak {row['memory_peak_gb']:.2f} GB")
    return " | ".join(parts)


def _si(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.1f}"
