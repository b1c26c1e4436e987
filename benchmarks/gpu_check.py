"""Everything only a GPU can show, in one run of <= 8 minutes on one H100/H200; prints JSON.

Sections (each one small function below; ``--only`` picks some):
  fp8           training step of a Llama-3-8B two-layer slice under regional compile:
                bf16 autocast vs torchao fp8 tensorwise and rowwise (and Transformer
                Engine's fp8 when it is installed); step time, speedup, tokens/s, MFU of
                each step (peaks from overdrive.runtime.peaks: bf16 and fp8 dense peaks)
  compile       regional vs full torch.compile of a 4-block Llama: cold start (first
                forward+backward+step, compile included, each in a fresh process with
                empty inductor/triton caches) and the steady step
  casting       layerwise casting (fp8 weight storage) forward vs the bf16 model at 16 /
                256 / 2048 tokens: the kernel "auto" picks (torch._scaled_mm on fp8 tensor
                cores) and the upcast copy forced; logits error beside each
  fsdp_offload  FSDP2 with CPU offload (od.FSDP(offload=True)) on one rank vs FSDP2
                without: step time and peak GPU memory (a fresh process: it opens the
                one-rank process group)
  offload       big-model inference, od.Offload vs Accelerate's
                infer_auto_device_map + load_checkpoint_and_dispatch with the same GPU
                budget (a quarter of the weights; the rest in CPU memory): forward tokens/s
                (needs transformers; Accelerate's row only where it is installed)

From a fresh clone (on Linux, `make venv` installs PyPI's torch wheel, which is the CUDA
build; if the venv already holds a CPU build, the install line replaces it):

    make venv
    .venv/bin/python -m pip install --force-reinstall --no-deps torch==2.13.0 \\
        --index-url https://download.pytorch.org/whl/cu130    # only if torch is +cpu
    .venv/bin/python benchmarks/gpu_check.py                  # -> results/gpu_check.json

Without CUDA it exits at once with status 2 and says so; ``--smoke`` runs every section
at toy sizes on the CPU instead (the plumbing, not the numbers; nothing is written to
results/). Each section reports its own error instead of stopping the run, and a section
that would start past ``--budget-s`` is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from _common import ROOT, emit, target

SECTIONS = ("fp8", "compile", "casting", "fsdp_offload", "offload")
NO_CUDA_EXIT = 2
CUDA_INSTALL = ("python -m pip install --force-reinstall --no-deps torch==2.13.0 "
                "--index-url https://download.pytorch.org/whl/cu130")


@dataclass(frozen=True)
class Shape:
    """A Llama-style model and batch."""

    dim: int
    ffn: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    seq: int
    batch: int


# two Llama-3-8B decoder layers (dim 4096, ffn 14336, 32 heads / 8 kv heads)
LLAMA3_8B_SLICE = Shape(4096, 14336, 32, 8, 2, 32000, 2048, 2)
COMPILE_SHAPE = Shape(2048, 5632, 16, 8, 4, 32000, 2048, 2)
OFFLOAD_SHAPE = Shape(2048, 5632, 16, 8, 8, 32000, 512, 1)
SMOKE = Shape(64, 128, 4, 2, 2, 128, 32, 2)


@dataclass
class Settings:
    device: str
    fp8_shape: Shape
    compile_shape: Shape
    casting_shape: Shape
    offload_shape: Shape
    casting_tokens: tuple[int, ...]
    warmup: int
    steps: int
    compile_backend: str
    smoke: bool


def settings(smoke: bool) -> Settings:
    if smoke:
        return Settings("cpu", SMOKE, SMOKE, SMOKE, SMOKE, (16,), 1, 2, "aot_eager", True)
    return Settings("cuda", LLAMA3_8B_SLICE, COMPILE_SHAPE, LLAMA3_8B_SLICE, OFFLOAD_SHAPE,
                    (16, 256, 2048), 5, 15, "inductor", False)


def no_cuda_message() -> str | None:
    """Why this machine cannot run the GPU check (None: it can)."""
    import torch

    if torch.cuda.is_available():
        return None
    build = "a CPU-only build" if torch.version.cuda is None else \
        f"built for CUDA {torch.version.cuda}, but no GPU is visible"
    return (f"gpu_check.py needs a CUDA GPU: torch {torch.__version__} is {build} "
            "(torch.cuda.is_available() is False). Install the CUDA build into the venv: "
            f"`{CUDA_INSTALL}`, or run `--smoke` to check the plumbing on the CPU.")


# --------------------------------------------------------------------------- helpers


def build_llama(shape: Shape, seed: int = 0):
    from overdrive.models.llama import Llama, LlamaConfig

    model = Llama(LlamaConfig(vocab_size=shape.vocab, dim=shape.dim, n_layers=shape.layers,
                              n_heads=shape.heads, n_kv_heads=shape.kv_heads,
                              ffn_dim=shape.ffn, max_seq_len=max(shape.seq, 2048)))
    model.init_weights(seed=seed)
    return model


def batch(shape: Shape, device, tokens: int | None = None):
    import torch

    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, shape.vocab, (shape.batch, tokens or shape.seq),
                         generator=gen).to(device)


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_forward(model, ids, device) -> float:
    """Seconds of one no-grad forward of ``ids``, the device synchronised around it."""
    import torch

    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        model(ids)
    sync(device)
    return time.perf_counter() - start


def train_step(rt, ids) -> float:
    """One optimizer step; seconds, synchronised."""
    sync(ids.device)
    start = time.perf_counter()
    rt.backward(rt.model(ids, labels=ids).loss)
    rt.optimizer.step()
    rt.optimizer.zero_grad(set_to_none=True)
    sync(ids.device)
    return time.perf_counter() - start


def runtime(model, plan):
    import torch

    import overdrive as od

    return od.accelerate(model, plan, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4))


def flops_per_step(shape: Shape) -> int:
    """Forward + backward FLOPs of one step, from overdrive's meta-device trace."""
    import torch

    from overdrive.rewrite.trace import trace_model

    with torch.device("meta"):
        model = _meta_llama(shape)
    ids = torch.zeros(shape.batch, shape.seq, dtype=torch.long, device="meta")
    trace = trace_model(model, {"input_ids": ids, "labels": ids})
    return trace.forward_flops + trace.backward_flops


def _meta_llama(shape: Shape):
    from overdrive.models.llama import Llama, LlamaConfig

    return Llama(LlamaConfig(vocab_size=shape.vocab, dim=shape.dim, n_layers=shape.layers,
                             n_heads=shape.heads, n_kv_heads=shape.kv_heads, ffn_dim=shape.ffn,
                             max_seq_len=max(shape.seq, 2048)))


def mfu(flops: int, seconds: float, device, dtype: str) -> float | None:
    import torch

    from overdrive.runtime.peaks import peak_flops

    peak = peak_flops(torch.device(device), dtype)
    return round(flops / seconds / peak, 4) if peak and seconds else None


def interleaved(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each callable, rounds interleaved in rotating order."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(fns[n]())
    return {n: statistics.median(t) for n, t in times.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_child(section: str, cfg: Settings, extra: dict | None = None, env: dict | None = None,
              timeout: float = 300) -> dict:
    """Run ``child_<section>`` of this script in a fresh Python process; its JSON line."""
    payload = json.dumps({"settings": asdict(cfg), **(extra or {})})
    out = subprocess.run([sys.executable, __file__, "--child", section, "--payload", payload],
                         capture_output=True, text=True, timeout=timeout, cwd=ROOT / "benchmarks",
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(f"child {section} exited {out.returncode}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def settings_from(payload: dict) -> Settings:
    raw = payload["settings"]
    shapes = {k: Shape(**v) for k, v in raw.items() if k.endswith("_shape")}
    return Settings(**{**raw, **shapes, "casting_tokens": tuple(raw["casting_tokens"])})


# --------------------------------------------------------------------------- sections


def fp8_plans() -> dict:
    import overdrive as od
    from overdrive.passes.fp8 import te_importable

    compiled = od.Compile(mode="regional")
    plans = {"bf16": od.Plan(compile=compiled, mixed_precision="bf16"),
             "fp8-torchao-tensorwise": od.Plan(fp8=od.FP8(backend="torchao", recipe="tensorwise"),
                                               compile=compiled, mixed_precision="bf16"),
             "fp8-torchao-rowwise": od.Plan(fp8=od.FP8(backend="torchao", recipe="rowwise"),
                                            compile=compiled, mixed_precision="bf16")}
    if te_importable():
        plans["fp8-te"] = od.Plan(fp8=od.FP8(backend="te"), compile=compiled,
                                  mixed_precision="bf16")
    return plans


def section_fp8(cfg: Settings) -> dict:
    """bf16 vs fp8 step time and MFU on the Llama-3-8B slice, regional compile."""
    import dataclasses

    import overdrive as od

    shape, dev = cfg.fp8_shape, cfg.device
    ids = batch(shape, dev)
    rows, steps = {}, {}
    for name, plan in fp8_plans().items():
        plan = dataclasses.replace(plan, compile=od.Compile(mode="regional",
                                                            backend=cfg.compile_backend))
        rt = runtime(build_llama(shape).to(dev), plan)
        first = train_step(rt, ids)  # compile
        for _ in range(cfg.warmup):
            train_step(rt, ids)
        steps[name] = (rt, first)
    medians = interleaved({n: (lambda rt=rt: train_step(rt, ids)) for n, (rt, _) in steps.items()},
                          cfg.steps)
    flops = flops_per_step(shape)
    tokens = shape.batch * shape.seq
    for name, (rt, first) in steps.items():
        s = medians[name]
        rows[name] = {"first_step_s": round(first, 3), "step_s": round(s, 5),
                      "speedup_vs_bf16": round(medians["bf16"] / s, 3),
                      "tokens_per_s": round(tokens / s, 1),
                      "tflops": round(flops / s / 1e12, 2),
                      "mfu_vs_bf16_peak": mfu(flops, s, dev, "bf16"),
                      "mfu_vs_fp8_peak": mfu(flops, s, dev, "fp8") if name != "bf16" else None}
    if "fp8-te" not in rows:
        rows["fp8-te"] = {"skipped": "transformer_engine is not installed"}
    return {"shape": asdict(shape), "flops_per_step": flops, "variants": rows,
            "target": "fp8 >= 1.2x bf16 step (benchmarks/README.md)"}


def child_compile(payload: dict) -> dict:
    """One fresh process: build, accelerate with ``payload['mode']``, time the first step
    (compile included) and the steady step."""
    import overdrive as od

    cfg = settings_from(payload)
    shape, dev = cfg.compile_shape, cfg.device
    model = build_llama(shape).to(dev)
    ids = batch(shape, dev)
    start = time.perf_counter()
    rt = runtime(model, od.Plan(compile=od.Compile(mode=payload["mode"],
                                                   backend=cfg.compile_backend),
                                mixed_precision="bf16"))
    cold = time.perf_counter() - start + train_step(rt, ids)
    for _ in range(cfg.warmup):
        train_step(rt, ids)
    steady = statistics.median(train_step(rt, ids) for _ in range(cfg.steps))
    return {"cold_start_s": round(cold, 2), "steady_step_s": round(steady, 5)}


def section_compile(cfg: Settings) -> dict:
    """Regional vs full compile: cold start in fresh processes with empty caches."""
    rows = {}
    for mode in ("regional", "full"):
        with tempfile.TemporaryDirectory() as cache:
            rows[mode] = run_child("compile", cfg, {"mode": mode},
                                   env={"TORCHINDUCTOR_CACHE_DIR": f"{cache}/inductor",
                                        "TRITON_CACHE_DIR": f"{cache}/triton"})
    return {"shape": asdict(cfg.compile_shape), "variants": rows,
            "cold_regional_vs_full": round(rows["regional"]["cold_start_s"]
                                           / rows["full"]["cold_start_s"], 3),
            "steady_regional_vs_full": round(rows["regional"]["steady_step_s"]
                                             / rows["full"]["steady_step_s"], 3)}


def section_casting(cfg: Settings) -> dict:
    """Layerwise casting forward vs bf16: the "auto" kernel and the copy forced."""
    import copy

    import torch

    import overdrive as od

    shape, dev = cfg.casting_shape, cfg.device
    base = build_llama(shape).to(dev).to(torch.bfloat16).eval()
    variants, kernels = {"bf16": base}, {}
    for kernel in ("auto", "copy"):
        model = copy.deepcopy(base)
        rt = od.accelerate(model, od.Plan(casting=od.Casting(kernel=kernel)))
        d = rt.report["casting"].details
        kernels[f"cast-{kernel}"] = {k: d[k] for k in ("kernel", "machine", "kernel_reason",
                                                       "fused_layers", "copy_layers")}
        variants[f"cast-{kernel}"] = model

    by_tokens = {}
    for tokens in cfg.casting_tokens:
        ids = torch.randint(0, shape.vocab, (1, tokens), device=dev)
        with torch.no_grad():
            ref = base(ids).logits.float()
            err = {n: ((m(ids).logits.float() - ref).norm() / ref.norm()).item()
                   for n, m in variants.items()}
        for m in variants.values():
            timed_forward(m, ids, dev)
        med = interleaved({n: (lambda m=m: timed_forward(m, ids, dev))
                           for n, m in variants.items()},
                          cfg.steps)
        by_tokens[str(tokens)] = {n: {"forward_ms": round(med[n] * 1e3, 3),
                                      "vs_bf16": round(med[n] / med["bf16"], 3),
                                      "logits_rel_err": round(err[n], 4)} for n in variants}
    return {"shape": asdict(shape), "kernels": kernels, "by_tokens": by_tokens,
            "targets": "cast-auto <= 1.5x bf16 at 16 tokens, <= 1.1x at >= 256"}


def child_fsdp_offload(payload: dict) -> dict:
    """One fresh process, a one-rank process group: FSDP2 with and without CPU offload."""
    import torch

    import overdrive as od

    cfg = settings_from(payload)
    shape, dev = cfg.fp8_shape, cfg.device
    ids = batch(shape, dev)
    rows = {}
    for name, offload in (("fsdp", False), ("fsdp-cpu-offload", True)):
        if offload and dev != "cuda":
            rows[name] = {"skipped": "fsdp.offload is for GPU runs (refused on a CPU device)"}
            continue
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rt = runtime(build_llama(shape).to("cpu" if offload else dev),
                     od.Plan(fsdp=od.FSDP(offload=offload), mixed_precision="bf16"))
        for _ in range(cfg.warmup):
            train_step(rt, ids)
        step = statistics.median(train_step(rt, ids) for _ in range(max(3, cfg.steps // 3)))
        rows[name] = {"step_s": round(step, 4),
                      "peak_gpu_bytes": torch.cuda.max_memory_allocated() if dev == "cuda"
                      else None}
        del rt
        if dev == "cuda":
            torch.cuda.empty_cache()
    if "step_s" in rows["fsdp-cpu-offload"]:
        rows["fsdp-cpu-offload"]["step_vs_fsdp"] = round(
            rows["fsdp-cpu-offload"]["step_s"] / rows["fsdp"]["step_s"], 3)
    return {"shape": asdict(shape), "variants": rows}


def section_fsdp_offload(cfg: Settings) -> dict:
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    return run_child("fsdp_offload", cfg, env=env)


def hf_llama_config(shape: Shape):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.dim,
                       intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
                       num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                       tie_word_embeddings=False)


def offload_variants(export: str, budget: int, cfg: Settings) -> dict:
    """name -> a builder returning the dispatched model (each with the same budget)."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    import overdrive as od

    gpu = 0 if cfg.device == "cuda" else "cpu"
    # integers: Accelerate does not parse "GiB" sizes. --smoke (CPU): all in CPU memory,
    # the plumbing only
    max_memory = {gpu: budget, "cpu": 200 * 2**30} if gpu == 0 else {"cpu": 16 * 2**30}
    hf = AutoConfig.from_pretrained(export)

    def ours():
        if not hasattr(od, "Offload"):
            raise RuntimeError("this overdrive has no od.Offload")
        with torch.device("meta"):
            model = LlamaForCausalLM(hf).eval()
        plan = od.Plan(offload=od.Offload(max_memory=max_memory, dtype="bfloat16",
                                          offload_folder=tempfile.mkdtemp()))
        return od.accelerate(model, plan, weights=export).model

    def accelerate():
        from accelerate import (infer_auto_device_map, init_empty_weights,
                                load_checkpoint_and_dispatch)
        with init_empty_weights():
            model = LlamaForCausalLM(hf).eval()
        device_map = infer_auto_device_map(model, max_memory=max_memory, dtype=torch.bfloat16,
                                           no_split_module_classes=["LlamaDecoderLayer"])
        return load_checkpoint_and_dispatch(model, export, device_map=device_map,
                                            dtype=torch.bfloat16,
                                            offload_folder=tempfile.mkdtemp())

    return {"overdrive": ours, "accelerate": accelerate}


def section_offload(cfg: Settings) -> dict:
    """od.Offload vs Accelerate's dispatch: forward tokens/s under one GPU budget."""
    import torch
    from transformers import LlamaForCausalLM

    shape = cfg.offload_shape
    with tempfile.TemporaryDirectory() as export:
        model = LlamaForCausalLM(hf_llama_config(shape)).to(torch.bfloat16)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(export)
        del model
        budget = weight_bytes // 4
        first = "cuda:0" if cfg.device == "cuda" else "cpu"
        ids = torch.randint(0, shape.vocab, (1, shape.seq), device=first)
        rows, models = {}, {}
        for name, make in offload_variants(export, budget, cfg).items():
            try:
                models[name] = make()
            except Exception as err:  # noqa: BLE001 - Accelerate is optional
                rows[name] = {"skipped": f"{type(err).__name__}: {str(err)[:300]}"}

        if not models:
            return {"shape": asdict(shape), "variants": rows}
        for m in models.values():
            timed_forward(m, ids, first)
        med = interleaved({n: (lambda m=m: timed_forward(m, ids, first))
                           for n, m in models.items()},
                          max(3, cfg.steps // 3))
        for name, s in med.items():
            rows[name] = {"forward_s": round(s, 4), "tokens_per_s": round(shape.seq / s, 1)}
    if "overdrive" in med and "accelerate" in med:
        rows["overdrive"]["throughput_vs_accelerate"] = round(med["accelerate"]
                                                              / med["overdrive"], 3)
    return {"shape": asdict(shape), "weight_bytes": weight_bytes, "gpu_budget_bytes": budget,
            "variants": rows, "target": "overdrive >= 1.5x Accelerate (issue 15)"}


SECTION_FNS = {"fp8": section_fp8, "compile": section_compile, "casting": section_casting,
               "fsdp_offload": section_fsdp_offload, "offload": section_offload}
CHILDREN = {"compile": child_compile, "fsdp_offload": child_fsdp_offload}


def environment() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    for pkg in ("torchao", "transformer_engine", "accelerate", "transformers"):
        try:
            info[pkg] = getattr(__import__(pkg), "__version__", "installed")
        except Exception:  # noqa: BLE001 - reported as missing
            info[pkg] = None
    return info


def targets(sections: dict) -> list[dict]:
    """The target rows benchmarks/report.py publishes, from the sections that ran."""
    rows = []
    for name, v in sections.get("fp8", {}).get("variants", {}).items():
        if name != "bf16" and "speedup_vs_bf16" in v:
            rows.append(target(f"{name} step speedup vs bf16", v["speedup_vs_bf16"], 1.2, ">="))
    comp = sections.get("compile", {})
    if "cold_regional_vs_full" in comp:
        rows.append(target("cold start regional / full", comp["cold_regional_vs_full"], 0.6))
        rows.append(target("steady step regional / full", comp["steady_regional_vs_full"],
                           1.05))
    cast = sections.get("casting", {})
    kind = cast.get("kernels", {}).get("cast-auto", {})
    for tokens, row in cast.get("by_tokens", {}).items():
        auto = row["cast-auto"]
        rows.append(target(f"casting forward / bf16 ({tokens} tokens; kernel "
                           f"{kind.get('kernel')}, {kind.get('machine')})", auto["vs_bf16"],
                           1.5 if int(tokens) < 256 else 1.1))
        rows.append(target(f"casting logits rel. error vs bf16 ({tokens} tokens) (reference)",
                           auto["logits_rel_err"], None))
    ours = sections.get("offload", {}).get("variants", {}).get("overdrive", {})
    if "throughput_vs_accelerate" in ours:
        rows.append(target("od.Offload forward tokens/s / Accelerate dispatch's",
                           ours["throughput_vs_accelerate"], 1.5, ">="))
    return rows


def run_sections(names, cfg: Settings, budget_s: float) -> dict:
    start, out = time.perf_counter(), {}
    for name in names:
        elapsed = time.perf_counter() - start
        if elapsed > budget_s:
            out[name] = {"skipped": f"time budget spent ({elapsed:.0f}s of {budget_s:.0f}s)"}
            continue
        t0 = time.perf_counter()
        try:
            out[name] = SECTION_FNS[name](cfg)
        except Exception as err:  # noqa: BLE001 - one section's failure is its result
            out[name] = {"error": f"{type(err).__name__}: {str(err)[:2000]}"}
        out[name]["section_s"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--smoke", action="store_true",
                    help="toy sizes on the CPU: checks the plumbing, writes no result")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="sections that would start after this many seconds are skipped")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--payload", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child](json.loads(args.payload))))
        return 0
    if not args.smoke and (why := no_cuda_message()) is not None:
        print(why, file=sys.stderr)
        return NO_CUDA_EXIT
    cfg = settings(args.smoke)
    start = time.perf_counter()
    result = {"environment": environment(), "smoke": args.smoke,
              "sections": run_sections(args.only, cfg, args.budget_s)}
    result["total_s"] = round(time.perf_counter() - start, 1)
    result["targets"] = targets(result["sections"])
    out = Path(tempfile.gettempdir()) / "gpu_check_smoke.json" if args.smoke else None
    emit("gpu_check", result, out=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
