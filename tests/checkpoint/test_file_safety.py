"""rt.load opens only regular files inside the checkpoint, within size bounds, and refuses
malformed manifest/marker JSON with a CheckpointError — never a hang, a MemoryError or a
raw TypeError/KeyError/ZeroDivisionError."""

import json
import os
import signal

import pytest
import torch

import overdrive as od
from overdrive.runtime import checkpoint_files as cf

from ckpt_util import CountingLoader, make_model, manual_runtime, train_step


@pytest.fixture
def saved(tmp_path):
    model = make_model(2, seed=0)
    rt = manual_runtime(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    rt._loaders.append(CountingLoader())
    train_step(rt, rt._loaders[0])
    rt.save(tmp_path / "ck")
    return rt, tmp_path / "ck"


@pytest.fixture
def no_hang():
    """A load that blocks (a FIFO) fails the test after 20 s instead of hanging it."""
    def timeout(*_):
        raise TimeoutError("rt.load blocked")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _replace(path, kind, outside):
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "outside":  # the same bytes, through a link leaving the checkpoint
        path.symlink_to(outside)


@pytest.mark.parametrize("name", [cf.MANIFEST, cf.MARKER, "state.pt", "rank-0.pt",
                                  ".metadata", "__0_0.distcp"])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "outside"])
def test_only_regular_files_inside_the_checkpoint_are_read(saved, tmp_path, no_hang, name,
                                                           kind):
    rt, ck = saved
    outside = tmp_path / f"outside-{name}"
    outside.write_bytes((ck / name).read_bytes())
    _replace(ck / name, kind, outside)
    match = {"fifo": "not a regular file|missing|has no", "dev-zero": "outside|not a regular file",
             "outside": "outside"}[kind]
    with pytest.raises(od.CheckpointError, match=match):
        rt.load(ck)


def test_a_listed_file_larger_than_its_manifest_size_is_not_read_past_it(saved):
    rt, ck = saved
    with open(ck / "state.pt", "ab") as f:
        f.write(b"\0" * 1000)
    with pytest.raises(od.CheckpointCorrupt, match=r"state\.pt: \d+ bytes, the manifest says"):
        rt.load(ck, verify=False)


def _write(ck, name, doc):
    (ck / name).write_text(doc if isinstance(doc, str) else json.dumps(doc))


def _marker(ck):
    return json.loads((ck / cf.MARKER).read_text())


@pytest.mark.parametrize("edit,error,match", [
    (lambda m: [], od.NotACheckpoint, "holds a JSON list"),
    (lambda m: None, od.NotACheckpoint, "holds a JSON NoneType"),
    (lambda m: {**m, "world_size": 0}, od.CheckpointCorrupt, "world_size=0 is not valid"),
    (lambda m: {**m, "world_size": "2"}, od.CheckpointCorrupt, "world_size='2' is not valid"),
    (lambda m: {**m, "world_size": None}, od.CheckpointCorrupt, "world_size=None"),
    (lambda m: {k: v for k, v in m.items() if k != "world_size"}, od.CheckpointCorrupt,
     "world_size=None"),
    (lambda m: {**m, "step": None}, od.CheckpointCorrupt, "step=None is not valid"),
    (lambda m: {**m, "step": 1.5}, od.CheckpointCorrupt, "step=1.5"),
    (lambda m: {**m, "kind": ["dcp"]}, od.CheckpointCorrupt, "kind=\\['dcp'\\]"),
    (lambda m: "[" * 100000 + "]" * 100000, od.CheckpointCorrupt, "not valid JSON"),
    (lambda m: "\xff\xfe", od.CheckpointCorrupt, "not valid JSON"),
])
def test_malformed_marker(saved, edit, error, match):
    rt, ck = saved
    _write(ck, cf.MARKER, edit(_marker(ck)))
    with pytest.raises(error, match=match):
        rt.load(ck)


@pytest.mark.parametrize("doc,match", [
    ([], "holds no 'files' object"),
    (None, "holds no 'files' object"),
    ({"files": []}, "holds no 'files' object"),
    ({"files": None}, "holds no 'files' object"),
    ({"files": {"state.pt": None}}, r"the entry of 'state\.pt' is None"),
    ({"files": {"state.pt": {"size": "1", "crc32": 0}}}, r"the entry of 'state\.pt'"),
    ({"files": {"state.pt": {"size": 1}}}, r"the entry of 'state\.pt'"),
    ({"files": {"state.pt": {"size": -1, "crc32": 0}}}, r"the entry of 'state\.pt'"),
    ({"files": {"a\u0000b": {"size": 1, "crc32": 0}}}, "outside the checkpoint"),
])
def test_malformed_manifest(saved, doc, match):
    rt, ck = saved
    _write(ck, cf.MANIFEST, doc)
    with pytest.raises(od.CheckpointCorrupt, match=match):
        rt.load(ck)


def test_keep_last_skips_siblings_with_malformed_markers(saved, tmp_path):
    rt, _ = saved
    for i, doc in enumerate(([], {"time_ns": "x"}, None)):
        (tmp_path / f"step-{i}").mkdir()
        _write(tmp_path / f"step-{i}", cf.MARKER, doc)
    rt.save(tmp_path / "step-9", keep_last=1)
    assert all((tmp_path / f"step-{i}").is_dir() for i in range(3))
