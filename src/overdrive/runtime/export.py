"""``rt.export`` and ``od.load_weights``: consolidated, transformers-compatible safetensors.

The export is ``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` shards plus
``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``), keys exactly the
original model's, tied weights stored once (first name in state-dict order, which is the
transformers convention: ``embed_tokens`` kept, ``lm_head`` dropped). Rank 0 writes it,
gathering one DTensor at a time with ``full_tensor()`` (every rank takes part in the
gather) into the current shard, which is flushed when the next tensor would overflow
``max_shard_size``: no more than one output shard of the full model is ever held.
DeepSpeed ZeRO-3 parameters are gathered the same way, one at a time
(``GatheredParameters``).

``load_weights`` reads such a directory into a plain model, a meta-device model, or a
sharded (FSDP/TP DTensor) one, one tensor at a time: each DTensor parameter receives only
its local piece (``distribute_tensor(..., src_data_rank=None)`` slices locally, no
communication). A meta model is materialised with ``to_empty`` and, when it has one,
``init_weights()`` (so non-persistent buffers such as rotary tables get their values)
before the weights are copied in.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CheckpointCorrupt, CheckpointMismatch, NotACheckpoint
from .runtime import clean_key

log = logging.getLogger("overdrive")

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """``"5GB"`` → 5·10⁹ bytes, ``"500MiB"`` → 500·2²⁰ (transformers' convention)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"max_shard_size={size!r} is not valid; use bytes or e.g. '5GB', '500MiB'")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _unique_entries(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(clean key, tensor) for every state-dict entry, tied tensors once."""
    seen: set[int] = set()
    out = []
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out.append((clean_key(key), t))
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    t = t.detach()
    return t.full_tensor() if isinstance(t, DTensor) else t


def _zero3_partitioned(t: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter: its ``data`` is this rank's partition (often empty)."""
    return hasattr(t, "ds_id") and hasattr(t, "ds_status")


def full_cpu(t: torch.Tensor, dtype: torch.dtype | None = None, *,
             keep: bool = True) -> torch.Tensor | None:
    """The full value of one state-dict entry as a contiguous CPU tensor (``dtype`` applies
    to floating tensors). DTensors are gathered with ``full_tensor()``, ZeRO-3 parameters
    with ``deepspeed.zero.GatheredParameters`` (its full data lives only inside the block,
    so it is copied out): collectives, so every rank calls this for the same entries in
    the same order; ``keep=False`` takes part and returns None."""
    if _zero3_partitioned(t):
        import deepspeed

        with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
            return _on_cpu(t.detach(), dtype, copy=True) if keep else None
    full = _full(t)
    return _on_cpu(full, dtype, copy=False) if keep else None


def _on_cpu(t: torch.Tensor, dtype: torch.dtype | None, copy: bool) -> torch.Tensor:
    dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
    return t.to("cpu", dtype=dtype, copy=copy).contiguous()


# --------------------------------------------------------------------------- export


def export(model: nn.Module, directory: str | Path, *, max_shard_size: int | str = "5GB",
           dtype: torch.dtype | None = None, is_main: bool | None = None,
           entries: list[tuple[str, torch.Tensor]] | None = None) -> Path:
    """Write ``model``'s weights to ``directory`` (every rank calls; rank 0 writes).

    ``entries``: the (key, tensor) pairs to write instead of ``model``'s own (the
    pipeline runtime hands the weights of every stage, gathered on rank 0)."""
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    is_main = (not dist.is_initialized() or dist.get_rank() == 0) if is_main is None else is_main
    directory = Path(directory)
    if is_main:
        directory.mkdir(parents=True, exist_ok=True)
        for old in list(directory.glob("model*.safetensors")) + [directory / INDEX]:
            old.unlink(missing_ok=True)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total = 0
    shards: list[list[str]] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            save_file(shard, str(directory / f".part-{len(shards)}.safetensors"),
                      metadata={"format": "pt"})
            shards.append(list(shard))
        shard, shard_bytes = {}, 0

    for key, t in entries if entries is not None else _unique_entries(model):
        full = full_cpu(t, dtype, keep=is_main)  # a collective: every rank runs the loop
        if not is_main:
            continue
        size = full.numel() * full.element_size()
        if shard and shard_bytes + size > limit:
            flush()
        shard[key] = full
        shard_bytes += size
        total += size
    if is_main:
        flush()
        _name_shards(directory, shards, total)
        _save_config(model, directory)
    if dist.is_initialized():
        dist.barrier()
    return directory


def _name_shards(directory: Path, shards: list[list[str]], total: int) -> None:
    if len(shards) <= 1:
        os.replace(directory / ".part-0.safetensors", directory / SINGLE) if shards else None
        return
    n = len(shards)
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(directory / f".part-{i}.safetensors", directory / name)
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))


def _save_config(model: nn.Module, directory: Path) -> None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(str(directory))
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "save_pretrained"):
        try:
            gen.save_pretrained(str(directory))
        except Exception:  # a generation config that does not validate is not ours to fix
            pass


# --------------------------------------------------------------------------- load_weights


def weight_files(directory: str | Path) -> dict[str, Path]:
    """``{key: file}`` of an export, refusing index entries that leave the directory."""
    directory = Path(directory)
    root = directory.resolve()
    if (directory / INDEX).is_file():
        try:
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointCorrupt(f"{directory / INDEX} is not a valid index ({e})") from None
        out = {}
        for key, name in weight_map.items():
            target = (directory / name).resolve()
            if Path(name).is_absolute() or target.parent != root:
                raise CheckpointCorrupt(
                    f"{directory / INDEX} maps {key!r} to {name!r}, which is outside "
                    f"{directory}; refusing to read it")
            out[key] = target
        return out
    if (directory / SINGLE).is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(directory / SINGLE), framework="pt") as f:
                return {k: directory / SINGLE for k in f.keys()}
        except Exception as e:
            raise CheckpointCorrupt(f"{directory / SINGLE} could not be read ({e}); the file "
                                    "is truncated or corrupted") from None
    raise NotACheckpoint(f"{directory} holds neither {SINGLE} nor {INDEX}; pass a directory "
                         "written by rt.export() or transformers' save_pretrained()")


@torch.no_grad()
def load_weights(model: nn.Module, directory: str | Path, *, strict: bool = True,
                 device: torch.device | str | None = None) -> nn.Module:
    """Load an export into ``model`` in place, one tensor at a time; returns ``model``.

    ``model`` may be plain, on the meta device (materialised on ``device``, default the
    accelerator if present else CPU), or sharded (DTensor parameters get their local piece).
    """
    from safetensors import safe_open

    files = weight_files(directory)
    targets = _targets(model)
    missing = sorted(set(targets) - set(files))
    unexpected = sorted(set(files) - set(targets))
    if strict and (missing or unexpected):
        raise CheckpointMismatch(
            f"weights in {directory} do not fit {type(model).__name__}: "
            f"missing ({len(missing)}): {', '.join(missing[:20]) or '-'}; "
            f"unexpected ({len(unexpected)}): {', '.join(unexpected[:20]) or '-'}")
    _materialise(model, device)
    targets = _targets(model)  # to_empty replaced the tensors
    by_file: dict[Path, list[str]] = {}
    for key in sorted(set(targets) & set(files)):
        by_file.setdefault(files[key], []).append(key)
    for path, keys in sorted(by_file.items()):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in keys:
                    _copy_into(targets[key], f.get_tensor(key), key)
        except (OSError, RuntimeError, ValueError) as e:
            if isinstance(e, CheckpointMismatch):
                raise
            raise CheckpointCorrupt(f"{path} could not be read ({type(e).__name__}: {e}); the "
                                    "file is truncated or corrupted") from None
    return model


def _targets(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(_unique_entries(model))


def _materialise(model: nn.Module, device: torch.device | str | None) -> None:
    from torch.distributed.tensor import DTensor

    def on_meta(t: torch.Tensor) -> bool:
        return (t.to_local() if isinstance(t, DTensor) else t).is_meta

    tensors = list(model.parameters()) + list(model.buffers())
    if not any(on_meta(t) for t in tensors):
        return
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    model.to_empty(device=device)
    if callable(getattr(model, "init_weights", None)):
        model.init_weights()  # non-persistent buffers (rope tables) are not in the export


def _copy_into(dst: torch.Tensor, full: torch.Tensor, key: str) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if tuple(full.shape) != tuple(dst.shape):
        raise CheckpointMismatch(f"{key}: the export has shape {list(full.shape)}, the model "
                                 f"{list(dst.shape)}")
    if isinstance(dst, DTensor):
        local = distribute_tensor(full.to(dst.dtype), dst.device_mesh, dst.placements,
                                  src_data_rank=None).to_local()
        dst.to_local().copy_(local)
    else:
        dst.copy_(full)
