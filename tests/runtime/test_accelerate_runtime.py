"""Accelerate's runtime helpers in one process: split_between_processes, triggers,
register_for_checkpointing, and Accelerate's scheduler cases (issue 21). The 2-rank
versions are in test_accelerate_runtime_dist.py."""

from __future__ import annotations

import math

import pytest
import torch

import overdrive as od
from overdrive.runtime.split import split


# --------------------------------------------------------------------------- split


def shares(items, ranks, padded=False):
    return [split(items, r, ranks, padded) for r in range(ranks)]


@pytest.mark.parametrize("ranks", [2, 3, 4, 8])
def test_split_accelerates_cases(ranks):
    # 2N items: 2 a rank
    assert [len(s) for s in shares(list(range(2 * ranks)), ranks)] == [2] * ranks
    # 2N - 1 items: the last rank gets 1
    assert [len(s) for s in shares(list(range(2 * ranks - 1)), ranks)] == [2] * (ranks - 1) + [1]
    # 17 items: ranks below 17 % N get one extra
    got = [len(s) for s in shares(list(range(17)), ranks)]
    assert got == [17 // ranks + (r < 17 % ranks) for r in range(ranks)]
    # contiguous, complete, in order
    assert [x for s in shares(list(range(17)), ranks) for x in s] == list(range(17))


@pytest.mark.parametrize("n", [0, 1, 3, 5, 7, 16, 17])
@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_padded_split_gathers_back_to_the_input(n, ranks):
    items = list(range(n))
    parts = shares(items, ranks, padded=True)
    assert all(len(p) == math.ceil(n / ranks) for p in parts)
    assert [x for p in parts for x in p][:n] == items
    tensor = torch.arange(n * 2).reshape(n, 2)
    tparts = shares(tensor, ranks, padded=True)
    assert all(p.shape == (math.ceil(n / ranks), 2) for p in tparts)
    assert torch.equal(torch.cat(tparts)[:n], tensor)


def test_split_keeps_types_and_splits_dicts_value_by_value():
    tup = shares(("a", "b", "c"), 2)
    assert tup == [("a", "b"), ("c",)] and all(isinstance(t, tuple) for t in tup)
    assert shares(("a", "b", "c"), 2, padded=True)[1] == ("c", "c")
    batch = {"ids": torch.arange(5), "text": ["p0", "p1", "p2", "p3", "p4"]}
    first, second = shares(batch, 2)
    assert torch.equal(first["ids"], torch.arange(3)) and first["text"] == ["p0", "p1", "p2"]
    assert torch.equal(second["ids"], torch.tensor([3, 4])) and second["text"] == ["p3", "p4"]


@pytest.mark.parametrize("bad, match", [
    ({"a": [1, 2], "b": [1]}, "different lengths"),
    (torch.tensor(3.0), "0-d tensor"),
    ("a string", "give a list, a tuple, a tensor"),
    (iter([1, 2]), "give a list"),
])
def test_split_refuses_what_it_cannot_split(bad, match):
    with pytest.raises(od.OverdriveError, match=match):
        split(bad, 0, 2)


def test_split_between_processes_on_one_process_is_everything():
    rt = od.accelerate(torch.nn.Linear(2, 2))
    with rt.split_between_processes([1, 2, 3]) as mine:
        assert mine == [1, 2, 3]
    with rt.split_between_processes([1, 2, 3], apply_padding=True) as mine:
        assert mine == [1, 2, 3]


# --------------------------------------------------------------------------- trigger


def test_trigger_is_seen_once():
    rt = od.accelerate(torch.nn.Linear(2, 2))
    assert rt.check_trigger() is False
    rt.set_trigger()
    rt.set_trigger()
    assert rt.check_trigger() is True
    assert rt.check_trigger() is False


# --------------------------------------------------------------------------- custom state


class EMA:
    def __init__(self, model, decay=0.5):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.updates = 0

    def update(self, model):
        for k, v in model.state_dict().items():
            self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
        self.updates += 1

    def state_dict(self):
        return {"shadow": self.shadow, "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state):
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}
        self.updates, self.decay = state["updates"], state["decay"]


class Curriculum:
    def __init__(self):
        self.level = 0

    def state_dict(self):
        return {"level": self.level}

    def load_state_dict(self, state):
        self.level = state["level"]


def _runtime(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    return od.accelerate(model, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


def _step(rt, ema):
    rt.backward(rt.model(torch.ones(4, 3)).square().mean())
    rt.optimizer.step()
    rt.optimizer.zero_grad()
    ema.update(rt.model)


def test_registered_objects_are_saved_and_restored_in_order(tmp_path):
    rt = _runtime()
    ema, cur = EMA(rt.model), Curriculum()
    rt.register_for_checkpointing(ema, cur)
    for _ in range(3):
        _step(rt, ema)
    cur.level = 7
    rt.save(tmp_path / "ck")
    saved = {k: v.clone() for k, v in ema.shadow.items()}

    rt2 = _runtime(seed=1)
    ema2, cur2 = EMA(rt2.model), Curriculum()
    rt2.register_for_checkpointing(ema2, cur2)
    rt2.load(tmp_path / "ck")
    assert cur2.level == 7 and ema2.updates == 3
    assert all(torch.equal(ema2.shadow[k], saved[k]) for k in saved)
    _step(rt, ema), _step(rt2, ema2)  # and training goes on identically
    assert all(torch.equal(ema2.shadow[k], ema.shadow[k]) for k in saved)


@pytest.mark.parametrize("register, match", [
    (lambda rt: None, r"holds 2 object\(s\) .*this runtime has 0"),
    (lambda rt: rt.register_for_checkpointing(Curriculum()), r"holds 2 .* has 1"),
    (lambda rt: rt.register_for_checkpointing(Curriculum(), EMA(rt.model)),
     "registered object 0 was a .*EMA when saved"),
])
def test_load_refuses_other_registered_objects_before_restoring(tmp_path, register, match):
    rt = _runtime()
    ema, cur = EMA(rt.model), Curriculum()
    rt.register_for_checkpointing(ema, cur)
    cur.level = 3
    _step(rt, ema)
    rt.save(tmp_path / "ck")

    rt2 = _runtime(seed=1)
    register(rt2)
    before = {k: v.clone() for k, v in rt2.model.state_dict().items()}
    with pytest.raises(od.CheckpointMismatch, match=match):
        rt2.load(tmp_path / "ck")
    assert all(torch.equal(v, before[k]) for k, v in rt2.model.state_dict().items())
    assert rt2.step == 0
    assert all(getattr(o, "level", 0) == 0 for o in rt2._custom_objects)


def test_register_refuses_objects_without_state_and_unstorable_state(tmp_path):
    rt = _runtime()
    with pytest.raises(TypeError, match="has no state_dict"):
        rt.register_for_checkpointing(object())

    class Opaque(Curriculum):
        def state_dict(self):
            return {"fn": lambda: 1}

    rt.register_for_checkpointing(Opaque())
    with pytest.raises(od.CheckpointError, match=r"registered object 0 \(Opaque\)\['fn'\] "
                                                  "holds a function"):
        rt.save(tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


# --------------------------------------------------------------------------- scheduler


@pytest.mark.parametrize("grad_accum", [1, 2, 4])
def test_scheduler_steps_once_per_optimizer_step(grad_accum):
    """Accelerate's test_scheduler accumulation case: LambdaLR(1 - n/10) reaches 0 exactly
    on the last of 10 * grad_accum micro-steps, whatever grad_accum is."""
    model = torch.nn.Linear(2, 4)
    rt = od.accelerate(model, od.Plan(grad_accum=grad_accum),
                       optimizer=lambda p: torch.optim.AdamW(p, lr=10.0),
                       scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(
                           o, lr_lambda=lambda n: 1 - n / 10))
    for i in range(10 * grad_accum):
        with rt.accumulate():
            rt.backward(rt.model(torch.ones(1, 2)).sum())
            rt.optimizer.step()
            rt.scheduler.step()
            rt.optimizer.zero_grad()
        if i == 10 * grad_accum - 2:
            assert rt.scheduler.get_last_lr()[0] != 0
    assert rt.scheduler.get_last_lr()[0] == 0
    assert rt.step == 10 and rt.scheduler.last_epoch == 10


def test_scheduler_does_not_step_on_a_skipped_fp16_step():
    """Accelerate's lambda_test: the step the fp16 scaler skips leaves the lr alone."""
    model = torch.nn.Linear(2, 4)
    rt = od.accelerate(model, od.Plan(mixed_precision="fp16"),
                       optimizer=lambda p: torch.optim.AdamW(p, lr=1.0),
                       scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(
                           o, lr_lambda=lambda n: 1 - n / 10))
    rt.backward(rt.model(torch.ones(1, 2)).sum() * 1e-3)  # finite in fp16 at scale 2**16
    rt.optimizer.step()
    rt.scheduler.step()
    rt.optimizer.zero_grad()
    assert not rt.optimizer.step_was_skipped
    assert rt.scheduler.get_last_lr()[0] == pytest.approx(0.9)
    rt.backward(rt.model(torch.full((1, 2), float("inf"))).sum())  # inf grads: skipped
    rt.optimizer.step()
    rt.scheduler.step()
    rt.optimizer.zero_grad()
    assert rt.optimizer.step_was_skipped
    assert rt.scheduler.get_last_lr()[0] == pytest.approx(0.9) and rt.step == 1


# --------------------------------------------------------------------------- comm hooks


@pytest.mark.parametrize("ddp, match", [
    ({"comm_hook": "int8"}, r"ddp.comm_hook='int8' is not valid; choose one of: None, 'fp16'"),
    ({"comm_hook": "powersgd", "powersgd_rank": 0}, r"ddp.powersgd_rank=0 is not valid"),
    ({"powersgd_rank": 4}, r"only apply with ddp.comm_hook='powersgd'"),
    ({"comm_hook": "powersgd", "powersgd_start_iter": 1}, r"powersgd_start_iter=1 .* >= 2"),
])
def test_comm_hook_fields_are_validated_in_the_plan(ddp, match):
    with pytest.raises(od.PlanError, match=match):
        od.Plan.from_dict({"ddp": ddp})


def test_comm_hook_is_refused_with_fsdp():
    with pytest.raises(od.PlanError, match=r"ddp.comm_hook='fp16' .* uses fsdp.*reduce_dtype"):
        od.Plan(fsdp=od.FSDP(), ddp=od.DDP(comm_hook="fp16")).replace()


def test_bf16_comm_hook_is_refused_before_anything_on_gloo():
    from tests.helpers import assert_untouched, snapshot

    model = torch.nn.Linear(4, 4)
    before = snapshot(model)
    with pytest.raises(od.PlanError, match=r"comm_hook='bf16' needs bfloat16 all-reduce .* "
                                           r"gloo on cpu; use comm_hook='fp16'"):
        od.accelerate(model, od.Plan(ddp=od.DDP(comm_hook="bf16")),
                      optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    assert_untouched(model, before)


def test_inspect_shows_the_comm_hook_plan():
    plan = od.Plan(ddp=od.DDP(comm_hook="powersgd", powersgd_rank=2, powersgd_start_iter=10))
    report = od.inspect(torch.nn.Linear(4, 4), plan, world_size=4)
    assert report.plan["ddp"]["comm_hook"] == "powersgd" and "ddp" in report


class OverflowingEngine:
    """A DeepSpeed-like engine whose fp16 loss scaler skips the steps listed in `skip`."""

    def __init__(self, skip):
        self.skip, self.steps, self._applied = set(skip), 0, False

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.steps += 1
        self._applied = self.steps not in self.skip

    def was_step_applied(self):
        return self._applied

    def zero_grad(self):
        pass


def test_scheduler_does_not_step_on_a_step_deepspeed_skipped():
    from overdrive.plan_spec import resolve_for_world
    from overdrive.rewrite.contract import Handoff
    from overdrive.rewrite.report import Report
    from overdrive.runtime.runtime import Runtime
    from overdrive.runtime.state import env_for

    model = torch.nn.Linear(2, 2)
    plan = resolve_for_world(od.Plan(), 1)
    env = env_for(plan, rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 1 - n / 10)
    rt = Runtime(model, plan=plan, report=Report([]), env=env, optimizer=opt, scheduler=sched,
                 handoff=Handoff(engine=OverflowingEngine(skip={2})))
    lrs = []
    for _ in range(3):
        rt.backward(model(torch.ones(1, 2)).sum())
        rt.optimizer.step()
        rt.scheduler.step()
        lrs.append(rt.scheduler.get_last_lr()[0])
    assert lrs == pytest.approx([0.9, 0.9, 0.8]) and rt.step == 2
