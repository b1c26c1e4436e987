"""``rt.split_between_processes``: this data rank's share of a list, tuple, tensor or dict.

For distributed inference (prompts, an eval set held in memory). Without padding the
items are dealt in contiguous runs as even as they go: ``n // ranks`` each, and the ranks
below ``n % ranks`` one more (Accelerate's split). With ``apply_padding=True`` every rank
gets exactly ``ceil(n / ranks)`` items: the ranks take consecutive chunks of that size and
a short (or empty) last chunk is filled with the input's last item, so the ranks' results
concatenated in rank order and truncated to ``n`` are the input's, item for item.

A dict is split value by value (every value must have the same length); a tensor along
dim 0. The values are slices of the input: nothing is copied but the padding.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from ..errors import OverdriveError


def bounds(n: int, rank: int, ranks: int, padded: bool) -> tuple[int, int]:
    """``[start, end)`` of ``rank``'s items among ``n``."""
    if padded:
        chunk = -(-n // ranks)
        start = min(n, rank * chunk)
        return start, min(n, start + chunk)
    base, extra = divmod(n, ranks)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _length(inputs: Any, what: str) -> int:
    if isinstance(inputs, torch.Tensor):
        if inputs.ndim == 0:
            raise OverdriveError(f"split_between_processes: {what} is a 0-d tensor; it has "
                                 "no items to split (give a tensor with a batch dim 0)")
        return inputs.shape[0]
    if isinstance(inputs, (list, tuple)):
        return len(inputs)
    raise OverdriveError(
        f"split_between_processes: {what} is a {type(inputs).__name__}; give a list, a "
        "tuple, a tensor (split along dim 0) or a dict of those")


def _take(values: Any, start: int, end: int, size: int | None) -> Any:
    """``values[start:end]``, padded to ``size`` items with the input's last item."""
    part = values[start:end]
    if size is None or len(part) == size:
        return part
    missing = size - len(part)
    if isinstance(values, torch.Tensor):
        fill = values[-1:].expand(missing, *values.shape[1:])
        return torch.cat([part, fill], dim=0)
    return part + type(values)([values[-1]] * missing)


def split(inputs: Any, rank: int, ranks: int, apply_padding: bool = False) -> Any:
    """``rank``'s share of ``inputs`` among ``ranks`` (see the module docstring)."""
    if isinstance(inputs, dict):
        lengths = {k: _length(v, f"inputs[{k!r}]") for k, v in inputs.items()}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{k!r}: {n}" for k, n in lengths.items())
            raise OverdriveError(
                f"split_between_processes: the dict's values have different lengths "
                f"({shown}); every value must hold one entry per item")
        n = next(iter(lengths.values()), 0)
    else:
        n = _length(inputs, "inputs")
    start, end = bounds(n, rank, ranks, apply_padding)
    size = -(-n // ranks) if apply_padding and n else None
    if isinstance(inputs, dict):
        return type(inputs)((k, _take(v, start, end, size)) for k, v in inputs.items())
    return _take(inputs, start, end, size)


@contextlib.contextmanager
def split_between_processes(rt, inputs: Any, apply_padding: bool = False) -> Iterator[Any]:
    """``with rt.split_between_processes(prompts) as mine:`` — over the data ranks (tensor
    and context-parallel peers, which share a data rank, get the same share)."""
    yield split(inputs, rt.dp_rank, rt.dp_size, apply_padding)
