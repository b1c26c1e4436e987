"""Collectives over nested tensors: gather, gather_for_metrics, reduce, broadcast, pad.

Every collective first checks that the ranks agree on the structure, shapes and dtypes
of its tensors — one all-gather of a few int64s (a digest, and the sizes along the one
dimension that may differ) — so ranks that disagree get a clear error on every rank
instead of a hang. A single process (no process group, or a world of one) gets its input
back unchanged, with no check at all.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..errors import OverdriveError
from .ledger import collective

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

_INLINE = 8  # sizes along the free dim sent with the check; more tensors take one more


def comm_device(group=None) -> torch.device:
    """Where small control tensors go for ``group``'s backend (CPU for gloo, also when
    it is the CPU half of "cpu:gloo,cuda:nccl"; else the current accelerator)."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    acc = torch.accelerator.current_accelerator()
    return torch.device("cpu") if acc is None else \
        torch.device(acc.type, torch.accelerator.current_device_index())


def _all_gather_ints(values: list[int], group=None) -> list[list[int]]:
    t = torch.tensor(values, dtype=torch.int64, device=comm_device(group))
    parts = [torch.empty_like(t) for _ in range(world(group))]
    collective("all_gather", dist.all_gather, parts, t, group=group, tensor=t)
    return torch.stack(parts).tolist()


def _free_size(t: torch.Tensor, dim: int) -> int:
    return t.shape[dim] if t.ndim else 1  # a 0-d tensor counts as one row


def _digest(tensors: list[torch.Tensor], free_dim: int | None) -> int:
    """A checksum of the structure, ndims, shapes (``free_dim`` left out) and dtypes."""
    def shape(t):
        if free_dim is None or t.ndim == 0:
            return tuple(t.shape)
        d = free_dim % t.ndim
        return tuple(s for i, s in enumerate(t.shape) if i != d)

    key = [(t.ndim, shape(t), str(t.dtype)) for t in tensors]
    return zlib.crc32(repr(key).encode())


def check_same(tensors: list[torch.Tensor], what: str, *, free_dim: int | None = None,
               group=None) -> list[list[int]] | None:
    """Raise on every rank alike if the ranks' tensors differ in structure, shape (other
    than along ``free_dim``) or dtype; return every rank's sizes along ``free_dim``
    (``[rank][tensor]``), or None without one. Exchanges a fixed-size int64 tensor:
    (count, digest, the first sizes); only a mismatch pays for gathering the details."""
    sizes = [_free_size(t, free_dim) for t in tensors] if free_dim is not None else []
    inline = (sizes[:_INLINE] + [0] * _INLINE)[:_INLINE]
    rows = _all_gather_ints([len(tensors), _digest(tensors, free_dim), *inline], group)
    if any(row[:2] != rows[0][:2] for row in rows):
        _raise_mismatch(tensors, what, free_dim, group)
    if free_dim is None:
        return None
    if len(tensors) <= _INLINE:
        return [row[2:2 + len(tensors)] for row in rows]
    rest = _all_gather_ints(sizes[_INLINE:], group)
    return [row[2:] + more for row, more in zip(rows, rest)]


def _raise_mismatch(tensors: list[torch.Tensor], what: str, free_dim: int | None,
                    group=None) -> None:
    metas: list = [None] * world(group)
    collective("all_gather_object", dist.all_gather_object, metas,
               [(list(t.shape), str(t.dtype)) for t in tensors], group=group)
    desc = "; ".join(f"rank {r}: {[(s, d) for s, d in m]}" for r, m in enumerate(metas))
    ignored = f" (other than dim {free_dim})" if free_dim is not None else ""
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
    check_same(tensors, "gather", group=group)
    return rebuild(data, [_all_gather(t, group) for t in tensors])


def _all_gather(t: torch.Tensor, group=None) -> torch.Tensor:
    t = t.contiguous()
    flat = t.unsqueeze(0) if t.ndim == 0 else t
    parts = [torch.empty_like(flat) for _ in range(world(group))]
    collective("all_gather", dist.all_gather, parts, flat, group=group, tensor=flat)
    return torch.cat(parts, dim=0)


def gather_uneven(data: Any, group=None, keep: Callable[[torch.Tensor], int] | None = None) -> Any:
    """Like ``gather`` but dim 0 may differ across ranks; ``keep(t)`` rows of each local
    tensor are kept (the rest is padding)."""
    tensors = _tensors(data, "gather_for_metrics")
    if keep is not None:
        tensors = [t[: keep(t)] if t.ndim else t for t in tensors]
    if world(group) == 1:
        return rebuild(data, tensors)
    sizes = check_same(tensors, "gather_for_metrics", free_dim=0, group=group)
    out = []
    for i, t in enumerate(tensors):
        rows = [per_rank[i] for per_rank in sizes]
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
    collective("all_gather_object", dist.all_gather_object, out, obj, group=group)
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
    check_same(tensors, "reduce", group=group)
    dist_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM,
               "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    out = []
    for t in tensors:
        r = t.detach().clone()
        collective("all_reduce", dist.all_reduce, r, op=dist_op, group=group, tensor=r)
        if op == "mean":
            r = r / n if r.is_floating_point() or r.is_complex() else r.double() / n
        out.append(r)
    return rebuild(data, out)


def broadcast(data: Any, src: int = 0, group=None) -> Any:
    """``src``'s tensors on every rank; tensors must already have the same shapes."""
    if world(group) == 1:
        return data
    tensors = _tensors(data, "broadcast")
    check_same(tensors, "broadcast", group=group)
    out = []
    for t in tensors:
        r = t.detach().clone().contiguous()
        collective("broadcast", dist.broadcast, r, src=src, group=group, tensor=r)
        out.append(r)
    return rebuild(data, out)


def barrier(group=None) -> None:
    collective("barrier", dist.barrier, group=group)


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    if world(group) == 1:
        return obj
    box = [obj]
    collective("broadcast_object_list", dist.broadcast_object_list, box, src=src, group=group)
    return box[0]


def pad_across_processes(data: Any, dim: int = 0, pad_index: int = 0, pad_first: bool = False,
                         group=None) -> Any:
    """Pad every tensor along ``dim`` to the largest size any rank has."""
    if world(group) == 1:
        return data
    tensors = _tensors(data, "pad_across_processes")
    for t in tensors:
        if t.ndim == 0 or not -t.ndim <= dim < t.ndim:
            raise OverdriveError(f"pad_across_processes: dim={dim} is out of range for a "
                                 f"tensor of shape {list(t.shape)}")
    sizes = check_same(tensors, "pad_across_processes", free_dim=dim, group=group)
    out = []
    for i, t in enumerate(tensors):
        target = max(per_rank[i] for per_rank in sizes)
        out.append(_pad_dim(t, dim % t.ndim, target, pad_index, pad_first))
    return rebuild(data, out)


def _pad_dim(t: torch.Tensor, dim: int, size: int, value, first: bool) -> torch.Tensor:
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    fill = t.new_full(shape, value)
    return torch.cat([fill, t] if first else [t, fill], dim=dim)
