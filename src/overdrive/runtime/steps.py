"""``rt.forward_backward`` and ``rt.evaluate``: one micro-step that works under every plan.

Without pipeline parallelism it is the forward the loop would write (``model(**batch)``,
``model(batch)`` or ``model(*batch)``), the loss (``output.loss`` or ``loss_fn(output,
batch)``) and ``rt.backward`` (scaled by ``1/grad_accum``, inside ``rt.accumulate`` as
usual). For a batch of ``rt.shard``'s loader under ``Plan(loss_normalization="tokens")``
(or "auto" with labels) the loss is normalised by the global step's target count
instead (``loss_norm.py``). Under pp the pipeline runner splits the batch into
micro-batches and runs the schedule.
"""

from __future__ import annotations

from typing import Any

import torch

from .loss_norm import current_share, normalised_loss
from .loss_parallel import local_loss
from .pipeline import LossFn, call_args, loss_of


def forward_backward(rt, batch: Any, loss_fn: LossFn = None) -> torch.Tensor:
    with rt._loss_parallel():  # Parallel(loss_parallel=True): the loss_fn and backward too
        return _forward_backward(rt, batch, loss_fn)


def _forward_backward(rt, batch: Any, loss_fn: LossFn = None) -> torch.Tensor:
    if rt._pipeline is not None:
        loss = rt._pipeline.forward_backward(batch, loss_fn)
        if getattr(rt, "_meter", None) is not None:  # step metrics see the loss, as rt.backward's
            rt._meter.on_backward(loss)
        return loss
    args, kwargs = call_args(batch)
    share = current_share(rt) if rt.model.training else None
    if share is None:  # loss_normalization "batch": the mean of micro-batch means
        loss = local_loss(loss_of(rt.model(*args, **kwargs), batch, loss_fn))
        rt.backward(loss)
        return loss.detach()
    # "tokens": this micro-batch's share of the step's global token mean (loss_norm.py)
    call = lambda extra: rt.model(*args, **{**kwargs, **extra})  # noqa: E731
    shown = local_loss(normalised_loss(rt, share, call, batch, loss_fn))
    undo = rt.grad_accum / share.micro  # rt.backward divides by grad_accum: k may be fewer
    rt._run_backward(shown * undo if undo != 1.0 else shown, shown, {})
    return shown.detach()


def evaluate(rt, batch: Any, loss_fn: LossFn = None) -> torch.Tensor:
    if rt._pipeline is not None:
        return rt._pipeline.evaluate(batch, loss_fn)
    args, kwargs = call_args(batch)
    with torch.no_grad(), rt._loss_parallel():
        return local_loss(loss_of(rt.model(*args, **kwargs), batch, loss_fn)).detach()
