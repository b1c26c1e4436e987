"""Where offloaded weights wait between forwards: host memory or a safetensors folder.

The disk folder holds one safetensors file per offloaded unit (a block, or whatever the
device map offloads as one entry) plus ``index.json`` (``weight_map``, the dtype, and the
fingerprint of the checkpoint it was written from). A folder whose index matches what is
about to be written is reused as it is.

When the weights run on the CPU, the disk files are mapped (copy-on-write, so nothing a
forward might write ever reaches the file) and a loaded tensor is a view of the mapping:
no copy, the page cache shared with every other reader. A unit's pages count toward this
process's resident memory only while it runs: ``warm`` faults them in ahead (on the
prefetch thread, the GIL released), ``evict`` drops them from this process again
(``MADV_DONTNEED``; the page cache keeps them for the next forward).
"""

from __future__ import annotations

import json
import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import PlanError
from ..safetensors_io import TensorEntry, read, read_header

INDEX_NAME = "index.json"
FORMAT = "overdrive-offload/1"


@dataclass
class OffloadStore:
    """Offloaded tensors by model key: ``host`` (kept in CPU memory, pinned when a GPU
    runs them) or ``disk`` (a byte range of a file in the offload folder)."""

    host: dict[str, torch.Tensor] = field(default_factory=dict)
    disk: dict[str, TensorEntry] = field(default_factory=dict)
    _maps: dict[Path, tuple[mmap.mmap, torch.Tensor]] = field(default_factory=dict)
    _views: dict[str, torch.Tensor] = field(default_factory=dict)

    def map_disk(self) -> None:
        """Map every disk file once and make each key's tensor a view of its mapping."""
        for entry in self.disk.values():
            if entry.file not in self._maps:
                self._maps[entry.file] = _map(entry.file)
            base = self._maps[entry.file][1]
            self._views[entry.key] = base[entry.start:entry.end].view(entry.dtype) \
                .reshape(entry.shape)

    def load(self, key: str, device: torch.device) -> torch.Tensor:
        """The tensor on ``device``: the host copy, a view of the mapped file (CPU), or a
        copy read into a pinned buffer (GPU). A stored tensor's writes never reach the
        store: mappings are copy-on-write and ``evict`` drops what a forward wrote."""
        gpu = device.type == "cuda"
        if key in self.host:
            t = self.host[key]
            return t.to(device, non_blocking=True) if gpu else t
        if not gpu and key in self._views:
            return self._views[key]
        t = read(self.disk[key], pin=gpu)
        return t.to(device, non_blocking=True) if gpu else t

    def files(self, keys: list[str]) -> list[Path]:
        """The mapped files holding ``keys``."""
        return sorted({self.disk[k].file for k in keys if k in self._views})

    def warm(self, files: list[Path]) -> None:
        """Fault the files' pages into this process (one read per page)."""
        for f in files:
            region, base = self._maps[f]
            region.madvise(mmap.MADV_WILLNEED)
            base[::mmap.PAGESIZE].sum()  # a torch op: runs with the GIL released

    def evict(self, files: list[Path]) -> None:
        """Drop the files' pages from this process (the page cache keeps them)."""
        for f in files:
            self._maps[f][0].madvise(mmap.MADV_DONTNEED)

    def __contains__(self, key: str) -> bool:
        return key in self.host or key in self.disk


def _map(path: Path) -> tuple[mmap.mmap, torch.Tensor]:
    with open(path, "rb") as fh:
        region = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    return region, torch.frombuffer(region, dtype=torch.uint8)


def unit_file(index: int, unit: str) -> str:
    return f"{index:05d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', unit or 'root')}.safetensors"


@dataclass
class DiskFolder:
    """Writes the offload folder unit by unit, then its index."""

    path: Path
    source: list | None  # the checkpoint fingerprint; None: written from memory
    dtype: str | None
    weight_map: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PlanError(f"offload.offload_folder={str(self.path)!r} cannot be created "
                            f"({e}); give a writable directory") from None
        index = self.path / INDEX_NAME
        if index.exists():
            index.unlink()  # an index only ever describes a complete folder

    def write(self, index: int, unit: str, tensors: dict[str, torch.Tensor]) -> dict[str, TensorEntry]:
        from safetensors.torch import save_file

        name = unit_file(index, unit)
        target = self.path / name
        tmp = self.path / (name + ".tmp")
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp))
        os.replace(tmp, target)  # a model still mapping the old file keeps reading it
        for key in tensors:
            self.weight_map[key] = name
        return read_header(target)

    def finish(self) -> None:
        data = {"format": FORMAT, "source": self.source, "dtype": self.dtype,
                "weight_map": self.weight_map}
        tmp = self.path / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path / INDEX_NAME)


def reusable(folder: Path, source: list | None, dtype: str | None,
             expected: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> dict[str, TensorEntry] | None:
    """The folder's entries when it was written from the same checkpoint, in the same
    dtype, with exactly the ``expected`` keys, dtypes and shapes; else None."""
    index = folder / INDEX_NAME
    if source is None or not index.is_file():
        return None
    try:
        data = json.loads(index.read_text())
        if data.get("format") != FORMAT or data.get("source") != source \
                or data.get("dtype") != dtype or set(data["weight_map"]) != set(expected):
            return None
        headers = {f: read_header(folder / f) for f in set(data["weight_map"].values())}
        entries = {k: headers[f][k] for k, f in data["weight_map"].items()}
    except Exception:  # noqa: BLE001 - any damage means: write it again
        return None
    if any((e.dtype, e.shape) != expected[k] for k, e in entries.items()):
        return None
    return entries
