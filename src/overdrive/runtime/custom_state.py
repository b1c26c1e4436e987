"""``rt.register_for_checkpointing(obj)``: user objects saved by ``rt.save``, restored by
``rt.load``, in registration order.

Any object with ``state_dict()`` and ``load_state_dict(state)`` (an EMA of the weights, a
custom sampler, a curriculum). Every rank calls ``state_dict()`` (it may be a collective);
rank 0's states go into the checkpoint's replicated ``state.pt``, and every rank gets them
back on load — custom state is replicated, like the scheduler's. DTensors are gathered
whole and every tensor is stored on the CPU (``load_state_dict`` gets CPU tensors back).

A state must be plain data that ``torch.load(weights_only=True)`` reads (dicts, lists,
tuples, strings, numbers, booleans, None, tensors): anything else is refused by ``rt.save``
naming where it is, never discovered at load time. Before anything is restored ``rt.load``
checks that the checkpoint holds as many objects as are registered, of the same types
(``CheckpointMismatch`` otherwise).

The checkpoint code calls three functions: ``collect`` (save), ``check`` (load, before
restoring) and ``restore`` (load, after the rest).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, CheckpointMismatch

_PLAIN = (str, int, float, bool, type(None), torch.dtype, torch.Size)


def register(objects: list, obj: Any) -> None:
    missing = [m for m in ("state_dict", "load_state_dict") if not callable(getattr(obj, m, None))]
    if missing:
        raise TypeError(
            f"register_for_checkpointing: a {type(obj).__name__} has no "
            f"{' or '.join(f'{m}()' for m in missing)}; register an object with state_dict() "
            "and load_state_dict(state) (e.g. an EMA, a sampler, a torch scheduler)")
    if any(o is obj for o in objects):
        raise ValueError(f"register_for_checkpointing: this {type(obj).__name__} is already "
                         "registered; each object is saved once")
    objects.append(obj)


def type_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def collect(objects: list) -> list[dict[str, Any]]:
    """Every registered object's ``{"type", "state"}`` (every rank calls this)."""
    out = []
    for i, obj in enumerate(objects):
        state = _plain(obj.state_dict(), f"registered object {i} ({type(obj).__name__})")
        out.append({"type": type_name(obj), "state": state})
    return out


def _plain(value: Any, where: str) -> Any:
    """``value`` with tensors on the CPU (DTensors whole); refuses what weights_only can't read."""
    if isinstance(value, torch.Tensor):
        from .export import full_cpu

        return full_cpu(value)
    if isinstance(value, dict):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, _PLAIN):
        return value
    raise CheckpointError(
        f"rt.save: {where} holds a {type(value).__name__}, which a checkpoint cannot store "
        "(it is read back with torch.load(weights_only=True)); return only dicts, lists, "
        "tuples, strings, numbers, booleans, None and tensors from state_dict()")


def check(objects: list, saved: list[dict[str, Any]] | None, path: Path) -> None:
    """Refuse a checkpoint whose custom states do not fit the registered objects."""
    saved = saved or []
    if len(saved) != len(objects):
        have = [type(o).__name__ for o in objects]
        held = [s["type"].rsplit(".", 1)[-1] for s in saved]
        raise CheckpointMismatch(
            f"checkpoint {path} holds {len(saved)} object(s) registered for checkpointing "
            f"({', '.join(held) or 'none'}), this runtime has {len(objects)} "
            f"({', '.join(have) or 'none'}); call rt.register_for_checkpointing for the same "
            "objects, in the same order, before rt.load")
    for i, (obj, entry) in enumerate(zip(objects, saved)):
        if entry["type"] != type_name(obj):
            raise CheckpointMismatch(
                f"checkpoint {path}: registered object {i} was a {entry['type']} when saved, "
                f"it is a {type_name(obj)} now; register the objects in the order they were "
                "registered when the checkpoint was saved")


def restore(objects: list, saved: list[dict[str, Any]] | None) -> None:
    for obj, entry in zip(objects, saved or []):
        obj.load_state_dict(entry["state"])
