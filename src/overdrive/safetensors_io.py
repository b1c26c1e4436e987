"""Safetensors tensors read one at a time, straight into a buffer of their own.

``read_header`` reads only a file's JSON header: every key's dtype, shape and byte range
(``TensorEntry``). ``read`` fills one tensor with ``os.preadv`` into a fresh (optionally
pinned) buffer: no mmap of the file, so its pages never count in this process's resident
memory and nothing but the tensor being placed is ever held. ``WeightsSource`` is what
``od.accelerate(weights=)`` hands the passes (``Env.weights``): a checkpoint's entries and,
for every model key, its key there.

A neutral module: ``runtime/weights.py`` (opening a checkpoint, checking its keys) and the
pass that places a model from it both use it, so neither imports the other.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointCorrupt

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


def fingerprint(entries: dict[str, TensorEntry]) -> list[list]:
    """What identifies a checkpoint's files (name, size, mtime): an offload folder written
    from it is reused only while these match."""
    files = sorted({e.file for e in entries.values()})
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


@dataclass(frozen=True)
class WeightsSource:
    """``od.accelerate(weights=)``: the checkpoint's entries and, for every model key (the
    first name of each tensor), its key there. Keys were checked before anything moved."""

    path: str
    entries: dict[str, TensorEntry]
    chosen: dict[str, str]

    def read(self, model_key: str) -> torch.Tensor:
        """The tensor of ``model_key``, read from the checkpoint into its own buffer."""
        return read(self.entries[self.chosen[model_key]])

    def holds(self, model_key: str) -> bool:
        return model_key in self.chosen
