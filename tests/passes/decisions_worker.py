"""2 ranks: for each named pass (pipeline: for this rank's stage), od.inspect(world_size=2)'s decision against what
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
    "pipeline": od.Plan(parallel=od.Parallel(pp=2, dp_shard=1)),
}


def compare_stage(inspected, rt) -> None:
    """pp: od.inspect decides every stage; this rank's record is its own stage's."""
    want, got = inspected["pipeline"], rt.report["pipeline"]
    mine = [s for s in want.details["stages"] if s["rank"] == rt.rank]
    assert [got.details["stage"]] == [s["stage"] for s in mine], (got.details, mine)
    assert got.modules == [want.modules[i] for i in mine[0]["blocks"]], (got.modules, mine)
    assert got.details["stages"] == [{k: v for k, v in s.items() if k != "memory"}
                                     for s in want.details["stages"]]


def model():
    torch.manual_seed(0)
    return tiny(n_layers=2)


def main(names):
    for name in names:
        plan = PLANS[name]
        inspected = od.inspect(model(), plan, world_size=2)
        rt = od.accelerate(model(), plan, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
        assert name in rt.report.names(), rt.report.names()
        compare_stage(inspected, rt) if name == "pipeline" else compare(name, inspected, rt)
        if rt.is_main:
            print(f"decision == applied: {name}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
