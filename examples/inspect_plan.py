"""Dry-run a plan for a Llama-3-70B-shaped model on 64 ranks before renting any GPU.

    python examples/inspect_plan.py [--plan fsdp+tp8+compile+ac] [--world-size 64]

The model is built on the meta device: no weights are allocated. The report lists the
passes in order, what each would touch, and the per-rank parameter, gradient, optimizer
and activation memory under the plan's sharding.
"""

import argparse
import time

import torch

import overdrive as od
from overdrive.models.llama import llama3_70b


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="fsdp+tp8+compile+ac+bf16")
    parser.add_argument("--world-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with torch.device("meta"):
        model = llama3_70b()
    t0 = time.perf_counter()
    report = od.inspect(model, args.plan, world_size=args.world_size,
                        example_inputs=torch.randint(0, 128256, (1, args.seq_len)))
    seconds = time.perf_counter() - t0
    print(report.to_json() if args.json else report)
    print(f"\ninspected in {seconds:.2f} s; model still on "
          f"{next(model.parameters()).device}")


if __name__ == "__main__":
    main()
