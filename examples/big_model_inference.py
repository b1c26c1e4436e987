"""Big-model inference: a model four times the memory budget, run through disk offload.

A transformers Llama from a tiny config is exported with rt.export, rebuilt on the meta
device (no weights in memory), then loaded with od.accelerate(..., weights=dir): each
tensor goes straight to its final place — the CPU for what fits max_memory, a safetensors
offload folder for the rest — and generate() runs, the next block read from disk on a
background thread while the current one computes.

    python examples/big_model_inference.py [--out /tmp/big_model]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import overdrive as od


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for the export and offload folder")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="big_model_"))

    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    rt = od.accelerate(LlamaForCausalLM(cfg).eval(), None)
    rt.export(out / "export")
    reference = rt.model
    total = sum(p.numel() * p.element_size() for p in reference.parameters())

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).eval()
    plan = od.Plan(offload=od.Offload(max_memory={"cpu": total // 4, "disk": "10GiB"},
                                      offload_folder=str(out / "offload")))
    print(od.inspect(model, plan))  # the device map and bytes per device, nothing loaded
    od.accelerate(model, plan, weights=out / "export")

    prompt = torch.randint(0, cfg.vocab_size, (1, 8))
    tokens = model.generate(prompt, max_new_tokens=12, do_sample=False)
    same = torch.equal(tokens, reference.generate(prompt, max_new_tokens=12, do_sample=False))
    print(f"model {total / 2**20:.1f} MiB, cpu budget {total / 4 / 2**20:.1f} MiB: "
          f"generated {tokens.shape[1] - prompt.shape[1]} tokens, same as in memory: {same}")


if __name__ == "__main__":
    main()
