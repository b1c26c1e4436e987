"""``rt.set_trigger()`` / ``rt.check_trigger()``: one rank's condition, every rank's decision.

Early stopping on a condition only one rank sees (its loss went NaN, its shard hit a
limit) must stop every rank at the same step, or the others wait in the next collective
forever. ``set_trigger`` raises a local flag; ``check_trigger`` — called by every rank at
the same point of the loop, it is one all-reduce — returns True on every rank when any
rank raised it since the last check, and lowers it everywhere: each ``set_trigger`` is
seen exactly once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import comm_device, world
from .ledger import collective


class Trigger:
    __slots__ = ("raised",)

    def __init__(self) -> None:
        self.raised = False

    def set(self) -> None:
        self.raised = True

    def check(self) -> bool:
        raised = self.raised
        if world() > 1:
            flag = torch.tensor([int(raised)], device=comm_device())
            collective("all_reduce", dist.all_reduce, flag, op=dist.ReduceOp.MAX, tensor=flag)
            raised = bool(flag.item())
        self.raised = False
        return raised
