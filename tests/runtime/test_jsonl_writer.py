"""metrics.jsonl's writer process: a fast loop's rows are written by a helper process fed
the step metrics' columns as numbers; the file is byte for byte what json.dumps writes,
the same as when this process writes it; a writer that cannot start, dies, or loses its
parent never loses the run's rows silently, never outlives the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import overdrive as od
from overdrive.runtime import jsonl, step_metrics, tracking
from overdrive.runtime.rows import Rows, StepColumns

NAN, INF = float("nan"), float("inf")


def _mixed_rows() -> Rows:
    """Step columns (sparse keys, non-finite values, -0.0, huge and tiny numbers), a
    column that is not all floats (ints: sent as text) and rt.log rows between them."""
    return Rows([
        StepColumns([1, 2, 3, 4], {"loss": [0.5, None, NAN, -0.0],
                                   "lr": [0.1, 0.1, 1e-300, 2.5e-7],
                                   "grad_norm": [None, INF, -INF, 1e308]}),
        ({"eval_loss": 0.25, 'a"b\u00e9': 1}, 4),
        StepColumns([5, 6], {"loss": [0.125, 3.0], "lr": [1, 2]}),  # int lr
        ({}, 6),
        StepColumns([7], {}),
        StepColumns([8, 9], {"loss": [None, None], "lr": [0.5, 0.5]}),
    ])


def _expected(rows: Rows) -> str:
    return "".join(json.dumps({"step": s, **m}) + "\n" for m, s in rows.pairs())


@pytest.mark.parametrize("min_rows", [0, 10 ** 9], ids=["writer-process", "in-process"])
def test_both_ways_write_what_json_dumps_writes(tmp_path, monkeypatch, min_rows):
    monkeypatch.setattr(tracking, "WRITER_MIN_ROWS", min_rows)
    tracker = tracking.JsonlTracker()
    tracker.open(tmp_path)
    tracker._log_batch(_mixed_rows())
    tracker.log_rows([({"x": 1.5}, 10)])  # the public path goes the same way
    used_writer = tracker._writer is not None
    tracker.finish()
    assert used_writer == (min_rows == 0)
    assert (tmp_path / "metrics.jsonl").read_text() == \
        _expected(_mixed_rows()) + json.dumps({"step": 10, "x": 1.5}) + "\n"


def test_columns_cross_the_wire_unchanged():
    steps, columns = [3, 2 ** 40], {"a": [0.1 + 0.2, None], "b": [NAN, 5e-324]}
    payload = jsonl.encode_columns(steps, columns)[jsonl._HEAD.size:]
    rows = jsonl.decode_columns(payload)
    assert [s for _, s in rows] == steps
    assert rows[0][0]["a"] == 0.1 + 0.2 and "a" not in rows[1][0]
    assert rows[1][0]["b"] == 5e-324 and rows[0][0]["b"] != rows[0][0]["b"]
    assert jsonl.encode_columns([1], {"a": [1]}) is None  # an int: as text
    assert jsonl.encode_columns([True], {"a": [1.0]}) is None  # a bool step: as text


def _fast_run(tmp_path, monkeypatch, steps: int):
    """A loop whose first flush after the first row holds ``steps - 1`` rows."""
    monkeypatch.setattr(step_metrics, "FLUSH_INTERVAL_S", 1e9)
    torch.manual_seed(0)
    rt = od.accelerate(torch.nn.Linear(3, 1), optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                       trackers=("jsonl",), run_dir=tmp_path / "run")
    x = torch.randn(4, 3)
    for _ in range(steps):
        rt.backward(rt.model(x).pow(2).mean())
        rt.optimizer.step()
        rt.optimizer.zero_grad()
    return rt


def _tracker(rt) -> tracking.JsonlTracker:
    (tracker,) = rt._tracking._trackers
    return tracker


def _gone(pid: int) -> bool:
    """No such process, or a zombie (exited, not reaped: an orphan's reaper may be slow)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def test_a_fast_loop_hands_its_rows_to_a_writer_process_that_finish_ends(tmp_path,
                                                                         monkeypatch):
    monkeypatch.setattr(tracking, "WRITER_MIN_ROWS", 50)
    rt = _fast_run(tmp_path, monkeypatch, steps=100)
    tracker = _tracker(rt)
    assert tracker._writer is None  # a row so far: written here
    rt._meter._flush(time.perf_counter())  # 99 rows: the writer starts
    writer = tracker._writer
    assert writer is not None and not _gone(writer.pid)
    rt.finish()
    assert _gone(writer.pid)  # finish waited for it (and reaped it)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == list(range(1, 101))
    assert all({"loss", "lr", "step_seconds", "memory_peak_gb"} <= set(r) for r in rows)


def test_a_writer_that_dies_leaves_the_rows_to_this_process_and_says_so(tmp_path, caplog):
    tracking_ = tracking.JsonlTracker()
    tracking_.open(tmp_path)
    tracking_._start_writer()
    writer = tracking_._writer
    writer.send(jsonl.frame(b"T", b'{"step": 1}\n'))
    writer._write()
    writer._proc.kill()
    writer._proc.wait()
    with caplog.at_level("WARNING", logger="overdrive"):
        tracking_._log_batch(Rows([StepColumns([2, 3], {"x": [1.0, 2.0]})]))
        writer._written = 0.0
        tracking_._log_batch(Rows([({"x": 3.0}, 4)]))
    tracking_.finish()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1]) == {"step": 4, "x": 3.0}  # written here from then on
    assert any("stopped" in r.message and "may be missing" in r.message
               for r in caplog.records)


def test_no_writer_process_no_problem(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python-here"))
    monkeypatch.setattr(tracking, "WRITER_MIN_ROWS", 1)
    tracker = tracking.JsonlTracker()
    tracker.open(tmp_path)
    tracker._log_batch(_mixed_rows())
    assert tracker._writer is None and tracker._inline
    tracker.finish()
    assert (tmp_path / "metrics.jsonl").read_text() == _expected(_mixed_rows())


PARENT_DIES = """
import os, sys
from overdrive.runtime import jsonl
writer = jsonl.Writer(sys.argv[1])
writer.send(jsonl.frame(b"T", b'{"step": 1}\\n'))
writer._write()
print(writer.pid, flush=True)
os._exit(3)
"""


def test_a_writer_whose_parent_dies_writes_what_it_got_and_exits(tmp_path):
    path = tmp_path / "metrics.jsonl"
    out = subprocess.run([sys.executable, "-c", PARENT_DIES, str(path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    pid = int(out.stdout)
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid)
    assert path.read_text() == '{"step": 1}\n'
