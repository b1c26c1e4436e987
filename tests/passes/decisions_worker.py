"""2 ranks: for each named pass, od.inspect(world_size=2)'s decision against what
od.accelerate did on this world (tests/passes/test_decisions.py)."""

import sys

import torch

import overdrive as od
from overdrive.models.llama import tiny
from tests.passes.decisions import compare

PLANS = {
    "tensor_parallel": od.Plan(parallel=od.Parallel(tp=2, dp_shard=1, sequence_parallel=True)),
    "context_parallel": od.Plan(parallel=od.Parallel(cp=2, dp_shard=1)),
    "fsdp": od.Plan(fsdp=od.FSDP()),
    "ddp": od.Plan(ddp=od.DDP()),
    "deepspeed": od.Plan(deepspeed=od.DeepSpeed(zero_stage=2)),
}


def model():
    torch.manual_seed(0)
    return tiny(n_layers=2)


def main(names):
    for name in names:
        plan = PLANS[name]
        inspected = od.inspect(model(), plan, world_size=2)
        rt = od.accelerate(model(), plan, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
        assert name in rt.report.names(), rt.report.names()
        compare(name, inspected, rt)
        if rt.is_main:
            print(f"decision == applied: {name}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
