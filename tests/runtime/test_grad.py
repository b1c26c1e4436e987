"""Gradient accumulation, optimizer/scheduler wrappers and clipping in one process."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

import overdrive as od
from overdrive.plan_spec import Plan, resolve_for_world
from overdrive.rewrite.report import Report
from overdrive.runtime.runtime import Runtime
from overdrive.runtime.state import env_for
from overdrive.rewrite.contract import Handoff


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def data(n=16):
    torch.manual_seed(1)
    return torch.randn(n, 4), torch.randn(n, 1)


def make_rt(model, plan: Plan, *, set_sync=None, engine=None, optimizer=True, scheduler=None):
    plan = resolve_for_world(plan, 1)
    env = env_for(plan, rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    handoff = Handoff(gradient_sync=set_sync, engine=engine)
    opt = torch.optim.SGD(model.parameters(), lr=0.1) if optimizer else None
    sched = scheduler(opt) if scheduler else None
    return Runtime(model, plan=plan, report=Report([]), env=env, optimizer=opt, scheduler=sched,
                   handoff=handoff)


def test_four_micro_batches_equal_one_big_batch():
    x, y = data()
    ref = mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(2):
        sl = slice(step * 8, (step + 1) * 8)
        torch.nn.functional.mse_loss(ref(x[sl]), y[sl]).backward()
        ref_opt.step()
        ref_opt.zero_grad()

    model = mlp()
    rt = od.accelerate(model, Plan(grad_accum=4),
                       optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    before = [p.detach().clone() for p in model.parameters()]
    for i, (xb, yb) in enumerate(rt.shard(DataLoader(TensorDataset(x, y), batch_size=2))):
        with rt.accumulate():
            rt.backward(torch.nn.functional.mse_loss(rt.model(xb), yb))
            rt.optimizer.step()
            rt.optimizer.zero_grad()
        if i < 3:  # nothing stepped, gradients still accumulating
            assert not rt.sync_gradients and rt.step == 0
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            assert model[0].weight.grad is not None
    assert rt.step == 2
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sync_toggled_only_on_change_and_last_batch_of_loader_syncs():
    calls = []
    rt = make_rt(mlp(), Plan(grad_accum=4), set_sync=calls.append)
    x, y = data(6)
    syncs = []
    for xb, yb in rt.shard(DataLoader(TensorDataset(x, y), batch_size=1)):
        with rt.accumulate():
            rt.backward(torch.nn.functional.mse_loss(rt.model(xb), yb))
            syncs.append(rt.sync_gradients)
            rt.optimizer.step()
            rt.optimizer.zero_grad()
    assert syncs == [False, False, False, True, False, True]  # 6 = 4 + the loader's end
    assert calls == [False, True, False, True]
    assert rt.step == 2


def test_scheduler_and_post_step_hooks_only_on_real_steps():
    model = mlp()
    rt = make_rt(model, Plan(grad_accum=2),
                 scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5))
    hooked = []
    rt.post_step_hooks.append(lambda m, o: hooked.append((m, o)))
    x, y = data(4)
    for i in range(4):
        with rt.accumulate():
            rt.backward(torch.nn.functional.mse_loss(rt.model(x[i:i + 1]), y[i:i + 1]))
            rt.optimizer.step()
            rt.scheduler.step()
            rt.optimizer.zero_grad()
    assert rt.step == 2 and len(hooked) == 2
    assert hooked[0][0] is model and hooked[0][1] is rt.optimizer.optimizer
    assert rt.scheduler.get_last_lr() == [0.025]
    assert rt.optimizer.param_groups[0]["lr"] == 0.025


def test_optimizer_wrapper_face():
    rt = make_rt(mlp(), Plan())
    opt = rt.optimizer
    assert isinstance(opt, torch.optim.Optimizer)
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.defaults["lr"] == 0.1


def test_clip_grad_norm_is_torch_norm_and_skipped_on_micro_steps():
    x, y = data(4)
    ref = mlp()
    torch.nn.functional.mse_loss(ref(x), y).backward()
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)

    rt = make_rt(mlp(), Plan(grad_accum=2))
    with rt.accumulate():
        rt.backward(torch.nn.functional.mse_loss(rt.model(x), y) * 2)
        grads = [p.grad.clone() for p in rt.model.parameters()]
        assert rt.clip_grad_norm_(0.1) is None  # partial gradients: untouched
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, rt.model.parameters()))
    with rt.accumulate():
        got = rt.clip_grad_norm_(0.1)
    torch.testing.assert_close(got, want * 1.0)
    for a, b in zip(rt.model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    rt.clip_grad_value_(1e-3)
    assert max(p.grad.abs().max() for p in rt.model.parameters()) <= 1e-3


def test_fp16_gradients_unscaled_once_before_clipping():
    x, y = data(4)
    ref = mlp()
    torch.nn.functional.mse_loss(ref(x), y).backward()
    want = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])

    rt = make_rt(mlp(), Plan(mixed_precision="fp16"))
    assert rt.scaler is not None and rt.scaler.get_scale() > 1
    rt.backward(torch.nn.functional.mse_loss(rt.model(x), y))
    torch.testing.assert_close(rt.clip_grad_norm_(1e9), want)
    torch.testing.assert_close(rt.clip_grad_norm_(1e9), want)  # not unscaled twice
    rt.optimizer.step()
    assert rt.step == 1 and not rt.optimizer.step_was_skipped


class RecordingEngine:
    """Stands in for a DeepSpeed engine: records what the runtime asks of it."""

    def __init__(self):
        self.calls = []

    def backward(self, loss):
        self.calls.append("backward")
        loss.backward()

    def step(self):
        self.calls.append("step")

    def zero_grad(self):
        self.calls.append("zero_grad")

    def set_gradient_accumulation_boundary(self, flag):
        self.calls.append(f"boundary={flag}")

    def get_global_grad_norm(self):
        return 3.0

    def gradient_clipping(self):  # DeepSpeedEngine's: the config's gradient_clipping
        return 1.0


def test_deepspeed_engine_steps_every_micro_step():
    engine = RecordingEngine()
    rt = make_rt(mlp(), Plan(grad_accum=2), engine=engine)
    x, y = data(2)
    for i in range(2):
        with rt.accumulate():
            rt.backward(torch.nn.functional.mse_loss(rt.model(x[i:i + 1]), y[i:i + 1]))
            norm = rt.clip_grad_norm_(1.0)
            rt.optimizer.step()
            rt.optimizer.zero_grad()
    assert engine.calls == ["boundary=False", "backward", "step",
                            "boundary=True", "backward", "step", "zero_grad"]
    assert rt.step == 1 and float(norm) == 3.0


def test_an_eval_loop_inside_the_training_loop_keeps_the_last_batch_sync():
    calls = []
    rt = make_rt(mlp(), Plan(grad_accum=4), set_sync=calls.append)
    x, y = data(6)
    train = rt.shard(DataLoader(TensorDataset(x, y), batch_size=1))
    evals = rt.shard(DataLoader(TensorDataset(x), batch_size=4))
    syncs, eval_rows = [], []
    for i, (xb, yb) in enumerate(train):
        for (e,) in evals:  # before the step: the eval loop ends, training is active again
            eval_rows.append(len(rt.gather_for_metrics(e)))
        with rt.accumulate():
            rt.backward(torch.nn.functional.mse_loss(rt.model(xb), yb))
            syncs.append(rt.sync_gradients)
            rt.optimizer.step()
            rt.optimizer.zero_grad()
        if i == 1:
            for (e,) in evals:  # and after it, breaking out early
                break
    assert syncs == [False, False, False, True, False, True]
    assert calls == [False, True, False, True] and rt.step == 2
    assert eval_rows == [4, 2] * 6


def test_fp16_step_skipped_on_inf_grads_runs_no_hooks_and_reads_no_scale():
    model = mlp()
    rt = make_rt(model, Plan(mixed_precision="fp16"),
                 scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5))
    hooked = []
    rt.post_step_hooks.append(lambda m, o: hooked.append(rt.step))
    reads = []
    real_get_scale = rt.scaler.get_scale
    rt.scaler.get_scale = lambda: reads.append(1) or real_get_scale()  # a device sync on GPU
    x, y = data(4)
    scale = real_get_scale()

    rt.backward(torch.nn.functional.mse_loss(rt.model(x), y))
    model[0].weight.grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    rt.optimizer.step()
    rt.scheduler.step()
    rt.optimizer.zero_grad()
    assert rt.optimizer.step_was_skipped and rt.step == 0 and hooked == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert real_get_scale() == scale / 2 and rt.scheduler.get_last_lr() == [0.1]

    rt.backward(torch.nn.functional.mse_loss(rt.model(x), y))
    rt.clip_grad_norm_(1.0)  # unscaled here, once: the skipped step left no unscaled flag
    rt.optimizer.step()
    rt.scheduler.step()
    assert not rt.optimizer.step_was_skipped and rt.step == 1 and hooked == [0]
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert rt.scheduler.get_last_lr() == [0.05]
    assert reads == []


def test_fp16_skipped_step_of_a_fused_optimizer_is_seen_too():
    model = mlp()
    plan = resolve_for_world(Plan(mixed_precision="fp16"), 1)
    env = env_for(plan, rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)  # skips on the device
    rt = Runtime(model, plan=plan, report=Report([]), env=env, optimizer=opt)
    x, y = data(4)
    rt.backward(torch.nn.functional.mse_loss(rt.model(x), y))
    model[0].weight.grad[0, 0] = float("nan")
    rt.optimizer.step()
    rt.optimizer.zero_grad()
    assert rt.optimizer.step_was_skipped and rt.step == 0
    rt.backward(torch.nn.functional.mse_loss(rt.model(x), y))
    rt.optimizer.step()
    assert not rt.optimizer.step_was_skipped and rt.step == 1


def test_deepspeed_clip_norm_must_match_the_engines_clipping():
    import pytest

    from overdrive.errors import OverdriveError

    rt = make_rt(mlp(), Plan(), engine=RecordingEngine())
    with pytest.raises(OverdriveError, match=r"max_norm=0.5.*gradient_clipping=1.0.*"
                                             r"od.DeepSpeed\(gradient_clipping=0.5\)"):
        rt.clip_grad_norm_(0.5)
    assert float(rt.clip_grad_norm_(1.0)) == 3.0  # the engine's last computed norm

    class NoClipMethod(RecordingEngine):
        gradient_clipping = None  # an engine that says nothing about clipping does not clip

    rt = make_rt(mlp(), Plan(), engine=NoClipMethod())
    with pytest.raises(OverdriveError, match="no gradient clipping"):
        rt.clip_grad_norm_(1.0)


def test_post_step_hooks_on_the_runtime_run_after_real_steps_only():
    rt = make_rt(mlp(), Plan(grad_accum=3))
    assert rt.post_step_hooks is rt._handoff.post_step_hooks
    seen = []
    rt.post_step_hooks.append(lambda model, opt: seen.append((rt.step, rt.sync_gradients)))
    x, y = data(6)
    for i in range(6):
        with rt.accumulate():
            rt.backward(torch.nn.functional.mse_loss(rt.model(x[i:i + 1]), y[i:i + 1]))
            rt.optimizer.step()
            rt.optimizer.zero_grad()
    assert seen == [(0, True), (1, True)] and rt.step == 2  # before rt.step counts the step
