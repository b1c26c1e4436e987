"""Loss parallel: the one owner of torch's ``loss_parallel()`` context for a runtime.

With ``Parallel(loss_parallel=True)`` the tensor-parallel pass leaves the lm_head's logits
a vocab-sharded DTensor (``Shard(-1)``); torch's cross-entropy on such a DTensor, and its
backward, only work inside ``torch.distributed.tensor.parallel.loss_parallel()``. The
context is entered around the root model's forward (transformers computes ``output.loss``
there), around ``rt.forward_backward`` / ``rt.evaluate`` (a ``loss_fn`` runs after the
forward) and around ``rt.backward``, and left when each returns: nested entries count, so
the innermost exit does not switch it off under an outer one.

The loss that comes back is a plain tensor (the replicated DTensor scalar's local value,
differentiable), so the non-finite guard, loss normalisation and step metrics see an
ordinary scalar.
"""

from __future__ import annotations

import contextlib
from collections.abc import MutableMapping
from typing import Any

import torch
from torch import nn


def local_loss(loss: Any) -> Any:
    """A replicated DTensor loss as a plain tensor (gradients still flow); else as is."""
    from torch.distributed.tensor import DTensor

    return loss.full_tensor() if isinstance(loss, DTensor) else loss


class LossParallel:
    """Counts nested entries into ``loss_parallel()`` and holds one while any is open."""

    def __init__(self) -> None:
        self._depth = 0
        self._ctx: Any = None

    def enter(self) -> None:
        if self._depth == 0:
            from torch.distributed.tensor.parallel import loss_parallel

            self._ctx = loss_parallel()
            self._ctx.__enter__()
        self._depth += 1

    def exit(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(None, None, None)

    @contextlib.contextmanager
    def __call__(self):
        self.enter()
        try:
            yield
        finally:
            self.exit()

    def hook(self, model: nn.Module) -> None:
        """Around the root model's forward: enter, then exit and make ``output.loss`` local
        (also when the forward raises)."""
        def pre(_mod, _args):
            self.enter()

        def post(_mod, _args, output):
            self.exit()
            return _with_local_loss(output)

        model.register_forward_pre_hook(pre)
        model.register_forward_hook(post, always_call=True)


def _with_local_loss(output: Any) -> Any:
    if isinstance(output, MutableMapping) and isinstance(output.get("loss"), torch.Tensor):
        output["loss"] = local_loss(output["loss"])  # a ModelOutput sets .loss as well
    elif isinstance(getattr(output, "loss", None), torch.Tensor):
        try:
            output.loss = local_loss(output.loss)
        except AttributeError:  # a frozen output: the caller's loss_fn sees the DTensor
            pass
    return output
