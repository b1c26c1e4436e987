"""crc32 of checkpoint files per fixed-size chunk, so a load checks them on every core.

A manifest entry (``manifest.json``, ``"files"``) is ``{"size", "crc32"}``: the whole
file's crc32, which every checkpoint has (and older overdrive versions check). Entries
written since manifest version 2 also hold ``"chunk"`` (bytes, ``CHUNK``) and
``"chunks"``: the crc32 of bytes ``[i*chunk, (i+1)*chunk)`` of the file, the last one
shorter. They are computed in the same pass as the whole-file crc32 (the whole one is
combined from the chunks', ``combine``), and a load checks the chunks of all its files on
``threads`` threads at once (zlib-ng releases the GIL on large buffers), where the whole
crc32 of one file is one thread's sequential pass. An entry without chunks (an older
checkpoint) is checked whole.
"""

from __future__ import annotations

import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from zlib_ng.zlib_ng import crc32  # zlib's crc32, SIMD-accelerated: ~3x zlib's speed

CHUNK = 8 << 20  # 8 MiB: ~50 chunks per 400 MB, enough to keep 2-4 threads busy
_POLY = 0xEDB88320  # crc32's reflected polynomial


# --------------------------------------------------------------------------- combining


def _times(mat: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _square(mat: list[int]) -> list[int]:
    return [_times(mat, mat[i]) for i in range(32)]


_OPS: list[list[int]] = []  # _OPS[k]: a crc32 register moved past 2**k zero bytes


def _zeros_operator(k: int) -> list[int]:
    """The linear map taking a crc32 register past ``2**k`` zero bytes (built on first use,
    by squaring: ~0.3 ms each)."""
    if not _OPS:
        bit = [_POLY] + [1 << (n - 1) for n in range(1, 32)]  # one zero bit
        _OPS.append(_square(_square(_square(bit))))  # 2, 4, 8 bits: one byte
    while len(_OPS) <= k:
        _OPS.append(_square(_OPS[-1]))
    return _OPS[k]


def combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32 of ``a + b`` from ``crc32(a)``, ``crc32(b)`` and ``len(b)`` (zlib's
    ``crc32_combine``, which Python's zlib does not expose)."""
    k = 0
    while len2:
        if len2 & 1:
            crc1 = _times(_zeros_operator(k), crc1)
        len2 >>= 1
        k += 1
    return crc1 ^ crc2


# --------------------------------------------------------------------------- writing


class Digest:
    """Size, whole crc32 and chunk crc32s of bytes fed in order (``update``)."""

    def __init__(self, chunk: int = CHUNK):
        self.chunk, self.size, self.chunks = chunk, 0, []
        self._crc, self._filled = 0, 0  # the open chunk

    def update(self, view: memoryview) -> None:
        pos, n = 0, view.nbytes
        while pos < n:
            take = min(self.chunk - self._filled, n - pos)
            self._crc = crc32(view[pos:pos + take], self._crc)
            self._filled += take
            pos += take
            if self._filled == self.chunk:
                self.chunks.append(self._crc)
                self._crc, self._filled = 0, 0
        self.size += n

    def entry(self) -> dict[str, Any]:
        """The manifest entry of the bytes so far."""
        chunks = self.chunks + ([self._crc] if self._filled else [])
        whole = 0
        for i, c in enumerate(chunks):
            length = self.chunk if i < len(self.chunks) else self._filled
            whole = combine(whole, c, length)
        return {"size": self.size, "crc32": whole, "chunk": self.chunk, "chunks": chunks}


def digest(data) -> dict[str, Any]:
    d = Digest()
    d.update(memoryview(data).cast("B"))
    return d.entry()


# --------------------------------------------------------------------------- checking


def entry_problem(entry: dict[str, Any]) -> str | None:
    """Why an entry's chunk fields are malformed (None: absent or well formed)."""
    if "chunk" not in entry and "chunks" not in entry:
        return None
    chunk, chunks = entry.get("chunk"), entry.get("chunks")
    if not (type(chunk) is int and chunk > 0 and isinstance(chunks, list)
            and all(type(c) is int and 0 <= c < 2**32 for c in chunks)):
        return ("\"chunk\" must be a byte count > 0 and \"chunks\" a list of crc32s "
                "0..2**32-1")
    want = -(-entry["size"] // chunk)
    if len(chunks) != want:
        return (f"{len(chunks)} chunk crc32s for {entry['size']} bytes in chunks of {chunk}; "
                f"it needs {want}")
    return None


def _ranges(entry: dict[str, Any]) -> list[tuple[int, int, int]]:
    """(offset, length, expected crc32) of what to check in a file."""
    size = entry["size"]
    if "chunks" not in entry:
        return [(0, size, entry["crc32"])]
    chunk = entry["chunk"]
    return [(i * chunk, min(chunk, size - i * chunk), c) for i, c in enumerate(entry["chunks"])]


class Verification:
    """``names`` (files of ``root`` whose sizes were checked) against their crc32s, every
    chunk of every file on ``threads`` threads, started at once; ``result()`` waits for it
    and returns the problems, one per damaged file. ``open_file(path)`` opens one as a
    regular file (a descriptor). The caller may read the files meanwhile, but trusts
    nothing it read until ``result()`` came back empty."""

    def __init__(self, root: Path, manifest: dict[str, dict[str, Any]], names: list[str],
                 threads: int, open_file):
        self.names, self.maps, self.problems = list(names), {}, {}
        jobs = []
        for n in names:
            entry = manifest[n]
            if entry["size"] == 0:
                if entry["crc32"] != 0:
                    self.problems[n] = f"{n}: crc32 differs from the manifest (corrupted)"
                continue
            try:
                self.maps[n] = _map(open_file(root / n), entry["size"])
            except (OSError, ValueError) as e:
                self.problems[n] = f"{n}: {e}"
                continue
            jobs += [(n, *r) for r in _ranges(entry)]
        jobs.sort(key=lambda j: -j[2])  # the long ones first: the threads end together
        self.pool = ThreadPoolExecutor(max(1, min(threads, len(jobs))),
                                       thread_name_prefix="overdrive-crc32")
        self.futures = [self.pool.submit(self._check, *job) for job in jobs]

    def _check(self, name: str, offset: int, length: int, want: int) -> str | None:
        view = memoryview(self.maps[name])[offset:offset + length]
        try:
            return None if crc32_long(view) == want else name
        finally:
            view.release()

    def result(self) -> list[str]:
        try:
            for f in self.futures:
                bad = f.result()
                if bad is not None:
                    self.problems.setdefault(bad, f"{bad}: crc32 differs from the manifest "
                                                  "(corrupted)")
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
            for m in self.maps.values():
                m.close()
            self.maps = {}
        return [self.problems[n] for n in self.names if n in self.problems]


def _map(fd: int, size: int) -> mmap.mmap:
    """A read-only map of the ``size`` bytes of ``fd`` (closed here)."""
    try:
        have = os.fstat(fd).st_size
        if have != size:
            raise ValueError(f"{have} bytes, the manifest says {size} (changed while being "
                             "checked)")
        return mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)


def verify(root: Path, manifest: dict[str, dict[str, Any]], names: list[str], threads: int,
           open_file) -> list[str]:
    """``Verification(...).result()``: the problems of ``names``' crc32s."""
    return Verification(root, manifest, names, threads, open_file).result()


def crc32_long(view: memoryview, block: int = 64 << 20) -> int:
    """crc32 of a long buffer, fed in ``block``-sized slices."""
    crc = 0
    for i in range(0, view.nbytes, block):
        crc = crc32(view[i:i + block], crc)
    return crc
