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
first stage's input-backward 0), and next to the same model with the cost of one
cross-rank hop measured on this mesh: every round also times a ping-pong of one
micro-batch's activation between the two ranks (half the round trip: one hop) and one
micro-batch's forward through the whole model (over the number of stages: the mean
stage's forward ``f``) and its backward; the medians over the rounds give ``hop = hop_s /
f_s``, ``b = backward_s / forward_s`` (the model's default 2) and each rank's time for
that same forward and backward over the ranks' mean (``rank_time``: how much slower the
shared machine runs each rank), one value each for every schedule. Target: the predicted
bubble with these measured inputs within 10
percentage points of measured idle, per schedule (mean over ranks). Also reported per
rank: the share of the step spent waiting on sends/receives and the loss broadcast
(the rest of the idle share is the schedule's own Python work between actions), and the
backward / forward time ratio inside the schedule's own stage calls.
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
    """Wrap this rank's torch stages so the time inside their compute calls adds up
    (``busy``; ``forward`` / ``backward`` split it by kind)."""
    busy = {"s": 0.0, "forward": 0.0, "backward": 0.0}
    for stage in rt._pipeline.stages:
        for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
            fn = getattr(stage, name)
            kind = "forward" if name.startswith("forward") else "backward"

            def wrapped(*a, _fn=fn, _kind=kind, **k):
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    dt = time.perf_counter() - t0
                    busy["s"] += dt
                    busy[_kind] += dt

            setattr(stage, name, wrapped)
    return busy


WAITS = {"s": 0.0}


def time_waits() -> None:
    """Add up the time schedules spend waiting on their sends/receives (torch's
    ``_wait_batch_p2p``) and in the loss broadcast: the waiting part of the idle time."""
    import torch.distributed as dist
    from torch.distributed.pipelining import schedules

    def timed(fn):
        def wrapped(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                WAITS["s"] += time.perf_counter() - t0
        return wrapped

    schedules._wait_batch_p2p = timed(schedules._wait_batch_p2p)
    dist.broadcast = timed(dist.broadcast)


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
        self.waiting: list[float] = []
        self.backward_over_forward: list[float] = []
        details = self.rt.report["pipeline"].details if schedule is not None else {}
        self.predicted = details.get("bubble_fraction")
        self.flops = details.get("stage_flops")

    def step(self, record: bool) -> None:
        import torch
        import torch.distributed as dist

        ids = torch.randint(0, 512, (self.rows, self.seq), generator=self.gen)
        batch = {"input_ids": ids, "labels": ids}  # the model shifts them
        dist.barrier()
        if self.busy is not None:
            self.busy.update(s=0.0, forward=0.0, backward=0.0)
        WAITS["s"] = 0.0
        t0 = time.perf_counter()
        self.rt.forward_backward(batch)
        dt = time.perf_counter() - t0
        self.rt.optimizer.step()
        self.rt.optimizer.zero_grad()
        if record:
            self.times.append(dt)
            if self.busy is not None:
                self.idle.append(1.0 - self.busy["s"] / dt)
                self.waiting.append(WAITS["s"] / dt)
                self.backward_over_forward.append(self.busy["backward"] / self.busy["forward"])

    def result(self) -> dict:
        out = {"step_s": statistics.median(self.times)}
        if self.busy is not None:
            out["idle"] = statistics.median(self.idle)
            out["waiting"] = statistics.median(self.waiting)
            out["backward_over_forward"] = statistics.median(self.backward_over_forward)
            out["predicted_bubble"] = self.predicted
            out["stage_flops"] = self.flops
        return out


class Probe:
    """One hop, one forward and its backward, timed each round: the cost model's
    measured inputs."""

    def __init__(self, args, mb_rows: int):
        import torch

        from overdrive.models.llama import tiny

        torch.manual_seed(0)
        self.model = tiny(n_layers=8, dim=args.dim, n_heads=4, vocab_size=512,
                          max_seq_len=args.seq)
        self.ids = torch.randint(0, 512, (mb_rows, args.seq))
        self.act = torch.randn(mb_rows, args.seq, args.dim)
        self.hop_s: list[float] = []
        self.forward_s: list[float] = []
        self.backward_s: list[float] = []

    def step(self, record: bool) -> None:
        import torch.distributed as dist

        peer = 1 - dist.get_rank()
        dist.barrier()
        reps, t0 = 4, time.perf_counter()
        for _ in range(reps):  # rank 0 sends then receives, rank 1 the reverse
            if dist.get_rank() == 0:
                dist.send(self.act, peer)
                dist.recv(self.act, peer)
            else:
                dist.recv(self.act, peer)
                dist.send(self.act, peer)
        hop = (time.perf_counter() - t0) / (2 * reps)
        dist.barrier()
        t0 = time.perf_counter()
        out = self.model(input_ids=self.ids, labels=self.ids)
        fwd = time.perf_counter() - t0
        t0 = time.perf_counter()
        out.loss.backward()
        bwd = time.perf_counter() - t0
        self.model.zero_grad(set_to_none=True)
        if record:
            self.hop_s.append(hop)
            self.forward_s.append(fwd)
            self.backward_s.append(bwd)

    def result(self) -> dict:
        return {"hop_s": statistics.median(self.hop_s),
                "forward_s": statistics.median(self.forward_s),
                "backward_s": statistics.median(self.backward_s)}


def worker(args) -> None:
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo")
    time_waits()
    rows = args.microbatches * 2  # 2 rows per micro-batch
    variants = {"pp1_ddp": Variant(None, 1, args, rows), "probe": Probe(args, 2)}
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
    load_at_start = [round(x, 2) for x in os.getloadavg()]
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
    from overdrive.bubble import bubble_fraction

    base = max(r["pp1_ddp"]["step_s"] for r in ranks)
    hop_s = statistics.mean(r["probe"]["hop_s"] for r in ranks)
    forward_s = statistics.mean(r["probe"]["forward_s"] for r in ranks)
    backward = statistics.mean(r["probe"]["backward_s"] for r in ranks) / forward_s
    work = [r["probe"]["forward_s"] + r["probe"]["backward_s"] for r in ranks]
    rank_time = tuple(w / statistics.mean(work) for w in work)  # same work, each rank
    rows, targets = {}, []
    for schedule, spr in SCHEDULES:
        step = max(r[schedule]["step_s"] for r in ranks)
        idle = [r[schedule]["idle"] for r in ranks]
        compute_only = ranks[0][schedule]["predicted_bubble"]
        flops = tuple(ranks[0][schedule]["stage_flops"]) or None
        hop = hop_s / (forward_s / (2 * spr))  # in units of the mean stage's forward
        predicted = bubble_fraction(schedule, 2, args.microbatches, spr, flops, hop, backward,
                                    rank_time)
        measured = sum(idle) / len(idle)
        rows[schedule] = {"stages_per_rank": spr, "step_s": round(step, 4),
                          "step_vs_pp1": round(step / base, 3),
                          "idle_per_rank": [round(i, 4) for i in idle],
                          "idle_mean": round(measured, 4),
                          "waiting_per_rank": [round(r[schedule]["waiting"], 4) for r in ranks],
                          "backward_over_forward_per_rank": [
                              round(r[schedule]["backward_over_forward"], 3) for r in ranks],
                          "predicted_bubble_no_comm": compute_only,
                          "hop_vs_stage_forward": round(hop, 4),
                          "predicted_bubble": predicted}
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
                      "pp1_ddp_step_s": round(base, 4),
                      "measured_hop_s": round(hop_s, 6),
                      "measured_model_forward_s": round(forward_s, 4),
                      "measured_backward_over_forward": round(backward, 3),
                      "measured_rank_time": [round(t, 3) for t in rank_time],
                      "probe_per_rank": [r["probe"] for r in ranks],
                      "load_average": [round(x, 2) for x in os.getloadavg()],
                      "load_average_at_start": load_at_start,
                      "schedules": rows,
                      "targets": targets})


if __name__ == "__main__":
    main()
