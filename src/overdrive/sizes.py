"""Byte sizes given as text: ``"5GB"``, ``"500MiB"`` (transformers' convention) — the one
parser, for export shard sizes and offload memory budgets."""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """``"5GB"`` → 5·10⁹ bytes, ``"500MiB"`` → 500·2²⁰ (transformers' convention)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"max_shard_size={size!r} is not valid; use bytes or e.g. '5GB', '500MiB'")
    return int(float(m.group(1)) * _UNITS[m.group(2)])
