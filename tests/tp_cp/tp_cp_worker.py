"""Runs on every rank under torchrun: the scenarios named on argv, results as JSON (rank 0).

    python -m torch.distributed.run --nproc-per-node=2 tp_cp_worker.py OUT.json tp sp cp ...
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

import overdrive as od
from overdrive.passes.context_parallel import ContextParallelAttention, balanced_positions
from tests.tp_cp.common import (LR, batches, fp8_llama, hf_batches, hf_llama, linear_only_net,
                                llama, regression_batches, stored_heads_llama, train_regression)



def sgd(params):
    return torch.optim.SGD(params, lr=LR)


def run(rt, data, shard=lambda b: b) -> list[float]:
    losses = []
    for batch in data:
        loss = rt.model(**shard(batch)).loss
        rt.backward(loss)
        rt.optimizer.step()
        rt.optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def mean_over(values, group) -> list[float]:
    t = torch.stack(values)
    dist.all_reduce(t, group=group)
    return (t / dist.get_world_size(group)).tolist()


def sharded_bytes(rt) -> dict:
    names = set(rt.report["tensor_parallel"].details["sharded_modules"])
    local = full = 0
    for name, module in rt.model.named_modules():
        if name in names:
            for p in module.parameters(recurse=False):
                local += p.to_local().numel() * p.element_size()
                full += p.numel() * p.element_size()
    return {"local": local, "full": full}


def tp_plan(**parallel):
    return od.Plan(parallel=od.Parallel(tp=2, dp_shard=1, **parallel))


def scenario_tp():
    rt = od.accelerate(llama(), tp_plan(), optimizer=sgd)
    return {"losses": [x.item() for x in run(rt, batches())], "bytes": sharded_bytes(rt),
            "keys_kept": sorted(rt.model.state_dict()) == sorted(llama().state_dict()),
            "bytes_after": rt.report["tensor_parallel"].bytes_after,
            "bytes_before": rt.report["tensor_parallel"].bytes_before}


def scenario_sp():
    rt = od.accelerate(llama(), tp_plan(sequence_parallel=True), optimizer=sgd)
    return {"losses": [x.item() for x in run(rt, batches())]}


def scenario_divide():
    plan = od.Plan(parallel=od.Parallel(tp=2, dp_shard=1), tp_divide_attrs=("n_heads", "n_kv_heads"))
    rt = od.accelerate(stored_heads_llama(), plan, optimizer=sgd)
    return {"losses": [x.item() for x in run(rt, batches())],
            "n_heads": rt.model.layers[0].attn.n_heads}


def scenario_hf():
    rt = od.accelerate(hf_llama(), tp_plan(), optimizer=sgd)
    return {"losses": [x.item() for x in run(rt, batches(vocab=128))],
            "styles": rt.report["tensor_parallel"].details["styles"], "bytes": sharded_bytes(rt)}


def scenario_fp8():
    rt = od.accelerate(fp8_llama(), tp_plan(sequence_parallel=True), optimizer=sgd)
    rec = rt.report["tensor_parallel"]
    return {"losses": [x.item() for x in run(rt, batches())], "notes": rec.notes,
            "float8_modules": len(rec.details["float8_modules"])}


ADAMW_LR = 1e-3


def adamw(params):
    return torch.optim.AdamW(params, lr=ADAMW_LR)


def full_params(model) -> dict:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).tolist()
            for k, v in model.state_dict().items()}


def lm_loss(output, batch):
    """A loss_fn on the (vocab-sharded) logits: the shifted next-token cross-entropy."""
    logits = output.logits[:, :-1].flatten(0, 1)
    return torch.nn.functional.cross_entropy(logits, batch["labels"][:, 1:].flatten())


def scenario_loss_parallel():
    """transformers' Llama with its own output.loss in a manual rt.model / rt.backward
    loop, and the reference Llama with rt.forward_backward(batch, loss_fn) and
    rt.evaluate, both with parallel.loss_parallel=True and AdamW."""
    from torch.distributed.tensor import DTensor

    rt = od.accelerate(hf_llama(), tp_plan(loss_parallel=True), optimizer=adamw)
    hf_losses = [x.item() for x in run(rt, batches(vocab=128, ignored=3))]
    rt.finish()  # the step metrics' rows: their loss is the DTensor loss made whole
    logged = [json.loads(line)["loss"] for line in
              (rt.run_dir / "metrics.jsonl").read_text().splitlines()] if rt.is_main else []
    out = {"hf_losses": hf_losses, "hf_logged": logged,
           "hf_params": full_params(rt.model),
           "details": {k: rt.report["tensor_parallel"].details[k]
                       for k in ("loss_parallel", "loss_head")}}
    rt = od.accelerate(llama(), tp_plan(loss_parallel=True, sequence_parallel=True),
                       optimizer=adamw)
    losses = []
    for batch in batches(ignored=3):
        losses.append(rt.forward_backward(batch, lm_loss).item())
        rt.optimizer.step()
        rt.optimizer.zero_grad()
    logits = rt.model(batches(1)[0]["input_ids"]).logits
    out.update(fn_losses=losses, fn_params=full_params(rt.model),
               eval_loss=rt.evaluate(batches(1, seed=2)[0], lm_loss).item(),
               logits_sharded=isinstance(logits, DTensor) and logits.to_local().shape[-1] * 2
               == logits.shape[-1])
    return out


def scenario_cp_attention():
    """Context-parallel attention vs unsharded SDPA: outputs and q/k/v gradients."""
    mesh = od.accelerate(llama(), od.Plan(parallel=od.Parallel(cp=2, dp_shard=1))).mesh["cp"]
    cp, rank = 2, mesh.get_local_rank()
    g = torch.Generator().manual_seed(3)
    q, k, v, w = (torch.randn(2, 4, 16, 8, generator=g) for _ in range(4))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(*full, is_causal=True)
    (out * w).sum().backward()
    idx = balanced_positions(16, cp, rank)
    local = [t[:, :, idx].clone().requires_grad_() for t in (q, k, v)]
    with ContextParallelAttention(mesh, cp, use_torch_cp=False):
        out_local = torch.nn.functional.scaled_dot_product_attention(*local, is_causal=True)
    (out_local * w[:, :, idx]).sum().backward()
    errs = {"out": (out_local - out[:, :, idx]).abs().max().item()}
    for name, a, b in zip("qkv", local, full):
        errs[f"grad_{name}"] = (a.grad - b.grad[:, :, idx]).abs().max().item()
    refused = {}
    for what, kwargs in (("mask", {"attn_mask": torch.ones(16, 16, dtype=torch.bool)}),
                         ("non_causal", {"is_causal": False})):
        try:
            with ContextParallelAttention(mesh, cp, use_torch_cp=False):
                torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
            refused[what] = None
        except od.PlanError as err:
            refused[what] = str(err)
    return {"errors": errs, "refused": refused}


def scenario_cp():
    rt = od.accelerate(llama(), od.Plan(parallel=od.Parallel(cp=2, dp_shard=1)), optimizer=sgd)
    losses = mean_over(run(rt, batches(), shard=rt.shard_sequence), rt.mesh["cp"].get_group())
    try:
        rt.shard_sequence(batches(1, seq=10)[0])
        bad_len = None
    except od.PlanError as err:
        bad_len = str(err)
    return {"losses": losses, "bad_len": bad_len, "notes": rt.report["context_parallel"].notes,
            "keys_kept": sorted(rt.model.state_dict()) == sorted(llama().state_dict())}


def scenario_cp_ignored():
    """cp=2 with the first 10 labels of every sequence ignored (-100): the ranks hold
    different numbers of targets, so only a token-weighted loss equals one process."""
    rt = od.accelerate(llama(), od.Plan(parallel=od.Parallel(cp=2, dp_shard=1)), optimizer=sgd)
    losses = run(rt, batches(ignored=10), shard=rt.shard_sequence)
    return {"losses": mean_over(losses, rt.mesh["cp"].get_group())}


def scenario_fsdp_fp8():
    """fsdp + fp8 on gloo where an FSDP unit holds only float8 weights (bias-free Linears):
    gloo cannot all-gather float8, so the weights travel in high precision."""
    rt = od.accelerate(linear_only_net(), od.Plan(fp8=od.FP8(), fsdp=od.FSDP()), optimizer=sgd)
    rec = rt.report["fp8"]
    losses = train_regression(rt.model, regression_batches(), rt.backward, rt.optimizer)
    return {"losses": losses, "notes": rec.notes,
            "all_gather": rec.details["fsdp_float8_all_gather"]}


def scenario_cp_hf():
    """transformers' Llama under cp=2, fed through rt.shard's data path: the loader's
    global batches are split by the runtime itself (no explicit shard_sequence)."""
    from torch.utils.data import DataLoader, TensorDataset

    rt = od.accelerate(hf_llama(), od.Plan(parallel=od.Parallel(cp=2, dp_shard=1)),
                       optimizer=sgd)
    data = hf_batches()
    rows = [{k: v[i] for k, v in b.items()} for b in data for i in range(len(b["input_ids"]))]
    loader = rt.shard(DataLoader(rows, batch_size=len(data[0]["input_ids"])))
    losses, first = [], None
    for batch in loader:
        first = first or {k: v.tolist() for k, v in batch.items() if torch.is_tensor(v)}
        loss = rt.model(**batch, use_cache=False).loss  # no cache: transformers reads positions
        rt.backward(loss)
        rt.optimizer.step()
        rt.optimizer.zero_grad()
        losses.append(loss.detach())
    ids = torch.arange(32).view(2, 16)
    tuples = rt.shard(DataLoader(TensorDataset(ids, ids), batch_size=2))
    try:
        next(iter(tuples))
        tuple_error = None
    except od.PlanError as err:
        tuple_error = str(err)
    firsts = [None] * dist.get_world_size()
    dist.all_gather_object(firsts, (rt.mesh["cp"].get_local_rank(), first))
    return {"losses": mean_over(losses, rt.mesh["cp"].get_group()), "tuple_error": tuple_error,
            "first_batch": dict(firsts),
            "notes": rt.report["context_parallel"].notes}


def scenario_cp_ac():
    """CP under activation checkpointing (recompute in backward) and a compiled block."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    rt = od.accelerate(llama(), od.Plan(parallel=od.Parallel(cp=2, dp_shard=1)), optimizer=sgd)
    rt.model.layers[0] = checkpoint_wrapper(rt.model.layers[0])  # as the checkpointing pass does
    rt.model.layers[1].compile(backend="eager")
    return {"losses": mean_over(run(rt, batches(), shard=rt.shard_sequence),
                                rt.mesh["cp"].get_group())}


def scenario_tp_cp():
    rt = od.accelerate(llama(), od.Plan(parallel=od.Parallel(cp=2, tp=2, dp_shard=1)),
                       optimizer=sgd)
    return {"losses": mean_over(run(rt, batches(), shard=rt.shard_sequence),
                                rt.mesh["cp"].get_group())}


def dp_slice(rt):
    """This data-parallel rank's rows of a global batch (TP peers share them)."""
    return lambda b: {k: v[rt.dp_rank::rt.dp_size] for k, v in b.items()}


def local_bytes(model) -> int:
    """Parameter bytes this rank holds (DTensor shards count their local part)."""
    return sum(getattr(p, "_local_tensor", p).numel() * p.element_size()
               for p in model.parameters())


def gathered(value) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def fsdp_tp(model, data):
    plan = od.Plan(parallel=od.Parallel(dp_shard=-1, tp=2), fsdp=od.FSDP())
    rt = od.accelerate(model, plan, optimizer=sgd)
    losses = mean_over(run(rt, data, shard=dp_slice(rt)), None)
    metrics = rt.gather_for_metrics(torch.tensor([rt.dp_rank]))  # over the dp group only
    return {"losses": losses, "bytes_after": rt.report.passes[-1].bytes_after,
            "rank_bytes": gathered(local_bytes(rt.model)), "passes": rt.report.names(),
            "metrics": metrics.tolist()}


def scenario_fsdp_tp():
    return fsdp_tp(llama(), batches())


def scenario_fsdp_tp_hf():
    return fsdp_tp(hf_llama(), batches(vocab=128))


def scenario_fsdp_tp_meta():
    """A meta-device model materialised by fsdp+tp on CPU (no DTensor RNG): every shard
    of a weight must be its own draw, replicas of one the same draw. Tied embeddings stay
    whole under tp, so embed_tokens is sharded over dp_shard only, replicated over tp."""
    from overdrive.models.llama import Llama, LlamaConfig

    with torch.device("meta"):
        model = Llama(LlamaConfig(n_layers=2, tie_embeddings=True))
    plan = od.Plan(parallel=od.Parallel(dp_shard=-1, tp=2), fsdp=od.FSDP())
    rt = od.accelerate(model, plan, optimizer=sgd)
    coords = dict(zip(rt.mesh.mesh_dim_names, rt.mesh.get_coordinate()))
    sums = {"q_proj": rt.model.layers[0].attn.q_proj.weight.to_local().sum().item(),
            "embed": rt.model.embed_tokens.weight.to_local().sum().item()}
    losses = mean_over(run(rt, batches(), shard=dp_slice(rt)), None)
    return {"sums": gathered(sums), "coords": gathered([coords["dp_shard"], coords["tp"]]),
            "losses": losses, "notes": rt.report["fsdp"].notes}


def on_device(rt):
    return lambda b: {k: v.to(rt.device) for k, v in b.items()}


def scenario_cuda_cp():
    """cp=2 on CUDA (tests/tp_cp/test_cuda_paths.py): torch's ring SDPA through DTensor
    instead of the all-gather-KV attention the CPU runs take."""
    rt = od.accelerate(llama(), od.Plan(parallel=od.Parallel(cp=2, dp_shard=1)), optimizer=sgd)
    move = on_device(rt)
    losses = run(rt, batches(), shard=lambda b: rt.shard_sequence(move(b)))
    return {"losses": mean_over(losses, rt.mesh["cp"].get_group()), "device": str(rt.device),
            "attention": rt.report["context_parallel"].details["attention"]}


def scenario_cuda_fp8_tp():
    """Tensorwise Float8Linear layers under tp=2 + sequence parallel on nccl: torchao's
    float8 TP styles (float8 all-gathers), which gloo cannot run."""
    rt = od.accelerate(fp8_llama(), tp_plan(sequence_parallel=True), optimizer=sgd)
    rec = rt.report["tensor_parallel"]
    return {"losses": [x.item() for x in run(rt, batches(), shard=on_device(rt))],
            "notes": rec.notes, "float8_modules": len(rec.details["float8_modules"])}


def refusal_cases() -> dict:
    """Plans each pass must refuse in check, before anything touches the model."""
    from transformers import BertConfig, BertModel

    def windowed():
        model = llama()
        model.layers[1].attn.sliding_window = 8
        return model

    def bert():
        return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64))

    cp = od.Plan(parallel=od.Parallel(cp=2, dp_shard=1))
    offload = od.FSDP(offload=True)
    return {
        "tp_heads": (lambda: llama(n_kv_heads=1), tp_plan()),
        "cp_window": (windowed, cp),
        "cp_bidirectional": (bert, cp),
        "offload_tp": (llama, od.Plan(parallel=od.Parallel(tp=2, dp_shard=1), fsdp=offload)),
        "offload_fp8": (llama, od.Plan(fsdp=offload, fp8=od.FP8())),
        "fsdp_twice": (lambda: od.accelerate(llama(), od.Plan(fsdp=od.FSDP())).model,
                       od.Plan(fsdp=od.FSDP())),
        "ddp_wrapped": (lambda: torch.nn.parallel.DistributedDataParallel(llama()),
                        od.Plan(ddp=od.DDP())),
        "tp_tied": (lambda: llama(tie_embeddings=True),
                    tp_plan_for({"lm_head": "colwise_rep", "layers.*.attn.q_proj": "colwise"})),
    }


def tp_plan_for(styles: dict) -> od.Plan:
    return od.Plan(parallel=od.Parallel(tp=2, dp_shard=1), tp_plan=styles)


def scenario_refusals():
    """od.accelerate on 2 real ranks: PlanError, and the model exactly as it was."""
    from tests.helpers import refusal_outcome

    return {name: refusal_outcome(make, plan, sgd)
            for name, (make, plan) in refusal_cases().items()}


def main() -> None:
    out, names = sys.argv[1], sys.argv[2:]
    results = {}
    for name in names:
        torch.manual_seed(0)
        results[name] = globals()[f"scenario_{name}"]()
    if dist.get_rank() == 0:
        with open(out, "w") as fh:
            json.dump(results, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
