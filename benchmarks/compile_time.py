"""Cold start and steady-state step of regional vs full vs per-block vs Accelerate compile.

Variants of one Llama-style model (vocab 2048, dim 256, 8 heads / 4 kv heads):

  eager       no compile
  full        overdrive Compile(mode="full")     (model.compile() on the root, in place)
  regional    overdrive Compile(mode="regional") (block.compile() on each block, in place)
  per_block   the hand-written loop: for layer in model.layers: layer.compile()
  accelerate  Hugging Face Accelerate's compile_regions(model)

cold: wall time of the setup call plus the first forward+backward (where the compile
happens), each variant in its own fresh Python process with its own empty inductor cache
(nothing compiled leaks from one variant to the next), started --repeats times with the
variants' order rotating from one repeat to the next; the median is reported.

steady: one process builds every variant, compiles and warms them up, then times their
steps (forward, backward, AdamW step) interleaved in rotating order, --rounds each: the
machine's slow moments hit every variant alike. On CPU with one thread and the process's
CPU time (the step's own cost, not the neighbours'); on a GPU the synchronised wall clock.

    python benchmarks/compile_time.py                 # 4 and 12 blocks, all variants
    python benchmarks/compile_time.py --quick --blocks 2

warm start (``--warm-start``, results/compile_warm_start.json): overdrive regional with
its compile cache (``Compile(cache_dir=...)``). Each repeat takes a fresh cache dir: a
cold process (empty inductor cache, empty compile cache: it compiles and writes the
bundle after its first optimizer step), then a warm process with a *new, empty*
``TORCHINDUCTOR_CACHE_DIR`` (a fresh machine) and only the bundle. Both times run from
``od.accelerate`` to the end of the first ``rt.optimizer.step()`` (the cold one includes
writing the bundle); then more steps count recompiles after step 1 (static shapes: 0).

    python benchmarks/compile_time.py --warm-start --blocks 12 --repeats 3
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


# --------------------------------------------------------------------------- children


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
    if variant in ("full", "regional"):  # the cold rows: no warm-start cache
        lib.accelerate(model, lib.Plan(compile=lib.Compile(mode=variant, cache=False)))
        return model
    if variant == "per_block":
        for layer in model.layers:
            layer.compile()
        return model
    if variant == "accelerate":
        return lib(model)  # compile_regions
    raise SystemExit(f"unknown variant {variant!r}")


class Trainer:
    """One variant's model, optimizer and batch; ``step()`` is one training step."""

    def __init__(self, n_layers: int, dev):
        import torch

        from overdrive.models.llama import Llama, LlamaConfig

        self.dev = dev
        torch.manual_seed(0)
        self.model = Llama(LlamaConfig(n_layers=n_layers, **MODEL))
        self.model.init_weights(seed=0)
        if dev.type == "cuda":  # GPUs train in bf16; the CPU run stays fp32
            self.model.to(dev, torch.bfloat16)
        self.x = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ), device=dev)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.call = self.model

    def step(self) -> None:
        loss = self.call(self.x, labels=self.x).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        synchronize(self.dev)


def cold_child(variant: str, n_layers: int) -> dict:
    import torch
    from torch._dynamo.utils import counters

    trainer = Trainer(n_layers, device())
    try:
        lib = _import_for(variant)
    except ImportError as err:
        return {"variant": variant, "error": f"import failed: {err}"}
    t0 = time.perf_counter()
    trainer.call = _setup(variant, trainer.model, lib)
    setup_s = time.perf_counter() - t0
    trainer.step()
    return {"variant": variant, "setup_s": round(setup_s, 4),
            "cold_s": round(time.perf_counter() - t0, 3),
            "graphs": int(counters["stats"]["unique_graphs"]),
            "frames": int(counters["frames"]["ok"]), "threads": torch.get_num_threads()}


def warm_child(n_layers: int, cache_dir: str, steps: int) -> dict:
    """od.accelerate with the compile cache, to the end of the first optimizer step."""
    import torch

    import overdrive as od

    trainer = Trainer(n_layers, device())
    plan = od.Plan(compile=od.Compile(mode="regional", cache_dir=cache_dir))
    t0 = time.perf_counter()
    rt = od.accelerate(trainer.model, plan,
                       optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4))
    for i in range(steps):
        rt.backward(rt.model(trainer.x, labels=trainer.x).loss)
        rt.optimizer.step()
        rt.optimizer.zero_grad(set_to_none=True)
        synchronize(trainer.dev)
        if i == 0:
            first_s = time.perf_counter() - t0
    d = rt.report["compile"].details
    return {"first_step_s": round(first_s, 3), "cache": d.get("cache"),
            "cache_load_s": d.get("cache_load_seconds"), "written": d.get("cache_written"),
            "cache_bytes": d.get("cache_bytes"), "compile_s": d.get("compile_seconds"),
            "graphs": d.get("graphs"), "ran_eager": d.get("ran_eager"),
            "recompiles_after_first_step": d.get("recompiles_after_first_step"),
            "steps": steps, "threads": torch.get_num_threads()}


def warm_starts(n: int, repeats: int, steps: int) -> dict:
    pairs = []
    for rep in range(repeats):
        with tempfile.TemporaryDirectory(prefix="od-compile-cache-") as cache:
            args = ["--warm-child", cache, "--n-layers", str(n), "--steps", str(steps)]
            cold = run_child(args, "cold")
            warm = run_child(args, "warm")  # a new, empty inductor cache: only the bundle
        pairs.append({"cold": cold, "warm": warm})
        print(f"# {n} blocks warm start #{rep + 1}: {pairs[-1]}", file=sys.stderr, flush=True)
    ok = [p for p in pairs if "error" not in p["cold"] and "error" not in p["warm"]]
    if not ok:
        return {"blocks": n, "pairs": pairs, "ratio": None, "recompiles": None}
    cold_s = statistics.median(p["cold"]["first_step_s"] for p in ok)
    warm_s = statistics.median(p["warm"]["first_step_s"] for p in ok)
    recompiles = max(p[k]["recompiles_after_first_step"] or 0 for p in ok for k in p)
    return {"blocks": n, "cold_s": round(cold_s, 3), "warm_s": round(warm_s, 3),
            "ratio": round(warm_s / cold_s, 3), "recompiles": recompiles,
            "all_hit": all(p["warm"]["cache"] == "hit" for p in ok), "pairs": pairs}


def warm_main(args) -> None:
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    steps = 3 if args.quick else 5
    by = {str(n): warm_starts(n, repeats, steps) for n in args.blocks}
    n = str(max(args.blocks))
    results = {"model": {**MODEL, "batch": BATCH, "seq": SEQ}, "repeats": repeats,
               "steps": steps, "loadavg_1min_at_start": os.getloadavg()[0], "by_blocks": by,
               "targets": [
                   target(f"warm start / cold start, fresh process and empty inductor cache "
                          f"({n} blocks)", by[n]["ratio"], 0.3),
                   target(f"recompiles after step 1, static shapes ({n} blocks)",
                          by[n]["recompiles"], 0),
               ]}
    out = args.out if args.out != RESULTS else RESULTS.with_name("compile_warm_start.json")
    emit("compile_warm_start", results, out=out)


def steady_child(variants: list[str], n_layers: int, warmup: int, rounds: int) -> dict:
    import torch

    dev = device()
    if dev.type == "cpu":
        torch.set_num_threads(1)
    plain = Trainer(n_layers, dev)
    flops = step_flops(plain.model, plain.x)  # from the meta trace of an eager copy
    trainers, errors = {}, {}
    for v in variants:
        try:
            trainer = Trainer(n_layers, dev)
            trainer.call = _setup(v, trainer.model, _import_for(v))
            for _ in range(1 + warmup):  # compile, then settle
                trainer.step()
            trainers[v] = trainer
        except ImportError as err:
            errors[v] = f"import failed: {err}"
    clock = time.perf_counter if dev.type == "cuda" else time.process_time
    times: dict[str, list[float]] = {v: [] for v in trainers}
    names = list(trainers)
    for r in range(rounds):
        for v in names[r % len(names):] + names[:r % len(names)]:
            t = clock()
            trainers[v].step()
            times[v].append(clock() - t)
    rows = {}
    for v in variants:
        if v in errors:
            rows[v] = {"error": errors[v]}
            continue
        med = statistics.median(times[v])
        rows[v] = {"steady_s": round(med, 5), **throughput(BATCH * SEQ, med, flops, dev)}
    return {"device": str(dev), "threads": torch.get_num_threads(),
            "clock": "wall (synchronised)" if dev.type == "cuda" else "process CPU time",
            "rows": rows}


# --------------------------------------------------------------------------- parent


def run_child(args: list[str], tag: str) -> dict:
    """``args`` in a fresh process with an empty inductor cache of its own."""
    with tempfile.TemporaryDirectory(prefix=f"inductor-{tag}-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache,
                   TRITON_CACHE_DIR=os.path.join(cache, "triton"))
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        proc = subprocess.run([sys.executable, __file__, *args], env=env,
                              capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-600:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cold_starts(variants: list[str], n: int, repeats: int) -> dict[str, dict]:
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(repeats):
        for v in variants[rep % len(variants):] + variants[:rep % len(variants)]:
            runs[v].append(run_child(["--cold", v, "--n-layers", str(n)], v))
            print(f"# {n} blocks {v} cold #{rep + 1}: {runs[v][-1]}", file=sys.stderr,
                  flush=True)
    return {v: median_row(rs) for v, rs in runs.items()}


def median_row(runs: list[dict]) -> dict:
    """One variant's repeats → the median setup and cold time (and every repeat's)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    row = dict(ok[0])
    for key in ("setup_s", "cold_s"):
        values = [r[key] for r in ok]
        row[key] = round(statistics.median(values), 4)
        row[f"{key}_all"] = values
    return row


def _ratio(rows: dict, a: str, b: str, key: str) -> float | None:
    ra, rb = rows.get(a, {}), rows.get(b, {})
    if key not in ra or key not in rb or not rb[key]:
        return None
    return round(ra[key] / rb[key], 3)


def ratios(rows: dict) -> dict:
    return {
        "cold_regional_over_per_block": _ratio(rows, "regional", "per_block", "cold_s"),
        "cold_regional_over_accelerate": _ratio(rows, "regional", "accelerate", "cold_s"),
        "cold_regional_over_full": _ratio(rows, "regional", "full", "cold_s"),
        "steady_regional_over_full": _ratio(rows, "regional", "full", "steady_s"),
        "steady_regional_over_eager": _ratio(rows, "regional", "eager", "steady_s"),
    }


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[4, 12])
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=None)
    ap.add_argument("--quick", action="store_true",
                    help="fewer variants (no accelerate), repeats and rounds")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None, help="timed steady steps per variant")
    ap.add_argument("--repeats", type=int, default=None,
                    help="fresh cold-start processes per variant (default 5, --quick 1)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--cold", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--steady", nargs="+", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--n-layers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--warm-start", action="store_true",
                    help="the compile cache's warm start against a same-run cold start")
    ap.add_argument("--warm-child", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warm_child:
        print(json.dumps(warm_child(args.n_layers, args.warm_child, args.steps)))
        return
    if args.warm_start:
        warm_main(args)
        return
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    rounds = args.rounds if args.rounds is not None else (5 if args.quick else 30)
    if args.cold:
        print(json.dumps(cold_child(args.cold, args.n_layers)))
        return
    if args.steady:
        print(json.dumps(steady_child(args.steady, args.n_layers, warmup, rounds)))
        return

    variants = list(args.variants or (QUICK_VARIANTS if args.quick else VARIANTS))
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    results = {"model": {**MODEL, "batch": BATCH, "seq": SEQ},
               "quick": args.quick, "warmup": warmup, "rounds": rounds, "repeats": repeats,
               "loadavg_1min_at_start": os.getloadavg()[0], "by_blocks": {}}
    for n in args.blocks:
        rows = cold_starts(variants, n, repeats)
        steady = run_child(["--steady", *variants, "--n-layers", str(n), "--warmup",
                            str(warmup), "--rounds", str(rounds)], "steady")
        print(f"# {n} blocks steady: {steady}", file=sys.stderr, flush=True)
        for v in variants:
            rows[v].update(steady.get("rows", {}).get(v, {"steady_error": steady.get("error")}))
        results["by_blocks"][str(n)] = {"variants": rows, "ratios": ratios(rows),
                                        "steady": {k: v for k, v in steady.items()
                                                   if k != "rows"}}
    results["targets"] = targets(results["by_blocks"])
    emit("compile_time", results, out=args.out)


if __name__ == "__main__":
    main()
