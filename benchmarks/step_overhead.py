"""Per-step overhead of the runtime, measured on the whole loop as users run it.

Every variant iterates a real ``torch.utils.data.DataLoader`` (shuffled, collated on the
fly): the raw loop iterates it directly, overdrive iterates ``rt.shard(loader)``,
Accelerate iterates ``accelerator.prepare(loader)``. One optimizer step = ``grad_accum``
micro-steps (fetch a batch, forward, loss, backward), the optimizer step and zero_grad.
Two step sizes: a tiny MLP (~0.3 ms a step: overhead-bound, where a µs shows) and a small
Llama (``overdrive.models.llama``, sized to ~10 ms a step on one core).

The variants run interleaved: one optimizer step each, in a rotating order, round after
round, in one process, so load from other processes on the machine hits all of them
alike. Each step is timed in process CPU time (``time.process_time``: the time the
process is descheduled while other processes run is not counted; wall-clock numbers are
kept beside them). Reported per variant: the median step (µs), the µs it adds per
optimizer step measured *paired* (median over rounds of its step minus the mean of the
two raw loops' steps of the same round) and the ratio 1 + added / raw median. ``raw_again`` (the raw
loop a second time, its own model and loader) is the run's noise floor (A/A). The rounds
are cut into ``--blocks`` consecutive blocks and the µs added is also given per block:
their spread says how noisy the run was.

Targets (1 process, grad_accum 1 and 4, both sizes): overdrive ≤ 1.01× raw and ≤ 25 µs
added per optimizer step; its default step metrics (``trackers=("jsonl",)``,
``log_every=1``: a row per step in ``metrics.jsonl``, the log line to a file) ≤ 1.02×
the same runtime with its step meter detached (``overdrive_unlogged``: the logged
variant's own model and runtime, so nothing but the logging differs; the two trade slots
every other round), from their per-round differences: the mean of the two halves'
medians (the rounds in each order: what the step before a slot adds cancels, ``paired``),
and the plain mean (a reference: it keeps the flushes, but also every rare slow step of
both slots; its A/A read up to 1.04). The flush and log-line intervals are scaled by the
number of variants taking turns, so that a flush holds the rows of 0.5 s of the logged
variant's own steps, as in a loop running alone, not 1/7 of them with 7 times a flush's
fixed cost each (``solo_intervals``). The logged runtime is then also run in a loop of
its own (``logging_solo``: blocks of 64 steps with the meter attached / detached, ABBA),
its blocks' paired difference ≤ 1.02 and, amortized, the meter's calls timed in place in
that loop, flushes included (``InPlace``; net of the timer's own cost, which an empty
call timed the same way once a step reads: ``timer_control``) ≤ 1.02. A flush of 64
rows or more hands them to the jsonl writer process (``overdrive/runtime/jsonl.py``),
which formats them on its own CPU: the CPU it used is reported per row
(``writer_cpu_us_per_row``) beside the target (``--inline-jsonl``: written in the
training process instead);
``--logging-aa`` keeps the meter attached in both slots (that ratio is the comparison's
own noise), and the step metrics' bookkeeping is also timed alone (the feeds one step
makes on the logged runtime's meter, 20,000 times, with the flushes of those rows: µs per
step, and 1 + that / the raw step; warm caches, so a lower bound). Accelerate's rows are
a reference: its ratio depends on the step size (a fixed per-step cost is a larger share
of a small step).

    python benchmarks/step_overhead.py --rounds 600
    torchrun --standalone --nproc-per-node=2 benchmarks/step_overhead.py --dist --rounds 300

Under torchrun every variant is data parallel over gloo: raw DDP (``DistributedSampler``,
``no_sync()`` on the micro-steps before the last, DDP's default 25 MB buckets), overdrive's
ddp pass, Accelerate's prepare (cpu=True). There ``overdrive_no_ledger`` is the same
runtime with its collective ledger detached for its steps: overdrive / it is the ledger's
bookkeeping cost (target ≤ 1.01; the two trade slots every other round, as a fixed slot
alone was worth 2–3% at a 2 ms step), from their per-round differences (the mean of the
two orders' medians, ``paired``), as far as those resolve it (a few µs are below this
machine's noise floor; ``--ledger-aa`` keeps the ledger attached in both slots: that
ratio is the comparison's own noise, up to 1.02 in 300 rounds at the MLP size); the same
bookkeeping is also timed alone (the ledger calls one step makes, 20,000 times: µs per
step, and 1 + that / the raw step), and the overdrive runtime runs in a loop of its own
with its ledger attached / detached (``ledger_solo``: the blocks' paired difference and
the ledger's calls timed in place, net of the timer's cost, each ≤ 1.01). DDP's gradient
sync is its C++ built-in for every overdrive variant (no comm hook): the ledger notes it
once per synced backward. The ledger's watchdog thread is measured apart as its CPU time
per second of wall time (it runs for every variant alike).

Prints one JSON object and writes benchmarks/results/step_overhead[_dist].json.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

import overdrive as od
from _common import emit, target

ADDED_US_LIMIT = 25.0  # µs added per optimizer step (1 process)


# --------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    name: str
    describe: str
    build: Callable[[], torch.nn.Module]
    dataset: Dataset
    micro_batch: int
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]


MLP_DIM = 128


def mlp_workload(batches: int) -> Workload:
    def build():
        torch.manual_seed(0)
        d = MLP_DIM
        return torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.GELU(),
                                   torch.nn.Linear(d, d), torch.nn.GELU(),
                                   torch.nn.Linear(d, 1))

    gen = torch.Generator().manual_seed(1)
    n = 8 * batches
    data = TensorDataset(torch.randn(n, MLP_DIM, generator=gen), torch.randn(n, 1, generator=gen))

    def loss(model, batch):
        x, y = batch
        return F.mse_loss(model(x), y)

    return Workload("mlp", f"MLP {MLP_DIM}-{MLP_DIM}-{MLP_DIM}-1, micro-batch 8, (x, y) "
                    "tuples", build, data, 8, loss)


LLAMA = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, max_seq_len=64)
LLAMA_BATCH = 2


class TokenDataset(Dataset):
    """Fixed random token rows as ``{"input_ids": ...}`` dicts (collated by the loader)."""

    def __init__(self, n: int, seq: int, vocab: int):
        self.ids = torch.randint(vocab, (n, seq), generator=torch.Generator().manual_seed(2))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i]}


def llama_workload(batches: int) -> Workload:
    from overdrive.models.llama import Llama, LlamaConfig

    def build():
        model = Llama(LlamaConfig(**LLAMA))
        model.init_weights(seed=0)
        return model

    def loss(model, batch):
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    seq = LLAMA["max_seq_len"]
    return Workload("llama", f"Llama dim {LLAMA['dim']}, {LLAMA['n_layers']} layers, "
                    f"vocab {LLAMA['vocab_size']}, micro-batch {LLAMA_BATCH}×{seq} tokens, "
                    "dict batches", build, TokenDataset(LLAMA_BATCH * batches, seq,
                                                        LLAMA["vocab_size"]),
                    LLAMA_BATCH, loss)


WORKLOADS = {"mlp": mlp_workload, "llama": llama_workload}


def sgd(params):
    return torch.optim.SGD(params, lr=1e-3)


# --------------------------------------------------------------------------- variants
# Each builder returns step(): one optimizer step over grad_accum micro-batches, drawn
# from the variant's own loader (a new epoch starts when it runs out, as in a loop over
# epochs). Epochs hold a multiple of grad_accum batches.


class Batches:
    """An endless stream of an iterable's batches, epoch after epoch (``set_epoch`` on
    the sampler or loader that has one, as a loop over epochs would call it)."""

    def __init__(self, loader, set_epoch: Callable[[int], None] | None = None):
        self.loader, self.set_epoch, self.epoch = loader, set_epoch, 0
        self.it = iter(loader)

    def next(self):
        try:
            return next(self.it)
        except StopIteration:
            self.epoch += 1
            if self.set_epoch is not None:
                self.set_epoch(self.epoch)
            self.it = iter(self.loader)
            return next(self.it)


def user_loader(w: Workload, distributed: bool) -> DataLoader:
    """The DataLoader a user writes (overdrive and Accelerate shard it themselves)."""
    return DataLoader(w.dataset, batch_size=w.micro_batch, shuffle=True, drop_last=True)


def raw_variant(w: Workload, accum: int, distributed: bool) -> Callable:
    model = w.build()
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
        sampler = DistributedSampler(w.dataset, shuffle=True, drop_last=True)
        loader = DataLoader(w.dataset, batch_size=w.micro_batch, sampler=sampler,
                            drop_last=True)
        batches = Batches(loader, sampler.set_epoch)
    else:
        batches = Batches(user_loader(w, False))
    opt = sgd(model.parameters())

    def step():  # DDP: no_sync() on the micro-steps before the last
        for i in range(accum):
            batch = batches.next()
            with (model.no_sync() if i < accum - 1 else _null):
                loss = w.loss(model, batch)
                (loss / accum if accum > 1 else loss).backward()
        opt.step()
        opt.zero_grad()

    def step_one_process():  # what a single-process loop writes: no context per micro-step
        for _ in range(accum):
            loss = w.loss(model, batches.next())
            (loss / accum if accum > 1 else loss).backward()
        opt.step()
        opt.zero_grad()
    return step if distributed else step_one_process


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


_null = _Null()


_RUNTIMES: dict[tuple[str, int], Any] = {}  # the overdrive variant's (runtime, batches)


def overdrive_variant(w: Workload, accum: int, distributed: bool, **tracking) -> Callable:
    plan = od.Plan(grad_accum=accum, ddp=od.DDP() if distributed else None)
    rt = od.accelerate(w.build(), plan, optimizer=sgd, **(tracking or {"trackers": ()}))
    batches = Batches(rt.shard(user_loader(w, distributed)))
    if not tracking:
        _RUNTIMES[(w.name, accum)] = rt, batches
    return overdrive_step(rt, w, batches, accum)


def overdrive_step(rt, w: Workload, batches: Batches, accum: int) -> Callable:
    def step():
        for _ in range(accum):
            batch = batches.next()
            with rt.accumulate():
                loss = w.loss(rt.model, batch)
                rt.backward(loss)
                rt.optimizer.step()
                rt.optimizer.zero_grad()
    return step


LEDGER_AA = False  # --ledger-aa: overdrive_no_ledger keeps its ledger (the A/A control)
LOGGING_AA = False  # --logging-aa: overdrive_unlogged keeps the meter (the A/A control)
INLINE_JSONL = False  # --inline-jsonl: metrics.jsonl written in the training process


def overdrive_no_ledger_variant(w: Workload, accum: int, distributed: bool) -> Callable:
    """The overdrive variant's own runtime and loader with its collective ledger
    detached for the step (as OVERDRIVE_LEDGER=0 would build it): the same model and
    memory, so overdrive / this is the ledger's bookkeeping alone, free of build-order
    effects. (A single process has no ledger: there the two are the same.) With
    ``--ledger-aa`` the same wrapper puts the ledger back instead: overdrive / this is
    then the comparison's own noise."""
    rt, batches = _RUNTIMES[(w.name, accum)]
    return detached(rt, "_ledger", overdrive_step(rt, w, batches, accum),
                    to=rt._ledger if LEDGER_AA else None)


def detached(rt, attr: str, step: Callable, to: Any = None) -> Callable:
    """``step`` run with ``rt.<attr>`` set to ``to`` (None: detached; restored after
    each step)."""
    def run():
        kept = getattr(rt, attr)
        setattr(rt, attr, to)
        try:
            step()
        finally:
            setattr(rt, attr, kept)
    return run


_RUN_DIRS: list[str] = []  # tracking run dirs: temporary, never inside the repository


_LOGGED: dict[tuple[str, int], Any] = {}  # the logged variant's runtime


def logged_variant(w: Workload, accum: int, distributed: bool) -> Callable:
    """overdrive with its default tracking: step metrics every step into metrics.jsonl
    and the log line (to a file here, as a terminal would slow the whole machine)."""
    run_dir = tempfile.mkdtemp(prefix="od-step-overhead-")
    _RUN_DIRS.append(run_dir)
    plan = od.Plan(grad_accum=accum, ddp=od.DDP() if distributed else None)
    rt = od.accelerate(w.build(), plan, optimizer=sgd, trackers=("jsonl",), run_dir=run_dir,
                       log_every=1)
    _LOGGED[(w.name, accum)] = rt
    _IN_PLACE[(w.name, accum)] = InPlace(rt._meter, METER_CALLS)
    return overdrive_step(rt, w, Batches(rt.shard(user_loader(w, distributed))), accum)


_IN_PLACE: dict[tuple[str, int], "InPlace"] = {}  # the logged meter's timed calls


class InPlace:
    """Calls of one object (the step meter's feeds and flushes, the ledger's entries)
    timed where they run, inside the loop's steps: each between two ``perf_counter``
    reads (wall time), a call made inside another (a flush inside ``on_step``) in the
    outer one's time. That is the whole of what the object runs in this process, on the
    loop's own cold caches, free of the block-to-block noise of a paired difference;
    what it cannot see is what the object does to the rest of the step (the paired rows
    are that read). The timer's own cost on those cold caches (0.4–2.4 µs a call) is
    counted too: ``timer_control`` measures it, to be taken off."""

    def __init__(self, obj: Any, names: tuple[str, ...]):
        self.seconds, self.calls, self._depth = 0.0, 0, 0
        clock = time.perf_counter
        for name in names:
            setattr(obj, name, self._timed(getattr(obj, name), clock))

    def _timed(self, call: Callable, clock: Callable) -> Callable:
        def timed(*args, **kwargs):
            self._depth += 1
            t0 = clock()
            try:
                return call(*args, **kwargs)
            finally:
                self._depth -= 1
                if not self._depth:
                    self.seconds += clock() - t0
                    self.calls += 1
        return timed

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def per_call(self) -> float:
        return self.seconds / max(self.calls, 1)

    def net_seconds(self, control: "InPlace") -> float:
        """``seconds`` less the timer's own cost of each call, as ``control`` read it."""
        return self.seconds - self.calls * control.per_call()


class _Empty:
    def call(self) -> None:
        return None


def timer_control() -> tuple[InPlace, Callable[[], None]]:
    """An empty method timed as ``InPlace`` times calls: called once a step in the same
    loop, it reads what the timing itself costs a call there."""
    empty = _Empty()
    return InPlace(empty, ("call",)), empty.call


METER_CALLS = ("on_batch", "on_backward", "on_step", "_flush")
LEDGER_CALLS = ("note_engine", "point")


def start_writer(rt) -> float | None:
    """The jsonl writer process started before the timed rounds, as a loop this fast
    starts it at its first flush of 64 rows or more: once a run (a few ms, reported
    apart), not a cost of the timed rows. Returns its start in ms (process CPU)."""
    tracker = _jsonl_tracker(rt)
    if INLINE_JSONL or tracker is None or tracker._writer is not None or tracker._inline or \
            tracker._path is None:
        return None
    c0 = time.process_time()
    tracker._start_writer()
    return round((time.process_time() - c0) * 1e3, 2) if tracker._writer else None


def _jsonl_tracker(rt):
    """Rank 0's jsonl tracker of ``rt`` (None elsewhere or when it has none)."""
    if not rt.is_main:
        return None
    return next((t for t in rt._tracking._trackers if t.name == "jsonl"), None)


def finish_logged(w: Workload, accum: int) -> dict:
    """``rt.finish()`` of the logged runtime: its rows written, and the CPU the jsonl
    writer process used (the children's CPU time, counted once it is reaped: µs per
    row written; None when its rows were written in this process)."""
    import resource

    rt = _LOGGED.get((w.name, accum))
    if rt is None or not rt.is_main:
        return {}
    tracker = _jsonl_tracker(rt)
    writer = tracker is not None and tracker._writer is not None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    rt.finish()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows = sum(1 for _ in open(os.path.join(rt._tracking.run_dir, "metrics.jsonl")))
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"rows_written": rows, "writer_process": writer,
            "writer_cpu_us_per_row": round(cpu / rows * 1e6, 2) if writer and rows else None}


def unlogged_variant(w: Workload, accum: int, distributed: bool) -> Callable:
    """The logged variant's own runtime with its step meter detached for the step (as
    ``log_every=0`` builds it; its own ``rt.shard`` loader, whose epochs start without the
    meter): the same model, memory and build, so logged / this is the logging alone. (A
    separately built runtime in another slot of the rotation differs from the first one
    by ±100 µs a step on this machine with no logging at all.)"""
    rt = _LOGGED[(w.name, accum)]
    batches = Batches(rt.shard(user_loader(w, distributed)))
    return detached(rt, "_meter", overdrive_step(rt, w, batches, accum),
                    to=rt._meter if LOGGING_AA else None)


def accelerate_variant(w: Workload, accum: int, distributed: bool) -> Callable:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = Accelerator(gradient_accumulation_steps=accum, cpu=True)
    model = w.build()
    model, opt, loader = acc.prepare(model, sgd(model.parameters()), user_loader(w, distributed))
    batches = Batches(loader, loader.set_epoch)

    def step():
        for _ in range(accum):
            batch = batches.next()
            with acc.accumulate(model):
                loss = w.loss(model, batch)
                acc.backward(loss)
                opt.step()
                opt.zero_grad()
    return step


# "raw_again" is the raw loop a second time: its ratio is the run's noise floor (A/A).
BUILDERS = {"raw": raw_variant, "raw_again": raw_variant, "overdrive": overdrive_variant,
            "overdrive_no_ledger": overdrive_no_ledger_variant,
            "overdrive_logged": logged_variant, "overdrive_unlogged": unlogged_variant,
            "accelerate": accelerate_variant}

# The order the variants take turns in (rotated every round): each overdrive variant
# follows another model's step, never the variant whose model it shares (it would find
# that model's tensors warm in the cache).
RUN_ORDER = ["raw", "overdrive", "raw_again", "overdrive_no_ledger", "overdrive_unlogged",
             "accelerate", "overdrive_logged"]
# a variant that reuses another's runtime is built after it
BUILD_ORDER = [n for n in RUN_ORDER if n != "overdrive_unlogged"] + ["overdrive_unlogged"]
# pairs measured against each other trade places every other round, so that neither
# always follows the same step
SWAPPED = [("overdrive_unlogged", "overdrive_logged"), ("overdrive_no_ledger", "overdrive")]


# --------------------------------------------------------------------------- timing


def measure(w: Workload, accum: int, rounds: int, warmup: int, blocks: int,
            distributed: bool) -> dict:
    variants, errors = {}, {}
    for name in BUILD_ORDER:
        if name == "overdrive_no_ledger" and not distributed:
            continue  # no ledger on a single process: nothing to detach
        try:
            variants[name] = BUILDERS[name](w, accum, distributed)
        except Exception as err:  # noqa: BLE001 — reported in the row
            errors[name] = f"{type(err).__name__}: {err}"
    variants = {n: variants[n] for n in RUN_ORDER if n in variants}
    solo_intervals(len(variants))
    wall: dict[str, list[float]] = {n: [] for n in variants}
    cpu: dict[str, list[float]] = {n: [] for n in variants}
    names = list(variants)
    clock, cpu_clock = time.perf_counter, time.process_time
    logged = _LOGGED.get((w.name, accum))
    writer_start_ms = None
    for i in range(warmup + rounds):
        if i == warmup and logged is not None:
            writer_start_ms = start_writer(logged)
        order = names[i % len(names):] + names[: i % len(names)]  # rotate who goes first
        if i % 2:
            for a, b in SWAPPED:
                if a in order and b in order:
                    ia, ib = order.index(a), order.index(b)
                    order[ia], order[ib] = b, a
        for name in order:
            if distributed:
                dist.barrier()
            t0, c0 = clock(), cpu_clock()
            variants[name]()
            dt, dc = clock() - t0, cpu_clock() - c0
            if i >= warmup:
                wall[name].append(dt)
                cpu[name].append(dc)
    out = summarize(w, accum, cpu, errors, blocks)
    if "overdrive_no_ledger" in cpu:
        out["ledger"] = paired(cpu["overdrive"], cpu["overdrive_no_ledger"], blocks, warmup)
    if "overdrive_logged" in cpu and "overdrive_unlogged" in cpu:
        out["logging"] = paired(cpu["overdrive_logged"], cpu["overdrive_unlogged"], blocks, warmup)
        out["logging"]["writer_start_ms"] = writer_start_ms
    out["wall"] = summarize(w, accum, wall, errors, blocks)["variants"]
    return out


def summarize(w: Workload, accum: int, times: dict[str, list[float]], errors: dict,
              blocks: int) -> dict:
    """Per variant: median step, and the µs it adds per step measured *paired*: the median
    over rounds of (its step − the raw loop's step of the same round), which cancels the
    load that hits a whole round; ``ratio_vs_raw`` = 1 + added / the raw median. The
    rounds cut into ``blocks`` give the spread (added µs per block). ``raw_again``'s
    numbers are against ``raw`` alone: the A/A noise floor."""
    first, again = times.get("raw"), times.get("raw_again")
    if not first or not again:
        return {"workload": w.name, "grad_accum": accum, "variants": {
            n: {"error": e} for n, e in errors.items()}}
    # each round's baseline: the mean of its two raw steps (the first-built model tends
    # to be a little slower: neither raw run alone is the reference)
    base = [(a + b) / 2 for a, b in zip(first, again)]
    raw = statistics.median(first + again)
    n = len(base)
    rows = {}
    for name in RUN_ORDER:
        if name in errors:
            rows[name] = {"error": errors[name]}
            continue
        if name not in times or name == "raw":
            continue
        ts = times[name]
        # raw_again against raw alone: the A/A noise floor
        diffs = [a - b for a, b in zip(ts, first if name == "raw_again" else base)]
        added = statistics.median(diffs)
        q = statistics.quantiles(ts, n=4)
        rows[name] = {
            "median_us": round(statistics.median(ts) * 1e6, 1),
            "iqr_us": [round(q[0] * 1e6, 1), round(q[2] * 1e6, 1)],
            "added_us": round(added * 1e6, 1),
            # the mean of the same differences: includes what comes every few hundred
            # steps (the step metrics' 0.5 s flush), which a median leaves out
            "added_us_mean": round(statistics.fmean(diffs) * 1e6, 1),
            "ratio_vs_raw": round(1 + added / raw, 4),
            "added_us_per_block": per_block_us(diffs, blocks),
        }
    q = statistics.quantiles(first, n=4)
    rows = {"raw": {"median_us": round(statistics.median(first) * 1e6, 1),
                    "iqr_us": [round(q[0] * 1e6, 1), round(q[2] * 1e6, 1)]}, **rows}
    return {"workload": w.name, "grad_accum": accum, "steps_per_variant": n,
            "raw_median_us": round(raw * 1e6, 1), "variants": rows}


def paired(on: list[float], off: list[float], blocks: int, warmup: int) -> dict:
    """A cost from its pair itself (the ledger: overdrive − overdrive_no_ledger; logging:
    overdrive_logged − overdrive_unlogged): the per-round differences of the two steps.
    The two share a round, so what loads the round cancels (the ratio of their medians
    each taken against the raw loops adds both rows' noise: an A/A read 1.019–1.023 on
    it). The pair trades places every other round (``SWAPPED``), so whatever the step
    before a slot adds (a cold cache after Accelerate's step) is +x in one half of the
    rounds and −x in the other: ``added`` is the mean of the two halves' medians, which
    cancels it (the median of all the rounds sits wherever the two halves' spreads put
    it). ``added_us_mean``: the plain mean, which keeps the rare slow steps (the
    logging's flushes). The A/A (``--ledger-aa``, ``--logging-aa``) is this estimator's
    noise."""
    diffs = [a - b for a, b in zip(on, off)]
    first = warmup % 2  # which half the first timed round is in
    halves = [statistics.median(h) for h in (diffs[first::2], diffs[1 - first::2]) if h]
    added = statistics.fmean(halves)
    base, mean = statistics.median(off), statistics.fmean(diffs)
    return {"added_us": round(added * 1e6, 1), "ratio": round(1 + added / base, 4),
            "added_us_halves": [round(h * 1e6, 1) for h in halves],
            "added_us_mean": round(mean * 1e6, 1), "ratio_mean": round(1 + mean / base, 4),
            "added_us_per_block": per_block_us(diffs, blocks)}


SOLO_BLOCK = 64  # optimizer steps a block of the solo loop: one epoch of the workloads


def solo_pair(rt, w: Workload, accum: int, distributed: bool, attr: str, in_place: InPlace,
              seconds: float, aa: bool, last: Callable[[], None] | None = None) -> dict:
    """A cost measured in a loop of its own, as a user runs one: ``rt`` alone, on a
    fresh ``rt.shard`` loader, in blocks of one epoch (``SOLO_BLOCK`` optimizer steps)
    with ``rt.<attr>`` (the step meter, the ledger) attached or detached, in the order
    attached, detached, detached, attached (drift over a quad cancels), for about
    ``seconds`` (``aa``: attached in all four, the A/A control). Reported: the median
    over quads of the attached blocks' step minus the detached ones' (``added_us``:
    every effect, the caches included), and its calls timed in place in the attached
    blocks (``in_place_us`` a step, net of the timer's own cost: ``timer_control``;
    ``last`` runs inside the timing at the end: the last rows' flush), each with 1 + it
    / the detached step."""
    obj = getattr(rt, attr)
    one_step = overdrive_step(rt, w, Batches(rt.shard(user_loader(w, distributed))), accum)
    control, empty = timer_control()

    def step() -> None:
        one_step()
        empty()

    clock = time.process_time

    def block(attached: bool) -> float:
        setattr(rt, attr, obj if attached or aa else None)  # a new epoch reads it
        if distributed:
            dist.barrier()
        c0 = clock()
        for _ in range(SOLO_BLOCK):
            step()
        return (clock() - c0) / SOLO_BLOCK

    quad_order = (True, False, False, True)
    try:
        quad = sum(block(a) for a in quad_order) * SOLO_BLOCK
        n = max(3, int(seconds / max(quad, 1e-9)))
        if distributed:  # every rank runs as many blocks
            t = torch.tensor([n])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            n = int(t)
        in_place.reset()
        control.reset()
        diffs, off = [], []
        for _ in range(n):
            a, b, c, d = (block(x) for x in quad_order)
            diffs.append((a + d - b - c) / 2)
            off += [b, c]
        if last is not None:
            last()
    finally:
        setattr(rt, attr, obj)
    base, added = statistics.median(off), statistics.median(diffs)
    steps = (4 if aa else 2) * n * SOLO_BLOCK
    in_place_us = in_place.net_seconds(control) / steps * 1e6
    return {"quads": n, "detached_median_us": round(base * 1e6, 1),
            "added_us": round(added * 1e6, 2), "ratio": round(1 + added / base, 4),
            "in_place_gross_us": round(in_place.seconds / steps * 1e6, 2),
            "timer_us_per_call": round(control.per_call() * 1e6, 2),
            "in_place_us": round(in_place_us, 2),
            "ratio_in_place": round(1 + in_place_us / (base * 1e6), 4)}


def logging_solo(w: Workload, accum: int, distributed: bool, seconds: float) -> dict | None:
    """``solo_pair`` of the logged runtime's step meter (its flush and log-line intervals
    a lone loop's, 0.5 s; the last rows' flush timed in place too)."""
    from overdrive.runtime import step_metrics

    rt, in_place = _LOGGED.get((w.name, accum)), _IN_PLACE.get((w.name, accum))
    if rt is None or rt._meter is None or in_place is None:
        return None
    step_metrics.FLUSH_INTERVAL_S, step_metrics.LINE_INTERVAL_S = _SOLO
    meter = rt._meter
    return solo_pair(rt, w, accum, distributed, "_meter", in_place, seconds, LOGGING_AA,
                     last=lambda: meter._flush(time.perf_counter()))


def ledger_solo(w: Workload, accum: int, seconds: float) -> dict | None:
    """``solo_pair`` of the overdrive runtime's collective ledger (2 processes)."""
    rt = _RUNTIMES.get((w.name, accum), (None,))[0]
    if rt is None or rt._ledger is None:
        return None
    return solo_pair(rt, w, accum, True, "_ledger", InPlace(rt._ledger, LEDGER_CALLS),
                     seconds, LEDGER_AA)


def per_block_us(diffs: list[float], blocks: int) -> list[float]:
    """The median paired difference (µs) of each of ``blocks`` consecutive runs of rounds:
    the spread of an added cost over the run."""
    n = len(diffs)
    return [round(statistics.median(diffs[b * n // blocks:(b + 1) * n // blocks]) * 1e6, 1)
            for b in range(blocks)]


def ledger_bookkeeping_us(name: str, accum: int, steps: int = 20000) -> float | None:
    """µs of CPU per optimizer step the collective ledger's bookkeeping takes, timed alone
    (the paired step comparison cannot resolve a few µs under load): the calls one DDP
    step makes on it, in rt.accumulate (a micro-step counted), rt.backward (the error
    check, the gradient sync's one entry on the synced micro-step, ``inside`` set and
    reset) and rt.optimizer.step (the point), on a ledger of the same kind with no
    watchdog. None on a single process (no ledger)."""
    rt = _RUNTIMES.get((name, accum), (None,))[0]
    if rt is None or rt._ledger is None or rt._handoff.engine_collectives is None:
        return None
    from overdrive.runtime.ledger import Ledger

    ledger = Ledger(0, 2, None, None, "benchmark")
    entry = rt._handoff.engine_collectives.synced_backward
    clock = time.process_time
    t0 = clock()
    for step in range(1, steps + 1):
        for micro in range(accum):
            if accum > 1:
                ledger.micro += 1
            if ledger.error is not None:
                ledger.raise_error()
            if micro == accum - 1:
                ledger.note_engine(entry, synced=True)
            ledger.inside = "rt.backward"
            ledger.inside = None
        ledger.point(step)
    return round((clock() - t0) / steps * 1e6, 2)


def solo_intervals(n_variants: int) -> None:
    """The step meter's flush and log-line intervals, scaled by the variants taking turns:
    both are wall time (0.5 s), and the logged variant runs one step in ``n_variants``,
    so its flushes would hold 1/n of the rows a loop running alone holds, and each row
    would carry n times its share of a flush's fixed cost (a write, the log line, the
    store round trips to the other ranks' parts). Scaled, a flush holds the rows of
    0.5 s of this variant's own steps, as in a real loop."""
    from overdrive.runtime import step_metrics

    step_metrics.FLUSH_INTERVAL_S = _SOLO[0] * n_variants
    step_metrics.LINE_INTERVAL_S = _SOLO[1] * n_variants


def _solo_defaults() -> tuple[float, float]:
    from overdrive.runtime import step_metrics

    return step_metrics.FLUSH_INTERVAL_S, step_metrics.LINE_INTERVAL_S


_SOLO = _solo_defaults()


def meter_bookkeeping_us(w: Workload, accum: int, steps: int = 20000) -> float | None:
    """µs of CPU per optimizer step the step metrics take, timed alone: the feeds one step
    makes (per micro-step rt.shard's ``on_batch`` with the batch's token count and
    rt.backward's ``on_backward``; ``on_step``) on the logged runtime's own meter, and
    the flushes of those rows (the last one forced inside the timing), so the rows'
    completion and their JSON lines are in. Warm caches: a lower bound of what the loop
    sees. None under torchrun (rank 0 would wait for the other ranks' parts of rows that
    are not theirs)."""
    from overdrive.runtime.step_metrics import token_counter

    rt = _LOGGED.get((w.name, accum))
    if rt is None or rt._meter is None or rt.world_size > 1:
        return None
    meter = rt._meter
    batch = next(iter(user_loader(w, False)))
    count = token_counter(batch)
    tokens = 0 if count is None else count(batch, w.micro_batch)
    with torch.no_grad():
        loss = w.loss(rt.model, batch)
    clock = time.process_time
    t0 = clock()
    for _ in range(steps):
        for _ in range(accum):
            meter.on_batch(batch, w.micro_batch, tokens)
            meter.on_backward(loss)
        meter.on_step()
    meter._flush(time.perf_counter())
    return round((clock() - t0) / steps * 1e6, 2)


def watchdog_share(seconds: float) -> float | None:
    """CPU seconds the ledger's watchdog thread used per wall second (None: no thread)."""
    import threading

    thread = next((t for t in threading.enumerate() if t.name == "overdrive-ledger"), None)
    if thread is None or not hasattr(time, "pthread_getcpuclockid"):
        return None
    clock = time.pthread_getcpuclockid(thread.ident)
    c0, t0 = time.clock_gettime(clock), time.perf_counter()
    time.sleep(seconds)
    return round((time.clock_gettime(clock) - c0) / (time.perf_counter() - t0), 5)


# --------------------------------------------------------------------------- targets


def targets_of(cases: list[dict], world: int, distributed: bool,
               watchdog: float | None) -> list[dict]:
    baseline = "raw DDP loop" if distributed else "raw loop"
    out = []
    for c in cases:
        v, accum, size, raw = c["variants"], c["grad_accum"], c["workload"], c["raw_median_us"]
        where = f"{size} (~{c['raw_median_us'] / 1000:.1f} ms step), grad_accum {accum}, " \
                f"{world} process(es)"
        od_row = v.get("overdrive", {})
        out.append(target(f"overdrive / {baseline}, {where}", od_row.get("ratio_vs_raw"),
                          1.01))
        if not distributed:
            out.append(target(f"overdrive: µs added per optimizer step vs the {baseline}, "
                              f"{where}", od_row.get("added_us"), ADDED_US_LIMIT))
        else:
            out.append(target(f"overdrive: µs added per optimizer step vs the {baseline}, "
                              f"{where} (reference)", od_row.get("added_us"), None))
            pair = c.get("ledger", {})
            control = " with it attached (A/A control)" if LEDGER_AA else " without it"
            out.append(target(f"collective ledger: overdrive / the same runtime{control}, "
                              f"{where} (the two orders' medians of the per-round "
                              f"differences: {pair.get('added_us')} µs, halves "
                              f"{pair.get('added_us_halves')}, per block "
                              f"{pair.get('added_us_per_block')})", pair.get("ratio"), 1.01))
            out += solo_targets("collective ledger", "attached / detached",
                                c.get("ledger_solo"), "", where, 1.01)
            alone = c.get("ledger_bookkeeping_us")
            out.append(target(f"collective ledger: 1 + its bookkeeping timed alone "
                              f"({alone} µs per optimizer step) / the raw step, {where}",
                              round(1 + alone / raw, 5) if alone is not None else None,
                              1.01))
        pair = c.get("logging", {})
        plain_is = "its meter attached too: A/A control" if LOGGING_AA else \
            "its meter detached"
        out.append(target(f"step metrics logged every step (jsonl + log line) / not "
                          f"logged (the same runtime, {plain_is}), {where} (the two orders' "
                          f"medians of the per-round differences: {pair.get('added_us')} µs, "
                          f"halves {pair.get('added_us_halves')}, per block "
                          f"{pair.get('added_us_per_block')})", pair.get("ratio"), 1.02))
        alone = c.get("meter_bookkeeping_us")
        if alone is not None:
            out.append(target(f"step metrics: 1 + their bookkeeping timed alone ({alone} µs "
                              f"per optimizer step, feeds, records and flushes) / the raw "
                              f"step, {where}", round(1 + alone / raw, 5), 1.02))
        writer = pair.get("writer_cpu_us_per_row")
        writer = f"; the jsonl writer process used {writer} µs of its own CPU a row" \
            if writer is not None else "; rows written in this process"
        out += solo_targets("step metrics", "logged / unlogged", c.get("logging_solo"),
                            f", amortized: flushes included{writer}", where, 1.02)
        out.append(target(f"step metrics: the plain mean of the per-round differences "
                          f"({pair.get('added_us_mean')} µs; reference: it keeps every "
                          f"rare slow step of both slots), {where}", pair.get("ratio_mean"),
                          None))
        acc = v.get("accelerate", {})
        out.append(target(f"Accelerate / {baseline}, {where} (reference: the ratio depends "
                          f"on the step size; µs added {acc.get('added_us')})",
                          acc.get("ratio_vs_raw"), None))
        again = v.get("raw_again", {})
        out.append(target(f"noise floor (A/A): raw loop again / raw loop, {where} "
                          f"(reference; µs {again.get('added_us')}, per block "
                          f"{again.get('added_us_per_block')})", again.get("ratio_vs_raw"),
                          None))
    if distributed and watchdog is not None:
        out.append(target(f"collective ledger's watchdog thread: CPU s per wall s (share of "
                          f"one core), {world} processes", watchdog, 0.01))
    return out


def solo_targets(what: str, blocks: str, solo: dict | None, in_place_note: str, where: str,
                 limit: float) -> list[dict]:
    """The two rows of a ``solo_pair``: its blocks' paired difference and its calls
    timed in place."""
    solo = solo or {}
    return [target(f"{what} in a loop of its own ({blocks} blocks of {SOLO_BLOCK} steps, "
                   f"{solo.get('quads')} quads; the median difference: "
                   f"{solo.get('added_us')} µs), {where}", solo.get("ratio"), limit),
            target(f"{what}: the calls timed in place in that loop ({solo.get('in_place_us')}"
                   f" µs a step{in_place_note}; net of the timer's own "
                   f"{solo.get('timer_us_per_call')} µs a call, read by an empty call timed "
                   f"the same way once a step: {solo.get('in_place_gross_us')} µs gross), "
                   f"{where}", solo.get("ratio_in_place"), limit)]


def _log_to_file() -> None:
    """overdrive's log lines (the per-step metrics line) go to a file, as in a batch job."""
    logger = logging.getLogger("overdrive")
    handler = logging.FileHandler(os.path.join(tempfile.mkdtemp(prefix="od-log-"), "log.txt"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=600, help="timed steps per variant (mlp)")
    p.add_argument("--llama-rounds", type=int, default=None,
                   help="timed steps per variant for the llama (default: rounds / 3)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--blocks", type=int, default=5, help="blocks for the per-block ratios")
    p.add_argument("--sizes", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--accum", nargs="*", type=int, default=[1, 4])
    p.add_argument("--dist", action="store_true", help="run under torchrun (gloo, raw DDP baseline)")
    p.add_argument("--solo-seconds", type=float, default=6.0,
                   help="seconds of each case's solo loops (solo_pair: logging, ledger)")
    p.add_argument("--inline-jsonl", action="store_true",
                   help="metrics.jsonl written in the training process, never by the "
                        "writer process (the comparison)")
    p.add_argument("--ledger-aa", action="store_true",
                   help="control: overdrive_no_ledger keeps its ledger (A/A of the ledger row)")
    p.add_argument("--logging-aa", action="store_true",
                   help="control: overdrive_unlogged keeps the step meter (A/A of the "
                        "logging rows)")
    args = p.parse_args()
    global LEDGER_AA, LOGGING_AA, INLINE_JSONL
    LEDGER_AA, LOGGING_AA, INLINE_JSONL = args.ledger_aa, args.logging_aa, args.inline_jsonl
    if args.inline_jsonl:
        from overdrive.runtime import tracking

        tracking.WRITER_MIN_ROWS = 1 << 62
    torch.set_num_threads(1)
    _log_to_file()
    distributed = args.dist and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.dist and not distributed:
        raise SystemExit("--dist: launch with torchrun --nproc-per-node=2 (or overdrive launch)")
    if distributed and not dist.is_initialized():
        dist.init_process_group("gloo")
    world = dist.get_world_size() if distributed else 1
    cases = []
    for size in args.sizes:
        rounds = args.rounds if size == "mlp" else (args.llama_rounds or max(args.rounds // 3, 30))
        for accum in args.accum:
            # epochs of 64 optimizer steps per rank
            w = WORKLOADS[size](64 * accum * world)
            t0 = time.perf_counter()
            cases.append(measure(w, accum, rounds, args.warmup, args.blocks, distributed))
            cases[-1]["seconds"] = round(time.perf_counter() - t0, 1)
            if distributed:
                cases[-1]["ledger_bookkeeping_us"] = ledger_bookkeeping_us(size, accum)
            else:
                cases[-1]["meter_bookkeeping_us"] = meter_bookkeeping_us(w, accum)
            cases[-1]["logging_solo"] = logging_solo(w, accum, distributed, args.solo_seconds)
            if distributed:
                cases[-1]["ledger_solo"] = ledger_solo(w, accum, args.solo_seconds)
            cases[-1].setdefault("logging", {}).update(finish_logged(w, accum))
            if not distributed or dist.get_rank() == 0:
                print(f"# {size} grad_accum {accum}: {cases[-1]['variants'].get('overdrive')}",
                      flush=True)
    watchdog = watchdog_share(5.0) if distributed else None
    result = {
        "processes": world,
        "workloads": {n: WORKLOADS[n](1).describe for n in args.sizes},
        "optimizer": "SGD lr 1e-3, 1 thread per process, shuffled DataLoader (drop_last)",
        "rounds": args.rounds, "blocks": args.blocks, "cases": cases,
        "ledger_watchdog_cpu_share": watchdog,
        "ledger_aa": LEDGER_AA,  # overdrive_no_ledger kept its ledger (control)
        "logging_aa": LOGGING_AA,  # overdrive_unlogged kept the step meter (control)
        "inline_jsonl": args.inline_jsonl,  # no jsonl writer process (the comparison)
        "clock": "process CPU time per optimizer step (time.process_time: the time other "
                 "processes on the machine take is not counted); wall-clock numbers under "
                 "each case's 'wall'",
        "baseline": f"the mean of the two {'raw DDP loops' if distributed else 'raw loops'}' "
                    "steps of the same round (paired); raw_again vs raw alone is the run's "
                    "noise floor; "
                    "added_us_per_block: the same in each of `blocks` consecutive blocks",
        "targets": targets_of(cases, world, distributed, watchdog),
    }
    if not distributed or dist.get_rank() == 0:
        emit("step_overhead_dist" if distributed else "step_overhead", result)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
