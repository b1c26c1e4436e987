"""Forward hooks that bring offloaded weights in for one unit's forward and drop them after.

An offloaded parameter keeps its ``nn.Parameter`` object (so tied modules keep sharing
it); between forwards its ``data`` is a one-element placeholder expanded to its shape.
The pre-hook of unit *i* swaps the real tensor in and schedules units *i+1 … i+prefetch*
(wrapping around: the next forward, a ``generate`` step, starts at unit 0) on a
background thread, so reading the next blocks overlaps the current block's compute;
the post-hook swaps the placeholders back, freeing the loaded copy. On the CPU a loaded
tensor is a view of the mapped offload file: the prefetch thread faults the next unit's
pages in, the post-hook drops the finished unit's pages from this process.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from .offload_store import OffloadStore


def placeholder(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A stand-in of ``t``'s shape that holds one element."""
    return torch.zeros((), dtype=dtype, device=device).expand(t.shape)


@dataclass
class Unit:
    """One hooked module and the offloaded parameters it brings in (its own, and its
    subtree's unless a nested unit owns them)."""

    module: str
    keys: list[str]
    params: list[nn.Parameter]


class Offloader:
    """Runs the units' loads; one background thread prefetches ahead."""

    def __init__(self, units: list[Unit], store: OffloadStore, device: torch.device,
                 prefetch: int):
        self.units, self.store, self.device = units, store, device
        self.prefetch = min(prefetch, max(len(units) - 1, 0))
        self.pending: dict[int, Future] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="overdrive-offload") \
            if self.prefetch else None
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        if self._stream is None:
            store.map_disk()
        self._files = [store.files(u.keys) for u in units]  # mapped files (CPU runs only)
        self._stand_ins = [[placeholder(p, device, p.dtype) for p in u.params] for u in units]
        self.loads = 0  # tensors brought in (for the report and tests)

    def _load(self, i: int, ahead: bool = False) -> tuple[list[torch.Tensor], object]:
        if self._stream is None:
            tensors = [self.store.load(k, self.device) for k in self.units[i].keys]
            if ahead:
                self.store.warm(self._files[i])
            return tensors, None
        with torch.cuda.stream(self._stream):
            tensors = [self.store.load(k, self.device) for k in self.units[i].keys]
            event = torch.cuda.Event()
            event.record(self._stream)
        return tensors, event

    def _schedule(self, i: int) -> None:
        n = len(self.units)
        window = {(i + d) % n for d in range(1, self.prefetch + 1)}
        for j in list(self.pending):
            if j not in window:
                del self.pending[j]
        for j in sorted(window, key=lambda j: (j - i) % n):
            if j not in self.pending:
                self.pending[j] = self._pool.submit(self._load, j, True)

    def bring_in(self, i: int) -> None:
        future = self.pending.pop(i, None)
        if self._pool is not None:
            self._schedule(i)
        tensors, event = future.result() if future is not None else self._load(i)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            for t in tensors:
                t.record_stream(torch.cuda.current_stream(self.device))
        for p, t in zip(self.units[i].params, tensors):
            p.data = t if t.dtype == p.dtype else t.to(p.dtype)
        self.loads += len(tensors)

    def release(self, i: int) -> None:
        for p, stand_in in zip(self.units[i].params, self._stand_ins[i]):
            p.data = stand_in
        self.store.evict(self._files[i])  # pages only: a unit sharing a file refaults it

    def install(self, model: nn.Module) -> list:
        handles = []
        for i, unit in enumerate(self.units):
            module = model.get_submodule(unit.module)
            handles.append(module.register_forward_pre_hook(
                lambda m, args, i=i: self.bring_in(i)))
            handles.append(module.register_forward_hook(
                lambda m, args, out, i=i: self.release(i), always_call=True))
        return handles

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()
