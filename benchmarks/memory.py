"""Per-rank memory under fsdp: measured after one AdamW step vs od.inspect's estimate.

    python benchmarks/memory.py [--ranks 1 2 4] [--layers 4 --dim 256]

For each world size it launches torchrun (CPU, gloo) on this file with ``--worker``;
every rank trains one step and counts the bytes it holds of parameters (local shards),
gradients and optimizer state; rank 0 compares them with ``od.inspect(model, "fsdp",
world_size=N).memory``. Prints one JSON object and writes benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, emit, target


def local_bytes(t) -> int:
    t = getattr(t, "_local_tensor", t)
    return t.numel() * t.element_size()


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import overdrive as od
    from overdrive.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=8,
                      max_seq_len=32)
    with torch.device("meta"):
        estimate = od.inspect(Llama(cfg), "fsdp", world_size=int(os.environ["WORLD_SIZE"]))
    torch.manual_seed(0)
    model = Llama(cfg)
    model.init_weights(seed=0)
    rt = od.accelerate(model, "fsdp", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    rt.backward(rt.model(x, labels=x).loss)
    rt.optimizer.step()
    measured = {
        "parameters": sum(local_bytes(p) for p in model.parameters()),
        "gradients": sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None),
        "optimizer": sum(local_bytes(v) for s in rt.optimizer.state.values()
                         for v in s.values() if torch.is_tensor(v)),
    }
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, measured)
    if dist.get_rank() == 0:
        m = estimate.memory
        est = {"parameters": m.parameters, "gradients": m.gradients, "optimizer": m.optimizer}
        worst = max(per_rank, key=lambda r: sum(r.values()))
        Path(args.out).write_text(json.dumps({
            "world_size": dist.get_world_size(),
            "measured_max_rank": worst,
            "measured_per_rank": per_rank,
            "estimate": est,
            "full_parameters": m.full_parameters,
            "error": {k: (est[k] - worst[k]) / worst[k] for k in est},
        }))
    dist.barrier()  # no rank tears gloo down while another still talks
    dist.destroy_process_group()


def launch(nproc: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", __file__, "--worker", "--out", str(out),
               "--layers", str(args.layers), "--dim", str(args.dim), "--vocab", str(args.vocab)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"torchrun nproc={nproc} failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="1 and 2 ranks only")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    ranks = [1, 2] if args.quick else args.ranks
    runs = [launch(n, args) for n in ranks]
    baseline = sum(runs[0]["measured_max_rank"].values())
    per_rank = {r["world_size"]: sum(r["measured_max_rank"].values()) / baseline for r in runs}
    targets = []
    for r in runs:
        n = r["world_size"]
        # the model has no unsharded leftovers: every parameter is in an FSDP unit
        targets.append(target(f"largest rank's bytes × {n} / 1 rank's ({n} ranks)",
                              per_rank[n] * n, 1.05))
        targets.append(target(f"|inspect estimate - measured| / measured ({n} ranks)",
                              max(abs(e) for e in r["error"].values()), 0.10))
    emit("memory", {
        "plan": "fsdp",
        "model": {"layers": args.layers, "dim": args.dim, "vocab": args.vocab},
        "optimizer": "AdamW",
        "runs": runs,
        "per_rank_total_vs_first": per_rank,
        "targets": targets,
    })


if __name__ == "__main__":
    main()
