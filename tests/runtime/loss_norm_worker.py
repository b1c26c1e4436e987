"""Runs on every rank under torchrun: loss normalisation and elastic-resume scenarios.

    python -m torch.distributed.run --nproc-per-node=2 loss_norm_worker.py OUT_DIR grads NAME...
    python -m torch.distributed.run --nproc-per-node=N loss_norm_worker.py OUT_DIR train \\
        NAME BATCH [--save-at S CKPT] [--resume CKPT] [--load-first]

``grads``: each NAME (``<model>-<layout>``, see ``LAYOUTS``) runs one optimizer step's
micro-batches through ``rt.forward_backward`` and rank 0 saves the gradients and the
logged loss to ``OUT_DIR/NAME.pt``. ``train``: ``STEPS`` AdamW steps with
``global_batch_size=GLOBAL``; rank 0 saves the sorted sample ids of every step and the
final parameters to ``OUT_DIR/NAME.pt``.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

import overdrive as od
from overdrive.models.llama import Llama, LlamaConfig

SEQ = 16  # divisible by 2·cp for cp = 2
VOCAB = 64
GLOBAL = 8  # samples per optimizer step
STEPS = 10  # train: optimizer steps (the data holds 6 per epoch: one epoch boundary)


# --------------------------------------------------------------------------- data


def samples(n: int, seed: int = 5) -> list[dict]:
    """Right-padded causal-LM samples of lengths 3..SEQ; -100 on the padding and, in every
    third sample, on a prompt of random length: the valid targets per sample differ a lot."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, SEQ + 1, (1,), generator=g))
        ids = torch.zeros(SEQ, dtype=torch.long)
        ids[:length] = torch.randint(3, VOCAB, (length,), generator=g)
        labels = ids.clone()
        labels[length:] = -100
        if i % 3 == 0:
            labels[:int(torch.randint(1, length, (1,), generator=g))] = -100
        out.append({"input_ids": ids, "labels": labels, "idx": torch.tensor(i)})
    return out


def full_batch(data: list[dict]) -> dict:
    return {k: torch.stack([d[k] for d in data]) for k in ("input_ids", "labels")}


# --------------------------------------------------------------------------- models


class MeanLossLM(nn.Module):
    """Not a transformers model and no num_items_in_batch: its loss is the mean over its
    (aligned) labels, which rt.forward_backward rescales by the target counts."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids, labels=None):
        logits = self.head(torch.tanh(self.mix(self.embed(input_ids))))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                               ignore_index=-100)
        return {"loss": loss, "logits": logits}


def hf_llama() -> nn.Module:
    from overdrive.quiet import known_harmless_noise

    with known_harmless_noise():
        from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
    cfg = HFConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                   attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


MODELS = {
    "llama": lambda: Llama(LlamaConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4,
                                       max_seq_len=SEQ)),
    "hf": hf_llama,
    "mean": MeanLossLM,
}


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[kind]().double()


# --------------------------------------------------------------------------- layouts

# layout -> (plan fields, loader batch size); GLOBAL samples per step in every layout
LAYOUTS = {
    "p1": ({}, 8),                                    # 1 process, grad_accum 1
    "ga2": ({}, 2),                                   # 2 data ranks × grad_accum 2
    "ga4": ({}, 1),                                   # 2 data ranks × grad_accum 4
    "batch": ({"loss_normalization": "batch"}, 2),    # today's mean of means: differs
    "cp2": ({"parallel": od.Parallel(cp=2, dp_shard=1)}, 4),  # 1 data rank, cp 2, ga 2
}


def one_step_grads(name: str, out: Path) -> None:
    kind, layout = name.split("-")
    fields, batch = LAYOUTS[layout]
    model = make_model(kind)
    plan = od.Plan(global_batch_size=GLOBAL, seed=3, **fields)
    run_dir = out / f"{name}-run"
    rt = od.accelerate(model, plan, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                       trackers=("jsonl",), run_dir=run_dir, log_every=1)
    loader = rt.shard(DataLoader(samples(16), batch_size=batch, shuffle=True))
    ids, returned = [], []
    for b in loader:
        with rt.accumulate():
            ids += b.pop("idx").tolist()
            returned.append(rt.forward_backward(b))
        if rt.sync_gradients:
            break
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    rt.optimizer.step()  # logs the step's metrics row
    rt.finish()
    every = [None] * dist.get_world_size() if dist.is_initialized() else [ids]
    if dist.is_initialized():
        dist.all_gather_object(every, ids)
    if rt.is_main:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        row = next(r for r in rows if "loss" in r)
        result = {"grads": grads, "logged": row["loss"], "grad_accum": rt.grad_accum,
                  "ids": sorted({i for r in every for i in r}),
                  "returned": [float(x) for x in returned]}
        if not dist.is_initialized():  # one process: the plain whole-batch reference too
            result["reference"] = reference(kind, [samples(16)[i] for i in result["ids"]])
        torch.save(result, out / f"{name}.pt")


def reference(kind: str, data: list[dict]) -> dict:
    """Gradients and loss of the plain model on the whole global batch: the mean over its
    valid targets, as one process computes it without overdrive."""
    model = make_model(kind)
    loss = model(**full_batch(data))
    loss = loss["loss"] if isinstance(loss, dict) else loss.loss
    loss.backward()
    return {"loss": float(loss), "grads": {n: p.grad for n, p in model.named_parameters()}}


# --------------------------------------------------------------------------- training


def train(name: str, batch: int, save_at: int | None, ckpt: str | None, resume: str | None,
          load_first: bool, out: Path) -> None:
    model = make_model("llama")
    plan = od.Plan(global_batch_size=GLOBAL, seed=3)
    rt = od.accelerate(model, plan, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                       trackers=())
    dl = DataLoader(samples(6 * GLOBAL), batch_size=batch, shuffle=True)
    if resume and load_first:
        rt.load(resume)
        loader = rt.shard(dl)
    else:
        loader = rt.shard(dl)
        if resume:
            rt.load(resume)
    steps, ids = {}, []
    while rt.step < STEPS:
        for b in loader:
            with rt.accumulate():
                ids += b.pop("idx").tolist()
                rt.forward_backward(b)
            if not rt.sync_gradients:
                continue
            rt.optimizer.step()
            rt.optimizer.zero_grad()
            every = [None] * dist.get_world_size() if dist.is_initialized() else [ids]
            if dist.is_initialized():
                dist.all_gather_object(every, ids)
            steps[rt.step] = sorted(i for r in every for i in r)
            ids = []
            if rt.step == save_at:
                rt.save(ckpt)
            if rt.step == STEPS:
                break
    if rt.is_main:
        torch.save({"steps": steps, "grad_accum": rt.grad_accum,
                    "params": {n: p.detach().clone() for n, p in model.named_parameters()}},
                   out / f"{name}.pt")


def main() -> None:
    out, what, *rest = sys.argv[1:]
    out = Path(out)
    if what == "grads":
        for name in rest:
            one_step_grads(name, out)
        return
    name, batch, *flags = rest
    save_at = ckpt = resume = None
    if "--save-at" in flags:
        i = flags.index("--save-at")
        save_at, ckpt = int(flags[i + 1]), flags[i + 2]
    if "--resume" in flags:
        resume = flags[flags.index("--resume") + 1]
    train(name, int(batch), save_at, ckpt, resume, "--load-first" in flags, out)


if __name__ == "__main__":
    main()
