"""The pipeline bubble a schedule predicts, from torch's own action lists and a cost model.

``torch.distributed.pipelining`` builds every schedule's per-rank action list
(forward, full backward, or backward-input / backward-weight per stage and
micro-batch). Replaying those lists with their dependencies — a forward needs the
previous stage's forward, a backward the next stage's backward — gives the time each
rank waits: the bubble fraction is idle time over the makespan, averaged over ranks.

Costs come from each stage's forward FLOPs ``f``: forward ``f``; full backward ``b·f``
with ``b = 2`` by default (gradients to inputs and to weights are each one matmul per
forward matmul); split, the input-backward and the weight-backward ``b·f/2`` each —
except on the first stage, whose inputs are token ids: torch skips its input-backward
(cost 0) and runs the whole backward as the weight step (``b·f``). A measured ``b`` (a
timed forward and backward) may replace the 2. A dependency between stages on different ranks
(an activation sent forward, a gradient sent back) arrives ``hop`` later, in the same
units: one send/receive of one micro-batch's activation. ``od.inspect`` has no mesh to
measure it on and uses ``hop=0``; ``benchmarks/pipeline.py`` measures it on the real
mesh (a ping-pong of the activation's size) and passes it in. Stages on the same rank
hand over for free. Ranks compute at the same speed unless ``rank_time`` (each rank's
time for the same work over the mean, measured) says otherwise. 1F1B is replayed from its textbook order (torch's visualisation
list for it numbers micro-batches off by one).
"""

from __future__ import annotations

import functools
import logging

from .plan_spec import SCHEDULE_CLASSES

KINDS = ("F", "B", "I", "W")


def action_cost(kind: str, stage: int, stage_flops: tuple[float, ...],
                backward: float = 2.0) -> float:
    """Time of one action, in units of the mean stage's forward: see the module
    docstring (``backward``: the full backward over the forward, ``b``)."""
    f = stage_flops[stage]
    if kind == "F":
        return f
    if kind == "I":
        return 0.0 if stage == 0 else backward * f / 2
    if kind == "W":
        return backward * f if stage == 0 else backward * f / 2
    return backward * f  # "B"


def one_f_one_b(pp: int, microbatches: int) -> list[list[tuple[str, int, int]]]:
    """Per rank, 1F1B's order: ``pp - 1 - rank`` warm-up forwards, then one forward and
    one backward in turn, then the remaining backwards."""
    out = []
    for r in range(pp):
        warm = min(pp - 1 - r, microbatches)
        acts = [("F", r, m) for m in range(warm)]
        f, b = warm, 0
        while b < microbatches:
            if f < microbatches:
                acts.append(("F", r, f))
                f += 1
            acts.append(("B", r, b))
            b += 1
        out.append(acts)
    return out

def action_lists(schedule: str, pp: int, microbatches: int, stages_per_rank: int
                 ) -> list[list[tuple[str, int, int]]]:
    """Per rank, the compute actions ``(kind, stage, microbatch)`` torch's schedule runs."""
    from torch.distributed.pipelining import schedules
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops

    cls = getattr(schedules, SCHEDULE_CLASSES[schedule])
    log = logging.getLogger("torch.distributed.pipelining.schedules")
    level = log.level
    log.setLevel(logging.WARNING)  # each schedule logs "Using ..." at INFO
    try:
        ops = get_schedule_ops(cls, pp, microbatches,
                               None if stages_per_rank == 1 else stages_per_rank)
    finally:
        log.setLevel(level)
    out = []
    for rank_ops in ops:
        acts = []
        for a in rank_ops:
            if a is None:
                continue
            kind = str(a.computation_type.value if hasattr(a.computation_type, "value")
                       else a.computation_type)
            if kind in KINDS:
                acts.append((kind, a.stage_index, a.microbatch_index))
        out.append(acts)
    return out


def stage_ranks(actions: list[list[tuple[str, int, int]]]) -> dict[int, int]:
    """Which rank runs each stage, read from the action lists."""
    return {stage: r for r, acts in enumerate(actions) for _, stage, _ in acts}


def simulate(actions: list[list[tuple[str, int, int]]], num_stages: int,
             stage_flops: tuple[float, ...] | None = None, hop: float = 0.0,
             backward: float = 2.0, rank_time: tuple[float, ...] | None = None
             ) -> list[float]:
    """Idle fraction of each rank when its actions run in order, each as soon as its
    inputs exist (``stage_flops``: each stage's forward cost, 1 each when None; ``hop``:
    the delay of an input coming from another rank; ``backward``: ``b``; ``rank_time``:
    each rank's time for one unit of work, 1 each when None)."""
    flops = tuple(stage_flops) if stage_flops is not None else (1.0,) * num_stages
    owner = stage_ranks(actions)
    speed = tuple(rank_time) if rank_time is not None else (1.0,) * len(actions)
    done: dict[tuple[str, int, int], float] = {}
    clock = [0.0] * len(actions)
    busy = [0.0] * len(actions)
    pos = [0] * len(actions)

    def ready(kind: str, stage: int, mb: int) -> float | None:
        deps = []
        if kind == "F" and stage > 0:
            deps.append(("F", stage - 1, mb))
        if kind in ("B", "I"):
            deps.append(("F", stage, mb))
            if stage < num_stages - 1:
                deps.append(("BI", stage + 1, mb))
        if kind == "W":
            deps.append(("I", stage, mb))
        times = []
        for d in deps:
            if d[0] == "BI":
                t = done.get(("B", d[1], d[2]), done.get(("I", d[1], d[2])))
            else:
                t = done.get(d)
            if t is None:
                return None
            times.append(t + (hop if owner.get(d[1]) != owner.get(stage) else 0.0))
        return max(times, default=0.0)

    remaining = sum(len(a) for a in actions)
    while remaining:
        progressed = False
        for r, acts in enumerate(actions):
            while pos[r] < len(acts):
                kind, stage, mb = acts[pos[r]]
                t = ready(kind, stage, mb)
                if t is None:
                    break
                start = max(clock[r], t)
                cost = action_cost(kind, stage, flops, backward) * speed[r]
                clock[r] = start + cost
                busy[r] += cost
                done[(kind, stage, mb)] = clock[r]
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("pipeline schedule replay is stuck (cyclic dependencies)")
    makespan = max(clock)
    return [1.0 - b / makespan for b in busy]


@functools.lru_cache(maxsize=64)
def bubble_fraction(schedule: str, pp: int, microbatches: int, stages_per_rank: int,
                    stage_flops: tuple[float, ...] | None = None,
                    hop: float = 0.0, backward: float = 2.0,
                    rank_time: tuple[float, ...] | None = None) -> float | None:
    """Mean idle fraction over the ranks (None when torch cannot build the schedule).

    ``stage_flops``: each stage's forward FLOPs (any scale); equal stages when None.
    ``hop``: one cross-rank send of a micro-batch's activation (or its gradient), in
    units of the mean stage's forward time; 0 (free) by default. ``backward``: the full
    backward's time over the forward's, 2 by default. ``rank_time``: each pipeline
    rank's measured time for the same work over the mean; equal when None."""
    num_stages = pp * stages_per_rank
    if stage_flops is not None and len(stage_flops) != num_stages:
        raise ValueError(f"stage_flops has {len(stage_flops)} entries for {num_stages} stages")
    if stage_flops is not None:
        mean = sum(stage_flops) / num_stages
        stage_flops = tuple(f / mean for f in stage_flops) if mean > 0 else None
    try:
        acts = (one_f_one_b(pp, microbatches) if schedule == "1f1b"
                else action_lists(schedule, pp, microbatches, stages_per_rank))
    except Exception:  # noqa: BLE001 - a schedule torch refuses for these sizes
        return None
    if rank_time is not None and len(rank_time) != pp:
        raise ValueError(f"rank_time has {len(rank_time)} entries for {pp} ranks")
    idle = simulate(acts, num_stages, stage_flops, hop, backward, rank_time)
    return round(sum(idle) / len(idle), 4)
