"""Layerwise casting for inference: weights stored in float8, computed in bfloat16.

    python examples/inference_fp8_casting.py

Prints parameter memory before/after and how far the logits move from the bf16 model.
Norms, embeddings and the output head stay in bf16 (`od.Casting.skip`).
"""

import copy

import torch

import overdrive as od
from overdrive.models.llama import tiny


def param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main():
    torch.manual_seed(0)
    model = tiny(n_layers=4, dim=128, n_heads=4).to(torch.bfloat16).eval()
    reference = copy.deepcopy(model)
    before = param_bytes(model)

    rt = od.accelerate(model, "inference-fp8")  # = od.Plan(casting=od.Casting())
    print(rt.report)
    after = param_bytes(rt.model)

    ids = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        ref = reference(ids).logits.float()
        out = rt.model(ids).logits.float()
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"parameters: {before / 2**20:.2f} MiB (bf16) -> {after / 2**20:.2f} MiB "
          f"({after / before:.2f}x)")
    print(f"logits relative error vs bf16: {rel:.4f}")
    assert after < before and rel < 0.1


if __name__ == "__main__":
    main()
