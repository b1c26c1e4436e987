"""``od.accelerate(model, plan="auto", batch=...)``: the planner's best layout for the
world this process was launched in and the memory of its device."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..errors import PlanError
from ..plan_spec import Plan
from .hardware import HARDWARE

# a fragment of torch.cuda.get_device_name → the hardware table's entry
_DEVICE_NAMES = (("H200", "h200"), ("H100", "h100"), ("B200", "b200"), ("A100", "a100-80g"),
                 ("MI300X", "mi300x"))


def device_hardware() -> tuple[str, int]:
    """(hardware name, bytes of memory per rank) of this rank's device."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        index = local % torch.cuda.device_count()
        name = torch.cuda.get_device_name(index)
        total = torch.cuda.get_device_properties(index).total_memory
        for fragment, entry in _DEVICE_NAMES:
            if fragment in name:
                return entry, total
        return "h100", total  # an unknown GPU: costed as an H100, memory its own
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return "cpu", pages // max(ranks_here, 1)


def auto_plan(model: nn.Module, batch: Any) -> tuple[Plan, dict]:
    """The best candidate's plan and the record of the choice for ``rt.report``."""
    from .search import plan as search_plan

    if batch is None:
        raise PlanError("plan='auto' needs batch=(global_batch_size, seq_len), e.g. "
                        "od.accelerate(model, plan='auto', batch=(64, 2048)): the planner "
                        "sizes activations and micro-batches from it")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    hardware, memory = device_hardware()
    best = search_plan(model, world_size=world_size, memory_per_rank=memory, batch=batch,
                       hardware=HARDWARE[hardware], top=1)[0]
    choice = {"chosen": best.layout.name(), "micro_batch": best.layout.micro_batch,
              "grad_accum": best.layout.grad_accum, "why": best.why,
              "predicted_memory": best.memory.total, "memory_per_rank": memory,
              "hardware": hardware, "world_size": world_size,
              "predicted_tokens_per_second": best.tokens_per_second}
    return best.plan, choice
