"""The files of a checkpoint directory: atomic publication, manifest, safe readers.

A checkpoint is a directory ``path`` holding

    .metadata, __<rank>_<i>.distcp     torch.distributed.checkpoint (tensors only)
    state.pt                           replicated non-tensor state (optimizer param groups,
                                       scheduler, scaler, step counters), weights_only
    rank-<r>.pt                        per-rank state (RNG, data-loader positions), weights_only
    manifest.json                      size and crc32 of every file above (computed from
                                       the bytes as they are written; DeepSpeed's files,
                                       which it writes itself, are read back once)
    overdrive_checkpoint.json          the marker, written last: format, step, world size, plan

It is written to a hidden sibling ``.<name>.tmp-<uuid>`` and renamed to ``path`` by rank 0
only after every rank has written and fsynced its files. A directory without the marker is
not a checkpoint; a crash before the rename leaves only the hidden sibling, which the next
save of the same ``path`` removes. All ranks must see the same filesystem.

Nothing here executes code from a file: DCP's pickled ``.metadata`` is read with an
unpickler that only admits DCP's own metadata classes, the ``.pt`` files are loaded with
``weights_only=True``. Nothing is read from outside the directory: the manifest and DCP's
index may only name files inside it (symlinks resolved), and the index only files the
manifest lists, within their sizes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import mmap
import os
import pickle
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from zlib_ng.zlib_ng import crc32  # zlib's crc32, SIMD-accelerated: ~3x zlib's speed

from ..errors import CheckpointCorrupt, NotACheckpoint

MARKER = "overdrive_checkpoint.json"
MANIFEST = "manifest.json"
FORMAT = 1
_CRC_BLOCK = 64 << 20


# --------------------------------------------------------------------------- paths


def tmp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def tmp_sibling(path: Path, token: str) -> Path:
    return path.parent / f"{tmp_prefix(path)}{token}"


def remove_stale_tmp(path: Path) -> list[Path]:
    """Remove hidden siblings left by saves of ``path`` that crashed before their rename.

    A crash between the two renames of ``publish`` leaves the replaced checkpoint aside as
    ``.<name>.old-<uuid>`` with no ``path``: it is moved back, not deleted.
    """
    removed = []
    if not path.parent.is_dir():
        return removed
    aside = set_aside(path)
    if aside is not None:
        os.rename(aside, path)
    for p in path.parent.iterdir():
        if p.name.startswith((aside_prefix(path), tmp_prefix(path))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def aside_prefix(path: Path) -> str:
    return f".{path.name}.old-"


def set_aside(path: Path) -> Path | None:
    """The complete previous checkpoint a crash inside ``publish`` left aside while
    replacing ``path`` (only when ``path`` itself is missing), else None."""
    if path.exists() or not path.parent.is_dir():
        return None
    found = sorted(p for p in path.parent.glob(f"{aside_prefix(path)}*") if (p / MARKER).is_file())
    return found[-1] if found else None


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory, deepest first."""
    dirs = [root]
    for p in sorted(root.rglob("*")):
        if p.is_dir() and not p.is_symlink():
            dirs.append(p)
        elif p.is_file():
            fsync_path(p)
    for d in reversed(dirs):
        fsync_path(d)


def write_file(path: Path, data: bytes) -> dict[str, int]:
    """Write and fsync ``data``; returns its manifest entry (size, crc32)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"size": len(data), "crc32": crc32(data)}


def save_plain(obj: Any, path: Path) -> dict[str, int]:
    """Small non-tensor state (and CPU tensors), readable with ``weights_only=True``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_file(path, buf.getbuffer())


def load_plain(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointCorrupt(f"checkpoint file {path} is missing") from None
    except Exception as e:  # an unpickling error: truncated, corrupted or not ours
        raise CheckpointCorrupt(
            f"{path} could not be read with weights_only=True ({type(e).__name__}: {e}); "
            "the file is corrupted or was not written by overdrive") from None


# --------------------------------------------------------------------------- manifest


def crc32_file(path: Path) -> int:
    """crc32 of a file through mmap (no copy into Python buffers; ~7 GB/s a core)."""
    crc = 0
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return 0
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                for i in range(0, len(view), _CRC_BLOCK):
                    crc = crc32(view[i:i + _CRC_BLOCK], crc)
            finally:
                view.release()
    return crc


def describe_files(root: Path, names: list[str]) -> dict[str, dict[str, int]]:
    return {n: {"size": (root / n).stat().st_size, "crc32": crc32_file(root / n)} for n in names}


class _ChecksumStream:
    """A file being written, with the size and crc32 of the bytes that went through it."""

    def __init__(self, raw):
        self.raw, self.size, self.crc32 = raw, 0, 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.crc32 = crc32(view, self.crc32)
        self.size += view.nbytes
        return self.raw.write(view)

    def __getattr__(self, name: str):  # tell, flush, fileno, close… are the file's
        return getattr(self.raw, name)


class _ChecksumFileSystem(FileSystem):
    """DCP's local file system, recording ``{relative name: {size, crc32}}`` of every file
    written in one sequential pass (``rename`` carries a record along).

    While a file is written, torch.save's own crc32 of each record inside it is off: the
    file's manifest crc32 (checked before every load) covers those bytes, and the second
    checksum was about a quarter of torch.save's cost. The option is thread-local in
    torch's serialization config, and DCP writes each file from one thread, so nothing
    else the process saves meanwhile is affected."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = Path(root)
        self.written: dict[str, dict[str, int]] = {}

    def _name(self, path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        with super().create_stream(path, mode) as raw:
            if mode != "wb":
                yield raw
                return
            stream = _ChecksumStream(raw)
            record_crc32 = torch.serialization.get_crc32_options()
            torch.serialization.set_crc32_options(False)
            try:
                yield stream
            finally:
                torch.serialization.set_crc32_options(record_crc32)
        if os.path.getsize(path) == stream.size:  # else written by seeking back: not recorded
            self.written[self._name(path)] = {"size": stream.size, "crc32": stream.crc32}

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        entry = self.written.pop(self._name(path), None)
        if entry is not None:
            self.written[self._name(new_path)] = entry


class ChecksumWriter(FileSystemWriter):
    """``dcp.FileSystemWriter`` whose files' manifest entries are computed from the bytes
    as they are written (``.written``), so publishing needs no second read of the data."""

    def __init__(self, path: str | os.PathLike, **kwargs: Any):
        super().__init__(path, **kwargs)
        self.fs = _ChecksumFileSystem(Path(path))

    @property
    def written(self) -> dict[str, dict[str, int]]:
        return self.fs.written


def check_sizes(root: Path, entries: dict[str, dict[str, int]]) -> None:
    """The files on disk have the sizes their entries were computed for."""
    for name, entry in entries.items():
        size = (root / name).stat().st_size
        if size != entry["size"]:
            raise CheckpointCorrupt(f"{root / name} has {size} bytes after writing "
                                    f"{entry['size']}; something else wrote to it")


def data_files(root: Path) -> list[str]:
    """Every file under ``root`` (relative POSIX paths) except the manifest and marker."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.name not in (MANIFEST, MARKER))


def verify_files(root: Path, manifest: dict[str, dict[str, int]], names: list[str],
                 crc: bool, threads: int = 1) -> list[str]:
    """Problems found in ``names`` (a subset of the manifest): missing, size, crc32.

    The crc32s are computed on ``threads`` threads: zlib-ng releases the GIL on large
    buffers, and DCP writes several files per rank, so the check reads them in parallel."""
    problems, to_crc = [], []
    for n in names:
        want, p = manifest[n], root / n
        if not p.is_file():
            problems.append(f"{n}: missing")
        elif p.stat().st_size != want["size"]:
            problems.append(f"{n}: {p.stat().st_size} bytes, the manifest says {want['size']} "
                            "(truncated or overwritten)")
        elif crc:
            to_crc.append(n)
    if to_crc:
        with ThreadPoolExecutor(max(1, min(len(to_crc), threads))) as pool:
            crcs = pool.map(lambda n: crc32_file(root / n), to_crc)
            problems += [f"{n}: crc32 differs from the manifest (corrupted)"
                         for n, got in zip(to_crc, crcs) if got != manifest[n]["crc32"]]
    return problems


def read_manifest(root: Path) -> dict[str, dict[str, int]]:
    try:
        files = json.loads((root / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointCorrupt(f"{root / MANIFEST} is missing or unreadable ({e})") from None
    for name in files:
        if Path(name).is_absolute() or ".." in Path(name).parts or name in ("", "."):
            raise CheckpointCorrupt(f"{root / MANIFEST} names a file outside the checkpoint: {name!r}")
    return files


# --------------------------------------------------------------------------- marker


def write_marker(root: Path, meta: dict[str, Any]) -> None:
    write_file(root / MARKER, json.dumps(meta, indent=1, default=repr).encode())


def read_marker(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / MARKER).is_file():
        hint = ""
        leftovers = sorted(p.name for p in path.parent.glob(f"{tmp_prefix(path)}*")) \
            if path.parent.is_dir() else []
        if leftovers:
            hint = (f"; {', '.join(leftovers)} is an unfinished save of it (the process "
                    "stopped before its rename): it was never published and is not loaded")
        what = "does not exist" if not path.exists() else f"has no {MARKER}"
        raise NotACheckpoint(
            f"{path} is not an overdrive checkpoint: it {what}{hint}. Pass a directory "
            "written by rt.save(); weights exported by rt.export() load with od.load_weights()")
    try:
        meta = json.loads((path / MARKER).read_text())
    except ValueError as e:
        raise CheckpointCorrupt(f"{path / MARKER} is not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise NotACheckpoint(f"{path} has checkpoint format {meta.get('format')!r}; this "
                             f"version of overdrive reads format {FORMAT}")
    return meta


def list_checkpoints(parent: Path) -> list[tuple[int, Path]]:
    """Completed checkpoints directly under ``parent`` (marker present), oldest first."""
    found = []
    for p in parent.iterdir() if parent.is_dir() else []:
        if p.is_dir() and not p.name.startswith(".") and (p / MARKER).is_file():
            try:
                found.append((int(json.loads((p / MARKER).read_text())["time_ns"]), p))
            except (ValueError, KeyError, OSError):
                continue
    return sorted(found)


def series(name: str) -> re.Pattern | None:
    """The names of ``name``'s series: its last number replaced by any number
    (``step-400`` → ``step-\\d+``); None when the name holds no number."""
    numbers = list(re.finditer(r"\d+", name))
    if not numbers:
        return None
    last = numbers[-1]
    return re.compile(re.escape(name[:last.start()]) + r"\d+" + re.escape(name[last.end():]))


def prune(path: Path, keep_last: int) -> list[Path]:
    """Remove all but the ``keep_last`` newest complete checkpoints of ``path``'s series
    (its siblings named like it with another number; ``best/`` or ``other-3/`` are not);
    ``path`` itself, just written, is the newest."""
    pattern = series(path.name)
    if pattern is None:
        return []
    ckpts = [p for _, p in list_checkpoints(path.parent) if pattern.fullmatch(p.name)
             and p != path]
    doomed = ckpts[:max(0, len(ckpts) - (keep_last - 1))]
    for p in doomed:
        (p / MARKER).unlink(missing_ok=True)  # not a checkpoint any more, even if rmtree stops
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# --------------------------------------------------------------------------- publication


def publish(tmp: Path, path: Path) -> None:
    """Rename the finished ``tmp`` to ``path``; an existing ``path`` is replaced.

    A replaced checkpoint is first renamed aside (``.<name>.old-<uuid>``) and deleted after
    the new one is in place; a crash between the two renames leaves it there, complete:
    ``load`` of ``path`` reads it (``set_aside``) and the next save of ``path`` renames it
    back before writing.
    """
    fsync_path(tmp)
    aside = None
    if path.exists():
        aside = path.parent / f"{aside_prefix(path)}{tmp.name.rsplit('-', 1)[-1]}"
        os.rename(path, aside)
    os.rename(tmp, path)
    fsync_path(path.parent)
    if aside is not None:
        (aside / MARKER).unlink(missing_ok=True)  # half deleted, it is no checkpoint
        shutil.rmtree(aside, ignore_errors=True)


# --------------------------------------------------------------------------- safe DCP reading

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED_GLOBALS = frozenset({
    (_DCP_METADATA, "Metadata"), (_DCP_METADATA, "MetadataIndex"),
    (_DCP_METADATA, "StorageMeta"), (_DCP_METADATA, "TensorStorageMetadata"),
    (_DCP_METADATA, "BytesStorageMetadata"), (_DCP_METADATA, "ChunkStorageMetadata"),
    (_DCP_METADATA, "TensorProperties"), (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("builtins", "set"), ("builtins", "frozenset"),
})


class _MetadataUnpickler(pickle.Unpickler):
    """Admits exactly DCP's metadata classes, torch dtypes/sizes/layouts, and nothing else.

    Only whole (module, name) pairs from the list: a dotted name (pickle protocol 4 resolves
    ``name`` attribute by attribute, so ``("torch.distributed.checkpoint.filesystem",
    "os.system")`` would be ``os.system``) is never looked up.
    """

    def find_class(self, module: str, name: str):
        if "." not in name:
            if (module, name) in _ALLOWED_GLOBALS:
                return super().find_class(module, name)
            if module == "torch" and isinstance(getattr(torch, name, None),
                                                (torch.dtype, torch.layout, torch.memory_format)):
                return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


class SafeReader(FileSystemReader):
    """FileSystemReader whose ``.metadata`` is unpickled with an allow-list and whose index
    may only name files of the manifest, inside the checkpoint, within their sizes.

    DCP's own reader reads one file after another; a rank's files (one per writer thread)
    are read here on ``threads`` threads, each file by DCP's own loop: reading, unpickling
    the records and copying into the model overlap (the copies release the GIL)."""

    def __init__(self, path: str | os.PathLike, manifest: dict[str, dict[str, int]],
                 threads: int = 1):
        super().__init__(path)
        self.manifest = manifest
        self.threads = threads
        self._read: dict[Any, Any] = {}  # rank → metadata: checked once, handed out again

    def read_data(self, plan, planner):
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path,
                                []).append(item)
        if self.threads <= 1 or len(per_file) <= 1:
            return super().read_data(plan, planner)
        parts = [dataclasses.replace(plan, items=items) for items in per_file.values()]
        with ThreadPoolExecutor(min(self.threads, len(parts))) as pool:
            for done in pool.map(lambda part: super(SafeReader, self).read_data(part, planner),
                                 parts):
                done.wait()
        return done

    def read_metadata(self, *args: Any, **kwargs: Any):
        if kwargs.get("rank") not in self._read:
            self._read[kwargs.get("rank")] = self._read_checked(kwargs.get("rank"))
        return self._read[kwargs.get("rank")]

    def _read_checked(self, rank):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = Path(self._get_metadata_path(rank))
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except FileNotFoundError:
            raise CheckpointCorrupt(f"{path} is missing") from None
        except Exception as e:
            raise CheckpointCorrupt(f"{path} is not valid DCP metadata ({type(e).__name__}: "
                                    f"{e})") from None
        check_storage_index(Path(self.path), getattr(metadata, "storage_data", None),
                            self.manifest)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def check_storage_index(root: Path, storage_data: Any, manifest: dict[str, dict[str, int]]
                        ) -> None:
    """Every entry of DCP's index must point into a manifest file inside ``root``, within
    its size, with no stream transforms (overdrive writes none)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    where = root / ".metadata"
    if not isinstance(storage_data, dict):
        raise CheckpointCorrupt(f"{where} has no storage index")
    base = root.resolve()
    inside: set[str] = set()  # relative paths already resolved
    for index, info in storage_data.items():
        if not isinstance(info, _StorageInfo) or not isinstance(info.relative_path, str):
            raise CheckpointCorrupt(f"{where}: the entry of {index} is not a file location")
        rel = info.relative_path
        if rel not in inside and (Path(rel).is_absolute() or (root / rel).resolve().parent
                                  != base):
            raise CheckpointCorrupt(f"{where} points {getattr(index, 'fqn', index)!r} at "
                                    f"{rel!r}, which is outside {root}; refusing to read it")
        inside.add(rel)
        if rel not in manifest:
            raise CheckpointCorrupt(f"{where} points {getattr(index, 'fqn', index)!r} at "
                                    f"{rel!r}, which is not in {root / MANIFEST}")
        if info.transform_descriptors:
            raise CheckpointCorrupt(f"{where}: {rel!r} has stream transforms "
                                    f"{list(info.transform_descriptors)}; overdrive writes none")
        offset, length = info.offset, info.length
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0
                and length >= 0 and offset + length <= manifest[rel]["size"]):
            raise CheckpointCorrupt(f"{where}: {getattr(index, 'fqn', index)!r} spans bytes "
                                    f"{offset}+{length} of {rel!r}, which has "
                                    f"{manifest[rel]['size']}")


class SafeLoadPlanner(DefaultLoadPlanner):
    """overdrive writes only tensors through DCP; a pickled item is refused, not run."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        raise CheckpointCorrupt(
            f"DCP item {read_item.dest_index.fqn!r} is a pickled object; overdrive checkpoints "
            "hold only tensors in DCP files and refuses to unpickle it")
