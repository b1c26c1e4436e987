"""Index-level sharding: which items of each global batch a data-parallel rank gets.

``shard_indices`` turns a stream of global batches (index lists, or sample lists for
iterable data) into one rank's batches, padding the tail by wrap-around when every rank
must get as many batches; ``sharded_len`` counts them without iterating. The samplers
here are what ``rt.shard`` puts into the rebuilt DataLoader.
"""

from __future__ import annotations

import collections
import itertools
import math
from typing import Iterable, Iterator

import torch
from torch.utils.data import IterableDataset, Sampler, get_worker_info


# --------------------------------------------------------------------------- index level


def shard_indices(batches: Iterable[list], rank: int, size: int, *, split: bool, even: bool,
                  batch_size: int, drop_last: bool, skip: int = 0) -> Iterator[tuple[list, int]]:
    """This rank's batches of a stream of global batches, as ``(items, n_real)``.

    Without ``split`` rank r takes global batches r, r+size, …; with ``split`` every
    global batch is cut into ``size`` slices. With ``even`` the tail is padded with the
    epoch's first items (wrap-around) so every rank gets as many full batches; ``n_real``
    counts the leading items that are not padding. Works for indices and for samples.

    ``skip``: the first ``skip`` global batches were consumed already (a resumed epoch,
    possibly on another number of ranks): they still feed the padding pool, and the rest
    is dealt out from the next global batch on.
    """
    group_len = batch_size * size if not split else batch_size
    first: list = []  # the epoch's first items: the padding pool

    def remember(batch: list) -> None:
        if len(first) < group_len:
            first.extend(batch[: group_len - len(first)])

    def pad(n: int) -> list:
        pool = first or [None]
        return [pool[i % len(pool)] for i in range(n)]

    if split:
        per = batch_size // size
        for i, batch in enumerate(batches):
            remember(batch)
            if i < skip:
                continue
            real = len(batch)
            if real < batch_size and drop_last:
                return
            if real < batch_size and even:
                batch = list(batch) + pad(batch_size - real)
            mine = batch[rank * per:(rank + 1) * per]
            if mine:
                yield mine, max(0, min(per, real - rank * per))
        return

    group: list[list] = []
    pending = None  # a full group whose last batch is short: the tail, unless more follow
    for i, batch in enumerate(batches):
        remember(batch)
        if i < skip:
            continue
        if pending is not None:
            yield pending[rank], len(pending[rank])
            pending = None
        group.append(batch)
        if len(group) == size:
            if len(group[-1]) == batch_size:
                yield group[rank], len(group[rank])
            else:
                pending = group
            group = []
    if pending is not None:
        group = pending
    if not group:
        return
    if not even:
        if rank < len(group):
            yield group[rank], len(group[rank])
        return
    if drop_last:
        return  # an incomplete tail group is dropped on every rank alike
    flat = [i for b in group for i in b]
    real = len(flat)
    flat = flat + pad(group_len - real)
    mine = flat[rank * batch_size:(rank + 1) * batch_size]
    yield mine, max(0, min(batch_size, real - rank * batch_size))


def sharded_len(n_batches: int, last_batch: int, rank: int, size: int, *, split: bool,
                even: bool, batch_size: int, drop_last: bool) -> int:
    """How many batches ``shard_indices`` yields for ``n_batches`` global batches whose
    last one holds ``last_batch`` items."""
    if n_batches == 0:
        return 0
    if split:
        if even or last_batch == batch_size:
            return n_batches
        return n_batches - 1 + (1 if last_batch > rank * (batch_size // size) else 0)
    full_groups, rest = divmod(n_batches, size)
    if rest == 0 and last_batch == batch_size:
        return full_groups
    if rest == 0:  # the last group is complete in count but its last batch is short
        full_groups, rest = full_groups - 1, size
    if even:
        return full_groups + (0 if drop_last else 1)
    return full_groups + (1 if rank < rest else 0)


class SeededRandomSampler(Sampler[int]):
    """``RandomSampler`` whose permutation depends only on (seed, epoch): every rank
    and every resumed run sees the same order."""

    def __init__(self, n: int, seed: int, *, replacement: bool = False,
                 num_samples: int | None = None):
        self.n, self.seed, self.replacement = n, seed, replacement
        self.num_samples = num_samples if num_samples is not None else n
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.replacement:
            return iter(torch.randint(self.n, (self.num_samples,), generator=g).tolist())
        reps = math.ceil(self.num_samples / max(self.n, 1))
        perm = torch.cat([torch.randperm(self.n, generator=g) for _ in range(reps)])
        return iter(perm[: self.num_samples].tolist())


class ShardBatchSampler(Sampler[list]):
    """Yields this rank's index batches; records ``n_real`` of each in ``meta`` for
    the loader (the DataLoader iterates its batch sampler in the main process, in order).
    ``skip``: global batches of the epoch already consumed (never read)."""

    def __init__(self, batch_sampler, rank: int, size: int, *, split: bool, even: bool,
                 batch_size: int, drop_last: bool):
        self.batch_sampler = batch_sampler
        self.rank, self.size, self.split, self.even = rank, size, split, even
        self.batch_size, self.drop_last = batch_size, drop_last
        self.skip = 0
        self.meta: collections.deque = collections.deque()

    def __iter__(self) -> Iterator[list]:
        self.meta.clear()
        note = self.meta.append
        if self.size == 1 and not self.split and not self.even:
            # one rank, nothing to pad: every global batch is this rank's, as it comes
            # (what shard_indices yields there, without its per-batch bookkeeping)
            for indices in itertools.islice(self.batch_sampler, self.skip, None):
                note(len(indices))
                yield indices
            return
        batches = shard_indices(self.batch_sampler, self.rank, self.size, split=self.split,
                                even=self.even, batch_size=self.batch_size,
                                drop_last=self.drop_last, skip=self.skip)
        for indices, n_real in batches:
            note(n_real)
            yield indices

    def __len__(self) -> int:
        """This rank's batches. The length of the last global batch is known when the
        batch sampler has a sized ``sampler`` (BatchSampler); a custom batch sampler's are
        taken as full. If its last one is short, len() can be one more than the batches
        yielded when split_batches goes with even_batches=False or drop_last, or
        even_batches with drop_last (the only layouts where a short last batch changes
        the count); the other layouts are exact."""
        n = len(self.batch_sampler)
        sampler = getattr(self.batch_sampler, "sampler", None)
        last = self.batch_size
        if sampler is not None and not self.drop_last and hasattr(sampler, "__len__"):
            last = len(sampler) - (n - 1) * self.batch_size if n else 0
        return sharded_len(n, last, self.rank, self.size, split=self.split, even=self.even,
                           batch_size=self.batch_size, drop_last=self.drop_last)


# --------------------------------------------------------------------------- iterable level


class IterableShard(IterableDataset):
    """Every rank reads the whole stream and keeps its share (``dispatch=False``).

    Yields ``(sample, is_real)``; loader workers split the global batches among
    themselves so no sample is produced twice (each reads the whole stream: a dataset
    that splits itself by ``get_worker_info()`` must use dispatch instead). ``skip``:
    global batches of the epoch already consumed (read and dropped: a stream has no index
    to jump to).
    """

    def __init__(self, dataset, rank: int, size: int, *, split: bool, even: bool,
                 batch_size: int, drop_last: bool):
        self.dataset = dataset
        self.kw = dict(split=split, even=even, batch_size=batch_size, drop_last=drop_last)
        self.rank, self.size = rank, size
        self.group_len = batch_size * size if not split else batch_size
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        it = iter(self.dataset)
        # global batches of samples; shard_indices cuts them like index batches
        per_batch = self.kw["batch_size"]
        samples = iter(lambda: list(itertools.islice(it, per_batch)), [])
        mine = shard_indices(samples, self.rank, self.size, skip=self.skip, **self.kw)
        for step, (batch, n_real) in enumerate(mine):
            if step % n_workers == worker:
                for i, sample in enumerate(batch):
                    yield sample, i < n_real


class FlaggedCollate:
    """Collates ``(sample, is_real)`` pairs into ``(batch, n_real)``."""

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn

    def __call__(self, pairs):
        return self.collate_fn([s for s, _ in pairs]), sum(1 for _, real in pairs if real)
