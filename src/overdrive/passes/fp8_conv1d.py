"""fp8 training for transformers' ``Conv1D`` (GPT-2's projections), with torchao.

``Conv1D`` is a Linear whose weight is stored transposed, ``(in_features, out_features)``,
so torchao's ``Float8Linear`` swap (nn.Linear only) never sees it. The layer keeps its
object, weight layout and keys; only its class is switched to one whose forward runs
torchao's fp8 matmul (the same autograd function ``Float8Linear`` uses, with the stored
weight as the already transposed operand) and the bias in high precision.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def hf_conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # noqa: BLE001 - transformers is optional
        return None
    return Conv1D


def is_hf_conv1d(module: nn.Module) -> bool:
    cls = hf_conv1d_class()
    return cls is not None and type(module) is cls


def conv1d_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Conv1D (its weight is ``(in, out)``)."""
    return module.weight.shape[0], module.weight.shape[1]


@functools.lru_cache(maxsize=1)
def float8_conv1d_class() -> type:
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

    class Float8Conv1D(hf_conv1d_class()):
        """transformers' Conv1D computing its matmul in fp8 (torchao)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.is_autocast_enabled():
                x = x.to(torch.get_autocast_gpu_dtype())  # as Float8Linear does
            flat = x.reshape(-1, x.size(-1))
            out = matmul_with_hp_or_float8_args.apply(flat, self.weight,
                                                      self.linear_mm_config, self.config)
            if self.bias is not None:
                out = out + self.bias.to(out.dtype)
            return out.view(*x.shape[:-1], self.nf)

    return Float8Conv1D


def convert_conv1d(module: nn.Module, config) -> None:
    """Switch one Conv1D to fp8 in place: same object, parameters and keys."""
    from torchao.float8.float8_linear import Float8Linear

    probe = Float8Linear(16, 16, bias=False, device="meta", config=config)
    module.config = config
    module.linear_mm_config = probe.linear_mm_config
    module.__class__ = float8_conv1d_class()
