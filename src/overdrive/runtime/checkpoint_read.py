"""Copy DCP records from a checkpoint's files straight into the tensors they restore.

DCP's own reader ``torch.load``-s every record into a new tensor and then copies it into
the destination: two full-size copies. Here each file is memory-mapped, the record's
pickle and zip entries are parsed without building anything (``record_layout``, the same
parser the pre-load check uses), and its bytes go to the destination once:

- ``direct``: ``preadv`` into the destination's own storage — a CPU tensor, contiguous,
  of the record's dtype, whose part of the record is one contiguous byte range (whole
  tensors, and dim-0 pieces of them: FSDP2 shards, resharded or not);
- ``copied``: ``copy_`` from a view of the mapped bytes — any other destination (another
  dtype, strided, an accelerator, a tensor subclass) or a part that is not one range
  (a dim-1 piece of a saved chunk);
- ``unpickled``: ``torch.load(weights_only=True)`` of the record, as DCP does — a record
  the parser does not recognise (another pickle layout, big-endian bytes).

Every record is planned (parsed, its destination resolved) before a byte moves; then the
bytes move in pieces of at most ``CHUNK`` (8 MiB) spread over the I/O threads, whatever
files they are in.

Every record was checked before the load began (``checkpoint_files.check_records``); an
unexpected layout here can only come from a file changed since, and is refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import io
import mmap
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.planner import LoadItemType

from ..errors import CheckpointCorrupt
from . import checkpoint_files as cf

_MAX_PREAD = 1 << 30  # Linux moves at most ~2 GiB a call; stay well below
CHUNK = 8 << 20  # the piece one thread moves at a time


@dataclasses.dataclass
class ReadCounts:
    """How the records of one load were read (see the module docstring)."""

    direct: int = 0
    copied: int = 0
    unpickled: int = 0
    direct_bytes: int = 0

    def add(self, other: "ReadCounts") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class MappedFile:
    """A checkpoint file opened as a regular file (``cf.open_regular``) and mapped
    privately (copy-on-write: views of it are writable, nothing reaches the file)."""

    def __init__(self, path: Path):
        self.fd = cf.open_regular(path)
        self.size = os.fstat(self.fd).st_size
        self.map = None
        if self.size:
            self.map = mmap.mmap(self.fd, self.size, flags=mmap.MAP_PRIVATE,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)

    def close(self) -> None:
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # a view is still alive somewhere: freed with it
                pass
        os.close(self.fd)

    def __enter__(self) -> "MappedFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def pread_into(self, target: torch.Tensor, start: int, nbytes: int, at: int = 0) -> None:
        """``nbytes`` bytes at ``start`` into ``target``'s memory (contiguous, CPU) from
        its byte ``at`` on."""
        base, done = target.data_ptr() + at, 0
        while done < nbytes:
            n = min(nbytes - done, _MAX_PREAD)
            got = os.preadv(self.fd, [(ctypes.c_char * n).from_address(base + done)],
                            start + done)
            if got <= 0:
                raise CheckpointCorrupt(f"the file ended at byte {start + done} while "
                                        f"reading {nbytes} bytes from {start}; it was "
                                        "truncated after the checks")
            done += got

    def view(self, start: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        """The mapped bytes ``start .. start+nbytes`` as a flat ``dtype`` tensor."""
        if nbytes == 0:
            return torch.empty(0, dtype=dtype)
        raw = torch.frombuffer(self.map, dtype=torch.uint8, offset=start, count=nbytes)
        return raw.view(dtype)


def _plan_file(f: MappedFile, path: Path, items: list, storage_data: dict, planner,
               layouts: dict, counts: ReadCounts) -> list:
    """The reads of ``items`` (all in ``f``): ``(item, target, [job, ...])`` each; a job
    moves one piece of at most ``CHUNK`` bytes and releases the GIL while it does."""
    out = []
    for item in sorted(items, key=lambda i: storage_data[i.storage_index].offset):
        info = storage_data[item.storage_index]
        if item.type == LoadItemType.BYTE_IO:  # SafeLoadPlanner refuses it
            planner.load_bytes(item, io.BytesIO())
            continue
        target, jobs = _plan_item(f, path, info, item, planner, counts,
                                  layouts.get(item.storage_index))
        out.append((item, target, jobs))
    return out


def _plan_item(f: MappedFile, path: Path, info, item, planner, counts: ReadCounts,
               layout: cf.RecordLayout | None) -> tuple[torch.Tensor, list]:
    where = f"{path}: the record of {item.storage_index.fqn!r}"
    if info.offset + info.length > f.size:
        raise CheckpointCorrupt(f"{where} ends past the file's {f.size} bytes; the file "
                                "changed after the checks")
    if layout is None:
        layout = _layout(f, info)
    target = planner.resolve_tensor(item).detach()
    if layout is None:  # unpickled when its turn comes: one such record in memory at a time
        counts.unpickled += 1
        return target, [lambda: _copy(target, narrow_tensor_by_index(
            _unpickle(f, info, where), item.storage_offsets, item.lengths), where)]
    start = info.offset + layout.data_start
    piece = _piece(layout, item)
    if _direct(target, layout, piece):
        size = piece.numel() * layout.itemsize
        first = start + piece.storage_offset() * layout.itemsize
        counts.direct += 1
        counts.direct_bytes += size
        return target, [functools.partial(f.pread_into, target, first + at, min(CHUNK, size - at),
                                          at)
                        for at in range(0, size, CHUNK)]
    flat = f.view(start, layout.nbytes, layout.dtype)
    source = flat.as_strided(piece.shape, piece.stride(), piece.storage_offset())
    counts.copied += 1
    return target, [lambda: _copy(target, source, where)]


def _layout(f: MappedFile, info) -> cf.RecordLayout | None:
    try:
        z = zipfile.ZipFile(cf.MapSlice(f.map, info.offset, info.length))
        layout = cf._fast_record(z)
    except CheckpointCorrupt:
        raise
    except Exception:  # noqa: BLE001 - the check accepted it: torch.load decides
        return None
    if layout is not None and layout.data_start + layout.nbytes > info.length:
        raise CheckpointCorrupt(f"its storage runs past the record's {info.length} bytes")
    return layout


def _piece(layout: cf.RecordLayout, item) -> torch.Tensor:
    """The part of the record this item restores, on the meta device (its geometry)."""
    whole = torch.empty(layout.numel, dtype=layout.dtype, device="meta").as_strided(
        layout.shape, layout.stride, layout.offset)
    return narrow_tensor_by_index(whole, item.storage_offsets, item.lengths)


def _direct(target: torch.Tensor, layout: cf.RecordLayout, piece: torch.Tensor) -> bool:
    return (type(target) is torch.Tensor and target.device.type == "cpu"
            and target.dtype == layout.dtype and target.shape == piece.shape
            and target.is_contiguous() and piece.is_contiguous()
            and not target.is_conj() and not target.is_neg())


def _copy(target: torch.Tensor, source: torch.Tensor, where: str) -> None:
    if target.shape != source.shape:
        raise CheckpointCorrupt(f"{where} has shape {list(source.shape)} where "
                                f"{list(target.shape)} is restored; the file changed after "
                                "the checks")
    target.copy_(source)


def _unpickle(f: MappedFile, info, where: str) -> torch.Tensor:
    try:
        tensor = torch.load(io.BufferedReader(cf.MapSlice(f.map, info.offset, info.length)),
                            map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - refused by weights_only, or damaged
        raise CheckpointCorrupt(f"{where} cannot be read with weights_only=True "
                                f"({type(e).__name__}); the file changed after the checks") \
            from None
    if not isinstance(tensor, torch.Tensor):
        raise CheckpointCorrupt(f"{where} holds a {type(tensor).__name__}, not a tensor")
    return tensor


def read_data(root: Path, plan, storage_data: dict, planner, threads: int,
              layouts: dict | None = None) -> ReadCounts:
    """A load plan's items: every file mapped, every record planned (parsed, its
    destination resolved: what can still be refused is refused here, before a byte moves),
    then the pieces of at most ``CHUNK`` bytes moved on ``threads`` threads (``preadv`` and
    ``copy_`` release the GIL; pieces, not files, so the threads stay busy however the
    bytes are spread over the files), then each item committed."""
    per_file: dict[str, list] = {}
    for item in plan.items:
        per_file.setdefault(storage_data[item.storage_index].relative_path, []).append(item)
    counts = ReadCounts()
    with contextlib.ExitStack() as files:
        planned = []
        for rel, items in sorted(per_file.items()):
            path = cf.inside(root, rel)
            f = files.enter_context(MappedFile(path))
            planned += _plan_file(f, path, items, storage_data, planner, layouts or {}, counts)
        jobs = [job for _, _, item_jobs in planned for job in item_jobs]
        if threads <= 1 or len(jobs) <= 1:
            for job in jobs:
                job()
        else:
            with ThreadPoolExecutor(min(threads, len(jobs))) as pool:
                for _ in pool.map(lambda job: job(), jobs):
                    pass
    for item, target, _ in planned:
        planner.commit_tensor(item, target)
    return counts
