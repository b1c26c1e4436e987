"""For every built-in pass: od.inspect's decision is what od.accelerate then did — the same
modules, styles and skips — read back from the transformed model itself. The passes that
need several ranks (tensor/context parallel, fsdp/ddp/deepspeed over 2 data ranks, the
pipeline) run the same comparison under torchrun (decisions_worker.py); offload's is
compared tensor by tensor."""

from pathlib import Path

import pytest
import torch

import overdrive as od
from overdrive.models.llama import tiny
from tests.helpers import run_torchrun
from tests.passes.decisions import compare, done

CASES = {
    "casting": od.Plan(casting=od.Casting(skip=("lm_head",))),
    "fp8": od.Plan(fp8=od.FP8(filter=lambda n: "mlp" in n)),
    "checkpointing-every": od.Plan(checkpointing=od.Checkpointing(mode="every", every=2)),
    "checkpointing-selective": od.Plan(checkpointing=od.Checkpointing(mode="selective")),
    "checkpointing-budget": od.Plan(checkpointing=od.Checkpointing(
        mode="budget", budget_bytes=1_200_000, budget_input_shape=(2, 32))),
    "compile-regional": od.Plan(compile=od.Compile(backend="eager")),
    "compile-full": od.Plan(compile=od.Compile(mode="full", backend="eager")),
    "mixed_precision": od.Plan(mixed_precision="bf16"),
    "fsdp": od.Plan(fsdp=od.FSDP()),
    "ddp": od.Plan(ddp=od.DDP()),  # one data rank: the decision is "nothing", and so it is
}


def model():
    torch.manual_seed(0)
    return tiny(n_layers=4)


@pytest.mark.parametrize("case", CASES, ids=CASES)
def test_inspect_decides_what_accelerate_does(case):
    plan, name = CASES[case], case.split("-")[0]
    inspected = od.inspect(model(), plan)
    rt = od.accelerate(model(), plan)
    assert inspected.names() == rt.report.names()
    compare(name, inspected, rt)
    if case == "checkpointing-budget":  # a real choice: some blocks, not all
        assert 0 < len(rt.report[name].modules) < 4


def test_inspect_decides_what_offload_does(tmp_path):
    """A CPU budget of a third of the weights: the device map od.inspect shows (module →
    cpu / disk) is where od.accelerate put every tensor, read back from the model and the
    offload folder."""
    from tests.offload.offload_common import build, llama_config, model_bytes

    cfg = llama_config(layers=4)
    torch.manual_seed(0)
    total = model_bytes(build(cfg))
    plan = od.Plan(offload=od.Offload(max_memory={"cpu": total // 3, "disk": "10GiB"},
                                      offload_folder=str(tmp_path / "offload")))
    inspected = od.inspect(build(cfg), plan)
    rt = od.accelerate(build(cfg), plan)
    assert inspected.names() == rt.report.names() == ["offload"]
    compare("offload", inspected, rt)
    homes = set(done("offload", rt)["tensors"].values())
    assert homes == {"cpu", "disk"}, homes  # a real split, not everything in one place


def test_every_builtin_pass_is_compared_here_or_on_two_ranks():
    from overdrive.rewrite.manager import _REGISTRY, registered_passes

    registered_passes()  # registers the built-ins (`import overdrive` is lazy)
    builtin = {n for n, e in _REGISTRY.items() if e.cls.__module__.startswith("overdrive.passes.")}
    here = {c.split("-")[0] for c in CASES} | {"offload"}
    assert builtin == here | set(TWO_RANKS)


TWO_RANKS = ("tensor_parallel", "context_parallel", "fsdp", "ddp", "deepspeed", "pipeline")


@pytest.mark.dist
def test_inspect_decides_what_accelerate_does_on_two_ranks(tmp_path):
    out = run_torchrun(Path(__file__).parent / "decisions_worker.py", 2, *TWO_RANKS,
                       tmp_path=tmp_path, timeout=600)
    for name in TWO_RANKS:
        assert f"decision == applied: {name}" in out.stdout, out.stdout[-3000:]
