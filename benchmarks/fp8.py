"""FP8 training vs bf16: loss curves and step time on a small Llama-style model.

Variants (same initial weights, same batches, steps interleaved so load drifts hit all):
  bf16          Plan(mixed_precision="bf16")                       autocast, fp32 weights
  fp8-torchao   Plan(fp8=FP8(backend="torchao"), mixed_precision="bf16")
  fp8-te        Plan(fp8=FP8(backend="te"), mixed_precision="bf16")   CUDA + TE only

On CPU torchao's fp8 matmuls are emulated, so the CPU run checks correctness only (the
fp8 loss curve must track bf16's); on a GPU with fp8 tensor cores the step-time ratio is
the speedup (target: fp8 >= 1.2x bf16 on a Llama-3-8B layer slice, the default shape on a
GPU: dim 4096, ffn 14336, 32 heads / 8 kv heads, seq 2048). Prints one JSON object and
writes benchmarks/results/fp8.json.

    python benchmarks/fp8.py [--dim 256 --layers 2 --steps 30]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from _common import device, emit, step_flops, synchronize, target, throughput

import overdrive as od
from overdrive.models.llama import Llama, LlamaConfig
from overdrive.passes.fp8 import te_importable

CPU_SHAPE = dict(dim=256, ffn=None, heads=4, kv_heads=None, layers=2, vocab=512, seq=128,
                 batch=4)
GPU_SHAPE = dict(dim=4096, ffn=14336, heads=32, kv_heads=8, layers=2, vocab=32000, seq=2048,
                 batch=2)  # two Llama-3-8B decoder layers


def build(args) -> torch.nn.Module:
    extra = {k: v for k, v in (("ffn_dim", args.ffn), ("n_kv_heads", args.kv_heads))
             if v is not None}
    model = Llama(LlamaConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers,
                              n_heads=args.heads, max_seq_len=args.seq, **extra))
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

    def step(self, ids, dev) -> None:
        """One training step; the runtime enters the fp8 forward contexts (TE's
        fp8_autocast) and runs the post-step hooks (fp8 scale precompute) itself."""
        rt = self.rt
        synchronize(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = rt.model(ids, labels=ids).loss
        rt.backward(loss)
        rt.optimizer.step()
        rt.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.item())
        synchronize(dev)
        self.times.append(time.perf_counter() - t0 if dev.type == "cuda"
                          else time.process_time() - c0)


def parse_args(dev) -> argparse.Namespace:
    shape = GPU_SHAPE if dev.type == "cuda" else CPU_SHAPE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in shape.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads")
    ap.add_argument("--quick", action="store_true", help="fewer steps")
    args = ap.parse_args()
    if args.quick:
        args.steps = min(args.steps, 12)
    return args


def main() -> None:
    dev = device()
    args = parse_args(dev)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    if not cuda:
        torch.set_num_threads(args.threads)

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
            trainers.append(Trainer(name, base, plan, dev, args.lr))
        except od.OverdriveError as err:  # e.g. a GPU without fp8 tensor cores
            skipped[name] = str(err)
    example = torch.zeros(args.batch, args.seq, dtype=torch.long)
    flops = step_flops(base, example)

    for i, ids in enumerate(batches(args, dev)):
        order = trainers[i % len(trainers):] + trainers[:i % len(trainers)]
        for t in order:
            t.step(ids, dev)

    ref = next(t for t in trainers if t.name == "bf16")
    tail = max(1, args.steps // 6)

    def summary(t):
        step = statistics.median(t.times[2:] or t.times)  # first steps warm up
        ref_step = statistics.median(ref.times[2:] or ref.times)
        diffs = [abs(a - b) for a, b in zip(t.losses, ref.losses)]
        return {
            "loss_first": t.losses[0], "loss_last": t.losses[-1],
            "loss_tail_mean": statistics.fmean(t.losses[-tail:]),
            "mean_loss_ratio_vs_bf16": statistics.fmean(t.losses) / statistics.fmean(ref.losses),
            "max_abs_loss_diff_over_first_loss": max(diffs) / ref.losses[0],
            "step_ms_median": step * 1e3,
            "speedup_vs_bf16": ref_step / step,
            **throughput(args.batch * args.seq, step, flops, dev),
            "fp8_modules": len(t.rt.report["fp8"].modules) if "fp8" in t.rt.report else 0,
            "losses": [round(x, 4) for x in t.losses],
        }

    rows = {t.name: summary(t) for t in trainers}
    targets = []
    for name, r in rows.items():
        if name == "bf16":
            continue
        # curves agree: mean loss over the run within 5%, no step off by > 5% of the
        # initial loss (a tail ratio alone is noisy once the loss nears zero)
        targets += [
            target(f"{name}: last loss / first loss (loss falls)",
                   r["loss_last"] / r["loss_first"], 0.5),
            target(f"{name}: |mean loss / bf16's - 1| (tracks bf16)",
                   abs(r["mean_loss_ratio_vs_bf16"] - 1), 0.05),
            target(f"{name}: max |loss - bf16's| / first loss",
                   r["max_abs_loss_diff_over_first_loss"], 0.05),
            target(f"{name}: step speedup vs bf16" + ("" if cuda else " (CPU: emulated, "
                                                       "no target)"),
                   r["speedup_vs_bf16"], 1.2 if cuda else None, ">="),
        ]
    emit("fp8", {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "mode": "speed + correctness" if cuda else "correctness only (CPU fp8 is emulated)",
        "timing": ("wall clock (synchronised)" if cuda
                   else f"process CPU time, {args.threads} thread(s)"),
        "config": vars(args),
        "variants": rows,
        "skipped": skipped,
        "targets": targets,
    })


if __name__ == "__main__":
    main()
