"""Built-in step metrics: every ``log_every`` optimizer steps, one row and one log line.

The runtime feeds the meter from the places that already see the numbers: ``rt.backward``
(the loss appended to one flat list, no sync: on the CPU the float the non-finite guard
already read, elsewhere the detached tensor), ``rt.clip_grad_norm_`` (the
norm), ``rt.shard``'s loader (real rows and tokens, added to counters; ``token_counter``
finds the tokens' place once an epoch) and the optimizer step. A logged step only
*records* one tuple (the step, where its losses end in the list, the counts, the norm,
lr, the clock); nothing is read from the device, reduced or written then. These feeds run
on every micro-step, so each is a few attribute updates in one frame.

Every ``FLUSH_INTERVAL_S`` seconds (at the first row, and at ``rt.finish()`` / exit) the
recorded rows are read with one device→host copy and completed:

* one data rank: at once;
* several (data × context-parallel ranks): each rank of rank 0's group sums its part of
  every row (loss sum, micro-steps, samples, tokens) and posts the batch under one key of
  the TCP store torchrun runs; rank 0 adds the parts it finds (``check``, never a wait) and
  a row is complete when every rank's part is in. No collective is issued for the
  metrics, so nothing can desync or block a step; a row reaches the trackers up to one
  interval (or one step, when steps are slower) after its step. ``rt.finish()`` (or the
  exit) posts the last parts; rank 0 waits up to ``FINISH_WAIT_S`` for them.

Rows reach the trackers in step order; ``rt.log`` rows logged meanwhile wait behind the
step rows recorded before them.

Row keys: ``loss`` (mean over the micro-steps of the interval and the data-parallel
× context-parallel ranks: under ``loss_normalization="tokens"`` the exact global token
mean, ``runtime/loss_norm.py``), ``grad_norm``, ``lr``, ``step_seconds``,
``samples_per_s``, ``tokens_per_s`` (both global), ``tflops`` and ``mfu`` (per device,
where a peak is known: FLOPs from the meta-device trace of the first batch),
``memory_allocated_gb`` and ``memory_peak_gb`` (the accelerator's at the step; on CPU the
process's peak resident memory, read at the flush).

A flush gives its rows to the trackers in one ``Tracking.log_rows`` call, column by column
(``rows.StepColumns``: no dict per row unless a tracker asks for them).

The same numbers go to rank 0's "overdrive" logger as one compact line, at most every
``LINE_INTERVAL_S`` seconds (a fast loop logs every row, but prints a line twice a second).
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import os
import sys
import time
import weakref
from collections import deque
from typing import Any, Callable

import torch
import torch.distributed as dist

from .grad import raw_optimizer
from .jsonl import all_floats
from .rows import Rows, StepColumns

log = logging.getLogger("overdrive")

_GB = 1024 ** 3
# the log line comes at most this often (every row still reaches the trackers): a line per
# step of a fast loop would cost more than the step and scroll past unread
LINE_INTERVAL_S = 0.5
# recorded rows are read, completed and written at most this long after their step: one
# device read and one store round trip per interval instead of per step
FLUSH_INTERVAL_S = 0.5
FINISH_WAIT_S = 10.0  # rank 0's wait at finish for the other ranks' last parts
_MAX_LOSSES = 4096  # recorded micro-step losses that force a flush (device memory bound)
_RECORD_WIDTH = 10  # the fields of on_step's record tuple
_INSTANCES = itertools.count()  # meters made under a process group: the same on every rank


class StepMeter:
    """Records every logged step, completes the rows in batches; ``rt._meter`` (None when
    step metrics are off)."""

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
        self._opt = None  # the torch optimizer whose lr is logged (found at the first row)
        self._line_at = -LINE_INTERVAL_S  # when the last log line was printed
        self._flushed_at: float | None = None  # None: the first row flushes at once
        # the micro-step losses since the last flush, detached, in one flat list (read
        # with one copy at the flush); _cut: how many of them recorded rows hold
        self._losses: list[torch.Tensor] = []
        self._cut = 0
        self._recorded: list[tuple] = []  # rows recorded since the last flush
        self._dtensor_loss = False
        self._closed = False
        self._exit_hook = False
        self._peers: _Peers | None = None
        if self._dp > 1 and dist.is_available() and dist.is_initialized():
            self._peers = _Peers(self, next(_INSTANCES))
        # rank 0: recorded rows not yet given to the trackers, in order, and rt.log rows
        # waiting behind them
        self._queue: deque = deque()
        # since the last recorded row: samples, tokens, optimizer steps, the clipped norm
        self._samples = self._tokens = self._steps = 0
        self._norm = None
        self._t_last: float | None = None
        tracking.before_finish = self.finish
        if self._main:
            tracking.hold = self.hold

    @classmethod
    def for_runtime(cls, rt, config, tracking, flops_model=None) -> "StepMeter":
        from .peaks import peak_flops

        peak = peak_flops(rt.device)
        return cls(rt, config.log_every, tracking, peak=peak,
                   shadow=flops_model if peak is not None else None)

    # -- feeds: a few attribute updates each (they run on every micro-step) ------------
    def on_batch(self, batch: Any, n_real: int, tokens: int) -> None:
        """A training batch from ``rt.shard``: its real rows and tokens (``token_counter``)."""
        if self._t_last is None:
            self._t_last = time.perf_counter()
        self._samples += n_real
        self._tokens += tokens
        if self._shadow is not None:
            self._trace_flops(batch, tokens or n_real)

    def on_backward(self, loss: Any, value: float | None = None) -> None:
        """A micro-step's loss: ``value`` where the non-finite guard already read it (a
        CPU scalar), else the tensor, detached (read at the flush: no sync here)."""
        if self._t_last is None:
            self._t_last = time.perf_counter()
        if type(loss) is torch.Tensor:
            if value is not None:
                self._losses.append(value)
            elif loss.numel() == 1:
                self._losses.append(loss.detach())
        elif isinstance(loss, torch.Tensor) and loss.numel() == 1:
            if hasattr(loss, "full_tensor"):
                self._dtensor_loss = True  # loss parallel: made whole on the logged step
            self._losses.append(loss.detach())

    def on_clip(self, norm: Any) -> None:
        if norm is not None:
            self._norm = norm

    def on_step(self) -> None:
        """An optimizer step; a logged one is *recorded*: one tuple of the step, where
        its losses end in the flat list, the counts since the last row, the norm, the
        lr, the clock (one frame: this runs every step)."""
        self._steps += 1
        if self.rt.step % self.every or self._closed:
            return
        now = time.perf_counter()
        elapsed = now - (self._t_last if self._t_last is not None else now)
        self._t_last = now
        losses, cut = self._losses, self._cut
        micro = len(losses) - cut
        if not self._main and self._peers is None:  # nothing to add up, nothing to log
            losses.clear()
            self._samples = self._tokens = self._steps = 0
            return
        if self._dtensor_loss and micro:  # a collective of the loss's mesh: every rank
            losses[cut:] = [_whole_sum(losses[cut:])]  # does it at this step
        self._cut = cut = len(losses)
        opt = self._opt if self._opt is not None else self._find_optimizer()
        groups = getattr(opt, "param_groups", None)
        lr = groups[0].get("lr") if groups else None
        if lr is not None and type(lr) is not float:  # a tensor lr (capturable
            lr = float(lr)  # optimizers) changes in place: read now
        self._recorded.append((self.rt.step, cut, micro, self._samples, self._tokens,
                               self._norm, lr, elapsed, self._steps,
                               memory(True) if self._cuda else None))
        self._samples = self._tokens = self._steps = 0
        self._norm = None
        if not self._exit_hook:  # the last rows are flushed at exit too
            self._exit_hook = True
            atexit.register(_finish_at_exit, weakref.ref(self))
        if self._flushed_at is None or now - self._flushed_at >= FLUSH_INTERVAL_S \
                or cut >= _MAX_LOSSES:
            self._flush(now)

    # -- a flush: read, complete, write ---------------------------------------------
    def _flush(self, now: float, final: bool = False) -> None:
        self._flushed_at = now
        recorded, self._recorded = self._recorded, []
        losses, cut = self._losses, self._cut
        self._losses, self._cut = losses[cut:], 0  # a partial interval stays
        # the records column by column (on_step's tuple: step, cut, micro, samples,
        # tokens, norm, lr, elapsed, steps, memory)
        fields = list(zip(*recorded)) if recorded else [()] * _RECORD_WIDTH
        sums = _loss_sums(losses, cut, fields[1], fields[2])
        if not self._main:
            self._peers.post([(r[0], [s, r[2], r[3], r[4]]) for r, s in zip(recorded, sums)],
                             final)
            return
        norms = _norms(list(fields[5]))
        # on CPU the peak resident memory, read once a flush (a peak up to one interval
        # after the row's step); an accelerator's is each row's own, read at its step
        memory_now = None if self._cuda else memory(False)
        queue, peers = self._queue, self._peers
        if peers is None and not queue:  # one data rank, nothing waiting: complete now
            if not recorded:
                return
            memories = [memory_now] * len(recorded) if memory_now is not None else \
                list(fields[9])
            self._give([self._columns(fields, sums, fields[2], fields[3], fields[4], norms,
                                      memories)], now)
            return
        for rec, loss_sum, norm in zip(recorded, sums, norms):
            entry = _Entry(rec, [loss_sum, rec[2], rec[3], rec[4]], norm,
                           rec[9] if memory_now is None else memory_now)
            queue.append(entry)
            if peers is not None:
                peers.expect(entry)
        if peers is not None:
            peers.collect()
        self._deliver(now)

    def _deliver(self, now: float) -> None:
        """Give the complete rows at the head of the queue to the trackers, in order
        (one batch: one write per tracker)."""
        queue, segments, run = self._queue, [], []
        while queue:
            entry = queue[0]
            if isinstance(entry, _UserRow):
                queue.popleft()
                if run:
                    segments.append(self._entry_columns(run))
                    run = []
                segments.append((entry.row, entry.step))
                continue
            if entry.missing:
                break
            queue.popleft()
            run.append(entry)
        if run:
            segments.append(self._entry_columns(run))
        self._give(segments, now)

    def _give(self, segments: list, now: float) -> None:
        """The rows to the trackers in one batch, and the log line of the last step row
        (at most every LINE_INTERVAL_S)."""
        if not segments:
            return
        self.tracking.log_rows(Rows(segments))
        if now - self._line_at >= LINE_INTERVAL_S and log.isEnabledFor(logging.INFO):
            last = next((s for s in reversed(segments) if isinstance(s, StepColumns)), None)
            if last is not None:
                self._line_at = now
                log.info("%s", format_line(last.steps[-1], last.row(-1)))

    def _entry_columns(self, entries: list["_Entry"]) -> StepColumns:
        totals = [e.total for e in entries]
        loss_sums, micros, samples, tokens = (list(c) for c in zip(*totals))
        return self._columns(list(zip(*[e.rec for e in entries])), loss_sums, micros,
                             samples, tokens, [e.norm for e in entries],
                             [e.memory for e in entries])

    def _columns(self, fields: list[tuple], loss_sums: list, micros: list, samples: list,
                 tokens: list, norms: list, memories: list[dict]) -> StepColumns:
        """The rows of the records ``fields`` (column by column: ``zip(*records)``; the
        sums over the ranks given), a list per key; a key no row has is left out."""
        steps, lrs, elapsed, nsteps = list(fields[0]), list(fields[6]), fields[7], fields[8]
        if self._cp > 1:  # counted by every cp peer
            samples = [int(s / self._cp) for s in samples]
            tokens = [int(t / self._cp) for t in tokens]
        cols: dict[str, list] = {
            "loss": [s / m if m else None for s, m in zip(loss_sums, micros)],
            "grad_norm": norms,
            "lr": lrs,
            "step_seconds": [e / n if e > 0 else None for e, n in zip(elapsed, nsteps)],
            "samples_per_s": [s / e if e > 0 and s else None for s, e in zip(samples, elapsed)],
            "tokens_per_s": [t / e if e > 0 and t else None for t, e in zip(tokens, elapsed)],
        }
        if self._peak is not None and self._flops_per_token:
            per_token, world = self._flops_per_token, self.rt.world_size
            work = [per_token * (t or s) / world for t, s in zip(tokens, samples)]
            cols["tflops"] = [w / e / 1e12 if e > 0 else None for w, e in zip(work, elapsed)]
            cols["mfu"] = [w / e / self._peak if e > 0 else None for w, e in zip(work, elapsed)]
        for key in memories[0]:
            cols[key] = [m.get(key) for m in memories]
        n = len(steps)
        return StepColumns(steps, {k: c for k, c in cols.items() if c.count(None) != n})

    # -- rt.log and rt.finish -----------------------------------------------------------
    def hold(self, row: dict[str, float], step: int) -> bool:
        """Queue an ``rt.log`` row behind the step rows recorded before it (True), or
        False when none is waiting (the row goes straight to the trackers)."""
        if self._recorded:  # local work only (rank 0 posts nothing): the order is kept
            self._flush(time.perf_counter())
        if not self._queue:
            return False
        self._queue.append(_UserRow(row, step))
        return True

    def finish(self) -> None:
        """The last rows: flushed (the other ranks' last parts posted; rank 0 waits for
        them up to FINISH_WAIT_S) and given to the trackers. No more rows after it."""
        if self._closed:
            return
        self._closed = True
        now = time.perf_counter()
        try:
            if self._recorded or (self._peers is not None and not self._main):
                self._flush(now, final=True)
            if self._main and self._peers is not None and self._queue:
                self._peers.wait_for_all(FINISH_WAIT_S)
                self._deliver(now)
        except Exception as err:  # noqa: BLE001 — the run is over; say what was lost
            log.warning("overdrive: the last step-metric rows could not be completed "
                        "(%s: %s)", type(err).__name__, err)
        if self._main and self._queue:
            steps = [e.rec[0] for e in self._queue if isinstance(e, _Entry)]
            log.warning("overdrive: step-metric rows of steps %s..%s not written: another "
                        "rank's part did not arrive within %.0f s (call rt.finish() on every "
                        "rank before the process group goes away)", steps[0], steps[-1],
                        FINISH_WAIT_S)
            user_rows = [(e.row, e.step) for e in self._queue if isinstance(e, _UserRow)]
            if user_rows:
                self.tracking.log_rows(Rows(user_rows))
            self._queue.clear()

    def _find_optimizer(self):
        """The torch optimizer whose lr is logged (found at the first row)."""
        self._opt = raw_optimizer(self.rt.optimizer)
        return self._opt

    def _loss_group(self):
        return self.rt._loss_group()

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


def _finish_at_exit(ref) -> None:
    meter = ref()
    if meter is not None:
        meter.tracking.finish()  # which finishes the meter first


class _Entry:
    """A recorded row on rank 0: its record, its sums so far (``total``: loss sum,
    micro-steps, samples, tokens), its norm and memory, how many ranks' parts are still
    missing."""

    __slots__ = ("rec", "total", "norm", "memory", "missing")

    def __init__(self, rec: tuple, total: list, norm: float | None, memory: dict):
        self.rec, self.total, self.norm, self.memory = rec, total, norm, memory
        self.missing = 0


class _UserRow:
    __slots__ = ("row", "step")

    def __init__(self, row: dict, step: int):
        self.row, self.step = row, step


class _Peers:
    """The other ranks of rank 0's dp × cp group, through the TCP store: each posts its
    parts of the rows under ``PREFIX/<rank>/<n>`` (n = 0, 1, …); rank 0 adds them up."""

    def __init__(self, meter: StepMeter, instance: int):
        self.meter = meter
        run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = f"overdrive/step_metrics/{run}/{restart}/{instance}"
        self.rank = dist.get_rank()
        self._store = None
        self._ranks: list[int] | None = None  # the group's other ranks (rank 0: its peers)
        self._member = None  # whether this rank is in rank 0's group
        self._next: dict[int, int] = {}  # rank 0: the next post number of each peer
        self._done: set[int] = set()  # rank 0: peers whose last post came
        self._posted = 0
        self._waiting: dict[int, _Entry] = {}  # rank 0: step -> its entry, parts missing
        self._early: dict[int, list] = {}  # rank 0: parts of steps not yet recorded here

    def _setup(self) -> None:
        if self._ranks is not None:
            return
        group = self.meter._loss_group()
        ranks = dist.get_process_group_ranks(group) if group is not None else \
            list(range(dist.get_world_size()))
        self._member = 0 in ranks
        self._ranks = [r for r in ranks if r != self.rank]
        self._next = {r: 0 for r in self._ranks}
        self._store = dist.distributed_c10d._get_default_store()

    def _key(self, rank: int, n: int) -> str:
        return f"{self.prefix}/{rank}/{n}"

    # -- the other ranks ------------------------------------------------------------------
    def post(self, parts: list[tuple[int, list]], final: bool) -> None:
        self._setup()
        if not self._member:  # another data group's rank: rank 0 does not log its rows
            return
        if not parts and not final:
            return
        value = json.dumps({"rows": parts, "last": final})
        self._store.set(self._key(self.rank, self._posted), value)
        self._posted += 1

    # -- rank 0 ---------------------------------------------------------------------------
    def expect(self, entry: _Entry) -> None:
        self._setup()
        entry.missing = len(self._ranks)
        step = entry.rec[0]
        for part in self._early.pop(step, ()):
            self._add(entry, part)
        if entry.missing:
            self._waiting[step] = entry

    def _add(self, entry: _Entry, part: list) -> None:
        total = entry.total
        for i in range(4):
            total[i] += part[i]
        entry.missing -= 1
        if not entry.missing:
            del_step = entry.rec[0]
            self._waiting.pop(del_step, None)

    def collect(self) -> bool:
        """Read the posts that are in (never waits); True when one came."""
        self._setup()
        store, got = self._store, False
        for peer in self._ranks:
            if peer in self._done:
                continue
            while True:
                key = self._key(peer, self._next[peer])
                if not store.check([key]):
                    break
                post = json.loads(store.get(key))
                store.delete_key(key)
                self._next[peer] += 1
                got = True
                for step, part in post["rows"]:
                    entry = self._waiting.get(step)
                    if entry is not None:
                        self._add(entry, part)
                    else:
                        self._early.setdefault(step, []).append(part)
                if post["last"]:
                    self._done.add(peer)
                    break
        return got

    def wait_for_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pause = 0.002
        while self._waiting and len(self._done) < len(self._ranks):
            if not self.collect():
                if time.monotonic() >= deadline:
                    return
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
        self.collect()


# --------------------------------------------------------------------------- reading


def _whole_sum(losses: list[torch.Tensor]) -> torch.Tensor:
    """The sum of DTensor (loss-parallel) losses as one plain tensor."""
    loss = torch.stack([t.reshape(()) for t in losses]).sum()
    return loss.full_tensor() if hasattr(loss, "full_tensor") else loss


def _loss_sums(losses: list[torch.Tensor], cut: int, ends: tuple,
               micros: tuple) -> list[float]:
    """Each recorded row's sum of micro-step losses (``losses[:cut]``, each row's ending
    at its record's ``ends`` entry, ``micros`` losses long): every loss read in one copy."""
    if not cut:
        return [0.0] * len(ends)
    flat = losses[:cut]
    values = flat if all_floats(flat) else _read(flat)
    if cut == len(ends) and micros.count(1) == cut:
        return values  # a loss a row (no accumulation): the sums are the losses
    sums, start = [], 0
    for end in ends:
        sums.append(values[start] if end - start == 1 else sum(values[start:end]))
        start = end
    return sums


def _read(losses: list) -> list[float]:
    """Scalar tensors (and floats) as floats, the tensors read in one copy."""
    try:
        try:
            values = torch.stack(losses).tolist()  # scalars (0-d), as losses are
        except RuntimeError:  # some of shape (1,): all made 0-d
            values = torch.stack([t.reshape(()) for t in losses]).tolist()
        if isinstance(values[0], list):  # all of shape (1,): [[v], ...]
            values = [v[0] for v in values]
    except (RuntimeError, TypeError):  # mixed devices or kinds (floats): one at a time
        values = [float(t) for t in losses]
    return values


def _norms(norms: list[Any]) -> list[float | None]:
    """The grad norms as floats: the tensors among them read in one copy."""
    if norms.count(None) == len(norms):  # no clipping
        return norms
    tensors = [n for n in norms if isinstance(n, torch.Tensor)]
    if not tensors:
        return [None if n is None else float(n) for n in norms]
    plain = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in tensors]
    try:
        values = iter(torch.stack([n.detach().reshape(()).double() for n in plain]).tolist())
    except (RuntimeError, TypeError):
        values = iter([float(n) for n in plain])
    return [next(values) if isinstance(n, torch.Tensor) else (None if n is None else float(n))
            for n in norms]


# --------------------------------------------------------------------------- helpers


_TOKEN_DTYPES = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                           torch.uint16, torch.uint32, torch.uint64})


def token_count(batch: Any) -> int:
    """Tokens in a batch: ``input_ids``'s elements, else those of the first integer
    tensor with two or more dimensions; 0 when there is none."""
    where = _token_slot(batch)
    return 0 if where is None else _slot(batch, where).numel()


def token_counter(batch: Any) -> Callable[[Any, int], int] | None:
    """``count(batch, n_real)``: the tokens of a loader's batches shaped like ``batch``
    (resolved once an epoch: which entry holds them), counting only the ``n_real`` real
    rows of a padded batch; a batch shaped otherwise is counted from scratch. None when
    ``batch`` holds no token tensor (the loader's batches count none)."""
    where = _token_slot(batch)
    if where is None:
        return None

    def count(b: Any, n_real: int) -> int:
        try:
            t = _slot(b, where)
        except (KeyError, IndexError, TypeError):
            t = None
        if not isinstance(t, torch.Tensor) or t.ndim < 2:
            other = _token_slot(b)
            if other is None:
                return 0
            t = _slot(b, other)
        tokens, rows = t.numel(), t.shape[0]
        return tokens if rows == n_real or not rows else tokens * n_real // rows
    return count


def _token_slot(batch: Any) -> Any:
    """The key or index of the batch's token tensor (see ``token_count``), or None."""
    if isinstance(batch, dict):
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor):
            return "input_ids"
        items = batch.items()
    elif isinstance(batch, (list, tuple)):
        items = enumerate(batch)
    elif isinstance(batch, torch.Tensor):
        return ... if batch.dtype in _TOKEN_DTYPES and batch.ndim >= 2 else None
    else:
        return None
    for where, v in items:
        if isinstance(v, torch.Tensor) and v.dtype in _TOKEN_DTYPES and v.ndim >= 2:
            return where
    return None


def _slot(batch: Any, where: Any) -> Any:
    return batch if where is ... else batch[where]


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
