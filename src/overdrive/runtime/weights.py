"""Safetensors weights read one tensor at a time, straight into a buffer of their own.

``open_weights`` reads only the headers of a ``.safetensors`` file or of a sharded
directory (``model.safetensors.index.json``): every key's file, dtype, shape and byte
range. ``read`` fills one tensor with ``os.preadv`` into a fresh (optionally pinned)
buffer: no mmap, so the file's pages never count in this process's resident memory and
nothing but the tensor being placed is ever held. ``check_keys`` compares a checkpoint
with a model (meta or real) before anything is touched.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointCorrupt, CheckpointMismatch, NotACheckpoint
from .export import INDEX, SINGLE, weight_files

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 * 2**20
MMAP_MIN = 256 * 2**10  # bytes from which a read gets a mapping of its own


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file."""

    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The entries of one safetensors file (its JSON header only)."""
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > MAX_HEADER:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(fh.read(length))
        size = path.stat().st_size
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointCorrupt(f"{path} is not a readable safetensors file ({e}); it is "
                                "truncated or corrupted") from None
    base = 8 + length
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = (base + int(o) for o in info["data_offsets"])
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointCorrupt(f"{path}: the header entry of {key!r} is malformed "
                                    f"({info!r})") from None
        numel = 1
        for d in shape:
            numel *= d
        if end > size or end - start != numel * dtype.itemsize:
            raise CheckpointCorrupt(f"{path}: {key!r} lies outside the file or has the wrong "
                                    "byte length; the file is truncated or corrupted")
        out[key] = TensorEntry(key, path, dtype, shape, start, end)
    return out


def open_weights(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """Every key of a safetensors file or export directory, from the headers only."""
    path = Path(path)
    if path.is_file():
        return read_header(path)
    if not path.is_dir():
        raise NotACheckpoint(f"weights={str(path)!r}: no such file or directory; pass a "
                             f".safetensors file or a directory written by save_pretrained "
                             "or rt.export")
    if not (path / INDEX).is_file() and not (path / SINGLE).is_file():
        raise NotACheckpoint(f"weights={str(path)!r} holds neither {SINGLE} nor {INDEX}; pass "
                             "a directory written by save_pretrained or rt.export")
    files = weight_files(path)
    entries: dict[str, TensorEntry] = {}
    headers = {f: read_header(f) for f in sorted(set(files.values()))}
    for key, f in files.items():
        if key not in headers[f]:
            raise CheckpointCorrupt(f"{path / INDEX} maps {key!r} to {f.name}, which does "
                                    "not hold it")
        entries[key] = headers[f][key]
    return entries


def _buffer(nbytes: int, pin: bool) -> tuple[torch.Tensor, memoryview]:
    """A fresh byte buffer. Large CPU ones are anonymous mappings of their own, unmapped
    the moment the tensor dies: heap allocations freed by another thread (the prefetch
    thread reads, the forward frees) would stay in malloc's arenas and grow the resident
    memory block after block."""
    if pin or nbytes < MMAP_MIN:
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        return buf, memoryview(buf.numpy())
    region = mmap.mmap(-1, nbytes)
    return torch.frombuffer(region, dtype=torch.uint8), memoryview(region)


def read(entry: TensorEntry, pin: bool = False) -> torch.Tensor:
    """The tensor, read into its own CPU buffer (pinned for a fast host→GPU copy)."""
    buf, view = _buffer(entry.nbytes, pin)
    if entry.nbytes:
        fd = os.open(entry.file, os.O_RDONLY)
        try:
            done = 0
            while done < entry.nbytes:
                n = os.preadv(fd, [view[done:]], entry.start + done)
                if n <= 0:
                    raise CheckpointCorrupt(f"{entry.file}: {entry.key!r} ends early; the file "
                                            "is truncated")
                done += n
        finally:
            os.close(fd)
    return buf.view(entry.dtype).reshape(entry.shape)


def model_keys(model: nn.Module) -> list[list[str]]:
    """State-dict keys grouped by tensor: tied aliases together, first name first."""
    groups: dict[int, list[str]] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(key)
    return list(groups.values())


def check_keys(model: nn.Module, entries: dict[str, TensorEntry], where: str) -> dict[str, str]:
    """``{model key: checkpoint key}`` for every tensor of ``model``; a missing, unexpected
    or differently shaped key raises ``CheckpointMismatch`` listing them all."""
    sd = model.state_dict(keep_vars=True)
    chosen: dict[str, str] = {}
    missing, mismatched = [], []
    covered: set[str] = set()
    for aliases in model_keys(model):
        covered.update(aliases)
        present = [a for a in aliases if a in entries]
        if not present:
            missing.append(aliases[0])
            continue
        shape = tuple(sd[aliases[0]].shape)
        for a in present:
            if entries[a].shape != shape:
                mismatched.append(f"{a} (checkpoint {list(entries[a].shape)}, model "
                                  f"{list(shape)})")
        chosen[aliases[0]] = present[0]
    unexpected = sorted(set(entries) - covered)
    if missing or unexpected or mismatched:
        raise CheckpointMismatch(
            f"weights {where} do not fit {type(model).__name__}: "
            f"missing ({len(missing)}): {', '.join(missing[:20]) or '-'}; "
            f"unexpected ({len(unexpected)}): {', '.join(unexpected[:20]) or '-'}; "
            f"shape mismatch ({len(mismatched)}): {', '.join(mismatched[:20]) or '-'}")
    return chosen


def fingerprint(entries: dict[str, TensorEntry]) -> list[list]:
    """What identifies a checkpoint's files (name, size, mtime): an offload folder written
    from it is reused only while these match."""
    files = sorted({e.file for e in entries.values()})
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
