"""FP8 training vs bf16: loss curves and step time on a small Llama-style model.

Variants (same initial weights, same batches, steps interleaved so load drifts hit all):
  bf16          Plan(mixed_precision="bf16")                       autocast, fp32 weights
  fp8-torchao   Plan(fp8=FP8(backend="torchao"), mixed_precision="bf16")
  fp8-te        Plan(fp8=FP8(backend="te"), mixed_precision="bf16")   CUDA + TE only

On CPU torchao's fp8 matmuls are emulated, so the CPU run checks correctness only (the
fp8 loss curve must track bf16's); on a GPU with fp8 tensor cores the step-time ratio is
the speedup. Prints one JSON object and writes benchmarks/results/fp8.json.

    python benchmarks/fp8.py [--dim 256 --layers 2 --steps 30]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import overdrive as od  # noqa: E402
from overdrive.models.llama import Llama, LlamaConfig  # noqa: E402
from overdrive.passes.fp8 import te_importable  # noqa: E402


def build(args) -> torch.nn.Module:
    model = Llama(LlamaConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers,
                              n_heads=max(1, args.dim // 64), max_seq_len=args.seq))
    model.init_weights(seed=0)
    return model


def batches(args, device):
    """A learnable stream: each sequence counts up from a random start (mod vocab)."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(args.steps):
        start = torch.randint(0, args.vocab, (args.batch, 1), generator=gen)
        yield ((start + torch.arange(args.seq)) % args.vocab).to(device)


class Trainer:
    def __init__(self, name, base, plan, device, lr):
        self.name = name
        model = copy.deepcopy(base).to(device)
        self.rt = od.accelerate(model, plan, optimizer=lambda p: torch.optim.AdamW(p, lr=lr))
        self.losses: list[float] = []
        self.times: list[float] = []

    def step(self, ids, sync) -> None:
        rt = self.rt
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        with contextlib.ExitStack() as stack:
            for ctx in rt.env.forward_contexts:  # e.g. TE's fp8_autocast
                stack.enter_context(ctx())
            loss = rt.model(ids, labels=ids).loss
        rt.backward(loss)
        rt.optimizer.step()
        rt.optimizer.zero_grad(set_to_none=True)
        for hook in rt.env.post_step_hooks:
            hook(rt.model, rt.optimizer)
        self.losses.append(loss.item())
        sync()
        cuda = ids.device.type == "cuda"
        self.times.append(time.perf_counter() - t0 if cuda else time.process_time() - c0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fp8.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    base = build(args)
    variants = {"bf16": od.Plan(mixed_precision="bf16"),
                "fp8-torchao": od.Plan(fp8=od.FP8(backend="torchao"), mixed_precision="bf16")}
    skipped = {}
    if cuda and te_importable():
        variants["fp8-te"] = od.Plan(fp8=od.FP8(backend="te"), mixed_precision="bf16")
    else:
        skipped["fp8-te"] = "needs CUDA and transformer_engine (pip install overdrive[te])"
    trainers = []
    for name, plan in variants.items():
        try:
            trainers.append(Trainer(name, base, plan, device, args.lr))
        except od.OverdriveError as err:  # e.g. a GPU without fp8 tensor cores
            skipped[name] = str(err)

    for i, ids in enumerate(batches(args, device)):
        order = trainers[i % len(trainers):] + trainers[:i % len(trainers)]
        for t in order:
            t.step(ids, sync)

    ref = next(t for t in trainers if t.name == "bf16")
    tail = max(1, args.steps // 6)

    def summary(t):
        step = statistics.median(t.times[2:] or t.times)  # first steps warm up
        ref_step = statistics.median(ref.times[2:] or ref.times)
        return {
            "loss_first": t.losses[0], "loss_last": t.losses[-1],
            "loss_tail_mean": statistics.fmean(t.losses[-tail:]),
            "loss_tail_ratio_vs_bf16": statistics.fmean(t.losses[-tail:])
            / statistics.fmean(ref.losses[-tail:]),
            "mean_loss_ratio_vs_bf16": statistics.fmean(t.losses) / statistics.fmean(ref.losses),
            "max_abs_loss_diff_vs_bf16": max(abs(a - b) for a, b in zip(t.losses, ref.losses)),
            "max_abs_loss_diff_over_first_loss": max(abs(a - b) for a, b in
                                                     zip(t.losses, ref.losses)) / ref.losses[0],
            "step_ms_median": step * 1e3,
            "speedup_vs_bf16": ref_step / step,
            "fp8_modules": len(t.rt.report["fp8"].modules) if "fp8" in t.rt.report else 0,
            "losses": [round(x, 4) for x in t.losses],
        }

    result = {
        "benchmark": "fp8",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "mode": "speed + correctness" if cuda else "correctness only (CPU fp8 is emulated)",
        "timing": ("wall clock (synchronised)" if cuda
                   else f"process CPU time, {args.threads} thread(s)"),
        "config": vars(args) | {"torch": torch.__version__},
        "variants": {t.name: summary(t) for t in trainers},
        "skipped": skipped,
    }
    fp8 = [r for n, r in result["variants"].items() if n != "bf16"]
    result["checks"] = {
        "fp8_loss_falls": all(r["loss_last"] < 0.5 * r["loss_first"] for r in fp8),
        # curves agree: mean loss over the run within 5%, no step off by > 5% of the
        # initial loss (the tail ratio alone is noisy once the loss nears zero)
        "fp8_tracks_bf16": all(abs(r["mean_loss_ratio_vs_bf16"] - 1) < 0.05
                               and r["max_abs_loss_diff_over_first_loss"] < 0.05 for r in fp8),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
