"""Cold start and steady-state step of regional vs full vs per-block vs Accelerate compile.

Every variant runs in its own fresh Python process with its own empty inductor cache
directory, so no compiled artefact leaks from one variant to the next:

  eager       no compile
  full        overdrive Compile(mode="full")     (model.compile() on the root, in place)
  regional    overdrive Compile(mode="regional") (block.compile() on each block, in place)
  per_block   the hand-written loop: for layer in model.layers: layer.compile()
  accelerate  Hugging Face Accelerate's compile_regions(model)

cold = wall time of the first forward+backward (where the compile happens), including the
setup call; steady = median step (forward, backward, AdamW step) over --rounds after
--warmup steps. Each variant is started --repeats times, the variants' order rotating
from one repeat to the next (the machine's slow moments fall on all of them), and the
median of the repeats is reported. Prints one JSON object and writes
benchmarks/results/compile_time.json.

    python benchmarks/compile_time.py                 # 4 and 12 blocks, all variants
    python benchmarks/compile_time.py --quick --blocks 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, device, emit, step_flops, synchronize, target, throughput

RESULTS = ROOT / "benchmarks" / "results" / "compile_time.json"
VARIANTS = ("eager", "full", "regional", "per_block", "accelerate")
QUICK_VARIANTS = ("eager", "full", "regional", "per_block")
MODEL = dict(vocab_size=2048, dim=256, n_heads=8, n_kv_heads=4, max_seq_len=256)
BATCH, SEQ = 4, 128


# --------------------------------------------------------------------------- child


def _import_for(variant: str):
    """Import what ``variant`` needs before the clock starts (imports are not compiles)."""
    if variant in ("full", "regional"):
        import overdrive

        return overdrive
    if variant == "accelerate":
        from accelerate.utils import compile_regions

        return compile_regions
    return None


def _setup(variant: str, model, lib):
    """Apply ``variant``'s compile to ``model``; returns the module to call."""
    if variant == "eager":
        return model
    if variant in ("full", "regional"):
        lib.accelerate(model, lib.Plan(compile=lib.Compile(mode=variant)))
        return model
    if variant == "per_block":
        for layer in model.layers:
            layer.compile()
        return model
    if variant == "accelerate":
        return lib(model)  # compile_regions
    raise SystemExit(f"unknown variant {variant!r}")


def child(variant: str, n_layers: int, warmup: int, rounds: int) -> dict:
    import torch
    from torch._dynamo.utils import counters

    from overdrive.models.llama import Llama, LlamaConfig

    dev = device()
    torch.manual_seed(0)
    model = Llama(LlamaConfig(n_layers=n_layers, **MODEL))
    model.init_weights(seed=0)
    if dev.type == "cuda":  # GPUs train in bf16; the CPU run stays fp32
        model.to(dev, torch.bfloat16)
    x = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ), device=dev)
    flops = step_flops(model, x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(m):
        loss = m(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(dev)

    try:
        lib = _import_for(variant)
    except ImportError as err:
        return {"variant": variant, "blocks": n_layers, "error": f"import failed: {err}"}
    t0 = time.perf_counter()
    m = _setup(variant, model, lib)
    setup_s = time.perf_counter() - t0
    step(m)
    cold_s = time.perf_counter() - t0
    for _ in range(warmup):
        step(m)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        step(m)
        times.append(time.perf_counter() - t)
    steady = statistics.median(times)
    return {"variant": variant, "blocks": n_layers, "device": str(dev),
            "setup_s": round(setup_s, 4), "cold_s": round(cold_s, 3),
            "steady_s": round(steady, 5), **throughput(BATCH * SEQ, steady, flops, dev),
            "graphs": int(counters["stats"]["unique_graphs"]),
            "frames": int(counters["frames"]["ok"]), "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- parent


def run_variant(variant: str, n_layers: int, warmup: int, rounds: int,
                threads: int | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"inductor-{variant}-") as cache:
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
        env["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        cmd = [sys.executable, __file__, "--child", variant, "--n-layers", str(n_layers),
               "--warmup", str(warmup), "--rounds", str(rounds)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"variant": variant, "blocks": n_layers,
                "error": f"exit {proc.returncode}: {proc.stderr.strip()[-600:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(rows: dict, a: str, b: str, key: str) -> float | None:
    ra, rb = rows.get(a, {}), rows.get(b, {})
    if key not in ra or key not in rb or not rb[key]:
        return None
    return round(ra[key] / rb[key], 3)


def median_row(runs: list[dict]) -> dict:
    """One variant's repeats → the median cold/steady time (and every repeat's value)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    row = dict(ok[0])
    for key in ("setup_s", "cold_s", "steady_s"):
        values = [r[key] for r in ok]
        row[key] = round(statistics.median(values), 5)
        row[f"{key}_all"] = values
    return row


def ratios(rows: dict) -> dict:
    return {
        "cold_regional_over_per_block": _ratio(rows, "regional", "per_block", "cold_s"),
        "cold_regional_over_accelerate": _ratio(rows, "regional", "accelerate", "cold_s"),
        "cold_regional_over_full": _ratio(rows, "regional", "full", "cold_s"),
        "steady_regional_over_full": _ratio(rows, "regional", "full", "steady_s"),
        "steady_regional_over_eager": _ratio(rows, "regional", "eager", "steady_s"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[4, 12])
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=None)
    ap.add_argument("--quick", action="store_true",
                    help="fewer variants (no accelerate) and rounds")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None,
                    help="fresh processes per variant (default 3, --quick 1)")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS for every variant (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--n-layers", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 10)
    if args.child:
        print(json.dumps(child(args.child, args.n_layers, warmup, rounds)))
        return

    variants = list(args.variants or (QUICK_VARIANTS if args.quick else VARIANTS))
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    results = {"model": {**MODEL, "batch": BATCH, "seq": SEQ},
               "quick": args.quick, "warmup": warmup, "rounds": rounds, "repeats": repeats,
               "loadavg_1min_at_start": os.getloadavg()[0], "by_blocks": {}}
    for n in args.blocks:
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for rep in range(repeats):
            order = variants[rep % len(variants):] + variants[:rep % len(variants)]
            for v in order:
                runs[v].append(run_variant(v, n, warmup, rounds, args.threads))
                print(f"# {n} blocks {v} #{rep + 1}: {runs[v][-1]}", file=sys.stderr,
                      flush=True)
        rows = {v: median_row(runs[v]) for v in variants}
        results["by_blocks"][str(n)] = {"variants": rows, "ratios": ratios(rows)}
    results["targets"] = targets(results["by_blocks"])
    emit("compile_time", results, out=args.out)


def targets(by_blocks: dict) -> list[dict]:
    """The targets of benchmarks/README.md, checked on the largest block count."""
    n = max(by_blocks, key=int)
    r = by_blocks[n]["ratios"]
    return [
        target(f"cold start regional / per-block ({n} blocks)",
               r["cold_regional_over_per_block"], 1.05),
        target(f"cold start regional / Accelerate compile_regions ({n} blocks)",
               r["cold_regional_over_accelerate"], 1.0, "<"),
        target(f"cold start regional / full ({n} blocks)", r["cold_regional_over_full"], 0.6),
        target(f"steady step regional / full ({n} blocks)", r["steady_regional_over_full"],
               1.05),
    ]


if __name__ == "__main__":
    main()
