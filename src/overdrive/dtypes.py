"""The one table from the dtype names a plan uses to torch dtypes.

Plans name dtypes two ways: ``mixed_precision`` as ``"bf16"`` / ``"fp16"`` and the part
fields (``FSDP.param_dtype``, ``Casting.storage``…) by torch's own names (``"bfloat16"``,
``"float8_e4m3fn"``). Every pass and the runtime read them through ``to_torch``.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
}


def to_torch(name: str | None) -> torch.dtype | None:
    """``"bf16"`` / ``"bfloat16"`` → ``torch.bfloat16``…; None (and ``"no"``) → None."""
    if name is None or name == "no":
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype name {name!r}; known: {', '.join(DTYPES)}") from None


def torch_name(name: str | None) -> str | None:
    """torch's own name of a dtype name: ``"bf16"`` → ``"bfloat16"``; None stays None."""
    dtype = to_torch(name)
    return None if dtype is None else str(dtype).removeprefix("torch.")
