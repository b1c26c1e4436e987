"""Collectives over nested tensors: gather, gather_for_metrics, reduce, broadcast, pad.

Every collective first exchanges the shapes and dtypes of its tensors, so ranks that
disagree get a clear error on every rank instead of a hang. A single process (no process
group, or a world of one) gets its input back unchanged.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from ..errors import OverdriveError

REDUCE_OPS = ("sum", "mean", "max", "min")


# --------------------------------------------------------------------------- structure


def leaves(data: Any) -> list:
    """The leaves of a nested list/tuple/dict, depth first."""
    if isinstance(data, dict):
        return [x for v in data.values() for x in leaves(v)]
    if isinstance(data, (list, tuple)):
        return [x for v in data for x in leaves(v)]
    return [data]


def rebuild(data: Any, values: list) -> Any:
    """``data`` with its leaves replaced, in order, by ``values``."""
    it = iter(values)

    def go(d):
        if isinstance(d, dict):
            return type(d)((k, go(v)) for k, v in d.items())
        if isinstance(d, tuple) and hasattr(d, "_fields"):
            return type(d)(*(go(v) for v in d))
        if isinstance(d, (list, tuple)):
            return type(d)(go(v) for v in d)
        return next(it)

    return go(data)


def _tensors(data: Any, what: str) -> list[torch.Tensor]:
    out = leaves(data)
    for x in out:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what} works on tensors (in nested lists/tuples/dicts), got a "
                            f"{type(x).__name__}; use rt.gather_object for Python objects")
    return out


def world(group=None) -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


# --------------------------------------------------------------------------- shape checks


def exchange_meta(tensors: list[torch.Tensor], group=None) -> list[list[tuple]]:
    """Every rank's ``[(shape, dtype), …]``; one small object all-gather."""
    mine = [(tuple(t.shape), str(t.dtype)) for t in tensors]
    out: list = [None] * world(group)
    dist.all_gather_object(out, mine, group=group)
    return out


def check_same(metas: list[list[tuple]], what: str, *, skip_dim: int | None = None) -> None:
    """Raise on every rank alike if the ranks' structures, shapes or dtypes differ
    (ignoring dimension ``skip_dim``)."""
    def key(meta):
        return [((tuple(s for i, s in enumerate(shape) if i != skip_dim)
                  if skip_dim is not None else shape), len(shape), dtype)
                for shape, dtype in meta]

    ref = key(metas[0])
    for rank, meta in enumerate(metas):
        if key(meta) != ref:
            desc = "; ".join(f"rank {r}: {[(list(s), d) for s, d in m]}"
                             for r, m in enumerate(metas))
            ignored = f" (other than dim {skip_dim})" if skip_dim is not None else ""
            raise OverdriveError(
                f"{what}: tensors differ across ranks in structure, shape{ignored} or dtype — "
                f"{desc}. Pad them first (rt.pad_across_processes) or gather objects "
                "with rt.gather_object")


# --------------------------------------------------------------------------- collectives


def gather(data: Any, group=None) -> Any:
    """Concatenate every rank's tensors along dim 0 (0-d tensors are stacked)."""
    if world(group) == 1:
        return data
    tensors = _tensors(data, "gather")
    check_same(exchange_meta(tensors, group), "gather")
    return rebuild(data, [_all_gather(t, group) for t in tensors])


def _all_gather(t: torch.Tensor, group=None) -> torch.Tensor:
    t = t.contiguous()
    flat = t.unsqueeze(0) if t.ndim == 0 else t
    parts = [torch.empty_like(flat) for _ in range(world(group))]
    dist.all_gather(parts, flat, group=group)
    return torch.cat(parts, dim=0)


def gather_uneven(data: Any, group=None, keep: Callable[[torch.Tensor], int] | None = None) -> Any:
    """Like ``gather`` but dim 0 may differ across ranks; ``keep(t)`` rows of each local
    tensor are kept (the rest is padding)."""
    tensors = _tensors(data, "gather_for_metrics")
    if keep is not None:
        tensors = [t[: keep(t)] if t.ndim else t for t in tensors]
    if world(group) == 1:
        return rebuild(data, tensors)
    metas = exchange_meta(tensors, group)
    check_same(metas, "gather_for_metrics", skip_dim=0)
    out = []
    for i, t in enumerate(tensors):
        rows = [m[i][0][0] if m[i][0] else 1 for m in metas]
        padded = _pad_dim(t if t.ndim else t.unsqueeze(0), 0, max(rows), 0, False)
        full = _all_gather(padded, group)
        chunks = full.split(max(rows), dim=0)
        out.append(torch.cat([c[:n] for c, n in zip(chunks, rows)], dim=0))
    return rebuild(data, out)


def gather_for_metrics(data: Any, rows: tuple[int, int] | None, group=None) -> Any:
    """Gather the current batch's results without the even_batches padding.

    ``rows`` is ``(rows in the batch, real rows)`` of the loader being iterated: tensors
    (and lists) with that many rows keep the real ones before gathering; ranks may then
    hold different row counts.
    """
    batch_len, n_real = rows if rows is not None else (-1, -1)
    if not all(isinstance(t, torch.Tensor) for t in leaves(data)):
        if isinstance(data, list) and len(data) == batch_len:
            data = data[:n_real]
        return gather_object(data, group)
    return gather_uneven(data, group, keep=lambda t: n_real if t.shape[0] == batch_len
                         else t.shape[0])


def gather_object(obj: Any, group=None) -> list:
    """Every rank's object; lists/tuples are concatenated in rank order."""
    if world(group) == 1:
        return list(obj) if isinstance(obj, (list, tuple)) else [obj]
    out: list = [None] * world(group)
    dist.all_gather_object(out, obj, group=group)
    if all(isinstance(o, (list, tuple)) for o in out):
        return [x for o in out for x in o]
    return out


def reduce(data: Any, op: str = "sum", group=None) -> Any:
    """Element-wise ``sum`` / ``mean`` / ``max`` / ``min`` over ranks (new tensors)."""
    if op not in REDUCE_OPS:
        raise OverdriveError(f"reduce op={op!r} is not valid; choose one of: "
                             f"{', '.join(REDUCE_OPS)}")
    n = world(group)
    tensors = _tensors(data, "reduce")
    if n == 1:
        return data
    check_same(exchange_meta(tensors, group), "reduce")
    dist_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM,
               "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    out = []
    for t in tensors:
        r = t.detach().clone()
        dist.all_reduce(r, op=dist_op, group=group)
        if op == "mean":
            r = r / n if r.is_floating_point() or r.is_complex() else r.double() / n
        out.append(r)
    return rebuild(data, out)


def broadcast(data: Any, src: int = 0, group=None) -> Any:
    """``src``'s tensors on every rank; tensors must already have the same shapes."""
    if world(group) == 1:
        return data
    tensors = _tensors(data, "broadcast")
    check_same(exchange_meta(tensors, group), "broadcast")
    out = []
    for t in tensors:
        r = t.detach().clone().contiguous()
        dist.broadcast(r, src=src, group=group)
        out.append(r)
    return rebuild(data, out)


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    if world(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def pad_across_processes(data: Any, dim: int = 0, pad_index: int = 0, pad_first: bool = False,
                         group=None) -> Any:
    """Pad every tensor along ``dim`` to the largest size any rank has."""
    if world(group) == 1:
        return data
    tensors = _tensors(data, "pad_across_processes")
    metas = exchange_meta(tensors, group)
    for t in tensors:
        if t.ndim == 0 or not -t.ndim <= dim < t.ndim:
            raise OverdriveError(f"pad_across_processes: dim={dim} is out of range for a "
                                 f"tensor of shape {list(t.shape)}")
    d = dim % tensors[0].ndim if tensors else 0
    check_same(metas, "pad_across_processes", skip_dim=d)
    out = []
    for i, t in enumerate(tensors):
        dd = dim % t.ndim
        target = max(m[i][0][dd] for m in metas)
        out.append(_pad_dim(t, dd, target, pad_index, pad_first))
    return rebuild(data, out)


def _pad_dim(t: torch.Tensor, dim: int, size: int, value, first: bool) -> torch.Tensor:
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    fill = t.new_full(shape, value)
    return torch.cat([fill, t] if first else [t, fill], dim=dim)
