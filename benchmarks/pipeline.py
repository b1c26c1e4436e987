"""Pipeline schedules on 2 CPU ranks (gloo): step time vs pp=1, idle fraction vs bubble.

    python benchmarks/pipeline.py            # launches itself with torchrun on 2 ranks
    python benchmarks/pipeline.py --quick

For each schedule (gpipe, 1f1b, interleaved-1f1b, looped-bfs, zero-bubble, zbv) a Llama
of 8 blocks trains under pp=2 on the same global batch as the baseline, pp=1 with ddp on
the same 2 ranks (each rank half the batch); rounds step every variant once, in turn.
Measured per rank: the median time of
``rt.forward_backward`` and the share of it the rank spent outside its stages' forward
and backward calls (``forward_one_chunk`` / ``backward_one_chunk`` /
``backward_weight_one_chunk``: waiting for the other stage, or in communication) — the
measured idle fraction, next to the bubble ``od.inspect`` predicts from the schedules'
action lists and per-stage FLOPs (forward f, backward 2f split as input f + weight f; the
first stage's input-backward 0). Target: predicted within 10 percentage points
of measured, per schedule (mean over ranks).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, emit, target

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("looped-bfs", 2),
             ("zero-bubble", 2), ("zbv", 2)]


def timed_stages(rt) -> dict:
    """Wrap this rank's torch stages so the time inside their compute calls adds up."""
    busy = {"s": 0.0}
    for stage in rt._pipeline.stages:
        for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
            fn = getattr(stage, name)

            def wrapped(*a, _fn=fn, **k):
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    busy["s"] += time.perf_counter() - t0

            setattr(stage, name, wrapped)
    return busy


class Variant:
    """One plan's runtime, stepped once per round (rounds interleave the variants, so
    the machine's load drifts over all of them alike)."""

    def __init__(self, schedule: str | None, spr: int, args, batch_rows: int):
        import torch
        import torch.distributed as dist

        import overdrive as od
        from overdrive.models.llama import tiny

        torch.manual_seed(0)
        model = tiny(n_layers=8, dim=args.dim, n_heads=4, vocab_size=512,
                     max_seq_len=args.seq)
        if schedule is None:
            plan = od.Plan(ddp=od.DDP())
            self.rows = batch_rows // dist.get_world_size()
        else:
            plan = od.Plan(parallel=od.Parallel(pp=2), pipeline=od.Pipeline(
                schedule=schedule, stages_per_rank=spr, microbatches=args.microbatches))
            self.rows = batch_rows
        self.rt = od.accelerate(model, plan, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4))
        self.busy = timed_stages(self.rt) if schedule is not None else None
        self.gen = torch.Generator().manual_seed(dist.get_rank() if schedule is None else 0)
        self.seq = args.seq
        self.times: list[float] = []
        self.idle: list[float] = []
        self.predicted = (self.rt.report["pipeline"].details["bubble_fraction"]
                          if schedule is not None else None)

    def step(self, record: bool) -> None:
        import torch
        import torch.distributed as dist

        ids = torch.randint(0, 512, (self.rows, self.seq), generator=self.gen)
        batch = {"input_ids": ids, "labels": ids}  # the model shifts them
        dist.barrier()
        if self.busy is not None:
            self.busy["s"] = 0.0
        t0 = time.perf_counter()
        self.rt.forward_backward(batch)
        dt = time.perf_counter() - t0
        self.rt.optimizer.step()
        self.rt.optimizer.zero_grad()
        if record:
            self.times.append(dt)
            if self.busy is not None:
                self.idle.append(1.0 - self.busy["s"] / dt)

    def result(self) -> dict:
        out = {"step_s": statistics.median(self.times)}
        if self.busy is not None:
            out["idle"] = statistics.median(self.idle)
            out["predicted_bubble"] = self.predicted
        return out


def worker(args) -> None:
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo")
    rows = args.microbatches * 2
    variants = {"pp1_ddp": Variant(None, 1, args, rows)}
    for schedule, spr in SCHEDULES:
        variants[schedule] = Variant(schedule, spr, args, rows)
    for rnd in range(args.warmup + args.steps):
        for v in variants.values():
            v.step(record=rnd >= args.warmup)
    results = {name: v.result() for name, v in variants.items()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.steps, args.warmup = 4, 1
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pp.json"
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", __file__, "--worker", "--out", str(out),
               "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--microbatches", str(args.microbatches), "--dim", str(args.dim),
               "--seq", str(args.seq)]
        subprocess.run(cmd, check=True, env=env, cwd=str(ROOT / "benchmarks"))
        import json

        ranks = json.loads(out.read_text())
    base = max(r["pp1_ddp"]["step_s"] for r in ranks)
    rows, targets = {}, []
    for schedule, spr in SCHEDULES:
        step = max(r[schedule]["step_s"] for r in ranks)
        idle = [r[schedule]["idle"] for r in ranks]
        predicted = ranks[0][schedule]["predicted_bubble"]
        measured = sum(idle) / len(idle)
        rows[schedule] = {"stages_per_rank": spr, "step_s": round(step, 4),
                          "step_vs_pp1": round(step / base, 3),
                          "idle_per_rank": [round(i, 4) for i in idle],
                          "idle_mean": round(measured, 4), "predicted_bubble": predicted}
        targets.append(target(f"predicted bubble minus measured idle (absolute), {schedule} "
                              f"({args.microbatches} micro-batches)",
                              abs(predicted - measured) if predicted is not None else None,
                              0.10))
        targets.append(target(f"{schedule} step time / pp=1 ddp step time, 2 ranks "
                              "(reference, no target)", step / base, None))
    emit("pipeline", {"config": {"ranks": 2, "blocks": 8, "dim": args.dim, "seq": args.seq,
                                 "microbatches": args.microbatches,
                                 "global_batch": args.microbatches * 2,
                                 "steps": args.steps},
                      "pp1_ddp_step_s": round(base, 4), "schedules": rows,
                      "targets": targets})


if __name__ == "__main__":
    main()
