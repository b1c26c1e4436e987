"""Runs on every rank under torchrun: for each layout given, one real training step of a
small Llama measured with torch's MemTracker (peak bytes on this rank) and CollectiveBytes
(bytes per collective kind), next to the planner's prediction for the same layout.

argv: OUT_JSON LAYOUT_JSON [LAYOUT_JSON ...]; every rank writes OUT_JSON.<rank>.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed._tools.mem_tracker import MemTracker

import overdrive as od
from overdrive.models.llama import Llama, LlamaConfig
from overdrive.planner.hardware import HARDWARE
from overdrive.planner.layout import Layout
from overdrive.planner.search import Model, evaluate
from counters import CollectiveBytes

SEQ = 64
CONFIG = dict(vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=SEQ)


def build() -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig(**CONFIG))


class ScheduleMemTracker(MemTracker):
    """torch's MemTracker with its per-module statistics off, its peak accounting (every
    storage an op creates, the model's and optimizer's tensors, resizes) unchanged: a
    pipeline schedule calls a stage's root module once per micro-batch before their
    backwards, which the per-module bookkeeping refuses ("multiple iterative calls")."""

    def _pre_fw_hook(self, module, inputs):
        pass

    def _post_fw_hook(self, module, inputs, outputs):
        pass

    def _pre_bw_hook(self, module, args):
        pass

    def _post_bw_hook(self, module, args):
        pass


def one_step(rt, layout: Layout, batches, between=None) -> None:
    if layout.pp > 1:  # one pipeline step: the schedule runs every micro-batch
        ids = torch.cat(batches)
        rt.forward_backward({"input_ids": ids, "labels": ids})
        rt.optimizer.step()
        rt.optimizer.zero_grad()
        return
    for i, ids in enumerate(batches):
        if i and between is not None:
            between()  # MemTracker: one forward per module at a time
        with rt.accumulate():
            out = rt.model(ids, labels=ids)
            rt.backward(out.loss)
            rt.optimizer.step()
            rt.optimizer.zero_grad()


def measure(layout: Layout) -> dict:
    model = build()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    pp_rank = rank // (world // layout.pp)  # the mesh is row-major, pp outermost
    predicted = evaluate(Model(model, SEQ, None), layout, HARDWARE["cpu"], 1 << 40,
                         layout.micro_batch * layout.grad_accum * layout.dp, SEQ,
                         pp_rank=pp_rank if layout.pp > 1 else None)
    rt = od.accelerate(model, layout.to_plan(),
                       optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=False),
                       trackers=())
    gen = torch.Generator().manual_seed(rt.dp_rank)
    batches = [torch.randint(0, CONFIG["vocab_size"], (layout.micro_batch, SEQ), generator=gen)
               for _ in range(layout.grad_accum)]
    one_step(rt, layout, batches)  # the optimizer state exists from here on
    counter = CollectiveBytes()
    with counter:
        one_step(rt, layout, batches)
    tracker = ScheduleMemTracker() if layout.pp > 1 else MemTracker()
    tracker.track_external(rt.model, rt.optimizer.optimizer)
    with tracker:
        one_step(rt, layout, batches, between=tracker.reset_mod_stats)
    peak = tracker.get_tracker_snapshot("peak")
    measured = sum(v["Total"] for v in peak.values())
    return {"layout": layout.name(), "measured_peak": measured,
            "predicted_peak": predicted.memory.total,
            "predicted_memory": predicted.memory.as_dict(),
            "measured_parts": {str(k): {str(a): b for a, b in v.items()}
                               for k, v in peak.items()},
            "measured_comm": dict(counter.bytes), "measured_calls": dict(counter.calls),
            "measured_sizes": dict(counter.sizes),
            "predicted_comm": {k: sum(v.values()) for k, v in predicted.comm.items()},
            "predicted_calls": predicted.details["comm_calls"]}


def main() -> None:
    out, specs = sys.argv[1], sys.argv[2:]
    results = [measure(Layout(**json.loads(s))) for s in specs]
    with open(f"{out}.{dist.get_rank()}", "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
