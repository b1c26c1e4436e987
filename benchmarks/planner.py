"""The planner against published measurements: torchtitan's Llama-3.1 tables on H100.

    python benchmarks/planner.py

For each published setup (torchtitan benchmarks/llama3_h100_202412_torchtitan.md, formerly
docs/performance.md, "Llama 3.1 performance numbers":
Grand Teton hosts, 8 H100 96 GB HBM2e per host at 500 W, 400 Gb/s RDMA per GPU), the
planner evaluates exactly that layout, batch and recompute mode and prints predicted /
published for tokens/s/GPU and for memory. The baseline is the published number. The
planner models neither torch.compile nor async TP; the rows that used them say so.
Targets (docs/planner.md): throughput within 25%, memory within 15%.
"""

from __future__ import annotations

import torch

from overdrive.models.llama import llama3_8b, llama3_70b
from overdrive.planner.hardware import GiB, Hardware, HARDWARE
from overdrive.planner.layout import Layout
from overdrive.planner.search import Model, evaluate

from _common import emit, target

SOURCE = ("https://github.com/pytorch/torchtitan/blob/main/benchmarks/"
          "llama3_h100_202412_torchtitan.md (formerly docs/performance.md; Llama 3.1 "
          "performance numbers, Tables 1, 3 and 4; torchtitan 9dec370)")
# Table 2's 32k-token sequences exceed the reference Llama's 8192-position RoPE table

# torchtitan's H100s: 96 GB HBM2e, 2.4 TB/s, power-capped at 500 W
TITAN_H100 = Hardware(**{**HARDWARE["h100"].__dict__, "name": "h100-96g-500w",
                         "hbm_bw": 2.4e12, "memory": 96 * 10 ** 9})

# (name, model, world, layout kwargs, global batch, seq, published tok/s/GPU, GiB, notes)
SETUPS = [
    ("8B FSDP 8, lbs 2, selective AC (Table 1)", llama3_8b, 8,
     dict(dp_shard=8, engine="fsdp", ac="selective", micro_batch=2), 16, 8192, 5762, 82.4,
     "eager"),
    ("8B FSDP 128, lbs 2, selective AC (Table 3)", llama3_8b, 128,
     dict(dp_shard=128, engine="fsdp", ac="selective", micro_batch=2), 256, 8192, 5605, 67.0,
     "eager"),
    ("70B FSDP 32 TP 8 (SP), lbs 16, full AC, float8 (Table 4)", llama3_70b, 256,
     dict(dp_shard=32, tp=8, engine="fsdp", ac="full", micro_batch=16, fp8=True,
          sequence_parallel=True, loss_parallel=True), 512, 8192, 829, 71.9,
     "published run used torch.compile (not modelled); loss parallel as published "
     "(Parallel(loss_parallel=True): the logits stay vocab-sharded over TP)"),
]


def main() -> None:
    rows, targets = [], []
    models: dict = {}
    for name, factory, world, kw, gbs, seq, tps, gib, notes in SETUPS:
        if (factory, seq) not in models:
            with torch.device("meta"):
                models[(factory, seq)] = Model(factory(), seq, torch.bfloat16)
        layout = Layout(**kw, grad_accum=1)
        c = evaluate(models[(factory, seq)], layout, TITAN_H100, TITAN_H100.memory, gbs, seq)
        tput = c.tokens_per_second_per_gpu / tps
        mem = c.memory.total / (gib * GiB)
        rows.append({"setup": name, "world_size": world, "layout": layout.name(),
                     "predicted_tokens_per_second_per_gpu": round(c.tokens_per_second_per_gpu),
                     "published_tokens_per_second_per_gpu": tps, "throughput_ratio": round(tput, 3),
                     "predicted_memory_gib": round(c.memory.total / GiB, 1),
                     "published_memory_gib": gib, "memory_ratio": round(mem, 3),
                     "predicted_mfu": round(c.mfu, 3), "why": c.why, "notes": notes,
                     "memory_parts_gib": {k: round(v / GiB, 2) for k, v in
                                          c.memory.as_dict().items() if isinstance(v, int)}})
        targets.append(target(f"|tokens/s/GPU ratio - 1|, {name}", abs(tput - 1), 0.25))
        targets.append(target(f"|memory ratio - 1|, {name}", abs(mem - 1), 0.15))
    emit("planner", {"source": SOURCE, "hardware": TITAN_H100.name, "rows": rows,
                     "targets": targets})


if __name__ == "__main__":
    main()
