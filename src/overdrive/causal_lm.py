"""What a model's loss is taken over: the one place that reads a model's loss convention.

Neutral ground (no pass, no runtime): context parallelism uses it to shift labels before
the sequence split, the runtime (``runtime/loss_norm.py``) to count the targets of a step
for ``Plan(loss_normalization="tokens")``. The counting rule is transformers Trainer's:
``shift_labels`` when the batch carries them, ``labels[..., 1:]`` for a model whose loss
shifts the labels itself (a causal LM), else ``labels``; a target is valid when it is not
``IGNORE_INDEX``.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch
from torch import nn

IGNORE_INDEX = -100
_NOT_MAPPINGS = (tuple, list, torch.Tensor)


def _forward_params(model: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(type(model).forward).parameters)
    except (TypeError, ValueError):
        return {}


def takes_shift_labels(model: nn.Module) -> bool:
    """A model whose forward names ``shift_labels`` and ``num_items_in_batch`` (overdrive's
    Llama): its loss shifts ``labels`` itself and accepts targets shifted beforehand."""
    params = _forward_params(model)
    return "shift_labels" in params and "num_items_in_batch" in params


def is_transformers_causal_lm(model: nn.Module) -> bool:
    """A transformers model whose loss is ``ForCausalLMLoss`` (it shifts ``labels``)."""
    loss = getattr(model, "loss_function", None) if hasattr(model, "loss_type") else None
    if getattr(loss, "__name__", None) != "ForCausalLMLoss":
        return False
    return getattr(getattr(model, "config", None), "is_encoder_decoder", False) is not True


def shifts_labels(model: nn.Module) -> bool:
    """The model's loss scores position ``t`` against ``labels[t + 1]``."""
    return is_transformers_causal_lm(model) or takes_shift_labels(model)


def takes_num_items(model: nn.Module) -> bool:
    """The model's forward divides its summed token losses by a ``num_items_in_batch``
    it is given: named in its signature (overdrive's Llama), or a transformers causal LM
    whose forward hands its ``**kwargs`` to ``self.loss_function`` (``ForCausalLMLoss``;
    ``accepts_loss_kwargs`` is read as the Trainer reads it). Anything else — a model
    computing its own mean (T5, classification heads), source that cannot be read — is
    rescaled from its mean loss instead, which is exact too."""
    params = _forward_params(model)
    if "num_items_in_batch" in params:
        return True
    if not is_transformers_causal_lm(model) or getattr(model, "accepts_loss_kwargs", True) is False:
        return False
    if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return False
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return False
    return "self.loss_function(" in source


def targets(batch: Any, shifts: bool) -> torch.Tensor | None:
    """The batch's targets as the loss sees them (the rule above), or None when the batch
    is not a mapping carrying a ``labels`` / ``shift_labels`` tensor."""
    cls = type(batch)  # a tuple or tensor batch is answered without the Mapping ABC check
    if cls in _NOT_MAPPINGS or (cls is not dict and not isinstance(batch, Mapping)):
        return None
    shifted = batch.get("shift_labels")
    if isinstance(shifted, torch.Tensor):
        return shifted
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor):
        return None
    return labels[..., 1:] if shifts and labels.ndim >= 1 else labels


def count_targets(batch: Any, shifts: bool) -> torch.Tensor | None:
    """How many valid targets ``batch`` holds (a 0-d int64 tensor on the labels' device)."""
    t = targets(batch, shifts)
    return None if t is None else (t != IGNORE_INDEX).sum()
