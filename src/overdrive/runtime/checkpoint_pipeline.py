"""Optimizer parameter groups of a pipeline checkpoint.

DCP keys are the original parameter names, so every pipeline rank saves the tensors of
its own stages and any world loads them. The optimizer's parameter groups, saved once
in ``state.pt``, name parameters too: under pp each rank's optimizer knows only its
stages, so the saved groups are the union over ranks, in the model's parameter order
(what a single process's optimizer lists), and a pp rank loading them keeps its own.
"""

from __future__ import annotations

from typing import Any


def _groups(plain: Any) -> list[dict]:
    return list(((plain or {}).get("optim") or {}).get("param_groups", []))


def merged_param_groups(plain: Any, every_rank: list[Any], order: list[str]) -> Any:
    """``plain`` with each parameter group listing the parameters of every rank."""
    groups = _groups(plain)
    if not groups:
        return plain
    rank = {n: i for i, n in enumerate(order)}
    merged = []
    for i, group in enumerate(groups):
        names: set[str] = set()
        for other in every_rank:
            other_groups = _groups(other)
            if i < len(other_groups):
                names.update(other_groups[i].get("params", []))
        merged.append({**group, "params": sorted(names, key=lambda n: rank.get(n, len(rank)))})
    return {**plain, "optim": {**plain["optim"], "param_groups": merged}}


def own_param_groups(saved: Any, current: Any) -> Any:
    """The saved groups restricted to the parameters this rank's optimizer holds."""
    groups = _groups(saved)
    if not groups:
        return saved
    mine = {n for g in _groups(current) for n in g.get("params", [])}
    kept = [{**g, "params": [n for n in g.get("params", []) if n in mine]} for g in groups]
    return {**saved, "optim": {**saved["optim"], "param_groups": kept}}
