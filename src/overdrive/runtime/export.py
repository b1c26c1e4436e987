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

Every shard's safetensors metadata carries ``overdrive.crc32``: a JSON object of each
tensor's crc32 (of its bytes as stored). transformers and safetensors ignore it;
``load_weights`` checks it when present.

``load_weights`` first reads and checks everything that could refuse the export: the index,
every shard's header (only regular files inside the directory; keys, shapes, dtypes, byte
ranges) against the model, and the crc32s (one pass over the files, no copy). Only then is
the model touched (materialised if on meta, then copied into): a refused load leaves it as
it was. It reads such a directory into a plain model, a meta-device model, or a
sharded (FSDP/TP DTensor) one, one tensor at a time: each DTensor parameter receives only
its local piece (``distribute_tensor(..., src_data_rank=None)`` slices locally, no
communication). A meta model is materialised with ``to_empty`` and, when it has one,
``init_weights()`` (so non-persistent buffers such as rotary tables get their values)
before the weights are copied in.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from zlib_ng.zlib_ng import crc32

from ..errors import CheckpointCorrupt, CheckpointMismatch, NotACheckpoint
from . import checkpoint_files as cf
from .ledger import collective
from .keys import clean_key
from ..sizes import parse_size

log = logging.getLogger("overdrive")

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
CRC_KEY = "overdrive.crc32"  # safetensors metadata: JSON {tensor key: crc32 of its bytes}
_MAX_HEADER = 100 << 20  # safetensors' own limit on a header
def _unique_entries(model: nn.Module, key_of=clean_key) -> list[tuple[str, torch.Tensor]]:
    """(the model's own key, tensor) for every state-dict entry, tied tensors once."""
    seen: set[int] = set()
    out = []
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out.append((key_of(key), t))
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
           entries: list[tuple[str, torch.Tensor]] | None = None, key_of=clean_key) -> Path:
    """Write ``model``'s weights to ``directory`` (every rank calls; rank 0 writes);
    ``key_of`` turns a state-dict key into the name written.

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
            crcs = {k: tensor_crc32(v) for k, v in shard.items()}
            save_file(shard, str(directory / f".part-{len(shards)}.safetensors"),
                      metadata={"format": "pt", CRC_KEY: json.dumps(crcs, sort_keys=True)})
            shards.append(list(shard))
        shard, shard_bytes = {}, 0

    for key, t in entries if entries is not None else _unique_entries(model, key_of):
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
        collective("barrier", dist.barrier)
    return directory


def tensor_crc32(t: torch.Tensor) -> int:
    """crc32 of a contiguous CPU tensor's bytes, as safetensors stores them."""
    return crc32(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else 0


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
    if os.path.lexists(directory / INDEX):
        weight_map = cf.read_json(cf.inside(directory, INDEX), "index")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise CheckpointCorrupt(f"{directory / INDEX} is not a valid index: it needs a "
                                    "'weight_map' object of {tensor key: file name}")
        root = directory.resolve()
        out = {}
        for key, name in weight_map.items():
            try:
                target = (directory / name).resolve()
            except (OSError, RuntimeError, ValueError):
                target = None
            if Path(name).is_absolute() or target is None or target.parent != root:
                raise CheckpointCorrupt(
                    f"{directory / INDEX} maps {key!r} to {name!r}, which is outside "
                    f"{directory}; refusing to read it")
            out[key] = target
        return out
    if os.path.lexists(directory / SINGLE):
        path = cf.inside(directory, SINGLE)
        return {k: path for k in _header(path).entries}
    raise NotACheckpoint(f"{directory} holds neither {SINGLE} nor {INDEX}; pass a directory "
                         "written by rt.export() or transformers' save_pretrained()")


@dataclass
class _Entry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte range in the file
    end: int


@dataclass
class _Header:
    entries: dict[str, _Entry]
    crc32: dict[str, int] | None  # overdrive's checksums, when the export has them


_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
             "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _header(path: Path) -> _Header:
    """The header of a safetensors file (a regular file), checked as safetensors checks
    it: every tensor's byte range inside the file, of its shape's size."""
    fd = cf.open_regular(path)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= n <= min(_MAX_HEADER, size - 8):
            raise CheckpointCorrupt(f"{path} is not a safetensors file (header length {n}, "
                                    f"file {size} bytes); it is truncated or corrupted")
        raw = f.read(n)
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CheckpointCorrupt(f"{path}: the safetensors header is not valid JSON ({e}); "
                                "the file is truncated or corrupted") from None
    if not isinstance(doc, dict):
        raise CheckpointCorrupt(f"{path}: the safetensors header is not an object")
    meta = doc.pop("__metadata__", None) or {}
    data = size - 8 - n
    entries = {}
    for key, e in doc.items():
        try:
            begin, end = e["data_offsets"]
            shape = tuple(e["shape"])
            ok = (all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                      for v in (begin, end, *shape))
                  and 0 <= begin <= end <= data
                  and end - begin == prod(shape) * _ITEMSIZE.get(e["dtype"], (end - begin)
                                                                  // max(1, prod(shape)))
                  and isinstance(e["dtype"], str))  # a dtype not listed: safetensors checks
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CheckpointCorrupt(f"{path}: the header entry of {key!r} ({e!r}) does not "
                                    f"describe bytes inside the file ({data} data bytes); "
                                    "the file is truncated or corrupted")
        entries[key] = _Entry(e["dtype"], shape, 8 + n + begin, 8 + n + end)
    return _Header(entries, _checksums(path, meta, entries))


def _checksums(path: Path, meta: dict, entries: dict[str, _Entry]) -> dict[str, int] | None:
    if not isinstance(meta, dict) or CRC_KEY not in meta:
        return None
    try:
        crcs = json.loads(meta[CRC_KEY])
        ok = isinstance(crcs, dict) and set(crcs) == set(entries) and all(
            isinstance(v, int) for v in crcs.values())
    except (TypeError, ValueError, RecursionError):
        ok = False
    if not ok:
        raise CheckpointCorrupt(f"{path}: its {CRC_KEY} metadata does not list a crc32 for "
                                "every tensor; the file was altered")
    return crcs


def _verify_checksums(path: Path, header: _Header) -> None:
    """One pass over the file (mmap, no copy), each tensor's bytes against its crc32."""
    if header.crc32 is None or not header.entries:
        return
    with os.fdopen(cf.open_regular(path), "rb") as f, \
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = memoryview(m)
        try:
            bad = sorted(k for k, e in header.entries.items()
                         if crc32(view[e.begin:e.end]) != header.crc32[k])
        finally:
            view.release()
    if bad:
        raise CheckpointCorrupt(f"{path}: the bytes of {len(bad)} tensor(s) differ from the "
                                f"crc32 written at export ({', '.join(bad[:10])}); the file is "
                                "corrupted")


def _check_export(directory: Path, files: dict[str, Path], targets: dict[str, torch.Tensor]
                  ) -> None:
    """Everything ``load_weights`` will read, checked before the model is touched: every
    file's header (and safetensors' own open), the keys each holds, shapes, checksums."""
    from safetensors import safe_open

    headers = {path: _header(path) for path in sorted(set(files.values()))}
    for path in headers:
        try:
            with safe_open(str(path), framework="pt", device="cpu"):
                pass
        except Exception as e:  # SafetensorError: what safetensors itself refuses
            raise CheckpointCorrupt(f"{path} could not be read ({type(e).__name__}: {e}); "
                                    "the file is truncated or corrupted") from None
    shapes = []
    for key in sorted(set(targets) & set(files)):
        entry = headers[files[key]].entries.get(key)
        if entry is None:
            raise CheckpointCorrupt(f"{directory / INDEX} maps {key!r} to "
                                    f"{files[key].name}, which does not hold it")
        if entry.shape != tuple(targets[key].shape):
            shapes.append(f"{key}: export {list(entry.shape)}, model "
                          f"{list(targets[key].shape)}")
    if shapes:
        raise CheckpointMismatch(f"weights in {directory} do not fit "
                                 f"{len(shapes)} tensor(s) of the model: " + "; ".join(shapes[:20]))
    for path, header in headers.items():
        _verify_checksums(path, header)


@torch.no_grad()
def load_weights(model: nn.Module, directory: str | Path, *, strict: bool = True,
                 device: torch.device | str | None = None) -> nn.Module:
    """Load an export into ``model`` in place, one tensor at a time; returns ``model``.

    ``model`` may be plain, on the meta device (materialised on ``device``, default the
    accelerator if present else CPU), or sharded (DTensor parameters get their local piece).
    Everything is checked first (``_check_export``): a refused export leaves ``model`` as it
    was.
    """
    from safetensors import safe_open

    directory = Path(directory)
    files = weight_files(directory)
    targets = _targets(model)
    missing = sorted(set(targets) - set(files))
    unexpected = sorted(set(files) - set(targets))
    if strict and (missing or unexpected):
        raise CheckpointMismatch(
            f"weights in {directory} do not fit {type(model).__name__}: "
            f"missing ({len(missing)}): {', '.join(missing[:20]) or '-'}; "
            f"unexpected ({len(unexpected)}): {', '.join(unexpected[:20]) or '-'}")
    _check_export(directory, files, targets)
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
        except Exception as e:  # checked before: only a file changed meanwhile gets here
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
