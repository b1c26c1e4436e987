"""``metrics.jsonl``'s lines, and the helper process that writes them for a fast loop.

Standard library only: the same file runs as the writer process (``python -I -S
jsonl.py PATH``), which must start in milliseconds without importing torch.

``json_lines(rows)`` is the text of ``[(metrics, step), ...]``: exactly what
``json.dumps({"step": step, **metrics})`` writes, a line each, but each run of rows with
the same keys is one %-format of a template made once per key set.

Formatting a float is the costly part of a row (``repr`` of a measured double: ~0.4 µs,
2 µs a row), so when a loop logs hundreds of rows a second the jsonl tracker hands its
rows to a ``Writer``: a child process that formats and appends them, fed over a pipe with
the step metrics' columns as raw doubles (``encode_columns``, ~0.2 µs a row). The child
writes with ``json_lines`` too, so the file is the same byte for byte either way.

Wire format, parent → child, a frame at a time: one kind byte, a little-endian uint32
payload length, the payload. ``T``: UTF-8 lines, written as they are; ``C``: columns
(uint32 header length, the JSON header ``{"n", "keys", "sparse"}``, the steps as int64,
then per key a presence byte per row when the key is in ``sparse`` and the values as
float64); ``E``: the end (the child flushes, closes and exits). End of input without
``E`` (the parent died) also ends the child, after it wrote every whole frame.
"""

from __future__ import annotations

import json
import struct
import sys
from array import array
from typing import Any, Iterable

# --------------------------------------------------------------------------- lines

# the line format of each row's key tuple ('{"step": %d, "loss": %r}\n'); the step
# metrics' rows repeat a few key tuples, so each row is one %-format. Bounded: key sets
# made up per step are not kept.
_TEMPLATES: dict[tuple, str | None] = {}
_PLAIN = frozenset({float, int})


def json_lines(rows: list[tuple[dict[str, Any], Any]]) -> str:
    """The lines of ``rows``: each run of rows with the same keys (the step metrics' rows
    are one run) is one %-format of its template repeated, when they are all plain (int
    steps, finite floats and ints); any other row is written on its own."""
    out, i, n = [], 0, len(rows)
    while i < n:
        keys = tuple(rows[i][0])
        j = i + 1
        while j < n and tuple(rows[j][0]) == keys:
            j += 1
        out.append(_json_run(rows[i:j], keys))
        i = j
    return "".join(out)


def _json_run(run: list[tuple[dict[str, Any], Any]], keys: tuple) -> str:
    """One run's lines: one %-format of the template repeated when every row is plain
    (``repr`` is JSON's own number text for finite floats and ints); else row by row,
    a row that is not plain through ``json.dumps``."""
    template = _template_of(keys)
    if template is not None:
        flat: list[Any] = []
        for metrics, step in run:
            flat.append(step)
            flat.extend(metrics.values())
        if _PLAIN.issuperset(map(type, flat)) and \
                all(type(step) is int for _, step in run) and _finite(flat):
            return (template * len(run)) % tuple(flat)
    if len(run) > 1:
        return "".join([_json_run([row], keys) for row in run])
    metrics, step = run[0]
    return json.dumps({"step": step, **metrics}) + "\n"


def _finite(values: list) -> bool:
    """No nan or ±inf among these ints and floats (an overflow only says False)."""
    try:
        total = sum(values)
    except OverflowError:
        return False
    return total - total == 0


def _template_of(keys: tuple) -> str | None:
    template = _TEMPLATES.get(keys, False)
    if template is False:
        template = _template(keys)
        if len(_TEMPLATES) < 256:
            _TEMPLATES[keys] = template
    return template


def _template(keys: tuple) -> str | None:
    """The %-format line of rows with ``keys``; None when a key is not a string or is
    "step" (json.dumps's own handling)."""
    if "step" in keys or not all(isinstance(k, str) for k in keys):
        return None
    fields = "".join(f", {json.dumps(k).replace('%', '%%')}: %r" for k in keys)
    return '{"step": %d' + fields + "}\n"


# --------------------------------------------------------------------------- the wire

_HEAD = struct.Struct("<cI")
_U32 = struct.Struct("<I")
_FLOAT = frozenset({float})


def all_floats(values) -> bool:
    """Every value is a Python float (one C-level pass; no subclass, no int)."""
    return _FLOAT.issuperset(map(type, values))


def frame(kind: bytes, payload: bytes) -> bytes:
    return _HEAD.pack(kind, len(payload)) + payload


def encode_columns(steps: list[int], columns: dict[str, list]) -> bytes | None:
    """A ``C`` frame of rows given column by column (None where a row lacks the key), or
    None when a value is not a float or a step not an int (those rows go as text)."""
    n = len(steps)
    if not n or set(map(type, steps)) != {int}:
        return None
    try:
        body = [array("q", steps).tobytes()]
    except OverflowError:
        return None
    sparse = []
    for key, values in columns.items():
        if None in values:
            sparse.append(key)
            body.append(bytes([v is not None for v in values]))
            values = [0.0 if v is None else v for v in values]
        if not all_floats(values):
            return None
        body.append(array("d", values).tobytes())
    header = json.dumps({"n": n, "keys": list(columns), "sparse": sparse}).encode()
    return frame(b"C", _U32.pack(len(header)) + header + b"".join(body))


def decode_columns(payload: bytes) -> list[tuple[dict[str, float], int]]:
    """The rows of a ``C`` frame's payload, as ``(metrics, step)`` pairs."""
    (size,) = _U32.unpack_from(payload)
    header = json.loads(payload[4:4 + size])
    n, at = header["n"], 4 + size
    steps = array("q")
    steps.frombytes(payload[at:at + 8 * n])
    at += 8 * n
    sparse, columns = set(header["sparse"]), []
    for key in header["keys"]:
        mask = None
        if key in sparse:
            mask, at = payload[at:at + n], at + n
        values = array("d")
        values.frombytes(payload[at:at + 8 * n])
        at += 8 * n
        columns.append((key, values, mask))
    rows = []
    for i, step in enumerate(steps):
        rows.append(({k: v[i] for k, v, m in columns if m is None or m[i]}, step))
    return rows


# --------------------------------------------------------------------------- the parent


class Writer:
    """The parent's end of a writer process appending to ``path``: ``send`` frames
    (written to the pipe at once when 0.5 s have passed since the last write, else
    gathered), ``close`` ends the child and waits for it (the file is whole then).
    Raises OSError when the process cannot start or has gone away."""

    WRITE_INTERVAL_S = 0.5

    def __init__(self, path: str):
        import os
        import subprocess
        import time

        self._clock = time.monotonic
        self._proc = subprocess.Popen([sys.executable, "-I", "-S", __file__,
                                       os.path.abspath(path)],
                                      stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        self._pipe = self._proc.stdin
        _widen(self._pipe)
        self._pending: list[bytes] = []
        self._written = self._clock()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def send(self, data: bytes) -> None:
        self._pending.append(data)
        now = self._clock()
        if now - self._written >= self.WRITE_INTERVAL_S:
            self._written = now
            self._write()

    def _write(self) -> None:
        if self._proc.poll() is not None:
            raise BrokenPipeError(f"the writer process exited with code {self._proc.returncode}")
        data, self._pending = b"".join(self._pending), []
        self._pipe.write(data)
        self._pipe.flush()

    def close(self, timeout: float) -> str | None:
        """Write what is pending and the end; None when the child wrote it all and
        exited, else what went wrong."""
        import subprocess

        try:
            self._pending.append(frame(b"E", b""))
            self._write()
            self._pipe.close()
        except OSError as err:
            self.kill()
            return f"the writer process went away ({type(err).__name__}: {err})"
        try:
            code = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return f"the writer process did not finish within {timeout:.0f} s"
        return None if code == 0 else f"the writer process exited with code {code}"

    def kill(self) -> None:
        try:
            self._pipe.close()
        except OSError:
            pass
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


def _widen(pipe) -> None:
    """A 1 MiB pipe (Linux) where that is allowed: a flush's rows fit, the write never
    waits for the child to read."""
    try:
        import fcntl

        fcntl.fcntl(pipe.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except (ImportError, OSError):
        pass


# --------------------------------------------------------------------------- the child


def _read_exact(stream, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def serve(path: str, stream=None) -> None:
    """The writer process: frames from ``stream`` (stdin) appended to ``path`` as lines,
    flushed after each frame, until ``E`` or the end of input."""
    stream = stream if stream is not None else sys.stdin.buffer
    with open(path, "a", encoding="utf-8") as out:
        for kind, payload in _frames(stream):
            if kind == b"E":
                return
            out.write(payload.decode("utf-8") if kind == b"T" else
                      json_lines(decode_columns(payload)))
            out.flush()


def _frames(stream) -> Iterable[tuple[bytes, bytes]]:
    while True:
        head = _read_exact(stream, _HEAD.size)
        if head is None:
            return
        kind, size = _HEAD.unpack(head)
        payload = _read_exact(stream, size)
        if payload is None:
            return
        yield kind, payload


if __name__ == "__main__":
    serve(sys.argv[1])
