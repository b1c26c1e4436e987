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

The split backward is not the full one cut in two: torch's input step walks the graph
once for the input gradient and keeps what the weight step needs, and the weight step
walks it again, so on a measured mesh ``I + W`` exceeds ``B`` (1.1–1.3x on CPU).
``backward_input`` / ``backward_weight`` (the split steps' times over the forward's,
measured the way ``b`` is) replace the ``b/2`` halves.

A replay with fixed costs is the bubble of a machine whose every action takes the same
time each time. ``expected_idle`` replays it with noisy actions instead: each action's
time is multiplied by a mean-one log-normal factor (``jitter``: the spread, measured as
the standard deviation of the log of repeated equal pieces of work) and each replay
draws one of the measured per-round ``rank_times`` (how much slower each rank ran in
that round). A rank waits for the slowest chain of noisy actions upstream of it, so the
expected wait grows with the noise — most for schedules that pack actions tightly with
no slack to absorb a late input (the zero-bubble ones); the reported idle per rank is
the median over the replays, the statistic the benchmark takes over its steps.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import statistics
from collections.abc import Sequence

from .plan_spec import SCHEDULE_CLASSES

KINDS = ("F", "B", "I", "W")


def action_cost(kind: str, stage: int, stage_flops: tuple[float, ...],
                backward: float = 2.0, backward_input: float | None = None,
                backward_weight: float | None = None) -> float:
    """Time of one action, in units of the mean stage's forward: see the module
    docstring (``backward``: the full backward over the forward, ``b``;
    ``backward_input`` / ``backward_weight``: the split steps over the forward, ``b/2``
    each when None)."""
    f = stage_flops[stage]
    if kind == "F":
        return f
    if kind == "I":
        return 0.0 if stage == 0 else (backward / 2 if backward_input is None
                                       else backward_input) * f
    if kind == "W":
        return backward * f if stage == 0 else (backward / 2 if backward_weight is None
                                                else backward_weight) * f
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
             backward: float = 2.0, rank_time: tuple[float, ...] | None = None,
             backward_input: float | None = None, backward_weight: float | None = None,
             noise: dict[tuple[str, int, int], float] | None = None) -> list[float]:
    """Idle fraction of each rank when its actions run in order, each as soon as its
    inputs exist (``stage_flops``: each stage's forward cost, 1 each when None; ``hop``:
    the delay of an input coming from another rank; ``backward``: ``b``; ``rank_time``:
    each rank's time for one unit of work, 1 each when None; ``backward_input`` /
    ``backward_weight``: the split steps' costs; ``noise``: a factor on each action's
    time, by ``(kind, stage, microbatch)``, 1 when absent)."""
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
                cost = action_cost(kind, stage, flops, backward, backward_input,
                                   backward_weight) * speed[r]
                if noise is not None:
                    cost *= noise.get((kind, stage, mb), 1.0)
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


def _schedule_actions(schedule: str, pp: int, microbatches: int, stages_per_rank: int
                      ) -> list[list[tuple[str, int, int]]] | None:
    try:
        return (one_f_one_b(pp, microbatches) if schedule == "1f1b"
                else action_lists(schedule, pp, microbatches, stages_per_rank))
    except Exception:  # noqa: BLE001 - a schedule torch refuses for these sizes
        return None


def _normalised(stage_flops: tuple[float, ...] | None, num_stages: int
                ) -> tuple[float, ...] | None:
    if stage_flops is None:
        return None
    if len(stage_flops) != num_stages:
        raise ValueError(f"stage_flops has {len(stage_flops)} entries for {num_stages} stages")
    mean = sum(stage_flops) / num_stages
    return tuple(f / mean for f in stage_flops) if mean > 0 else None


@functools.lru_cache(maxsize=64)
def bubble_fraction(schedule: str, pp: int, microbatches: int, stages_per_rank: int,
                    stage_flops: tuple[float, ...] | None = None,
                    hop: float = 0.0, backward: float = 2.0,
                    rank_time: tuple[float, ...] | None = None,
                    backward_input: float | None = None,
                    backward_weight: float | None = None) -> float | None:
    """Mean idle fraction over the ranks (None when torch cannot build the schedule).

    ``stage_flops``: each stage's forward FLOPs (any scale); equal stages when None.
    ``hop``: one cross-rank send of a micro-batch's activation (or its gradient), in
    units of the mean stage's forward time; 0 (free) by default. ``backward``: the full
    backward's time over the forward's, 2 by default. ``rank_time``: each pipeline
    rank's measured time for the same work over the mean; equal when None.
    ``backward_input`` / ``backward_weight``: the split backward's input and weight
    steps over the forward (``backward / 2`` each when None)."""
    num_stages = pp * stages_per_rank
    stage_flops = _normalised(stage_flops, num_stages)
    acts = _schedule_actions(schedule, pp, microbatches, stages_per_rank)
    if acts is None:
        return None
    if rank_time is not None and len(rank_time) != pp:
        raise ValueError(f"rank_time has {len(rank_time)} entries for {pp} ranks")
    idle = simulate(acts, num_stages, stage_flops, hop, backward, rank_time,
                    backward_input, backward_weight)
    return round(sum(idle) / len(idle), 4)


def expected_idle(schedule: str, pp: int, microbatches: int, stages_per_rank: int,
                  stage_flops: tuple[float, ...] | None = None, *, hop: float = 0.0,
                  backward: float = 2.0, backward_input: float | None = None,
                  backward_weight: float | None = None,
                  rank_times: Sequence[tuple[float, ...]] = (), jitter: float = 0.0,
                  samples: int = 64, seed: int = 0) -> list[float] | None:
    """Each rank's idle fraction on a noisy machine: the median over ``samples`` replays
    (see the module docstring; None when torch cannot build the schedule).

    ``rank_times``: measured per-round rank speeds (each like ``rank_time``), replay
    ``k`` uses round ``k`` modulo their number (equal ranks when empty); ``jitter``: the
    log-normal spread of every action's time (0: the fixed-cost replay); the other
    arguments as ``bubble_fraction``. Seeded: the same inputs give the same answer."""
    num_stages = pp * stages_per_rank
    stage_flops = _normalised(stage_flops, num_stages)
    acts = _schedule_actions(schedule, pp, microbatches, stages_per_rank)
    if acts is None:
        return None
    for rt in rank_times:
        if len(rt) != pp:
            raise ValueError(f"a rank_times entry has {len(rt)} entries for {pp} ranks")
    rng = random.Random(seed)
    keys = [a for rank_acts in acts for a in rank_acts]
    per_rank: list[list[float]] = [[] for _ in range(pp)]
    for k in range(samples if jitter > 0 or len(rank_times) > 1 else 1):
        noise = ({a: math.exp(rng.gauss(0.0, jitter) - jitter * jitter / 2) for a in keys}
                 if jitter > 0 else None)
        rank_time = tuple(rank_times[k % len(rank_times)]) if rank_times else None
        idle = simulate(acts, num_stages, stage_flops, hop, backward, rank_time,
                        backward_input, backward_weight, noise)
        for r, i in enumerate(idle):
            per_rank[r].append(i)
    return [round(statistics.median(v), 4) for v in per_rank]
