"""``Plan(loss_normalization="tokens")``: one optimizer step's loss is its global token mean.

The gradient of a step is that of (sum of the per-token losses of every micro-batch on
every data and context-parallel rank) / (the valid targets of the whole global step) —
what one process computes on the whole global batch, whatever the dp × grad_accum × cp
split. How:

- ``rt.shard``'s loader reads each step's micro-batches ahead (``StepCounter.windows``:
  ``grad_accum`` of them, fewer at an epoch's end), counts their valid targets
  (``causal_lm.count_targets``: ``shift_labels``, ``labels[..., 1:]`` for a label-shifting
  causal LM, else ``labels``; -100 is ignored) and all-reduces that count once per step
  over the data-parallel ranks (context-parallel peers read the same batch).
- ``rt.forward_backward`` (``normalised_loss``) makes each micro-batch's loss its share:
  a model that takes ``num_items_in_batch`` (transformers' causal LMs, overdrive's Llama)
  gets N / (R · k) — N the step's targets, R = dp × cp the ranks gradients are averaged
  over, k the step's micro-batches — and divides its summed token losses by it; another
  model's mean loss is rescaled by (its micro-batch's valid targets) / (N / (R · k)).
  The backward undoes ``rt.backward``'s 1/grad_accum, so a short last step of an epoch
  is exact too.
- The returned (and logged) value is that share: its mean over the step's micro-batches
  and the dp × cp ranks — what the step metrics take (``step_metrics.py``) — is the exact
  global mean.

``"batch"`` (and ``"auto"`` for batches without labels, or under pp) keeps ``rt.backward``'s
meaning: the mean of micro-batch means.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist

from ..causal_lm import count_targets, shifts_labels, takes_num_items
from ..errors import OverdriveError

log = logging.getLogger("overdrive")


@dataclass(frozen=True)
class LossKind:
    """How the model's loss is taken, read once from its forward (``causal_lm.py``)."""

    shifts: bool  # its loss scores position t against labels[t + 1]
    num_items: bool  # its forward takes num_items_in_batch

    @classmethod
    def of(cls, model) -> "LossKind":
        return cls(shifts_labels(model), takes_num_items(model))


@dataclass(frozen=True)
class StepShare:
    """The step a micro-batch belongs to: ``targets`` valid targets over every micro-batch
    of every data rank (a 0-d float64 tensor on the device), ``micro`` micro-batches."""

    targets: torch.Tensor
    micro: int


class StepCounter:
    """Reads a sharded loader's batches one optimizer step ahead and counts their targets
    (one all-reduce of one number per step over the data-parallel ranks)."""

    def __init__(self, rt, explicit: bool):
        self.rt, self.explicit = rt, explicit
        self.kind: LossKind = rt._loss_kind
        self._group, self._group_known = None, False  # looked up at the first count

    def windows(self, batches: Iterator[tuple[Any, int]]) -> Iterator[tuple[Any, int, Any]]:
        """``(batch, n_real, StepShare | None)`` for every batch, in order."""
        rt = self.rt
        while True:
            window = list(itertools.islice(batches, max(1, int(rt.grad_accum))))
            if not window:
                return
            share = self._share(window)
            for batch, n_real in window:
                yield batch, n_real, share

    def _share(self, window: list) -> StepShare | None:
        shifts, counts = self.kind.shifts, []
        for batch, _ in window:
            count = count_targets(batch, shifts)
            if count is None:  # a batch without labels: the step keeps the batch mean
                if self.explicit:
                    raise OverdriveError(
                        "loss_normalization='tokens': a batch of the loader is not a mapping "
                        "with a 'labels' (or 'shift_labels') tensor, so its target tokens "
                        "cannot be counted; give the batches labels (-100 marks ignored "
                        "targets) or use Plan(loss_normalization='batch')")
                return None
            counts.append(count)
        local = sum(int(c) for c in counts)
        total = torch.tensor(float(local), dtype=torch.float64, device=self.rt.device)
        if self.rt.dp_size > 1:
            if not self._group_known:
                self._group, self._group_known = self.rt._dp_group(), True
            dist.all_reduce(total, group=self._group)
        return StepShare(total.clamp(min=1.0), len(window))


def step_counter(rt, loader) -> StepCounter | None:
    """The loader's step counter under ``loss_normalization`` "tokens" / "auto", or None."""
    mode = rt.plan.loss_normalization
    if mode == "batch" or rt._pipeline is not None:
        return None
    explicit = mode == "tokens"
    if loader.size > 1 and not loader.even:
        if explicit:
            raise OverdriveError(
                "loss_normalization='tokens' with rt.shard(even_batches=False): the data "
                "ranks would end the epoch after different numbers of steps and the step's "
                "token count is added up over all of them; use even_batches=True (the "
                "default) or Plan(loss_normalization='batch')")
        return None
    return StepCounter(rt, explicit)


def current_share(rt) -> StepShare | None:
    loader = rt._active_loader
    return getattr(loader, "share", None) if loader is not None else None


def normalised_loss(rt, share: StepShare, model_call, batch: Any, loss_fn) -> torch.Tensor:
    """This micro-batch's share of the step's global token mean (see the module doc).

    ``model_call(extra_kwargs)`` runs the forward and returns the model's output."""
    from .pipeline import loss_of

    ranks = rt.dp_size * rt.plan.parallel.cp
    per_item = share.targets / (ranks * share.micro)  # N / (R · k)
    kind = rt._loss_kind
    if loss_fn is None and kind.num_items and isinstance(batch, Mapping):
        return loss_of(model_call({"num_items_in_batch": per_item}), batch, None)
    mean = loss_of(model_call({}), batch, loss_fn)
    n = count_targets(batch, kind.shifts)
    if n is None:
        raise OverdriveError(
            "loss_normalization='tokens': the batch handed to rt.forward_backward has no "
            "'labels' (or 'shift_labels') tensor to count the targets its mean loss was "
            "taken over; pass the batch the loader yielded, or use "
            "Plan(loss_normalization='batch')")
    return mean * (n.to(per_item.device, torch.float64) / per_item).to(mean.device)
