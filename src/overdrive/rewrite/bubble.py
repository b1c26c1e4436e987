"""The pipeline bubble a schedule predicts, from torch's own action lists.

``torch.distributed.pipelining`` builds every schedule's per-rank action list
(forward, full backward, or backward-input / backward-weight per stage and
micro-batch). Replaying those lists with their dependencies — a forward needs the
previous stage's forward, a backward the next stage's backward — and unit costs
(forward 1, full backward 2, input or weight backward 1 each) gives the time each rank
waits: the bubble fraction is idle time over the makespan, averaged over ranks.
For GPipe and 1F1B it is ``(pp - 1) / (microbatches + pp - 1)``, used as such.
"""

from __future__ import annotations

import functools
import logging

from .plan import SCHEDULE_CLASSES

COSTS = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}

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
            if kind in COSTS:
                acts.append((kind, a.stage_index, a.microbatch_index))
        out.append(acts)
    return out


def simulate(actions: list[list[tuple[str, int, int]]], num_stages: int) -> list[float]:
    """Idle fraction of each rank when its actions run in order, each as soon as its
    inputs exist."""
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
            times.append(t)
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
                clock[r] = start + COSTS[kind]
                busy[r] += COSTS[kind]
                done[(kind, stage, mb)] = clock[r]
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("pipeline schedule replay is stuck (cyclic dependencies)")
    makespan = max(clock)
    return [1.0 - b / makespan for b in busy]


@functools.lru_cache(maxsize=64)
def bubble_fraction(schedule: str, pp: int, microbatches: int, stages_per_rank: int
                    ) -> float | None:
    """Mean idle fraction over the ranks (None when torch cannot build the schedule).

    GPipe and 1F1B use the closed form (torch's 1F1B action list for visualisation
    numbers its micro-batches off by one); the multi-stage schedules replay torch's
    action lists."""
    if schedule in ("gpipe", "1f1b"):
        return round((pp - 1) / (microbatches + pp - 1), 4)
    try:
        acts = action_lists(schedule, pp, microbatches, stages_per_rank)
    except Exception:  # noqa: BLE001 - a schedule torch refuses for these sizes
        return None
    idle = simulate(acts, pp * stages_per_rank)
    return round(sum(idle) / len(idle), 4)
