"""Where offloaded weights wait between forwards: host memory or a safetensors folder.

The disk folder holds one safetensors file per offloaded unit (a block, or whatever the
device map offloads as one entry) plus ``index.json`` (``weight_map``, the dtype, and the
fingerprint of the checkpoint it was written from). A folder whose index matches what is
about to be written is reused as it is.
"""

from __future__ import annotations

import json
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

    def load(self, key: str, device: torch.device) -> torch.Tensor:
        """The tensor on ``device`` (a new copy; the stored one is never handed out to be
        written to)."""
        gpu = device.type == "cuda"
        if key in self.host:
            t = self.host[key]
            return t.to(device, non_blocking=True) if gpu else t
        t = read(self.disk[key], pin=gpu)
        return t.to(device, non_blocking=True) if gpu else t

    def __contains__(self, key: str) -> bool:
        return key in self.host or key in self.disk


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
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(target))
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
