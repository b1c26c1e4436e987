"""Per-step overhead of the runtime: raw PyTorch loop vs overdrive vs HF Accelerate.

A tiny model, so the loop's own cost shows. The variants run interleaved, one optimizer
step each in turn, and the median step time is compared with the raw loop in the same
run. Targets: overdrive ≤ 1.01× raw; overdrive logging its step metrics every step
(trackers=("jsonl",), log_every=1, the defaults) ≤ 1.02× the same runtime without trackers.

    python benchmarks/step_overhead.py --steps 300
    torchrun --standalone --nproc-per-node=2 benchmarks/step_overhead.py --dist --steps 200

Prints one JSON object and writes benchmarks/results/step_overhead[_dist].json.
Under torchrun every variant is data parallel over gloo: raw DDP, overdrive's ddp pass,
Accelerate's prepare (cpu=True). There, overdrive_no_ledger (the same runtime with its
collective ledger detached, as OVERDRIVE_LEDGER=0 builds it) gives the ledger's own cost:
overdrive / overdrive_no_ledger (target ≤ 1.01).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

import overdrive as od
from _common import emit, target

MICRO_BATCH, DIM = 8, 128


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM, DIM), torch.nn.GELU(),
                               torch.nn.Linear(DIM, DIM), torch.nn.GELU(),
                               torch.nn.Linear(DIM, 1))


def sgd(params):
    return torch.optim.SGD(params, lr=1e-3)


# --------------------------------------------------------------------------- variants
# Each builder returns step(xs, ys): one optimizer step over len(xs) micro-batches.


def raw_variant(accum: int, distributed: bool) -> Callable:
    model = tiny_model()
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = sgd(model.parameters())

    def step(xs, ys):
        for i, (x, y) in enumerate(zip(xs, ys)):
            last = i == len(xs) - 1
            ctx = model.no_sync() if distributed and not last else _null
            with ctx:
                loss = F.mse_loss(model(x), y)
                (loss / accum if accum > 1 else loss).backward()
        opt.step()
        opt.zero_grad()
    return step


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


_null = _Null()


_RUNTIMES: dict[int, od.Runtime] = {}  # the overdrive variant's runtime, by grad_accum


def overdrive_variant(accum: int, distributed: bool, **tracking) -> Callable:
    plan = od.Plan(grad_accum=accum, ddp=od.DDP() if distributed else None)
    rt = od.accelerate(tiny_model(), plan, optimizer=sgd, **(tracking or {"trackers": ()}))
    if not tracking:
        _RUNTIMES[accum] = rt
    return overdrive_step(rt)


def overdrive_step(rt) -> Callable:
    def step(xs, ys):
        for x, y in zip(xs, ys):
            with rt.accumulate():
                loss = F.mse_loss(rt.model(x), y)
                rt.backward(loss)
                rt.optimizer.step()
                rt.optimizer.zero_grad()
    return step


def overdrive_no_ledger_variant(accum: int, distributed: bool) -> Callable:
    """The overdrive variant's own runtime with its collective ledger detached for the
    step (as OVERDRIVE_LEDGER=0 would build it): the same model and memory, so
    overdrive / this is the ledger's cost alone, free of the build-order effect
    (single process: no ledger either way)."""
    rt = _RUNTIMES[accum]
    step = overdrive_step(rt)

    def without_ledger(xs, ys):
        ledger, rt._ledger = rt._ledger, None
        try:
            step(xs, ys)
        finally:
            rt._ledger = ledger
    return without_ledger


def logged_variant(accum: int, distributed: bool) -> Callable:
    """overdrive with its default tracking: step metrics every step into metrics.jsonl
    and the log line (to a file here, as a terminal would slow the whole machine)."""
    run_dir = tempfile.mkdtemp(prefix="od-step-overhead-")
    return overdrive_variant(accum, distributed, trackers=("jsonl",), run_dir=run_dir,
                             log_every=1)


def accelerate_variant(accum: int, distributed: bool) -> Callable:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = Accelerator(gradient_accumulation_steps=accum, cpu=True)
    model = tiny_model()
    model, opt = acc.prepare(model, sgd(model.parameters()))

    def step(xs, ys):
        for x, y in zip(xs, ys):
            with acc.accumulate(model):
                loss = F.mse_loss(model(x), y)
                acc.backward(loss)
                opt.step()
                opt.zero_grad()
    return step


# "raw_again" is the raw loop a second time: its ratio is the run's noise floor (A/A).
BUILDERS = {"raw": raw_variant, "raw_again": raw_variant, "overdrive": overdrive_variant,
            "overdrive_no_ledger": overdrive_no_ledger_variant,
            "overdrive_logged": logged_variant, "accelerate": accelerate_variant}


# The order the variants take turns in (rotated every step): each overdrive variant
# follows a raw one, never the other overdrive variant, whose model it shares (it would
# find that model's tensors warm in the cache).
RUN_ORDER = ["raw", "overdrive", "raw_again", "overdrive_no_ledger", "accelerate",
             "overdrive_logged"]


# --------------------------------------------------------------------------- timing


def measure(accum: int, steps: int, warmup: int, distributed: bool) -> list[dict]:
    variants, errors = {}, {}
    for name, build in BUILDERS.items():
        try:
            variants[name] = build(accum, distributed)
        except Exception as err:  # noqa: BLE001 — reported in the row
            errors[name] = f"{type(err).__name__}: {err}"
    torch.manual_seed(1)
    xs = [torch.randn(MICRO_BATCH, DIM) for _ in range(accum)]
    ys = [torch.randn(MICRO_BATCH, 1) for _ in range(accum)]
    times: dict[str, list[float]] = {n: [] for n in variants}
    names = [n for n in RUN_ORDER if n in variants]
    for i in range(warmup + steps):
        order = names[i % len(names):] + names[: i % len(names)]  # rotate who goes first
        for name in order:
            if distributed:
                dist.barrier()
            t0 = time.perf_counter()
            variants[name](xs, ys)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
    # baseline: both raw runs pooled (the first-built model is often a few % slower)
    raw_times = times.get("raw", []) + times.get("raw_again", [])
    raw = statistics.median(raw_times) if raw_times else None
    rows = []
    for name in BUILDERS:
        if name in errors:
            rows.append({"variant": name, "grad_accum": accum, "error": errors[name]})
            continue
        med = statistics.median(times[name])
        rows.append({"variant": name, "grad_accum": accum, "median_us": round(med * 1e6, 1),
                     "ratio_vs_raw": round(med / raw, 4) if raw else None})
    return rows


def ledger_cost(rows: list[dict]) -> dict[int, float | None]:
    """overdrive's median step / the same without the collective ledger, per grad_accum."""
    med = {(r["variant"], r["grad_accum"]): r.get("median_us") for r in rows}
    out = {}
    for accum in sorted({r["grad_accum"] for r in rows}):
        on, off = med.get(("overdrive", accum)), med.get(("overdrive_no_ledger", accum))
        out[accum] = round(on / off, 4) if on and off else None
    return out


def _log_to_file() -> None:
    """overdrive's log lines (the per-step metrics line) go to a file, as in a batch job."""
    import logging

    logger = logging.getLogger("overdrive")
    handler = logging.FileHandler(os.path.join(tempfile.mkdtemp(prefix="od-log-"), "log.txt"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--dist", action="store_true", help="run under torchrun (gloo, raw DDP baseline)")
    args = p.parse_args()
    torch.set_num_threads(1)
    _log_to_file()
    distributed = args.dist and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.dist and not distributed:
        raise SystemExit("--dist: launch with torchrun --nproc-per-node=2 (or overdrive launch)")
    if distributed and not dist.is_initialized():
        dist.init_process_group("gloo")
    rows = []
    for accum in (1, 4):
        rows += measure(accum, args.steps, args.warmup, distributed)
    ratios = {f"overdrive_accum{r['grad_accum']}": r.get("ratio_vs_raw")
              for r in rows if r["variant"] == "overdrive"}
    ledger = ledger_cost(rows)
    world = dist.get_world_size() if distributed else 1
    baseline = "raw DDP loop" if distributed else "raw loop"
    targets = [target(f"overdrive / {baseline}, grad_accum {r['grad_accum']}, "
                      f"{world} process(es)", r.get("ratio_vs_raw"), 1.01)
               for r in rows if r["variant"] == "overdrive"]
    if distributed:  # a single process has no ledger: nothing to measure
        targets += [target(f"collective ledger: overdrive / overdrive without it, grad_accum "
                           f"{accum}, {world} processes", ratio, 1.01)
                    for accum, ratio in ledger.items()]
    by = {(r["variant"], r["grad_accum"]): r.get("median_us") for r in rows}
    for accum in (1, 4):
        logged, plain = by.get(("overdrive_logged", accum)), by.get(("overdrive", accum))
        targets.append(target(
            f"overdrive with step metrics logged every step / without, grad_accum {accum}, "
            f"{world} process(es)", round(logged / plain, 4) if logged and plain else None,
            1.02))
    targets += [target(f"Accelerate / {baseline}, grad_accum {r['grad_accum']}, "
                       f"{world} process(es) (reference, no target)", r.get("ratio_vs_raw"),
                       None) for r in rows if r["variant"] == "accelerate"]
    result = {
        "processes": world,
        "model": f"MLP {DIM}-{DIM}-{DIM}-1, micro-batch {MICRO_BATCH}, SGD, 1 thread",
        "steps": args.steps, "rows": rows, "overdrive_ratio": ratios,
        "ledger_ratio": {f"accum{a}": r for a, r in ledger.items()} if distributed else None,
        "baseline": f"median of the {baseline}'s steps, raw and raw_again pooled; raw_again "
                    "vs raw shows the run's noise",
        "targets": targets,
    }
    if not distributed or dist.get_rank() == 0:
        emit("step_overhead_dist" if distributed else "step_overhead", result)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
