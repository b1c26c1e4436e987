"""Non-finite guards (single process, fp32): a NaN/inf loss or gradient norm raises
NonFiniteError naming the step with the parameters unchanged, or — with
Plan(skip_nonfinite=True) — the step is skipped and logged."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import overdrive as od


def make(**plan):
    torch.manual_seed(0)
    return od.accelerate(torch.nn.Linear(4, 1), od.Plan(**plan),
                         optimizer=lambda p: torch.optim.AdamW(p, lr=0.1))


def step(rt, scale=1.0, clip=None):
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    with rt.accumulate():
        loss = F.mse_loss(rt.model(x), y) * scale
        rt.backward(loss)
        if clip is not None:
            rt.clip_grad_norm_(clip)
        rt.optimizer.step()
        rt.optimizer.zero_grad()


def params(rt):
    return [p.detach().clone() for p in rt.model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nonfinite_loss_raises_naming_the_step_and_changes_nothing(bad):
    rt = make()
    step(rt)
    step(rt)
    before = params(rt)
    with pytest.raises(od.NonFiniteError, match=rf"the loss is {bad} at optimizer step 3"):
        step(rt, scale=bad)
    assert same(params(rt), before) and rt.step == 2
    assert all(p.grad is None for p in rt.model.parameters())  # backward never ran


def test_the_error_names_the_micro_step_under_grad_accum():
    rt = make(grad_accum=4)
    with pytest.raises(od.NonFiniteError, match=r"optimizer step 1 \(micro-step 2 of 4\)"):
        step(rt)
        step(rt, scale=float("nan"))


def test_a_nonfinite_gradient_norm_is_reported_the_same_way():
    rt = make()
    before = params(rt)
    rt.model.weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(od.NonFiniteError, match=r"the gradient norm is (inf|nan) at optimizer step 1"):
        step(rt, clip=1.0)
    assert same(params(rt), before)


def test_skip_nonfinite_skips_the_step_and_logs(caplog):
    rt = make(skip_nonfinite=True)
    step(rt)
    before = params(rt)
    with caplog.at_level(logging.WARNING, logger="overdrive"):
        step(rt, scale=float("nan"))
    assert same(params(rt), before) and rt.step == 1
    assert rt.optimizer.step_was_skipped
    assert all(p.grad is None for p in rt.model.parameters())  # dropped, not accumulated
    assert "skipped optimizer step 2: the loss is nan" in caplog.text
    step(rt)  # training goes on
    assert rt.step == 2 and not same(params(rt), before)


def test_skip_nonfinite_must_be_a_bool():
    with pytest.raises(od.PlanError, match="skip_nonfinite='yes' is not valid"):
        od.Plan(skip_nonfinite="yes").replace()


def test_skip_nonfinite_is_refused_with_deepspeed():
    with pytest.raises(od.PlanError, match="skip_nonfinite=True with deepspeed"):
        od.Plan(skip_nonfinite=True, deepspeed=od.DeepSpeed()).replace()


def test_fp16_leaves_inf_to_the_grad_scaler():
    rt = make(mixed_precision="fp16")
    assert not rt._guard.enabled


@pytest.mark.parametrize("kw", [{"timeout": 0}, {"timeout": "60"}, {"desync_timeout": -1},
                                {"desync_timeout": True}])
def test_bad_timeouts_are_plan_errors(kw):
    name = next(iter(kw))
    with pytest.raises(od.PlanError, match=rf"{name}=.* is not valid; give a number of seconds"):
        od.accelerate(torch.nn.Linear(2, 2), **kw)
