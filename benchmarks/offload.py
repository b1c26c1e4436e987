"""Big-model inference through disk offload: tokens/s and peak memory, vs Accelerate.

One transformers Llama (built from a config, saved with save_pretrained), loaded on the
meta device with a CPU budget of a quarter of its weights, the rest on disk:
  overdrive   od.accelerate(meta_model, od.Offload(max_memory=..., offload_folder=...),
              weights=dir): one block per hook; a loaded weight views the mapped
              offload file (no copy), the next block's pages are faulted in on a
              background thread while the current one computes, and a finished
              block's pages are dropped from the process
  accelerate  load_checkpoint_and_dispatch(meta_model, dir, device_map=
              infer_auto_device_map(same budget), offload_folder=...): Accelerate's disk
              offload, each weight read on demand inside its module's hook
Each variant runs in a fresh process (its peak RSS is its own: VmHWM, reset after the
imports), rounds interleaved; forward tokens/s over `--tokens` tokens and 16-token greedy
generate tokens/s, medians. Targets (issue 15): >= 1.5x Accelerate's throughput, peak
RSS no higher than Accelerate's.

    python benchmarks/offload.py [--hidden 512 --layers 8 --tokens 128 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, emit, target

NEW_TOKENS = 16


def config(hidden: int, layers: int, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                       num_hidden_layers=layers, num_attention_heads=hidden // 64,
                       num_key_value_heads=max(1, hidden // 128), tie_word_embeddings=False)


def high_water_mark() -> int:
    with open("/proc/self/status") as fh:
        return int(next(x for x in fh if x.startswith("VmHWM:")).split()[1]) * 1024


def child(variant: str, export: str, budget: int, folder: str, tokens: int, rounds: int) -> dict:
    import psutil
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    cfg = AutoConfig.from_pretrained(export)
    if variant == "overdrive":
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg).eval()
    else:
        from accelerate import init_empty_weights

        with init_empty_weights():  # Accelerate needs the buffers real
            model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, tokens))
    if variant == "overdrive":  # the libraries' code is imported before the baseline
        import overdrive as od

        od.accelerate, od.Offload  # noqa: B018 - `import overdrive` is lazy
    else:
        import accelerate  # noqa: F401
    Path("/proc/self/clear_refs").write_text("5")
    baseline = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    if variant == "overdrive":
        import overdrive as od

        plan = od.Plan(offload=od.Offload(max_memory={"cpu": budget, "disk": "1TiB"},
                                          offload_folder=folder))
        od.accelerate(model, plan, weights=export)
    else:
        from accelerate import infer_auto_device_map, load_checkpoint_and_dispatch
        device_map = infer_auto_device_map(model, max_memory={"cpu": budget},
                                           no_split_module_classes=["LlamaDecoderLayer"])
        model = load_checkpoint_and_dispatch(model, export, device_map=device_map,
                                             offload_folder=folder)
    load_s = time.perf_counter() - t0
    forward, generate = [], []
    with torch.no_grad():
        model(ids[:, :8])  # warm-up
        for _ in range(rounds):
            t = time.perf_counter()
            model(ids)
            forward.append(tokens / (time.perf_counter() - t))
            t = time.perf_counter()
            model.generate(ids[:, :8], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                           do_sample=False)
            generate.append(NEW_TOKENS / (time.perf_counter() - t))
    return {"forward_tokens_per_s": statistics.median(forward),
            "generate_tokens_per_s": statistics.median(generate),
            "load_s": load_s, "peak_rss_above_baseline": high_water_mark() - baseline}


def run_child(variant: str, args, export: Path, budget: int, folder: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", variant, "--export", str(export),
                          "--budget", str(budget), "--folder", str(folder),
                          "--tokens", str(args.tokens), "--rounds", str(args.rounds)],
                         capture_output=True, text=True, cwd=ROOT / "benchmarks",
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                              "PYTHONPATH": str(ROOT / "src")})
    if out.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per variant")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", default=None)
    parser.add_argument("--export", default=None)
    parser.add_argument("--budget", type=int, default=0)
    parser.add_argument("--folder", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.export, args.budget, args.folder,
                               args.tokens, args.rounds)))
        return
    if args.quick:
        args.hidden, args.layers, args.vocab, args.rounds, args.repeats = 256, 6, 2048, 2, 1
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = LlamaForCausalLM(config(args.hidden, args.layers, args.vocab))
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(tmp / "export")
        del model
        budget = total // 4
        runs: dict[str, list[dict]] = {"overdrive": [], "accelerate": []}
        for i in range(args.repeats):
            order = ["overdrive", "accelerate"] if i % 2 == 0 else ["accelerate", "overdrive"]
            for variant in order:
                runs[variant].append(run_child(variant, args, tmp / "export", budget,
                                               tmp / f"offload-{variant}"))
    result = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in runs.items()}
    od_, acc = result["overdrive"], result["accelerate"]
    fwd = od_["forward_tokens_per_s"] / acc["forward_tokens_per_s"]
    gen = od_["generate_tokens_per_s"] / acc["generate_tokens_per_s"]
    rss = od_["peak_rss_above_baseline"] / acc["peak_rss_above_baseline"]
    emit("offload", {
        "model_bytes": total, "cpu_budget_bytes": budget, "tokens": args.tokens,
        "results": result,
        "targets": [target("forward tokens/s vs Accelerate (disk offload, 4x budget)", fwd,
                           1.5, ">="),
                    target("16-token generate tokens/s vs Accelerate", gen, 1.5, ">="),
                    target("peak RSS / Accelerate's", rss, 1.0, "<=")]})


if __name__ == "__main__":
    main()
