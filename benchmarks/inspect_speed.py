"""How long `od.inspect` takes on meta-device Llama-3-8B and 70B shapes.

    python benchmarks/inspect_speed.py [--rounds 3]

Baseline in the same run: building the meta model itself (the floor any dry run pays).
Target: < 5 s for 8B with plan fsdp+compile at world size 8.
"""

import argparse
import statistics
import time

import torch

import overdrive as od
from overdrive.models.llama import llama3_8b, llama3_70b

from _common import emit, target


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cases = [("llama3_8b", llama3_8b, "fsdp+compile", 8),
             ("llama3_70b", llama3_70b, "fsdp+tp8+compile+ac", 64)]
    rows = {}
    for name, factory, plan, world in cases:
        build, inspect, traced = [], [], []
        for _ in range(args.rounds):
            with torch.device("meta"):
                dt, model = timed(factory)
            build.append(dt)
            dt, report = timed(lambda: od.inspect(model, plan, world_size=world))
            inspect.append(dt)
            ids = torch.randint(0, 128256, (1, 2048))
            dt, _ = timed(lambda: od.inspect(model, plan, world_size=world, example_inputs=ids))
            traced.append(dt)
        rows[name] = {
            "plan": plan, "world_size": world,
            "build_meta_s": statistics.median(build),
            "inspect_s": statistics.median(inspect),
            "inspect_with_trace_s": statistics.median(traced),
            "inspect_over_build": statistics.median(inspect) / statistics.median(build),
            "per_rank_total_gib": report.memory.total / 2**30,
        }
    targets = [target("od.inspect seconds, Llama-3-8B on meta, fsdp+compile, 8 ranks",
                      rows["llama3_8b"]["inspect_s"], 5.0, "<")]
    emit("inspect_speed", {"rows": rows, "targets": targets})


if __name__ == "__main__":
    main()
