"""Pretrain a tiny Llama on synthetic tokens with overdrive's runtime helpers.

    overdrive launch --nproc 2 examples/train_llm.py --steps 20
    overdrive launch --nproc 2 examples/train_llm.py --plan fsdp --grad-accum 4
    overdrive launch --nproc 2 examples/train_llm.py --steps 8 --save-every 4 --out out/run
    overdrive launch --nproc 2 examples/train_llm.py --steps 12 --out out/run --resume
    # elastic: 2 ranks × grad_accum 1, resumed on 1 rank × grad_accum 2, same global batches
    overdrive launch --nproc 2 examples/train_llm.py --global-batch-size 16 --steps 8 --save-every 4 --out out/el
    overdrive launch --nproc 1 examples/train_llm.py --global-batch-size 16 --steps 12 --out out/el --resume
    overdrive launch --nproc 2 examples/train_llm.py --plan pp    # two pipeline stages
    overdrive plot out/run/metrics --out out/run/plot.png     # loss, lr, tokens/s, memory

Step metrics (loss, grad norm, lr, tokens/s, step time, memory) are logged every step
to ``metrics.jsonl`` and TensorBoard event files (``tensorboard --logdir DIR``) in
``--run-dir`` (default: ``OUT/metrics`` with ``--out``, else ``runs/<timestamp>``); a
resumed run appends to the same files.

Every sequence counts upwards from a random start with a random stride (mod the
vocabulary), so the loss falls quickly: the next token is predictable from the last two.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re

import torch
from torch.utils.data import DataLoader, Dataset

import overdrive as od
from overdrive.models.llama import tiny


class CountingTokens(Dataset):
    """``n`` sequences of ``seq_len`` tokens: start, start+stride, … (mod vocab); the labels
    are the tokens themselves (the model's loss shifts them)."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0):
        self.n, self.seq_len, self.vocab, self.seed = n, seq_len, vocab, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        start, stride = torch.randint(0, self.vocab, (2,), generator=g).tolist()
        seq = (start + (stride % 7 + 1) * torch.arange(self.seq_len)) % self.vocab
        return {"input_ids": seq, "labels": seq}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", default=None, help="preset or plan file (default: ddp when "
                   "launched on several processes, nothing on one)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="samples per step over every rank (grad_accum derived; a --resume "
                   "on another number of ranks then sees the same global batches)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per rank")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="checkpoint directory")
    p.add_argument("--save-every", type=int, default=0, help="save every N steps (needs --out)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--run-dir", default=None, help="metrics directory (default: OUT/metrics, "
                   "else runs/<timestamp>)")
    p.add_argument("--profile", default=None, help="write a torch.profiler trace of steps 3-5 "
                   "to this directory")
    return p.parse_args()


def latest_checkpoint(out: str | None) -> str | None:
    if not out or not os.path.isdir(out):
        return None
    steps = [(int(m.group(1)), name) for name in os.listdir(out)
             if (m := re.fullmatch(r"step-(\d+)", name))]
    return os.path.join(out, max(steps)[1]) if steps else None


def make_plan(args: argparse.Namespace) -> od.Plan:
    if args.plan is None:
        plan = od.Plan()
    elif args.plan.lower().endswith((".yaml", ".yml", ".json")):
        plan = od.Plan.from_file(args.plan)
    else:
        plan = od.Plan.preset(args.plan)
    if plan.deepspeed is not None:  # DeepSpeed clips inside engine.step, at its config's norm
        plan = plan.replace(deepspeed=dataclasses.replace(
            plan.deepspeed, gradient_clipping=args.max_grad_norm))
    if args.global_batch_size is not None:
        return plan.replace(global_batch_size=args.global_batch_size, seed=args.seed)
    return plan.replace(grad_accum=args.grad_accum, seed=args.seed)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    model = tiny(n_layers=2, dim=64, n_heads=4, vocab_size=128, max_seq_len=args.seq_len)
    run_dir = args.run_dir or (os.path.join(args.out, "metrics") if args.out else None)
    rt = od.accelerate(model, make_plan(args),
                       optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr),
                       trackers=("jsonl", "tensorboard"), run_dir=run_dir,
                       run_config=vars(args))
    rt.print(rt.report)

    data = CountingTokens(n=4096, seq_len=args.seq_len, vocab=128, seed=args.seed)
    loader = rt.shard(DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True))

    ckpt = latest_checkpoint(args.out) if args.resume else None
    if ckpt is not None:
        rt.load(ckpt)  # after rt.shard: the loader's position is restored too
        rt.print(f"resumed from {ckpt} at step {rt.step}")

    if args.profile:
        rt.profile(args.profile, wait=2, warmup=1, active=2)  # stops by itself after step 5
    rt.model.train()
    micro_losses = []
    while rt.step < args.steps:
        for batch in rt.progress(loader, desc=f"epoch {loader.epoch}", disable=None):
            with rt.accumulate():
                # forward + backward under any plan (under pp: the pipeline schedule); the
                # loss is normalised by the global step's token count (docs/steps.md)
                micro_losses.append(rt.forward_backward(batch))
                norm = rt.clip_grad_norm_(args.max_grad_norm)
                rt.optimizer.step()
                rt.optimizer.zero_grad()
            if not rt.sync_gradients:
                continue
            # the mean over the step's micro-batches and the ranks: the step's global mean
            mean_loss = rt.reduce(torch.stack(micro_losses).mean(), "mean").item()
            micro_losses = []
            # (DeepSpeed computes the norm inside its step: rt.clip_grad_norm_ returns its
            # last one, None before the first step)
            shown = "-" if norm is None else f"{float(norm):.3f}"
            rt.print(f"step {rt.step} loss {mean_loss:.4f} grad_norm {shown}")
            if args.out and args.save_every and rt.step % args.save_every == 0:
                rt.save(os.path.join(args.out, f"step-{rt.step}"))
            if rt.step >= args.steps:
                break
    rt.finish()


if __name__ == "__main__":
    main()
