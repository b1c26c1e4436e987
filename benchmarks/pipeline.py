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
measured idle fraction, next to the idle ``overdrive.bubble`` predicts for each rank from
the schedules' action lists, per-stage FLOPs and costs measured on this mesh. Every
round also times (the probe): a ping-pong of one micro-batch's activation between the
two ranks (half the round trip: one hop); one micro-batch's forward through the whole
model (over the number of stages: the mean stage's forward ``f``), timed by piece
(embedding, blocks, final norm + head + loss: each stage's forward time is its blocks'
plus the embedding on the first stage and the rest on the last, in place of the traced
FLOPs, which miss the loss), and its backward (``b = backward / forward``); the 8 blocks alone (a middle stage: an activation in and
out) forward, full backward, and on a second forward torch's own split backward
(``stage_backward_input`` then ``stage_backward_weight``, what the zero-bubble schedules
run): the input and weight steps over that forward; and four forwards of a quarter of
the blocks in a row, whose spread about their round's mean (standard deviation of the
log) is the noise of one action's time (``jitter``). Each round's time of the same work
per rank over the ranks' mean is that round's rank speeds. The prediction
(``expected_idle``) replays each schedule ``--samples`` times with every action's time
drawn around its cost with that jitter and the rank speeds of one measured round, and
takes each rank's median, as the measurement takes the median over steps. Target: that
prediction within 10 percentage points of measured idle, per schedule (mean over
ranks). Also reported: the fixed-cost replay (no noise, median rank speeds), the one
``od.inspect`` shows (no hop, ``b = 2``), per rank the share of the step spent waiting on
sends/receives and the loss broadcast (the rest of the idle share is the schedule's own
Python work between actions), and the backward / forward time ratio inside the
schedule's own stage calls.
"""

from __future__ import annotations

import argparse
import math
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
        self.stage_blocks = [st["blocks"] for st in details.get("stages", [])]

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
            out["stage_blocks"] = self.stage_blocks
        return out


class Probe:
    """Timed each round: one hop, one forward and its backward, the split backward's
    two steps, and a run of stage-sized forwards — the cost model's measured inputs."""

    def __init__(self, args, mb_rows: int):
        import torch

        from overdrive.models.llama import tiny

        torch.manual_seed(0)
        self.model = tiny(n_layers=8, dim=args.dim, n_heads=4, vocab_size=512,
                          max_seq_len=args.seq)
        self.ids = torch.randint(0, 512, (mb_rows, args.seq))
        self.act = torch.randn(mb_rows, args.seq, args.dim)
        self.seq = args.seq
        self.times: dict[str, list] = {k: [] for k in (
            "hop_s", "forward_s", "backward_s", "blocks_forward_s", "blocks_backward_s",
            "backward_input_s", "backward_weight_s", "embed_s", "block_s", "tail_s",
            "chunk_forward_s")}

    def _hop(self) -> float:
        import torch.distributed as dist

        peer = 1 - dist.get_rank()
        reps, t0 = 4, time.perf_counter()
        for _ in range(reps):  # rank 0 sends then receives, rank 1 the reverse
            if dist.get_rank() == 0:
                dist.send(self.act, peer)
                dist.recv(self.act, peer)
            else:
                dist.recv(self.act, peer)
                dist.send(self.act, peer)
        return (time.perf_counter() - t0) / (2 * reps)

    def _model_forward(self) -> tuple[float, float, float]:
        """The model's forward with its loss (``Llama.forward``'s own steps), timed by
        piece: the embedding (the first stage's extra), the blocks, and the final norm,
        head and loss (the last stage's extra, which FLOPs undercount: the loss and the
        norm are no matmuls)."""
        from overdrive.models.llama import causal_lm_loss

        t0 = time.perf_counter()
        h = self.model.embed_tokens(self.ids)
        t1 = time.perf_counter()
        h = self._blocks(h)
        t2 = time.perf_counter()
        self.loss = causal_lm_loss(self.model.lm_head(self.model.norm(h)), self.ids, None,
                                   None)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    def _blocks(self, x, blocks=None):
        rope = self.model.rope[:self.seq]
        for layer in (self.model.layers if blocks is None else blocks):
            x = layer(x, rope)
        return x

    def _split_backward(self) -> tuple[float, float, float, float]:
        """The blocks (a middle stage: an activation in, one out) forward, full backward,
        and, on a second forward, torch's own input step then weight step (what
        ``backward_one_chunk(full_backward=False)`` / ``backward_weight_one_chunk``
        run)."""
        import torch
        from torch.distributed.pipelining._backward import (stage_backward_input,
                                                            stage_backward_weight)

        x = self.act.clone().requires_grad_(True)
        t0 = time.perf_counter()
        out = self._blocks(x)
        fwd = time.perf_counter() - t0
        grad = torch.ones_like(out)
        t0 = time.perf_counter()
        out.backward(grad)
        full = time.perf_counter() - t0
        self.model.zero_grad(set_to_none=True)
        x = self.act.clone().requires_grad_(True)
        out = self._blocks(x)
        t0 = time.perf_counter()
        _, groups = stage_backward_input([out], [grad], [x], self.model.layers.parameters())
        t1 = time.perf_counter()
        stage_backward_weight(self.model.layers.parameters(), groups)
        t2 = time.perf_counter()
        self.model.zero_grad(set_to_none=True)
        return fwd, full, t1 - t0, t2 - t1

    def _chunk_forwards(self) -> list[float]:
        """Forwards of a quarter of the blocks (one stage of the 4-stage schedules),
        one after another: equal work, so their spread is the machine's noise."""
        import torch

        per = len(self.model.layers) // 4
        out = []
        with torch.no_grad():
            x = self.act
            for c in range(4):
                t0 = time.perf_counter()
                x = self._blocks(x, self.model.layers[c * per:(c + 1) * per])
                out.append(time.perf_counter() - t0)
        return out

    def step(self, record: bool) -> None:
        import torch.distributed as dist

        dist.barrier()
        hop = self._hop()
        dist.barrier()
        embed, blocks, tail = self._model_forward()
        fwd = embed + blocks + tail
        t0 = time.perf_counter()
        self.loss.backward()
        bwd = time.perf_counter() - t0
        self.model.zero_grad(set_to_none=True)
        self.loss = None
        dist.barrier()
        blocks_fwd, blocks_bwd, b_in, b_w = self._split_backward()
        chunks = self._chunk_forwards()
        if record:
            for key, value in zip(self.times, (hop, fwd, bwd, blocks_fwd, blocks_bwd, b_in,
                                               b_w, embed, blocks / len(self.model.layers),
                                               tail, chunks)):
                self.times[key].append(value)

    def result(self) -> dict:
        out = {k: statistics.median(v) for k, v in self.times.items()
               if k != "chunk_forward_s"}
        out["rounds"] = {k: v for k, v in self.times.items()}
        return out


def stage_times(stage_blocks: list[list[int]], probes: list[dict]) -> tuple[float, ...]:
    """Each stage's forward time from the probe's pieces: its blocks, plus the embedding
    on the first stage and the norm, head and loss on the last (the ranks' mean)."""
    embed = statistics.mean(p["embed_s"] for p in probes)
    block = statistics.mean(p["block_s"] for p in probes)
    tail = statistics.mean(p["tail_s"] for p in probes)
    last = len(stage_blocks) - 1
    return tuple(len(b) * block + (embed if s == 0 else 0.0) + (tail if s == last else 0.0)
                 for s, b in enumerate(stage_blocks))


def jitter_of(chunk_rounds: list[list[float]]) -> float:
    """The spread (standard deviation of the log) of equal pieces of work run one after
    another, about each round's own mean: the noise of one action's time. The round's
    level is left out — each round's rank speeds carry it."""
    sq, n = 0.0, 0
    for chunks in chunk_rounds:
        logs = [math.log(c) for c in chunks]
        mean = sum(logs) / len(logs)
        sq += sum((x - mean) ** 2 for x in logs)
        n += len(logs) - 1
    return math.sqrt(sq / n) if n else 0.0


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
    p.add_argument("--samples", type=int, default=128,
                   help="noisy replays behind each predicted idle")
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
    from overdrive.bubble import bubble_fraction, expected_idle

    base = max(r["pp1_ddp"]["step_s"] for r in ranks)
    probes = [r["probe"] for r in ranks]
    hop_s = statistics.mean(p["hop_s"] for p in probes)
    forward_s = statistics.mean(p["forward_s"] for p in probes)
    backward = statistics.mean(p["backward_s"] for p in probes) / forward_s
    blocks_f = statistics.mean(p["blocks_forward_s"] for p in probes)
    backward_input = statistics.mean(p["backward_input_s"] for p in probes) / blocks_f
    backward_weight = statistics.mean(p["backward_weight_s"] for p in probes) / blocks_f
    blocks_backward = statistics.mean(p["blocks_backward_s"] for p in probes) / blocks_f
    work = [p["forward_s"] + p["backward_s"] for p in probes]
    rank_time = tuple(w / statistics.mean(work) for w in work)  # same work, each rank
    rounds = [[f + b for f, b in zip(p["rounds"]["forward_s"], p["rounds"]["backward_s"])]
              for p in probes]
    rank_times = [tuple(w / statistics.mean(ws) for w in ws) for ws in zip(*rounds)]
    jitter = statistics.mean(jitter_of(p["rounds"]["chunk_forward_s"]) for p in probes)
    rows, targets = {}, []
    for schedule, spr in SCHEDULES:
        step = max(r[schedule]["step_s"] for r in ranks)
        idle = [r[schedule]["idle"] for r in ranks]
        compute_only = ranks[0][schedule]["predicted_bubble"]
        flops = tuple(ranks[0][schedule]["stage_flops"]) or None
        measured_stages = stage_times(ranks[0][schedule]["stage_blocks"], probes)
        hop = hop_s / (forward_s / (2 * spr))  # in units of the mean stage's forward
        costs = dict(hop=hop, backward=backward, backward_input=backward_input,
                     backward_weight=backward_weight)
        fixed = bubble_fraction(schedule, 2, args.microbatches, spr, measured_stages, hop,
                                backward,
                                rank_time, backward_input, backward_weight)
        per_rank = expected_idle(schedule, 2, args.microbatches, spr, measured_stages, **costs,
                                 rank_times=rank_times, jitter=jitter, samples=args.samples)
        predicted = sum(per_rank) / len(per_rank) if per_rank is not None else None
        measured = sum(idle) / len(idle)
        rows[schedule] = {"stages_per_rank": spr, "step_s": round(step, 4),
                          "step_vs_pp1": round(step / base, 3),
                          "idle_per_rank": [round(i, 4) for i in idle],
                          "idle_mean": round(measured, 4),
                          "predicted_idle_per_rank": per_rank,
                          "predicted_bubble": round(predicted, 4) if per_rank else None,
                          "waiting_per_rank": [round(r[schedule]["waiting"], 4) for r in ranks],
                          "backward_over_forward_per_rank": [
                              round(r[schedule]["backward_over_forward"], 3) for r in ranks],
                          "predicted_bubble_no_comm": compute_only,
                          "predicted_bubble_fixed_costs": fixed,
                          "hop_vs_stage_forward": round(hop, 4),
                          "measured_stage_forward_s": [round(t, 4) for t in measured_stages]}
        targets.append(target(f"predicted bubble minus measured idle (absolute), {schedule} "
                              f"({args.microbatches} micro-batches)",
                              abs(predicted - measured) if predicted is not None else None,
                              0.10))
        targets.append(target(f"{schedule} step time / pp=1 ddp step time, 2 ranks "
                              "(reference, no target)", step / base, None))
    for p in probes:
        p.pop("rounds")
    emit("pipeline", {"config": {"ranks": 2, "blocks": 8, "dim": args.dim, "seq": args.seq,
                                 "microbatches": args.microbatches,
                                 "global_batch": args.microbatches * 2,
                                 "steps": args.steps},
                      "pp1_ddp_step_s": round(base, 4),
                      "measured_hop_s": round(hop_s, 6),
                      "measured_model_forward_s": round(forward_s, 4),
                      "measured_backward_over_forward": round(backward, 3),
                      "measured_backward_input_over_forward": round(backward_input, 3),
                      "measured_backward_weight_over_forward": round(backward_weight, 3),
                      "measured_blocks_backward_over_forward": round(blocks_backward, 3),
                      "measured_rank_time": [round(t, 3) for t in rank_time],
                      "measured_rank_times_per_round": [[round(t, 3) for t in rt]
                                                        for rt in rank_times],
                      "measured_jitter": round(jitter, 3),
                      "probe_per_rank": [r["probe"] for r in ranks],
                      "load_average": [round(x, 2) for x in os.getloadavg()],
                      "load_average_at_start": load_at_start,
                      "schedules": rows,
                      "targets": targets})


if __name__ == "__main__":
    main()
