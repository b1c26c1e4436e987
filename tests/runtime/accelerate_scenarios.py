"""Run under torchrun (2 ranks): issue 21's distributed helpers in one launch; each rank
writes ``<out>/rank<R>.json``. tests/runtime/test_accelerate_runtime_dist.py checks them."""

from __future__ import annotations

import copy
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import overdrive as od
from overdrive.models.llama import tiny

OUT = Path(sys.argv[1])


def split(rank):
    rt = od.accelerate(torch.nn.Linear(2, 2))
    out = {}
    for n in (4, 3, 17):
        with rt.split_between_processes(list(range(n))) as mine:
            out[f"list{n}"] = mine
    with rt.split_between_processes({"ids": torch.arange(5), "text": list("abcde")}) as mine:
        out["dict"] = {"ids": mine["ids"].tolist(), "text": mine["text"]}
    for n in (1, 5):
        data = torch.arange(n * 3).reshape(n, 3)
        with rt.split_between_processes(data, apply_padding=True) as mine:
            out[f"padded{n}_rows"] = mine.shape[0]
            result = mine * 10  # "inference"
        out[f"padded{n}_gathered"] = torch.equal(rt.gather(result)[:n], data * 10)
    with rt.split_between_processes(list(range(5)), apply_padding=True) as mine:
        out["padded_list"] = mine
        out["padded_list_gathered"] = rt.gather_object(mine)[:5]
    return out


def trigger(rank):
    rt = od.accelerate(torch.nn.Linear(2, 2))
    stopped_at = None
    for i in range(10):
        if rank == 1 and i == 3:  # only rank 1 sees the condition
            rt.set_trigger()
        if rt.check_trigger():
            stopped_at = i
            break
    return {"stopped_at": stopped_at, "again": rt.check_trigger()}


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def comm_hooks(rank):
    torch.manual_seed(1)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    out = {}
    for hook in (None, "fp16", "powersgd"):  # bf16: NCCL/XCCL only (refused on gloo)
        extra = {"powersgd_rank": 1, "powersgd_start_iter": 2} if hook == "powersgd" else {}
        rt = od.accelerate(_mlp(), od.Plan(ddp=od.DDP(comm_hook=hook, **extra)),
                           optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
        grads, losses = [], []
        for _ in range(4):
            sl = slice(rank * 4, rank * 4 + 4)
            loss = F.mse_loss(rt.model(x[sl]), y[sl])
            rt.backward(loss)
            grads.append(torch.cat([p.grad.flatten() for p in rt.model.parameters()]).tolist())
            rt.optimizer.step()
            rt.optimizer.zero_grad()
            losses.append(rt.reduce(loss.detach(), "mean").item())
        ddp = rt.report["ddp"]
        out[str(hook)] = {"grads": grads, "losses": losses,
                          "details": {k: v for k, v in ddp.details.items() if k != "sync_size"}}
    return out


class EMA:
    def __init__(self, model, decay=0.5):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def update(self, model):
        for k, v in model.state_dict().items():
            self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)

    def state_dict(self):
        return {"shadow": self.shadow}

    def load_state_dict(self, state):
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}


def custom_state(rank):
    def make():
        rt = od.accelerate(_mlp(), "ddp", optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
        return rt, EMA(rt.model)

    rt, ema = make()
    rt.register_for_checkpointing(ema)
    for _ in range(2):
        rt.backward(rt.model(torch.ones(2, 4) * (rank + 1)).square().mean())
        rt.optimizer.step()
        rt.optimizer.zero_grad()
        ema.update(rt.model)
    path = OUT / "ck-custom"
    rt.save(path)
    rt2, ema2 = make()
    rt2.register_for_checkpointing(ema2)
    rt2.load(path)
    restored = all(torch.equal(ema2.shadow[k], ema.shadow[k]) for k in ema.shadow)
    rt3, _ = make()
    try:
        rt3.load(path)
        refused = None
    except od.CheckpointMismatch as e:
        refused = str(e)
    return {"restored": restored, "refused": refused,
            "shadow_sum": float(sum(v.sum() for v in ema2.shadow.values()))}


def _llama(seed):
    model = tiny(2, vocab_size=64, dim=32, n_heads=2, max_seq_len=16)
    model.init_weights(seed=seed)
    return model


def _kl(student_logits, teacher_logits):
    return F.kl_div(F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1),
                    log_target=True, reduction="batchmean")


def distillation(rank):
    """fsdp student + fsdp frozen teacher, loss = KL(student || teacher), grad_accum=2,
    against the same training in one process with the full batch."""
    steps, lr = 3, 0.5
    tokens = torch.randint(0, 64, (steps, 4, 8), generator=torch.Generator().manual_seed(3))
    student, teacher = _llama(0), _llama(1).requires_grad_(False)
    ref_s, ref_t = copy.deepcopy(student), copy.deepcopy(teacher)

    ref_opt = torch.optim.SGD(ref_s.parameters(), lr=lr)
    ref_losses = []
    for step in range(steps):
        with torch.no_grad():
            t_logits = ref_t(tokens[step]).logits
        loss = _kl(ref_s(tokens[step]).logits, t_logits)
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        ref_losses.append(loss.item())

    rt_s = od.accelerate(student, od.Plan(fsdp=od.FSDP(), grad_accum=2),
                         optimizer=lambda p: torch.optim.SGD(p, lr=lr))
    groups_before = len(dist.distributed_c10d._world.pg_map)
    rt_t = od.accelerate(teacher, "fsdp")  # optimizer=None: inference
    groups_after = len(dist.distributed_c10d._world.pg_map)
    teacher_sync_calls = []
    rt_t._grad_sync._set_sync = lambda flag: teacher_sync_calls.append(flag)  # accumulate
    losses = []
    for step in range(steps):
        total = 0.0
        for micro in range(2):  # rank r's sequences 2r and 2r+1, one per micro-step
            batch = tokens[step][2 * rank + micro: 2 * rank + micro + 1]
            with rt_s.accumulate():
                with torch.no_grad():
                    t_logits = rt_t.model(batch).logits
                loss = _kl(rt_s.model(batch).logits, t_logits)
                rt_s.backward(loss)
                rt_s.optimizer.step()
                rt_s.optimizer.zero_grad()
            total += loss.item() / 2
        losses.append(rt_s.reduce(torch.tensor(total), "mean").item())
    full = rt_s.state_dict()
    ref = ref_s.state_dict()
    max_diff = max((full[k] - ref[k]).abs().max().item() for k in ref)
    teacher_full = rt_t.state_dict()
    teacher_same = all(torch.equal(teacher_full[k], v) for k, v in ref_t.state_dict().items())
    return {"losses": losses, "ref_losses": ref_losses, "max_param_diff": max_diff,
            "same_mesh": rt_s.mesh is rt_t.mesh, "new_groups": groups_after - groups_before,
            "teacher_sync_calls": teacher_sync_calls, "teacher_unchanged": teacher_same,
            "student_steps": rt_s.step, "teacher_steps": rt_t.step}


def frozen_ddp(rank):
    """A frozen model on 2 ranks with no plan (ddp turned on by itself): inference works."""
    rt = od.accelerate(_mlp().requires_grad_(False))
    with torch.no_grad():
        out = rt.model(torch.ones(1, 4))
    return {"passes": rt.report.names(), "notes": rt.report["ddp"].notes,
            "shape": list(out.shape)}


def scheduler(rank):
    out = {}
    for ga in (1, 2, 4):
        rt = od.accelerate(torch.nn.Linear(2, 4), od.Plan(ddp=od.DDP(), grad_accum=ga),
                           optimizer=lambda p: torch.optim.AdamW(p, lr=10.0),
                           scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(
                               o, lr_lambda=lambda n: 1 - n / 10))
        lrs = []
        for _ in range(10 * ga):
            with rt.accumulate():
                rt.backward(rt.model(torch.ones(1, 2)).sum())
                rt.optimizer.step()
                rt.scheduler.step()
                rt.optimizer.zero_grad()
            lrs.append(rt.scheduler.get_last_lr()[0])
        out[str(ga)] = lrs
    return out


SCENARIOS = [split, trigger, comm_hooks, custom_state, distillation, frozen_ddp, scheduler]


def main():
    import os

    rank = int(os.environ["RANK"])
    results = {}
    for fn in SCENARIOS:
        try:
            results[fn.__name__] = fn(rank)
        except Exception:
            results[fn.__name__] = {"error": traceback.format_exc()}
    (OUT / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
