"""The files of a checkpoint directory: atomic publication, manifest, safe readers.

A checkpoint is a directory ``path`` holding

    .metadata, __<rank>_<i>.distcp     torch.distributed.checkpoint (tensors only)
    state.pt                           replicated non-tensor state (optimizer param groups,
                                       scheduler, scaler, step counters), weights_only
    rank-<r>.pt                        per-rank state (RNG, data-loader positions), weights_only
    manifest.json                      size and crc32 of every file above, whole and per
                                       8 MiB chunk (checkpoint_crc.py; computed from the
                                       bytes as they are written; DeepSpeed's files,
                                       which it writes itself, are read back once)
    overdrive_checkpoint.json          the marker, written last: format, step, world size, plan

It is written to a hidden sibling ``.<name>.tmp-<uuid>`` and renamed to ``path`` by rank 0
only after every rank has written and fsynced its files. A directory without the marker is
not a checkpoint; a crash before the rename leaves only the hidden sibling, which the next
save of ``path`` or of its series removes. All ranks must see the same filesystem.

Nothing here executes code from a file: DCP's pickled ``.metadata`` is read with an
unpickler that only admits DCP's own metadata classes, the ``.pt`` files are loaded with
``weights_only=True``. Nothing is read from outside the directory: the manifest and DCP's
index may only name files inside it (symlinks resolved), and the index only files the
manifest lists, within their sizes. Only regular files are opened (``O_NOFOLLOW`` on the
resolved path, ``O_NONBLOCK`` so a FIFO cannot block the open, ``fstat`` checked before a
byte is read), each within a size bound: a listed file its manifest size, the manifest and
the marker ``MAX_JSON`` bytes.

A save in progress holds an exclusive ``flock`` on ``<tmp>/.lock`` (taken before the
directory appears under its ``.tmp-`` name, released after the rename): a temporary
directory whose lock can be taken belongs to a save that crashed or failed, and is removed
by the next save of the same series; one whose lock is held (an async save, another process)
is left alone. (The lock is as good as the filesystem's ``flock``: local filesystems and
NFSv4 share it between machines; a filesystem mounted with node-local locks does not.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import json
import mmap
import os
import pickle
import re
import shutil
import stat
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from ..errors import CheckpointCorrupt, NotACheckpoint
from . import checkpoint_crc as crcs

MARKER = "overdrive_checkpoint.json"
MANIFEST = "manifest.json"
LOCK = ".lock"  # held by the save writing a temporary directory; never part of a checkpoint
FORMAT = 1
# manifest.json's "version": 2 adds each file's chunk crc32s (checkpoint_crc.py); a
# manifest without them (version 1, no "version") is checked a whole file at a time
MANIFEST_VERSION = 2
MAX_JSON = 64 << 20  # the manifest and the marker: far above any real one


# --------------------------------------------------------------------------- safe opening


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def inside(root: Path, name: str) -> Path:
    """``root / name`` with symlinks resolved; refused when that leaves ``root``."""
    base = Path(root).resolve()
    try:
        real = (Path(root) / name).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL byte
        raise CheckpointCorrupt(f"{Path(root) / name} cannot be resolved ({e})") from None
    if real != base and base not in real.parents:
        raise CheckpointCorrupt(f"{Path(root) / name} resolves to {real}, which is outside "
                                f"{root}; refusing to read it")
    return real


def open_regular(path: Path, max_size: int | None = None) -> int:
    """A read-only descriptor of ``path`` (already resolved), a regular file of at most
    ``max_size`` bytes: never a FIFO (``O_NONBLOCK`` keeps the open from waiting for a
    writer), a device or a symlink (``O_NOFOLLOW``)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{path} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointCorrupt(f"{path} cannot be opened as a regular file ({e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointCorrupt(f"{path} is not a regular file (a FIFO, socket or device); "
                                    "refusing to read it")
        if max_size is not None and st.st_size > max_size:
            raise CheckpointCorrupt(f"{path} has {st.st_size} bytes, more than the {max_size} "
                                    "it may have")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: Path, max_size: int) -> bytes:
    """The bytes of a regular file of at most ``max_size`` bytes (see ``open_regular``)."""
    fd = open_regular(path, max_size)
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_size + 1)
    if len(data) > max_size:
        raise CheckpointCorrupt(f"{path} grew past {max_size} bytes while being read")
    return data


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(read_regular(path, MAX_JSON))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointCorrupt(f"{path} is not valid JSON ({type(e).__name__}: {e}); the "
                                f"{what} was damaged or not written by overdrive") from None


# --------------------------------------------------------------------------- paths


def tmp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def tmp_sibling(path: Path, token: str) -> Path:
    return path.parent / f"{tmp_prefix(path)}{token}"


def remove_stale_tmp(path: Path) -> list[Path]:
    """Remove hidden siblings left by saves that crashed or failed before their rename:
    the temporary directories of ``path`` and of its series (``step-100`` when saving
    ``step-200``) whose save holds no lock any more, and ``path``'s set-aside copies.

    A crash between the two renames of ``publish`` leaves the replaced checkpoint aside as
    ``.<name>.old-<uuid>`` with no ``path``: it is moved back, not deleted.
    """
    removed = []
    if not path.parent.is_dir():
        return removed
    aside = set_aside(path)
    if aside is not None:
        os.rename(aside, path)
    stale_tmp = _tmp_names(path)
    for p in path.parent.iterdir():
        if p.name.startswith(aside_prefix(path)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        elif stale_tmp.fullmatch(p.name) and remove_unlocked(p):
            removed.append(p)
    return removed


def _tmp_names(path: Path) -> re.Pattern:
    """The temporary directories of ``path``'s saves and of its series' saves."""
    pattern = series(path.name)
    names = pattern.pattern if pattern is not None else re.escape(path.name)
    return re.compile(r"\." + f"(?:{names})" + r"\.tmp-[0-9a-f]+")


class SaveLock:
    """The exclusive ``flock`` a save holds on its temporary directory (rank 0's process)."""

    def __init__(self, fd: int):
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def make_tmp(tmp: Path) -> SaveLock:
    """Create ``tmp`` with its lock already held: it is built under another name and
    renamed, so no other process ever sees it unlocked."""
    building = tmp.with_name(tmp.name + ".new")
    building.mkdir(parents=True)
    fd = os.open(building / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(building, tmp)
    return SaveLock(fd)


def remove_unlocked(tmp: Path) -> bool:
    """Remove the temporary directory ``tmp`` unless a save still holds its lock."""
    try:
        fd = os.open(tmp / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = None  # from a crash while it was being removed, or an older overdrive
    except OSError:
        return False
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: a save in progress (async, or another process)
                return False
        shutil.rmtree(tmp, ignore_errors=True)
        return True
    finally:
        if fd is not None:
            os.close(fd)


def aside_prefix(path: Path) -> str:
    return f".{path.name}.old-"


def set_aside(path: Path) -> Path | None:
    """The complete previous checkpoint a crash inside ``publish`` left aside while
    replacing ``path`` (only when ``path`` itself is missing), else None."""
    if path.exists() or not path.parent.is_dir():
        return None
    found = sorted(p for p in path.parent.glob(f"{aside_prefix(path)}*")
                   if (p / MARKER).is_file() and not p.is_symlink())
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


def write_file(path: Path, data: bytes) -> dict[str, Any]:
    """Write and fsync ``data``; returns its manifest entry (size, crc32s)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return crcs.digest(data)


def save_plain(obj: Any, path: Path) -> dict[str, int]:
    """Small non-tensor state (and CPU tensors), readable with ``weights_only=True``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_file(path, buf.getbuffer())


def load_plain(root: Path, name: str, manifest: dict[str, dict[str, int]]) -> Any:
    """A listed ``.pt`` file of the checkpoint, read within its manifest size."""
    path = root / name
    data = read_regular(inside(root, name), manifest[name]["size"])
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # an unpickling error: truncated, corrupted or not ours
        raise CheckpointCorrupt(
            f"{path} could not be read with weights_only=True ({type(e).__name__}: {e}); "
            "the file is corrupted or was not written by overdrive") from None


# --------------------------------------------------------------------------- manifest


@contextlib.contextmanager
def _mapped(path: Path):
    """A read-only memoryview of a regular file through mmap (no copy into Python
    buffers); an empty file is ``b""``."""
    with os.fdopen(open_regular(Path(path)), "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield memoryview(b"")
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                yield view
            finally:
                view.release()


def crc32_file(path: Path) -> int:
    """crc32 of a whole file (~7 GB/s a core)."""
    with _mapped(path) as view:
        return crcs.crc32_long(view)


def describe_file(path: Path) -> dict[str, Any]:
    """The manifest entry of a file written by someone else (DeepSpeed), read once."""
    with _mapped(path) as view:
        return crcs.digest(view)


def describe_files(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: describe_file(root / n) for n in names}


class _ChecksumStream:
    """A file being written, with the size and crc32s of the bytes that went through it
    (``digest``: the whole file's and each chunk's, ``checkpoint_crc``)."""

    def __init__(self, raw):
        self.raw, self.digest = raw, crcs.Digest()

    @property
    def size(self) -> int:
        return self.digest.size

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
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
            self.written[self._name(path)] = stream.digest.entry()

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        entry = self.written.pop(self._name(path), None)
        if entry is not None:
            self.written[self._name(new_path)] = entry


def lower_thread_priority() -> bool:
    """Make the calling thread (and the threads it starts, which inherit it) the last to
    get a core: Linux nice 19 for this thread only. An async save's writers then take only
    the CPU time the training loop leaves. False where the OS has no per-thread nice."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (OSError, AttributeError):
        return False
    return True


class ChecksumWriter(FileSystemWriter):
    """``dcp.FileSystemWriter`` whose files' manifest entries are computed from the bytes
    as they are written (``.written``), so publishing needs no second read of the data.

    ``background=True`` (an async save, whose ``write_data`` runs in DCP's own
    one-save executor thread): that thread and the writer threads it starts run at the
    lowest CPU priority (``lower_thread_priority``)."""

    def __init__(self, path: str | os.PathLike, *, background: bool = False, **kwargs: Any):
        super().__init__(path, **kwargs)
        self.fs = _ChecksumFileSystem(Path(path))
        self.background = background

    def write_data(self, plan, planner):
        if self.background and threading.current_thread() is not threading.main_thread():
            lower_thread_priority()
        return super().write_data(plan, planner)

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
                  if p.is_file() and p.relative_to(root).as_posix() not in (MANIFEST, MARKER,
                                                                             LOCK))


def verify_files(root: Path, manifest: dict[str, dict[str, int]], names: list[str],
                 crc: bool, threads: int = 1) -> list[str]:
    """Problems found in ``names`` (a subset of the manifest): missing, size, crc32."""
    return start_verify(root, manifest, names, crc, threads).result()


class PendingVerify:
    """A check of files started by ``start_verify``: ``result()`` waits for its problems."""

    def __init__(self, problems: list[str], crc: "crcs.Verification | None"):
        self._problems, self._crc = problems, crc

    def result(self) -> list[str]:
        crc, self._crc = self._crc, None
        return self._problems + (crc.result() if crc is not None else [])


def start_verify(root: Path, manifest: dict[str, dict[str, int]], names: list[str],
                 crc: bool, threads: int = 1) -> PendingVerify:
    """Check ``names`` (a subset of the manifest): missing files and sizes at once, then
    the crc32s on ``threads`` threads in the background, chunk by chunk where the
    manifest has chunk crc32s (``checkpoint_crc``), else a file per thread: zlib-ng
    releases the GIL on large buffers."""
    problems, to_crc = [], []
    for n in names:
        want = manifest[n]
        try:
            real = inside(root, n)
            os.close(open_regular(real))
            size = real.stat().st_size
        except CheckpointCorrupt as e:
            problems.append(f"{n}: " + ("missing" if str(e).endswith(" is missing") else str(e)))
            continue
        if size != want["size"]:
            problems.append(f"{n}: {size} bytes, the manifest says {want['size']} "
                            "(truncated or overwritten)")
        elif crc:
            to_crc.append(n)
    if not to_crc:
        return PendingVerify(problems, None)

    def open_file(path: Path) -> int:
        try:
            return open_regular(path, manifest[path.relative_to(root).as_posix()]["size"])
        except CheckpointCorrupt as e:
            raise OSError(str(e)) from None

    return PendingVerify(problems, crcs.Verification(root, manifest, to_crc, threads,
                                                     open_file))


def read_manifest(root: Path) -> dict[str, dict[str, int]]:
    """``{name: {"size": int, "crc32": int}}``, every name inside the checkpoint."""
    where = root / MANIFEST
    doc = read_json(inside(root, MANIFEST), "manifest")
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict):
        raise CheckpointCorrupt(f"{where} holds no 'files' object (got {type(doc).__name__}"
                                f"{'' if not isinstance(doc, dict) else ' without it'}); the "
                                "manifest was damaged or not written by overdrive")
    for name, entry in files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts or name in ("", ".") \
                or "\x00" in name:
            raise CheckpointCorrupt(f"{where} names a file outside the checkpoint: {name!r}")
        if not (isinstance(entry, dict) and _is_int(entry.get("size")) and entry["size"] >= 0
                and _is_int(entry.get("crc32")) and 0 <= entry["crc32"] < 2**32):
            raise CheckpointCorrupt(f"{where}: the entry of {name!r} is {entry!r}; each file "
                                    "needs {\"size\": bytes >= 0, \"crc32\": 0..2**32-1}")
        problem = crcs.entry_problem(entry)
        if problem is not None:
            raise CheckpointCorrupt(f"{where}: the chunk crc32s of {name!r} are not valid "
                                    f"({problem}); the manifest was damaged or altered")
    return files


# --------------------------------------------------------------------------- marker


def write_marker(root: Path, meta: dict[str, Any]) -> None:
    write_file(root / MARKER, json.dumps(meta, indent=1, default=repr).encode())


def read_marker(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not os.path.lexists(path / MARKER) or not path.is_dir():
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
    meta = read_json(inside(path, MARKER), "marker")
    check_marker(meta, path / MARKER)
    return meta


def check_marker(meta: Any, where: Path) -> None:
    """The marker's fields ``load`` relies on, with their types."""
    if not isinstance(meta, dict):
        raise NotACheckpoint(f"{where} holds a JSON {type(meta).__name__}, not the object "
                             "rt.save writes; it is not an overdrive checkpoint marker")
    if meta.get("format") != FORMAT:
        raise NotACheckpoint(f"{where.parent} has checkpoint format {meta.get('format')!r}; "
                             f"this version of overdrive reads format {FORMAT}")
    checks = (("kind", meta.get("kind") in ("dcp", "deepspeed"), "'dcp' or 'deepspeed'"),
              ("step", _is_int(meta.get("step")) and meta["step"] >= 0, "an integer >= 0"),
              ("world_size", _is_int(meta.get("world_size")) and meta["world_size"] >= 1,
               "an integer >= 1"))
    for field, ok, want in checks:
        if not ok:
            raise CheckpointCorrupt(f"{where}: {field}={meta.get(field)!r} is not valid (it "
                                    f"must be {want}); the marker was altered or not written "
                                    "by overdrive")


def list_checkpoints(parent: Path) -> list[tuple[int, Path]]:
    """Completed checkpoints directly under ``parent`` (marker present), oldest first."""
    found = []
    for p in parent.iterdir() if parent.is_dir() else []:
        if p.is_dir() and not p.name.startswith(".") and (p / MARKER).is_file():
            try:
                meta = read_json(inside(p, MARKER), "marker")
                if _is_int(meta.get("time_ns")):
                    found.append((meta["time_ns"], p))
            except (CheckpointCorrupt, AttributeError):  # not ours to prune
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

    DCP's own reader unpickles every record into a new tensor and copies that into the
    destination; here each record's bytes go straight into it (``checkpoint_read.py``),
    a rank's files (one per writer thread) on ``threads`` threads. ``counts`` says how
    the last ``read_data`` read its records."""

    def __init__(self, path: str | os.PathLike, manifest: dict[str, dict[str, int]],
                 threads: int = 1):
        super().__init__(path)
        self.manifest = manifest
        self.threads = threads
        self._read: dict[Any, Any] = {}  # rank → metadata: checked once, handed out again
        self.counts = None  # checkpoint_read.ReadCounts of the last read_data
        self.layouts: dict[Any, RecordLayout] = {}  # records check_records parsed already

    def read_data(self, plan, planner):
        from torch.futures import Future

        from .checkpoint_read import read_data

        self.counts = read_data(Path(self.path), plan, self.storage_data, planner,
                                self.threads, self.layouts)
        done: Future = Future()
        done.set_result(None)
        return done

    def read_metadata(self, *args: Any, **kwargs: Any):
        if kwargs.get("rank") not in self._read:
            self._read[kwargs.get("rank")] = self._read_checked(kwargs.get("rank"))
        return self._read[kwargs.get("rank")]

    def _read_checked(self, rank):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = Path(self._get_metadata_path(rank))
        name = path.relative_to(self.path).as_posix()
        if name not in self.manifest:
            raise CheckpointCorrupt(f"{path} is not listed in {MANIFEST}")
        data = read_regular(inside(Path(self.path), name), self.manifest[name]["size"])
        try:
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
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


# --------------------------------------------------------------------------- record checks


class MapSlice(io.RawIOBase):
    """Bytes ``offset .. offset+length`` of a memory-mapped file, as a seekable file of
    their own: the small reads of parsing a record (zip directory, pickle) cost no system
    call, and nothing reads the data it does not ask for."""

    def __init__(self, data: mmap.mmap, offset: int, length: int):
        super().__init__()
        self.data, self.offset, self.length, self.pos = data, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = (0, self.pos, self.length)[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.length if n is None or n < 0 else min(self.length, self.pos + n)
        start = min(self.pos, end)
        self.pos = end
        return self.data[self.offset + start:self.offset + end]

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        memoryview(buf)[:len(data)] = data
        return len(data)


_STORAGE_ENTRY = re.compile(r"[^/]+/data/\d+")


def record_order(storage_data: dict[Any, Any]) -> list[Any]:
    """DCP's index entries in one order on every rank (to split the checks over ranks)."""
    return sorted(storage_data, key=lambda i: (i.fqn, tuple(i.offset or ()), i.index or 0))


def check_records(root: Path, metadata: Any, indices: list[Any]) -> dict[Any, RecordLayout]:
    """Each tensor record of ``indices`` unpickles with ``weights_only`` to a tensor of the
    chunk's shape and dtype, its storage present in full, without reading its data (loaded
    on the meta device): everything a later read into the model could trip over, except
    the data bytes themselves, which the manifest's crc32 covers.

    Returns the layouts found (``{index: RecordLayout}``; records torch's own loader
    checked are not in it): the read that follows does not parse them again."""
    layouts: dict[Any, RecordLayout] = {}
    by_file: dict[str, list[Any]] = {}
    for idx in indices:
        by_file.setdefault(metadata.storage_data[idx].relative_path, []).append(idx)
    for rel, idxs in sorted(by_file.items()):
        fd = open_regular(inside(root, rel))
        try:
            size = os.fstat(fd).st_size
            with (mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else
                  contextlib.nullcontext(b"")) as data:
                for idx in sorted(idxs, key=lambda i: metadata.storage_data[i].offset):
                    layout = _check_record(root / rel, data, metadata, idx)
                    if layout is not None:
                        layouts[idx] = layout
        finally:
            os.close(fd)
    return layouts


class _Unrecognised(Exception):
    """A record laid out otherwise than torch.save writes a plain tensor."""


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


@dataclasses.dataclass
class _TensorRef:
    """What a record's pickle describes, never built: dtype, shape, storage and view."""
    dtype: torch.dtype
    key: str
    numel: int  # elements of the storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_ref(storage, offset, size, stride, requires_grad=False, hooks=None,
                 metadata=None) -> _TensorRef:
    if not (isinstance(storage, tuple) and isinstance(offset, int)
            and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) and not hooks and not metadata):
        raise _Unrecognised
    return _TensorRef(*storage, offset, size, stride)


@dataclasses.dataclass(frozen=True)
class RecordLayout:
    """Where a plain-tensor record keeps its bytes, and how its tensor views them."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # the view's first element in the storage
    numel: int  # elements of the storage
    itemsize: int
    data_start: int  # byte offset of the storage's bytes in the record

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


class _RecordUnpickler(pickle.Unpickler):
    """The pickle torch.save writes for a plain tensor, read without building anything:
    ``_rebuild_tensor_v2`` of a typed storage, and nothing else (any other content goes
    to torch's own weights_only loader, ``_check_record``'s slow path)."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_ref
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name.endswith("Storage") and "." not in name:
            dtype = getattr(getattr(torch, name, None), "dtype", None)
            if isinstance(dtype, torch.dtype):
                return _StorageType(dtype)
        raise _Unrecognised

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and isinstance(pid[4], int) and pid[4] >= 0):
            raise _Unrecognised
        return (pid[1].dtype, pid[2], pid[4])


def _entry_start(z: zipfile.ZipFile, name: str) -> int:
    """Where an uncompressed entry's bytes start in the zip, past its local header."""
    info = z.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        raise _Unrecognised
    z.fp.seek(info.header_offset)
    head = z.fp.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise _Unrecognised
    name_len, extra_len = int.from_bytes(head[26:28], "little"), int.from_bytes(head[28:30],
                                                                                "little")
    return info.header_offset + 30 + name_len + extra_len


def _stored_bytes(z: zipfile.ZipFile, name: str) -> bytes:
    """An uncompressed entry's bytes, read past its local header. Not ``z.read``: the
    records' zip crc32s are not written (the file's manifest crc32 covers them)."""
    size = z.getinfo(name).compress_size
    z.fp.seek(_entry_start(z, name))
    data = z.fp.read(size)
    if len(data) != size:
        raise _Unrecognised
    return data


def _fast_record(z: zipfile.ZipFile) -> RecordLayout | None:
    """The layout of a plain-tensor record, checked against its zip entries; None when
    the record is laid out otherwise (the slow path decides)."""
    pkls = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        return None
    archive = pkls[0].rsplit("/", 1)[0]
    try:
        ref = _RecordUnpickler(io.BytesIO(_stored_bytes(z, pkls[0]))).load()
        order = f"{archive}/byteorder"
        if order in z.NameToInfo and _stored_bytes(z, order).decode() != sys.byteorder:
            return None  # torch.load swaps the bytes
    except Exception:  # noqa: BLE001 - _Unrecognised or a damaged pickle: the slow path
        return None
    if not isinstance(ref, _TensorRef):
        return None
    item = ref.dtype.itemsize
    extent = 1 + sum((n - 1) * st for n, st in zip(ref.shape, ref.stride)) \
        if all(n > 0 for n in ref.shape) else 0
    if ref.offset < 0 or any(n < 0 for n in ref.shape) or any(st < 0 for st in ref.stride) \
            or ref.offset + extent > ref.numel:
        raise CheckpointCorrupt(f"its view (offset {ref.offset}, shape {list(ref.shape)}, "
                                f"stride {list(ref.stride)}) exceeds its storage of "
                                f"{ref.numel} elements")
    entry = f"{archive}/data/{ref.key}"
    if entry not in z.NameToInfo:
        raise CheckpointCorrupt(f"its storage {entry!r} is missing")
    try:
        start = _entry_start(z, entry)
    except _Unrecognised:
        return None
    return RecordLayout(ref.dtype, tuple(ref.shape), tuple(ref.stride), ref.offset, ref.numel,
                        item, start)


def _check_record(path: Path, data, metadata: Any, idx: Any) -> RecordLayout | None:
    info = metadata.storage_data[idx]
    saved = metadata.state_dict_metadata.get(idx.fqn)
    chunk = next((c for c in getattr(saved, "chunks", ()) if c.offsets == idx.offset), None)
    where = f"{path}: the record of {idx.fqn!r} (bytes {info.offset}+{info.length})"
    if chunk is None:
        raise CheckpointCorrupt(f"{where} is not a tensor chunk the DCP metadata describes")
    try:
        if info.offset + info.length > len(data):
            raise CheckpointCorrupt(f"it ends past the file's {len(data)} bytes")
        z = zipfile.ZipFile(MapSlice(data, info.offset, info.length))
        layout = _fast_record(z)
        if layout is not None:
            fast = layout.dtype, layout.shape, layout.nbytes
        else:  # torch's own weights_only loader, on the meta device: ~2.5 ms
            tensor = torch.load(io.BufferedReader(MapSlice(data, info.offset, info.length)),
                                weights_only=True, map_location="meta")
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointCorrupt(f"{where} holds a {type(tensor).__name__}, not a "
                                        "tensor")
            fast = tensor.dtype, tuple(tensor.shape), tensor.untyped_storage().nbytes()
        storages = [z for z in z.infolist() if _STORAGE_ENTRY.fullmatch(z.filename)]
    except CheckpointCorrupt as e:
        raise CheckpointCorrupt(str(e) if str(e).startswith(where) else f"{where}: {e}") \
            from None
    except Exception as e:  # weights_only refusals, truncated or damaged zip records
        raise CheckpointCorrupt(f"{where} cannot be read with weights_only=True "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                                "; the file is corrupted or holds objects overdrive does not "
                                "unpickle") from None
    dtype, shape, storage = fast
    if tuple(shape) != tuple(chunk.sizes) or dtype != saved.properties.dtype:
        raise CheckpointCorrupt(f"{where} holds a {dtype} tensor of shape {list(shape)}; the "
                                f"DCP metadata says {saved.properties.dtype} {list(chunk.sizes)}")
    if len(storages) != 1 or storages[0].file_size != storage or \
            storages[0].compress_type != zipfile.ZIP_STORED:
        raise CheckpointCorrupt(f"{where}: its storage should be one uncompressed entry of "
                                f"{storage} bytes, found "
                                f"{[(z.filename, z.file_size) for z in storages]}")
    return layout
