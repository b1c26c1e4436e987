"""Run under torchrun (2 ranks): one fault, or a long clean run, for the collective ledger.

    desync_scenarios.py SCENARIO OUT_DIR

Each rank writes ``OUT_DIR/rank<R>.json``: {"error": the exception's class, "message",
"since_fault": s from the fault to the raise} (or {"error": null, "steps": n}). A rank that
is stopped rather than raising (blocked in DDP's all-reduce, sleeping) writes nothing;
the ledger prints its DesyncError to stderr instead. The faulting rank writes
``OUT_DIR/fault`` (the wall time of the fault) just before it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import overdrive as od
from overdrive.plan_spec import Plan
from overdrive.rewrite.report import Report
from overdrive.runtime.runtime import Runtime
from overdrive.runtime.state import make_env

DESYNC_TIMEOUT = 5.0


def plain_runtime() -> Runtime:
    """Two ranks training alone (no DDP: no collective in backward), each step's loss
    reduced with rt.reduce — the only collective of a step."""
    plan, env = make_env(Plan())
    model = torch.nn.Linear(4, 1)
    return Runtime(model, plan=plan, report=Report([]), env=env,
                   optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                   desync_timeout=DESYNC_TIMEOUT)


def ddp_runtime(**tracking) -> Runtime:
    torch.manual_seed(0)
    return od.accelerate(torch.nn.Linear(4, 1), od.Plan(ddp=od.DDP()),
                         optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
                         desync_timeout=DESYNC_TIMEOUT, **tracking)


def train_step(rt, x, y, *, sleep: float = 0.0):
    out = rt.model(x)
    if sleep:
        time.sleep(sleep)
    loss = F.mse_loss(out, y)
    rt.backward(loss)
    rt.optimizer.step()
    rt.optimizer.zero_grad()
    return loss


def mark_fault(out: Path) -> None:
    (out / "fault").write_text(repr(time.time()))


def skip_reduce(out: Path) -> int:
    """Rank 1 skips one rt.reduce at step 5; the later ones pair up one step apart."""
    rt = plain_runtime()
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for step in range(1, 2000):
        loss = train_step(rt, x, y)
        if rt.rank == 1 and step == 5:
            mark_fault(out)
            continue
        rt.reduce(loss.detach(), "mean")
        time.sleep(0.005)
    return 2000


def write_ledger(rt, out: Path) -> None:
    """This rank's recent ledger entries, as the DesyncError would show them."""
    from overdrive.runtime.ledger import describe

    entries = [describe(e) for _, e in rt._ledger.entries]
    (out / f"ledger{rt.rank}.json").write_text(json.dumps(entries))


def skip_backward(rt, out: Path, x, y) -> int:
    """Rank 1 runs step 5's forward but skips its backward (and so the engine's gradient
    sync), then steps; the default step metrics are on (their all-reduce would meet the
    other rank's gradient sync, of another size: gloo aborts that process)."""
    for step in range(1, 2000):
        if step == 5:
            write_ledger(rt, out)
        if rt.rank == 1 and step == 5:
            mark_fault(out)
            F.mse_loss(rt.model(x), y)  # a loss it decides not to train on
            rt.optimizer.step()
            rt.optimizer.zero_grad()
            continue
        train_step(rt, x, y)
        time.sleep(0.005)
    return 2000


def skip_bucket(out: Path) -> int:
    """DDP: rank 1 skips step 5's backward."""
    rt = ddp_runtime(run_dir=str(out / "run"))
    return skip_backward(rt, out, torch.randn(8, 4), torch.randn(8, 1))


def fsdp_runtime(out: Path, **plan) -> Runtime:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    return od.accelerate(model, od.Plan(fsdp=od.FSDP(), **plan),
                         optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
                         desync_timeout=DESYNC_TIMEOUT, run_dir=str(out / "run"))


def fsdp_skip_backward(out: Path) -> int:
    """FSDP2: rank 1 skips step 5's backward (its all-gathers and reduce-scatters)."""
    rt = fsdp_runtime(out)
    return skip_backward(rt, out, torch.randn(8, 4), torch.randn(8, 1))


def skip_micro(rt, out: Path) -> int:
    """grad_accum=2: rank 1 enters step 3's synced micro-step and skips it (no forward,
    backward or step): its gradient sync comes one micro-step later than rank 0's."""
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for micro in range(1, 4000):
        with rt.accumulate():
            if rt.rank == 1 and micro == 6:
                mark_fault(out)
                continue
            loss = F.mse_loss(rt.model(x), y)
            rt.backward(loss)
            rt.optimizer.step()
            rt.optimizer.zero_grad()
        time.sleep(0.003)
    return 4000


def ddp_skip_micro(out: Path) -> int:
    torch.manual_seed(0)
    rt = od.accelerate(torch.nn.Linear(4, 1), od.Plan(ddp=od.DDP(), grad_accum=2),
                       optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
                       desync_timeout=DESYNC_TIMEOUT, run_dir=str(out / "run"))
    return skip_micro(rt, out)


def fsdp_skip_micro(out: Path) -> int:
    return skip_micro(fsdp_runtime(out, grad_accum=2), out)


def backend_error(out: Path) -> int:
    """DDP: rank 1 skips step 5's backward and step and then works (sleeps) 8 s outside
    overdrive; rank 0's gradient all-reduce hits the process group's timeout
    (OVERDRIVE_PG_TIMEOUT=2, below desync_timeout): gloo raises inside rt.backward."""
    rt = ddp_runtime(run_dir=str(out / "run"))
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for step in range(1, 200):
        if rt.rank == 1 and step == 5:
            mark_fault(out)
            F.mse_loss(rt.model(x), y)
            time.sleep(8.0)
            continue
        train_step(rt, x, y)
    return 200


def save_alone(out: Path) -> int:
    """Rank 1 calls rt.save at step 3; rank 0 trains on, into DDP's all-reduce."""
    rt = ddp_runtime()
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for step in range(1, 200):
        train_step(rt, x, y)
        if rt.rank == 1 and step == 3:
            mark_fault(out)
            rt.save(out / "ckpt")
    return 200


def sleep_forward(out: Path) -> int:
    """Rank 1 sleeps in its forward at step 3; rank 0 waits in the step's rt.reduce."""
    rt = plain_runtime()
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for step in range(1, 200):
        slow = rt.rank == 1 and step == 3
        if slow:
            mark_fault(out)
        loss = train_step(rt, x, y, sleep=60.0 if slow else 0.0)
        rt.reduce(loss.detach(), "mean")
    return 200


def gather_alone(out: Path) -> int:
    """Rank 0 calls rt.gather_for_metrics alone at step 3; rank 1 trains on."""
    rt = plain_runtime()
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for step in range(1, 2000):
        loss = train_step(rt, x, y)
        if rt.rank == 0 and step == 3:
            mark_fault(out)
            rt.gather_for_metrics(loss.detach())
        time.sleep(0.005)
    return 2000


def clean(out: Path, steps: int = 1000) -> int:
    """After rank 0 spent longer than desync_timeout alone in rt.main_process_first,
    ``steps`` DDP steps over a sharded loader with an uneven last batch, an evaluation
    with gather_for_metrics every 250 steps (uneven too), a save every 100."""
    rt = ddp_runtime()
    with rt.main_process_first():  # rank 0 alone for longer than desync_timeout: by design
        if rt.is_main:
            time.sleep(DESYNC_TIMEOUT + 2)
    train = TensorDataset(torch.randn(41, 4), torch.randn(41, 1))  # 41 rows: a ragged tail
    evals = TensorDataset(torch.randn(13, 4), torch.randn(13, 1))
    loader = rt.shard(DataLoader(train, batch_size=4, shuffle=True))
    eval_loader = rt.shard(DataLoader(evals, batch_size=4))
    step = 0
    while step < steps:
        for x, y in loader:
            train_step(rt, x, y)
            step += 1
            if step % 100 == 0:
                rt.save(out / f"step-{step}", keep_last=2)
            if step % 250 == 0:
                with torch.no_grad():
                    rows = [rt.gather_for_metrics(F.mse_loss(rt.model(ex), ey, reduction="none"))
                            for ex, ey in eval_loader]
                assert sum(r.shape[0] for r in rows) == len(evals)
            if step % 250 == 50:  # an evaluation off the save/eval grid, in train mode
                rt.gather_for_metrics(torch.tensor([float(step)]))
            if step == steps:
                break
    rt.load(out / f"step-{steps}")
    return step


SCENARIOS = {"skip_reduce": skip_reduce, "skip_bucket": skip_bucket,
             "fsdp_skip_backward": fsdp_skip_backward, "ddp_skip_micro": ddp_skip_micro,
             "fsdp_skip_micro": fsdp_skip_micro, "backend_error": backend_error,
             "save_alone": save_alone, "sleep_forward": sleep_forward,
             "gather_alone": gather_alone, "clean": clean,
             "clean_short": lambda out: clean(out, steps=200)}


def main() -> None:
    name, out = sys.argv[1], Path(sys.argv[2])
    import torch.distributed as dist

    rank = int(__import__("os").environ["RANK"])
    result: dict = {"error": None}
    start = time.monotonic()
    try:
        result["steps"] = SCENARIOS[name](out)
        result["seconds"] = round(time.monotonic() - start, 1)
    except od.DesyncError as err:
        fault = out / "fault"
        since = time.time() - float(fault.read_text()) if fault.exists() else None
        cause = err.__cause__
        result = {"error": type(err).__name__, "message": str(err), "since_fault": since,
                  "cause": None if cause is None else f"{type(cause).__name__}: {cause}"}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if result["error"] is not None:
        sys.exit(1)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
