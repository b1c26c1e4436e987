"""A load the checkpoint refuses leaves the runtime exactly as it was: every check runs
before the model, optimizer, scheduler, RNG or loaders are touched."""

import pytest
import torch

import overdrive as od

from ckpt_util import CountingLoader, make_model, manual_runtime, train_step
from ckpt_util import runtime_state as _state, assert_same_state as _assert_same


def _runtime(seed=0, scheduler=True, fp16=False, loaders=1, groups=1):
    model = make_model(2, seed=seed)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params if groups == 1 else [{"params": params[:3]},
                                                        {"params": params[3:]}], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if scheduler else None
    rt = manual_runtime(model, opt, sched, plan=od.Plan(mixed_precision="fp16") if fp16 else None)
    for _ in range(loaders):
        rt._loaders.append(CountingLoader())
    return rt


@pytest.fixture
def saved(tmp_path):
    rt = _runtime(seed=0)
    for _ in range(2):
        train_step(rt, rt._loaders[0])
    rt.save(tmp_path / "ck")
    return tmp_path / "ck"


@pytest.mark.parametrize("kind,match", [
    ({"scheduler": False}, "has a scheduler state but this runtime has no scheduler"),
    ({"fp16": True}, "has no scaler state but this runtime has scaler"),
    ({"loaders": 2}, r"holds 1 data-loader position\(s\), this runtime has 2 loader"),
    ({"groups": 2}, r"parameter groups differ — checkpoint 1 group\(s\)"),
])
def test_refused_load_leaves_the_runtime_untouched(saved, kind, match):
    rt = _runtime(seed=7, **kind)
    train_step(rt, rt._loaders[0])  # optimizer state, step, positions of its own
    before = _state(rt)
    with pytest.raises(od.CheckpointMismatch, match=match):
        rt.load(saved)
    _assert_same(before, _state(rt))


def test_save_and_load_mid_accumulation_are_refused(saved, tmp_path):
    model = make_model(2, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rt = manual_runtime(model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2),
                        plan=od.Plan(grad_accum=2))
    rt._loaders.append(CountingLoader())
    with rt.accumulate():  # micro-step 1 of 2: gradients accumulate, no step
        train_step(rt, rt._loaders[0])
    before = _state(rt)
    with pytest.raises(od.CheckpointError, match=r"rt.save at micro-step 1 of grad_accum=2"):
        rt.save(tmp_path / "mid")
    assert not (tmp_path / "mid").exists() and not list(tmp_path.glob(".mid*"))
    with pytest.raises(od.CheckpointError, match=r"rt.load at micro-step 1 of grad_accum=2"):
        rt.load(saved)
    _assert_same(before, _state(rt))
    with rt.accumulate():  # micro-step 2: the boundary, the optimizer steps
        train_step(rt, rt._loaders[0])
    assert rt.step == 1
    rt.save(tmp_path / "boundary")
    assert rt.load(tmp_path / "boundary")["step"] == 1


@pytest.mark.dist
def test_a_load_one_rank_refuses_is_refused_on_every_rank(tmp_path):
    from tests.helpers import ROOT, read_json, run_torchrun

    run_torchrun(ROOT / "tests" / "checkpoint" / "scripts" / "refuse_on_one_rank.py", 2,
                 str(tmp_path), tmp_path=tmp_path, timeout=120)
    errors = [read_json(tmp_path / f"refused-rank{r}.json")["error"] for r in range(2)]
    assert errors[1].startswith("CheckpointMismatch: the checkpoint holds 1 data-loader"), errors
    assert errors[0].startswith("CheckpointMismatch: rank 1 refused the load: the checkpoint "
                                "holds 1 data-loader"), errors
