"""Run under torchrun: many runtime scenarios in one launch; each rank writes
``<out>/rank<R>.json`` with what it saw. tests/runtime/test_dist_runtime.py checks them."""

from __future__ import annotations

import json
import sys
import traceback

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from overdrive.plan_spec import Plan
from overdrive.rewrite.contract import Handoff
from overdrive.rewrite.report import Report
from overdrive.runtime.runtime import Runtime
from overdrive.runtime.state import make_env


def runtime(model=None, optimizer=None, **plan_kw) -> Runtime:
    plan, env = make_env(Plan(**plan_kw))
    model = model or torch.nn.Linear(2, 2)
    opt = optimizer(model) if optimizer else None
    return Runtime(model, plan=plan, report=Report([]), env=env, optimizer=opt)


def items(loader) -> list:
    """Each batch as (values, n_real)."""
    return [(b[0].tolist(), loader.n_real) for b in loader]


class Stream(IterableDataset):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(torch.arange(self.n).split(1))


class Recording(Dataset):
    """A map-style dataset that remembers which indices were read."""

    def __init__(self, n):
        self.n, self.read = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.read.append(i)
        return torch.tensor([i])


def torch_seeded_shuffle(_rt):
    """No Plan.seed, no loader generator: the shuffle follows torch.manual_seed (each rank
    seeded differently here: rank 0's draw is the one every rank uses)."""
    rank = torch.distributed.get_rank()
    ds = TensorDataset(torch.arange(37))
    runs = []
    for _ in range(2):
        torch.manual_seed(rank)
        rt = runtime()
        runs.append(items(rt.shard(DataLoader(ds, batch_size=4, shuffle=True))))
    torch.manual_seed(1000 + rank)
    other = items(runtime().shard(DataLoader(ds, batch_size=4, shuffle=True)))
    return {"runs": runs, "other": other}


def shards(rt):
    out = {}
    ds = TensorDataset(torch.arange(37))
    for shuffle in (False, True):
        loader = rt.shard(DataLoader(ds, batch_size=4, shuffle=shuffle))
        out[f"shuffle={shuffle}"] = {"batches": items(loader), "len": len(loader)}
    loader = rt.shard(DataLoader(TensorDataset(torch.arange(18)), batch_size=4),
                      split_batches=True)
    out["split"] = {"batches": items(loader), "len": len(loader)}
    loader = rt.shard(DataLoader(Stream(11), batch_size=2))  # dispatch (default for iterable)
    out["dispatch"] = {"batches": [(b.flatten().tolist(), loader.n_real) for b in loader],
                       "dispatch": loader.dispatch}
    loader = rt.shard(DataLoader(Stream(11), batch_size=2), dispatch=False)
    out["iterable_no_dispatch"] = {"batches": [(b.flatten().tolist(), loader.n_real)
                                               for b in loader]}
    loader = rt.shard(DataLoader(Stream(9), batch_size=2), even_batches=False)
    out["dispatch_uneven"] = [b.flatten().tolist() for b in loader]
    three = TensorDataset(torch.arange(3))
    for even in (True, False):
        loader = rt.shard(DataLoader(three, batch_size=1), even_batches=even)
        out[f"three_even={even}"] = [len(b[0]) for b in loader]
    return out


def metrics(rt):
    out = {}
    for n, workers in ((37, 0), (22, 4)):
        loader = rt.shard(DataLoader(TensorDataset(torch.arange(n)), batch_size=4,
                                     num_workers=workers))
        seen = []
        for (x,) in loader:
            seen += rt.gather_for_metrics(x * 10).tolist()
        out[f"{n}_{workers}"] = seen
    loader = rt.shard(DataLoader(TensorDataset(torch.arange(37)), batch_size=4),
                      even_batches=False)
    out["uneven"] = [v for (x,) in loader for v in rt.gather_for_metrics(x).tolist()]
    loader = rt.shard(DataLoader(TensorDataset(torch.arange(37)), batch_size=4))
    out["strings"] = [s for (x,) in loader
                      for s in rt.gather_for_metrics([f"s{v}" for v in x.tolist()])]
    return out


def resume(rt):
    ds = TensorDataset(torch.arange(40))
    full = rt.shard(DataLoader(ds, batch_size=2, shuffle=True))
    full.set_epoch(1)
    want = items(full)
    first = rt.shard(DataLoader(ds, batch_size=2, shuffle=True))
    first.set_epoch(1)
    it = iter(first)
    consumed = [next(it)[0].tolist() for _ in range(3)]
    state = first.state_dict()
    rec = Recording(40)
    again = rt.shard(DataLoader(rec, batch_size=2, shuffle=True))
    again.load_state_dict(state)
    again.set_epoch(1)  # the loaded epoch: keeps the position
    rest = [b.flatten().tolist() for b in again]
    return {"want": [b for b, _ in want], "consumed": consumed, "rest": rest,
            "read": sorted(rec.read), "state": state, "after": again.state_dict()}


def collectives(rt):
    r = rt.rank
    out = {}
    g = rt.gather({"a": torch.tensor(float(r)), "b": [torch.full((2, 2), r)]})
    out["gather"] = {"a": g["a"].tolist(), "b": g["b"][0].tolist()}
    x = torch.tensor([1.0 + r, 5.0 - r])
    out["sum"] = rt.reduce(x, "sum").tolist()
    out["mean"] = rt.reduce(x, "mean").tolist()
    out["max"] = rt.reduce(x, "max").tolist()
    out["broadcast"] = rt.broadcast(torch.tensor([r, r + 10]), src=1).tolist()
    out["pad"] = rt.pad_across_processes(torch.ones(r + 1, 2), dim=0, pad_index=-1).tolist()
    out["pad_first"] = rt.pad_across_processes(torch.ones(2, r + 1), dim=1,
                                               pad_first=True).tolist()
    out["object"] = rt.gather_object([f"r{r}"])
    try:
        rt.gather(torch.zeros(r + 1, 3))
        out["mismatch"] = None
    except Exception as err:  # noqa: BLE001
        out["mismatch"] = f"{type(err).__name__}: {err}"
    out["after_error"] = rt.reduce(torch.tensor([1.0]), "sum").tolist()  # still usable
    try:
        rt.reduce({"a": torch.zeros(2)} if r == 0 else {"a": torch.zeros(2, dtype=torch.int64)})
        out["dtype_mismatch"] = None
    except Exception as err:  # noqa: BLE001
        out["dtype_mismatch"] = f"{type(err).__name__}: {err}"
    # more tensors than the sizes sent with the check: one more exchange
    many = [torch.full((r + 1 + i % 2, 2), float(i)) for i in range(10)]
    out["pad_many"] = [list(t.shape) for t in rt.pad_across_processes(many, dim=0)]
    # the happy path pickles nothing: no object collective
    import torch.distributed as dist

    objects = []
    real = dist.all_gather_object
    dist.all_gather_object = lambda *a, **k: objects.append(1) or real(*a, **k)
    try:
        rt.gather(torch.ones(2)), rt.reduce(torch.ones(2)), rt.broadcast(torch.ones(2))
        rt.pad_across_processes(torch.ones(r + 1)), rt.gather_for_metrics(torch.ones(r + 1))
    finally:
        dist.all_gather_object = real
    out["object_collectives"] = len(objects)
    return out


def clip_fsdp(rt):
    """Gradient norm of a FSDP2-sharded (DTensor) model = the single process's norm."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    for layer in model:
        fully_shard(layer, mesh=rt.mesh["dp_shard"])
    fully_shard(model, mesh=rt.mesh["dp_shard"])
    shard_rt = runtime(model)
    torch.manual_seed(1)
    x = torch.randn(6, 8)
    model(x).pow(2).sum().backward()
    norm = shard_rt.clip_grad_norm_(0.5)
    full = {n: p.grad.full_tensor().tolist() for n, p in model.named_parameters()}
    return {"norm": float(norm), "is_dtensor": shard_rt._dtensor_grads, "clipped": full}


def tp_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4),
                               torch.nn.LayerNorm(4))


def clip_tp(rt):
    """TP only (hand-made parallelize_module): DTensor linears next to a plain LayerNorm."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    model = tp_model()
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    tp_rt = runtime(model)
    torch.manual_seed(1)
    x = torch.randn(6, 8)  # the same batch on both ranks: TP peers
    model(x).pow(3).sum().backward()
    inf_norm = tp_rt.clip_grad_norm_(1e9, norm_type=float("inf"))  # no clipping at 1e9
    norm = tp_rt.clip_grad_norm_(0.5)
    full = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).tolist()
            for n, p in model.named_parameters()}
    return {"norm": float(norm), "inf_norm": float(inf_norm), "clipped": full}


def batch_size_search(rt):
    """Only rank 1 runs out of memory above 100: both ranks must back off together."""
    import overdrive as od

    tried = []

    @od.find_executable_batch_size(starting_batch_size=128)
    def train(batch_size):
        tried.append(batch_size)
        if rt.rank == 1 and batch_size > 100:
            raise torch.OutOfMemoryError("CUDA out of memory (on purpose)")
        return batch_size

    return {"chosen": train(), "tried": tried}


def main_first(rt):
    """Rank 0 runs the block first: its end time precedes rank 1's start."""
    import time

    with rt.main_process_first():
        start = time.time()
        if rt.is_main:
            time.sleep(0.5)
        end = time.time()
    return {"start": start, "end": end}


# --------------------------------------------------------------------------- accumulation

ACCUM, STEPS, LR = 4, 2, 0.1


def llama_and_tokens():
    from overdrive.models.llama import tiny

    torch.manual_seed(0)
    model = tiny(n_layers=2, dim=32, n_heads=2, vocab_size=64, max_seq_len=8)
    torch.manual_seed(1)
    tokens = torch.randint(0, 64, (ACCUM * STEPS * 2, 8))
    return model, tokens


def train_micro(rt, tokens, observe=None) -> list[float]:
    """grad_accum micro-batches of 1 sample per rank; returns the losses of each step.
    ``observe()`` runs after each backward."""
    loader = rt.shard(DataLoader(TensorDataset(tokens), batch_size=1))
    losses = []
    for (x,) in loader:
        with rt.accumulate():
            loss = rt.model(x, labels=x).loss
            rt.backward(loss)
            if observe is not None:
                observe()
            rt.optimizer.step()
            rt.optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def accum_raw_fsdp(rt):
    """FSDP2 applied by hand (not the pass): micro-steps really skip the reduce-scatter."""
    from torch.distributed.fsdp import fully_shard

    model, tokens = llama_and_tokens()
    mesh = rt.mesh["dp_shard"]
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    plan, env = make_env(Plan(grad_accum=ACCUM, seed=0))
    calls = []

    def set_sync(flag):
        calls.append(flag)
        model.set_requires_gradient_sync(flag)

    opt = torch.optim.SGD(model.parameters(), lr=LR)
    acc_rt = Runtime(model, plan=plan, report=Report([]), env=env, optimizer=opt,
                     handoff=Handoff(gradient_sync=set_sync))
    train_micro(acc_rt, tokens)
    state = {k: v.full_tensor().tolist() for k, v in model.state_dict().items()}
    return {"state": state, "steps": acc_rt.step, "sync_calls": calls}


def accumulate_with_plan(plan_name: str):
    """The same run through od.accelerate with the ddp / fsdp pass, recording at every
    micro-step whether the gradients were really reduced across the ranks."""
    import overdrive as od

    model, tokens = llama_and_tokens()
    rt = od.accelerate(model, {plan_name: True, "grad_accum": ACCUM, "seed": 0},
                       optimizer=lambda p: torch.optim.SGD(p, lr=LR))
    calls, reduced = [], []
    real_switch = rt._grad_sync._set_sync  # the pass's switch, as rt.accumulate calls it
    assert real_switch is not None, "the pass set no gradient-sync switch"

    def switch(flag):
        calls.append(flag)
        real_switch(flag)

    rt._grad_sync._set_sync = switch
    weight = model.layers[0].attn.q_proj.weight if plan_name == "ddp" else None

    def observe():
        if plan_name == "fsdp":  # reduce-scatter ran <=> the sharded grads exist
            reduced.append(any(p.grad is not None for p in model.parameters()))
        else:  # all-reduce ran <=> both ranks hold the same (averaged) gradient
            sums = rt.gather_object(float(weight.grad.sum()))
            reduced.append(sums[0] == sums[1])

    train_micro(rt, tokens, observe)
    return {"state": {k: v.tolist() for k, v in rt.state_dict().items()}, "steps": rt.step,
            "sync_calls": calls, "reduced": reduced}


def main() -> None:
    out_dir = sys.argv[1]
    if len(sys.argv) > 2:  # runtime_scenarios.py OUT accumulate PLAN
        result = accumulate_with_plan(sys.argv[3])
        rank = torch.distributed.get_rank()
        with open(f"{out_dir}/rank{rank}.json", "w") as fh:
            json.dump(result, fh)
        return
    rt = runtime(seed=7)
    result = {}
    for fn in (shards, torch_seeded_shuffle, metrics, resume, collectives, clip_fsdp, clip_tp, accum_raw_fsdp,
               batch_size_search, main_first):
        try:
            result[fn.__name__] = fn(rt)
        except Exception:  # noqa: BLE001 — reported in the JSON, the test fails on it
            result[fn.__name__] = {"error": traceback.format_exc()}
    with open(f"{out_dir}/rank{rt.rank}.json", "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
