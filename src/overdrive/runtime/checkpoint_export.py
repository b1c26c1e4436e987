"""``overdrive export CHECKPOINT OUT``: an ``rt.save`` checkpoint → a transformers directory.

Offline, in one process, without the training script (Accelerate's ``merge-weights``):
the checkpoint's files are verified against its manifest, the model's entries are read
from DCP's shards — whatever world size and plan wrote them (FSDP, TP, HSDP, CP DTensor
shards are reassembled by DCP's planner) — and written as ``rt.export`` writes them:
``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` + index, keys exactly the
model's, tied entries once (the checkpoint's marker records which). At most one output
shard (``max_shard_size``) is held in memory: the entries are loaded shard by shard.

``config.json`` (and ``generation_config.json``) come from what ``rt.save`` recorded about
a transformers model (``model_meta.py``), or from ``config=`` (a config.json, or a
directory holding one) for models that have none. The directory is written beside ``out``
and renamed into place when complete.

A DeepSpeed checkpoint's ZeRO partitions are consolidated by DeepSpeed's own
``zero_to_fp32`` with every file read through ``weights_only=True``
(``checkpoint_export_deepspeed.py``); that one is held in memory whole.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
import warnings
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import CheckpointCorrupt, OverdriveError
from . import checkpoint_files as cf
from ..sizes import parse_size
from .export import _name_shards

log = logging.getLogger("overdrive")

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
MODEL_PREFIX = "model."  # rt.save's DCP keys: "model.<state-dict key>", "optim.<...>"


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise OverdriveError(f"dtype={name!r} is not valid; choose one of: "
                             f"{', '.join(DTYPES)}")
    return DTYPES[name]


def export_checkpoint(checkpoint: str | Path, out: str | Path, *,
                      dtype: str | torch.dtype | None = None,
                      max_shard_size: int | str = "5GB", config: str | Path | None = None,
                      verify: bool = True, overwrite: bool = False) -> Path:
    """Write ``checkpoint``'s model weights to ``out`` as a transformers directory."""
    from .checkpoint import io_threads

    dtype, limit = parse_dtype(dtype), parse_size(max_shard_size)
    path, out = Path(checkpoint).absolute(), Path(out).absolute()
    meta = cf.read_marker(path)
    info = meta.get("export") or {}
    hf_config = _config(config, info, path)
    _check_out(out, overwrite)
    manifest = cf.read_manifest(path)
    problems = cf.verify_files(path, manifest, sorted(manifest), verify, io_threads())
    if problems:
        raise CheckpointCorrupt(f"checkpoint {path} is damaged: " + "; ".join(problems))
    if meta.get("kind") == "deepspeed":
        from .checkpoint_export_deepspeed import deepspeed_source

        source = deepspeed_source(path, manifest, info.get("tied", {}))
    else:
        source = dcp_source(path, manifest, info.get("tied", {}))

    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(parents=True)
    try:
        total, shards = _write_shards(source, tmp, dtype, limit)
        _name_shards(tmp, shards, total)
        if hf_config is not None:
            _write_configs(tmp, hf_config, info, source, dtype)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("overdrive: exported %s (step %s, saved on %s rank(s)) to %s: %d tensors%s",
             path, meta.get("step"), meta.get("world_size"), out, len(source.entries),
             "" if hf_config is not None else " (no config.json: pass --config)")
    return out


@dataclass
class Source:
    """The model's entries in a checkpoint: ``{key: (shape, dtype)}`` in order, and
    ``read(keys) -> {key: full CPU tensor}``."""

    entries: dict[str, tuple[tuple[int, ...], torch.dtype]]
    read: Callable[[list[str]], dict[str, torch.Tensor]]


def dcp_source(path: Path, manifest: dict[str, dict[str, int]], tied: dict[str, str]) -> Source:
    from .checkpoint import io_threads

    reader = cf.SafeReader(str(path), manifest, threads=io_threads())
    found = model_entries(reader.read_metadata(), tied, path)
    entries = {k: (tuple(md.size), md.properties.dtype) for k, (_, md) in found.items()}
    return Source(entries, lambda keys: _read(reader, {k: found[k] for k in keys}))


def model_entries(metadata, tied: dict[str, str], path: Path) -> dict[str, Any]:
    """``{state-dict key: (DCP key, TensorStorageMetadata)}`` of the model, tied keys once."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if not fqn.startswith(MODEL_PREFIX) or not isinstance(md, TensorStorageMetadata):
            continue
        key = fqn[len(MODEL_PREFIX):]
        if key not in tied:
            entries[key] = (fqn, md)
    if not entries:
        raise CheckpointCorrupt(f"checkpoint {path} holds no model tensors")
    return entries


def _write_shards(source: Source, tmp: Path, dtype: torch.dtype | None,
                  limit: int) -> tuple[int, list[list[str]]]:
    from safetensors.torch import save_file

    shards: list[list[str]] = []
    total = 0
    for chunk in _chunks(source.entries, dtype, limit):
        tensors = source.read(chunk)
        if dtype is not None:
            tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
        tensors = {k: t.contiguous() for k, t in tensors.items()}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(tmp / f".part-{len(shards)}.safetensors"),
                  metadata={"format": "pt"})
        shards.append(list(tensors))
    return total, shards


def _chunks(entries: dict[str, Any], dtype: torch.dtype | None, limit: int) -> list[list[str]]:
    """Keys grouped into output shards of at most ``limit`` bytes (a bigger tensor alone)."""
    chunks, current, size = [], [], 0
    for key, (shape, t_dtype) in entries.items():
        out_dtype = dtype if dtype is not None and t_dtype.is_floating_point else t_dtype
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=out_dtype).element_size()
        if current and size + nbytes > limit:
            chunks.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    return chunks + ([current] if current else [])


def _read(reader, entries: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Load these entries whole, on the CPU, from the checkpoint's shards."""
    import torch.distributed.checkpoint as dcp

    buffers = {fqn: torch.empty(tuple(md.size), dtype=md.properties.dtype)
               for fqn, md in entries.values()}
    with warnings.catch_warnings():  # one process by design: DCP warns that it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(buffers, storage_reader=reader, planner=cf.SafeLoadPlanner(), no_dist=True)
    return {key: buffers[fqn] for key, (fqn, _) in entries.items()}


def _config(config: str | Path | None, info: dict[str, Any], path: Path) -> dict | None:
    if config is None:
        return info.get("hf_config")
    p = Path(config)
    p = p / "config.json" if p.is_dir() else p
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise OverdriveError(f"config={str(config)!r}: not a readable config.json "
                             f"({type(e).__name__}: {e})") from None


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OverdriveError(f"{out} exists and is not empty; export into a new directory, "
                             "or pass overwrite=True (--overwrite) to replace it")


def _write_configs(tmp: Path, hf_config: dict, info: dict[str, Any], source: Source,
                   dtype: torch.dtype | None) -> None:
    config = dict(hf_config)
    if not config.get("architectures") and info.get("architecture"):
        config["architectures"] = [info["architecture"]]
    floating = [d for _, d in source.entries.values() if d.is_floating_point]
    stored = dtype or (floating[0] if floating else None)
    if stored in _DTYPE_NAMES:
        config["dtype"] = _DTYPE_NAMES[stored]
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if info.get("generation_config") is not None:
        (tmp / "generation_config.json").write_text(
            json.dumps(info["generation_config"], indent=2, sort_keys=True) + "\n")
