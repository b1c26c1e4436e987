"""Data sharding: ``rt.shard(loader)`` → this data-parallel rank's slice of every epoch.

Map-style data is sharded at the index level (sampling.py): the user's batch sampler —
with a seeded, epoch-aware permutation in place of ``shuffle=True`` — yields the global
batches and this rank takes its share. Resuming skips consumed batches there, so their
samples are never read. Iterable data is either read by rank 0 and scattered
(``dispatch``, the default for iterable datasets) or read by every rank, each keeping its
share. (``dispatch=True`` is refused for map-style data: every rank reads its own indices.)

``even_batches`` pads the tail by wrapping around to the epoch's first samples so every
rank yields the same number of equally sized batches; each batch remembers how many of
its rows are real, and ``rt.gather_for_metrics`` drops the rest.
"""

from __future__ import annotations

import copy
import itertools
import logging
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import (BatchSampler, DataLoader, DistributedSampler, IterableDataset,
                              RandomSampler, SubsetRandomSampler, WeightedRandomSampler)
from torch.utils.data._utils.collate import default_collate

from ..errors import OverdriveError
from . import loss_norm
from .sampling import (FlaggedCollate, IterableShard, SeededRandomSampler, ShardBatchSampler,
                       shard_indices, sharded_len)
from .state import mesh_coordinates
from .step_metrics import token_counter

log = logging.getLogger("overdrive")

# DataLoader arguments copied from the user's loader when it is rebuilt.
_LOADER_ARGS = ("num_workers", "pin_memory", "timeout", "worker_init_fn",
                "multiprocessing_context", "generator", "prefetch_factor",
                "persistent_workers", "pin_memory_device", "in_order")

# Random samplers that draw from their ``generator``: rt.shard gives them one seeded from
# (seed, epoch) before every epoch, so all ranks draw the same global order.
_SEEDABLE_SAMPLERS = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)


# --------------------------------------------------------------------------- the loader


class ShardedLoader:
    """What ``rt.shard`` returns: iterate it like the user's loader.

    ``state_dict()`` / ``load_state_dict()`` hold (seed, epoch, position), the position
    in global batches so it survives a change of the data-parallel size; ``set_epoch``
    changes the permutation; ``len()`` is this rank's number of batches.
    """

    def __init__(self, loader: DataLoader, rt, *, split_batches: bool = False,
                 even_batches: bool = True, dispatch: bool | None = None,
                 device_placement: bool = True):
        if not isinstance(loader, DataLoader):
            raise OverdriveError(f"rt.shard expects a torch DataLoader, got "
                                 f"{type(loader).__name__}")
        _refuse_distributed_sampler(loader)
        self.rt = rt
        self.base = loader
        self.rank, self.size = rt.dp_rank, rt.dp_size
        self.split = split_batches
        self.even = even_batches and self.size > 1  # one rank: nothing to even out
        self.iterable = isinstance(loader.dataset, IterableDataset)
        if dispatch and not self.iterable:
            raise OverdriveError(
                f"rt.shard(dispatch={dispatch!r}): dispatch is for iterable datasets; a "
                f"map-style dataset ({type(loader.dataset).__name__}) is sharded by index and "
                "every rank reads its own samples. Leave dispatch=None (or False)")
        self.dispatch = self.iterable if dispatch is None else bool(dispatch)
        self.device = rt.device if device_placement else None
        self.non_blocking = rt.device.type == "cuda"
        # the passes' batch transforms (context parallel's sequence split), if any
        self.shard_sequence = rt.shard_sequence if rt._handoff.batch_transforms else None
        self.batch_size = self._batch_size(loader)
        if split_batches and self.batch_size % self.size:
            raise OverdriveError(
                f"split_batches=True: the loader's batch size {self.batch_size} is not "
                f"divisible by the {self.size} data-parallel ranks; use a multiple of "
                f"{self.size} or split_batches=False")
        self.drop_last = self._drop_last(loader)
        # the position: global batches of this epoch consumed (by every rank together,
        # counted in the user's batches), so it survives a change of the dp size; each
        # batch of this rank stands for one global batch (split) or one per dp rank
        self.epoch, self.consumed, self._skip = 0, 0, 0
        self._per_batch = 1 if split_batches else self.size
        self.seed = self._agree_on_seed(loader)
        # DataLoader draws its workers' base seed from the *global* torch RNG at every
        # iter() unless it has a generator: a resumed run would draw at a different point
        # and shift every later random number (dropout). Our own, seeded per epoch, keeps
        # the global stream untouched and worker seeds reproducible.
        self._iter_gen = torch.Generator() if loader.generator is None else None
        if getattr(loader, "in_order", True) is False:
            log.info("rt.shard: the loader's in_order=False is not kept: each batch's "
                     "padding count is matched to it by order, so batches come in order")
        self.sampler = None
        self._sampler_gen = None  # the seeded generator given to a random sampler
        self.loader = self._rebuild(loader)
        self._transport = Dispatch(rt) if self.loader is None else None
        # the batch being consumed (batch_len: its rows), its real rows, whether it is the last
        self._batch, self.n_real, self.end_of_epoch = None, 0, False
        # the step the batch being consumed belongs to (loss_norm.StepShare), under
        # loss_normalization "tokens" / "auto"; None otherwise
        self.share = None
        self._counter = loss_norm.step_counter(rt, self)
        self._iterating = False

    # -- construction ------------------------------------------------------------
    @staticmethod
    def _batch_size(loader: DataLoader) -> int:
        if loader.batch_size is not None:
            return loader.batch_size
        bs = getattr(loader.batch_sampler, "batch_size", None)
        if bs is None:
            raise OverdriveError(
                "rt.shard needs to know the batch size: give the DataLoader batch_size=N or "
                "a batch_sampler with a batch_size attribute")
        return bs

    @staticmethod
    def _drop_last(loader: DataLoader) -> bool:
        return bool(getattr(loader.batch_sampler, "drop_last", loader.drop_last))

    def _agree_on_seed(self, loader: DataLoader) -> int:
        """The shuffle seed every rank uses: ``Plan.seed``, else the loader's generator's,
        else one drawn from torch's default generator as ``DataLoader(shuffle=True)`` does
        (so ``torch.manual_seed`` makes the order repeat); rank 0's is broadcast."""
        if self.rt.plan.seed is not None:
            return self.rt.plan.seed
        gen = loader.generator
        if gen is not None:
            seed = gen.initial_seed()
        else:  # every rank draws, so their default generators stay in step
            seed = int(torch.empty((), dtype=torch.int64).random_().item()) % 2**31
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [seed]
            dist.broadcast_object_list(box, src=0)
            seed = box[0]
        return int(seed)

    def _loader_kwargs(self, loader: DataLoader) -> dict[str, Any]:
        kw = {k: getattr(loader, k) for k in _LOADER_ARGS if hasattr(loader, k)}
        if kw.get("num_workers", 0) == 0:
            kw.pop("prefetch_factor", None), kw.pop("persistent_workers", None)
        if self.device is not None and self.device.type == "cuda":
            kw["pin_memory"] = True
        if "in_order" in kw:
            kw["in_order"] = True  # batches are matched to their padding counts by order
        if self._iter_gen is not None:
            kw["generator"] = self._iter_gen
        return kw

    def _rebuild(self, loader: DataLoader) -> DataLoader | None:
        collate = loader.collate_fn or default_collate
        kw = self._loader_kwargs(loader)
        if self.iterable and self.dispatch:
            return None  # rank 0 iterates the user's loader itself (see _dispatched)
        common = dict(split=self.split, even=self.even, batch_size=self.batch_size,
                      drop_last=self.drop_last)
        if self.iterable:
            per_rank = self.batch_size // self.size if self.split else self.batch_size
            ds = IterableShard(loader.dataset, self.rank, self.size, **common)
            # workers are started per epoch: each must see the epoch's resume position
            kw.pop("persistent_workers", None)
            return DataLoader(ds, batch_size=per_rank, collate_fn=FlaggedCollate(collate), **kw)
        self.sampler = self._global_batch_sampler(loader)
        self.batch_sampler = ShardBatchSampler(self.sampler, self.rank, self.size, **common)
        return DataLoader(loader.dataset, batch_sampler=self.batch_sampler, collate_fn=collate,
                          **kw)

    def _global_batch_sampler(self, loader: DataLoader):
        bs = loader.batch_sampler
        if type(bs) is not BatchSampler:
            return bs  # a custom batch sampler yields the global batches itself
        sampler = bs.sampler
        if type(sampler) is RandomSampler:
            sampler = SeededRandomSampler(len(sampler.data_source), self.seed,
                                          replacement=sampler.replacement,
                                          num_samples=sampler._num_samples)
        elif isinstance(sampler, _SEEDABLE_SAMPLERS):  # a copy: the user's keeps its own
            sampler = copy.copy(sampler)
            sampler.generator = self._sampler_gen = torch.Generator()
        return BatchSampler(sampler, bs.batch_size, bs.drop_last)

    # -- epochs and resumption ---------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation. Setting the epoch a loaded state is in keeps
        the resume position."""
        if epoch != self.epoch:
            self.epoch, self._skip, self.consumed = epoch, 0, 0

    def _apply_epoch(self) -> None:
        if self._iter_gen is not None:
            self._iter_gen.manual_seed(self.seed * 100_003 + self.epoch)
        if self._sampler_gen is not None:
            self._sampler_gen.manual_seed(self.seed + self.epoch)
        for obj in (self.sampler, getattr(self.sampler, "sampler", None), self.base.dataset):
            if obj is not None and hasattr(obj, "set_epoch"):
                obj.set_epoch(self.epoch)

    @property
    def position(self) -> int:
        """This rank's batches of the epoch consumed (with the current dp size)."""
        return self.consumed // self._per_batch

    def state_dict(self) -> dict[str, int]:
        """(seed, epoch) and the position in global terms: ``global_batches`` of the
        user's ``batch_size`` consumed by all ``dp_size`` ranks together. ``position`` is
        this rank's batch count, for reading only."""
        return {"epoch": self.epoch, "seed": self.seed, "global_batches": self.consumed,
                "batch_size": self.batch_size, "samples": self.consumed * self.batch_size,
                "dp_size": self.size, "position": self.position}

    def check_state_dict(self, state: dict[str, int]) -> None:
        """Raise for a position ``load_state_dict`` would refuse, changing nothing
        (``rt.load`` checks every loader's before restoring any)."""
        self._global_position(state)
        int(state["epoch"]), int(state.get("seed", self.seed))

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where ``state`` left off, also when it was saved on another number of
        data-parallel ranks: the remaining global batches are dealt out anew."""
        consumed = self._global_position(state)
        self.epoch, self.seed = int(state["epoch"]), int(state.get("seed", self.seed))
        self.consumed = self._skip = consumed
        if isinstance(self.sampler, BatchSampler) and \
                isinstance(self.sampler.sampler, SeededRandomSampler):
            self.sampler.sampler.seed = self.seed

    def _global_position(self, state: dict[str, int]) -> int:
        if "global_batches" not in state:  # saved before positions were global: same layout
            return int(state["position"]) * self._per_batch
        consumed = int(state["global_batches"])
        saved_bs = int(state.get("batch_size", self.batch_size))
        if saved_bs == self.batch_size:
            return consumed
        samples = consumed * saved_bs
        if samples % self.batch_size:
            raise OverdriveError(
                f"loader state: {consumed} global batches of batch_size={saved_bs} "
                f"({samples} samples) were consumed, which is not a whole number of "
                f"batches of this loader's batch_size={self.batch_size}; resume with "
                f"batch_size={saved_bs} (or a divisor of {samples})")
        return samples // self.batch_size

    def __len__(self) -> int:
        if self.loader is not None and not self.iterable:
            return len(self.batch_sampler)
        n_samples = len(self.base.dataset)  # iterable datasets that define __len__
        n = n_samples // self.batch_size if self.drop_last else -(-n_samples // self.batch_size)
        last = n_samples - (n - 1) * self.batch_size if n and not self.drop_last else \
            self.batch_size
        return sharded_len(n, last, self.rank, self.size, split=self.split, even=self.even,
                           batch_size=self.batch_size, drop_last=self.drop_last)

    # -- iteration ---------------------------------------------------------------
    @property
    def batch_len(self) -> int:
        """Rows of the batch being consumed (read when asked: gather_for_metrics, the
        step metrics), 0 before the first batch."""
        return _rows(self._batch)

    def __iter__(self) -> Iterator[Any]:
        self._apply_epoch()
        skip, self._skip = self._skip, 0
        self.consumed = skip
        items = self._batches(skip)  # (batch, n_real)
        counter = self._counter if self.rt.model.training else None
        if counter is not None:  # read a step ahead: (batch, n_real, StepShare | None)
            items = counter.windows(items)
        self.share = None
        # the active loader is the one whose batch was yielded last (its last batch syncs,
        # gather_for_metrics trims its padding); a loop nested in ours hands it back
        rt, per_batch, place = self.rt, self._per_batch, self._placer()
        outer = rt._active_loader
        # the step meter (fixed for the runtime's life) counts training batches only; the
        # tokens' place in a batch is found at the epoch's first batch
        meter = getattr(rt, "_meter", None) if rt.model.training else None
        count_tokens, resolve = None, meter is not None
        self._iterating = True
        try:
            nxt = next(items, _END)
            while nxt is not _END:
                if counter is None:
                    batch, n_real = nxt
                else:
                    batch, n_real, self.share = nxt
                nxt = next(items, _END)
                self.end_of_epoch = nxt is _END
                self._batch, self.n_real = batch, n_real
                self.consumed += per_batch
                rt._active_loader = self
                if meter is not None:
                    if resolve:  # None: these batches hold no token tensor
                        count_tokens, resolve = token_counter(batch), False
                    meter.on_batch(batch, n_real,
                                   0 if count_tokens is None else count_tokens(batch, n_real))
                yield batch if place is None else place(batch)
            ledger = getattr(self.rt, "_ledger", None)
            if ledger is not None:  # a sync point: every rank ends the epoch together
                ledger.point(f"rt.shard epoch {self.epoch} end")
            self.epoch, self.consumed = self.epoch + 1, 0
        finally:
            self._iterating = False
            if self.rt._active_loader is self:
                self.rt._active_loader = outer if getattr(outer, "_iterating", False) else None

    def _batches(self, skip: int) -> Iterator[tuple[Any, int]]:
        if self.loader is None:
            return self._dispatched(skip)
        if self.iterable:
            self.loader.dataset.skip = skip  # streams are read up to the position
            return iter(self.loader)
        self.batch_sampler.skip = skip
        real = self.batch_sampler.meta.popleft
        return ((batch, real()) for batch in self.loader)

    def _dispatched(self, skip: int) -> Iterator[tuple[Any, int]]:
        """Global rank 0 reads raw samples with the user's loader settings and sends each
        data-parallel rank its batch (TP/CP peers get the same one, see ``Dispatch``);
        every rank collates its own."""
        source = msgs = None
        transport = self._transport
        if transport.is_source:
            raw = DataLoader(self.base.dataset, batch_size=self.batch_size,
                             collate_fn=_as_list, **self._loader_kwargs(self.base))
            source = _with_last(_grouped(iter(raw), self.size, self.split, self.even,
                                         self.batch_size, self.drop_last, skip))
        collate = self.base.collate_fn or default_collate
        while True:
            if transport.is_source:
                item = next(source, None)
                msgs = [None] * self.size if item is None else item
            got = transport.receive(msgs)
            if got is None:
                return
            entry, last = got
            if entry is not None:  # (samples, n_real); None once this rank ran out
                yield collate(entry[0]), entry[1]
            if last:
                return

    def _placer(self):
        """What each batch goes through before it is yielded (None: nothing to do)."""
        if self.shard_sequence is None and self.device is not None \
                and self.device.type == "cpu":
            return _on_cpu  # a CPU run: only tensors not on the CPU are moved
        if self.device is None and self.shard_sequence is None:
            return None
        return self._place

    def _place(self, batch: Any) -> Any:
        if self.device is not None:
            batch = _to_device(batch, self.device, self.non_blocking)
        if self.shard_sequence is not None:
            batch = self.shard_sequence(batch)
        return batch

    def __repr__(self) -> str:
        return (f"ShardedLoader(rank={self.rank}/{self.size}, batch_size={self.batch_size}, "
                f"split={self.split}, even={self.even}, dispatch={self.dispatch}, "
                f"epoch={self.epoch}, position={self.position})")


_END = object()


def _refuse_distributed_sampler(loader: DataLoader) -> None:
    samplers = (loader.sampler, getattr(loader.batch_sampler, "sampler", None))
    if any(isinstance(s, DistributedSampler) for s in samplers):
        raise OverdriveError(
            "rt.shard: the DataLoader's sampler is a DistributedSampler, which already "
            "shards the data; rt.shard would shard it a second time. Pass the plain loader "
            "(shuffle=True or your own sampler): rt.shard does the sharding")


def _grouped(chunks: Iterator[list], size: int, split: bool, even: bool, batch_size: int,
             drop_last: bool, skip: int = 0) -> Iterator[list]:
    """Rank 0's view for dispatch: per step, one ``(samples, n_real)`` per rank (or None)."""
    rank_streams = [shard_indices(c, r, size, split=split, even=even, batch_size=batch_size,
                                  drop_last=drop_last, skip=skip)
                    for r, c in enumerate(itertools.tee(chunks, size))]
    for row in itertools.zip_longest(*rank_streams):
        yield list(row)


def _with_last(groups: Iterator[list]) -> Iterator[list]:
    """Each rank's ``(entry, last_step)``: every rank takes part in every scatter until
    the last step, also after its own batches ran out (no collective is left waiting)."""
    prev = next(groups, None)
    while prev is not None:
        cur = next(groups, None)
        yield [(entry, cur is None) for entry in prev]
        prev = cur


class Dispatch:
    """How a dispatched batch travels from global rank 0, the only reader, to every rank.

    Rank 0 scatters one message per data-parallel rank over the dp ranks of its own
    (pp, cp, tp) slice; each of those broadcasts it to its pp peers (every pipeline
    stage of a data rank gets the same batch), then to its cp peers (the ranks with tp
    coordinate 0), then every rank receives it from its tp peer 0. Without tp/cp the dp
    group is the default group and the scatter is all there is. Groups are looked up once.
    """

    def __init__(self, rt):
        self.is_source = rt.rank == 0
        self.size = rt.dp_size
        self.in_scatter, self.scatter_group, self.hops = True, None, []
        if rt.world_size == rt.dp_size:
            return
        coords = mesh_coordinates(rt.rank, rt.plan.parallel)
        self.in_scatter = coords["cp"] == 0 and coords["tp"] == 0 and coords["pp"] == 0
        if self.in_scatter and self.size > 1:
            self.scatter_group = rt._env.submesh("dp").get_group()
        par = rt.plan.parallel
        if par.pp > 1 and coords["cp"] == 0 and coords["tp"] == 0:
            self.hops.append(_peers(rt._env.submesh("pp")))  # every stage sees the batch
        if par.cp > 1 and coords["tp"] == 0:
            self.hops.append(_peers(rt._env.submesh("cp")))
        if par.tp > 1:
            self.hops.append(_peers(rt._env.submesh("tp")))

    def receive(self, msgs: list | None) -> Any:
        """This rank's message (every rank calls this once per step, in step)."""
        out = [None]
        if self.in_scatter:
            if self.size == 1:
                out[0] = msgs[0]
            else:
                dist.scatter_object_list(out, msgs, src=0, group=self.scatter_group)
        for group, src in self.hops:
            dist.broadcast_object_list(out, src=src, group=group)
        return out[0]


def _peers(mesh) -> tuple[Any, int]:
    """A 1-D submesh's group and the global rank of its first member."""
    group = mesh.get_group()
    return group, dist.get_global_rank(group, 0)


def _as_list(samples: list) -> list:
    return samples


def _rows(batch: Any) -> int:
    """Rows of a collated batch: the first dimension of its first tensor (or list)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.ndim else 1
    if isinstance(batch, dict):
        for v in batch.values():
            return _rows(v)
    if isinstance(batch, (list, tuple)) and batch:
        if isinstance(batch[0], (torch.Tensor, dict, list, tuple)):
            return _rows(batch[0])
        return len(batch)
    return 0


_CPU = torch.device("cpu")


def _all_cpu(batch: Any) -> bool:
    cls = type(batch)  # the common containers by type first: no isinstance chain per leaf
    if cls is torch.Tensor:
        return batch.is_cpu
    if cls is tuple or cls is list:
        return all(map(_all_cpu, batch))
    if cls is dict:
        return all(map(_all_cpu, batch.values()))
    if isinstance(batch, torch.Tensor):
        return batch.is_cpu
    if isinstance(batch, (list, tuple)):
        return all(map(_all_cpu, batch))
    if isinstance(batch, dict):
        return all(map(_all_cpu, batch.values()))
    return True


def _on_cpu(batch: Any) -> Any:
    """``_to_device(batch, cpu)`` — the batch itself when every tensor in it is on the CPU
    already (the common case, checked without rebuilding its containers)."""
    return batch if _all_cpu(batch) else _to_device(batch, _CPU, False)


def _to_device(batch: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(batch, torch.Tensor):
        if batch.is_cpu and device.type == "cpu":  # what .to() returns, without its µs
            return batch
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: _to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(v, device, non_blocking) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device, non_blocking) for v in batch)
    return batch


def shard(rt, dataloader: DataLoader, *, split_batches: bool = False, even_batches: bool = True,
          dispatch: bool | None = None, device_placement: bool = True) -> ShardedLoader:
    """Shard ``dataloader`` and register it for checkpoints (``rt._loaders``, in order).

    Sharding the same DataLoader again (an eval loader each evaluation) replaces its
    earlier ShardedLoader in the same slot, starting fresh. A new loader takes the next
    position ``rt.load`` kept for loaders not made yet (``rt._pending_loader_states``).
    """
    loader = ShardedLoader(dataloader, rt, split_batches=split_batches,
                           even_batches=even_batches, dispatch=dispatch,
                           device_placement=device_placement)
    rt._derive_grad_accum(loader)  # Plan(global_batch_size): refused before any change
    for i, known in enumerate(rt._loaders):
        if getattr(known, "base", None) is dataloader:
            rt._loaders[i] = loader
            return loader
    rt._loaders.append(loader)
    pending = rt._pending_loader_states
    if pending:
        loader.load_state_dict(pending.pop(0))
    return loader
