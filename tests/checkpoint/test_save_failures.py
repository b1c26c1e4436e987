"""A save that fails (a full disk) raises a CheckpointError on every rank, removes its own
temporary directory and leaves the previous checkpoint as it was; later saves prune the
temporary directories failed or killed saves of the series left, never one whose save is
still in progress (it holds the directory's lock)."""

import errno

import pytest
import torch

import overdrive as od
from overdrive.runtime import checkpoint_files as cf

from ckpt_util import CountingLoader, make_model, manual_runtime, train_step


def _runtime():
    model = make_model(2, seed=0)
    rt = manual_runtime(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    rt._loaders.append(CountingLoader())
    train_step(rt, rt._loaders[0])
    return rt


def _full_disk(*_args, **_kw):
    raise OSError(errno.ENOSPC, "No space left on device")


def _hidden(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))


def _fail_dcp_write(monkeypatch):
    monkeypatch.setattr(cf._ChecksumStream, "write", _full_disk)


def _fail_rank_file(monkeypatch):
    real = cf.save_plain
    monkeypatch.setattr(cf, "save_plain", lambda obj, path: _full_disk() if
                        path.name.startswith("rank-") else real(obj, path))


def _fail_manifest(monkeypatch):
    real = cf.write_file
    monkeypatch.setattr(cf, "write_file", lambda path, data: _full_disk() if
                        path.name == cf.MANIFEST else real(path, data))


# DCP does not join its other writer threads when one fails: their errors surface as
# pytest's unhandled-thread-exception warnings, which are expected here
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("fail", [_fail_dcp_write, _fail_rank_file, _fail_manifest])
@pytest.mark.parametrize("async_", [False, True])
def test_a_failed_save_is_a_checkpoint_error_and_leaves_nothing(tmp_path, monkeypatch, fail,
                                                                async_):
    rt = _runtime()
    rt.save(tmp_path / "step-1")
    train_step(rt, rt._loaders[0])
    with monkeypatch.context() as m:
        fail(m)
        with pytest.raises(od.CheckpointError, match="No space left on device"):
            for path in ("step-2", "step-1"):  # a new path, then an overwrite
                rt.save(tmp_path / path, async_=async_)
                rt.wait_for_save()
    assert _hidden(tmp_path) == []
    assert not (tmp_path / "step-2").exists()
    assert rt.load(tmp_path / "step-1")["step"] == 1  # the previous checkpoint, intact
    rt.save(tmp_path / "step-2", keep_last=1)  # the disk has room again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2"]


def test_stale_temporary_dirs_of_the_series_are_pruned_locked_ones_kept(tmp_path):
    rt = _runtime()
    (tmp_path / ".step-1.tmp-aaaa").mkdir()  # a killed save: no lock held any more
    (tmp_path / ".step-1.tmp-aaaa" / "__0_0.distcp").write_bytes(b"x" * 1000)
    cf.make_tmp(tmp_path / ".step-1.tmp-dead").release()  # a failed save's, lock released
    lock = cf.make_tmp(tmp_path / ".step-2.tmp-bbbb")  # a save in progress elsewhere
    for other in (".other-1.tmp-cccc", ".best.tmp-dddd"):  # other series
        (tmp_path / other).mkdir()
    rt.save(tmp_path / "step-3", keep_last=2)
    assert _hidden(tmp_path) == [".best.tmp-dddd", ".other-1.tmp-cccc", ".step-2.tmp-bbbb"]
    lock.release()  # that save is gone now
    rt.save(tmp_path / "step-4", keep_last=2)
    assert _hidden(tmp_path) == [".best.tmp-dddd", ".other-1.tmp-cccc"]


def test_an_async_save_in_progress_is_not_pruned_by_another_runtime(tmp_path):
    a, b = _runtime(), _runtime()
    a.save(tmp_path / "step-5", async_=True)  # written, not published until waited for
    a._pending_save.future.result()
    assert [n.startswith(".step-5.tmp-") for n in _hidden(tmp_path)] == [True]
    b.save(tmp_path / "step-6", keep_last=3)  # prunes the series' stale temporary dirs
    assert [n.startswith(".step-5.tmp-") for n in _hidden(tmp_path)] == [True]
    a.wait_for_save()
    assert a.load(tmp_path / "step-5")["step"] == 1 and _hidden(tmp_path) == []


@pytest.mark.dist
def test_a_save_that_fails_on_one_rank_fails_on_both(tmp_path):
    from tests.helpers import ROOT, read_json, run_torchrun

    run_torchrun(ROOT / "tests" / "checkpoint" / "scripts" / "save_fails_on_one_rank.py", 2,
                 str(tmp_path), tmp_path=tmp_path, timeout=180)
    for case in ("rank-file", "dcp-write", "manifest"):
        errors = [read_json(tmp_path / f"{case}-rank{r}.json") for r in range(2)]
        assert all(e["error"] and e["error"].startswith("CheckpointError") for e in errors), \
            (case, errors)
        assert all("No space left on device" in e["error"] for e in errors), (case, errors)
        assert all(e["hidden"] == [] for e in errors), (case, errors)
    assert read_json(tmp_path / "after-rank0.json") == {"step": 1, "names": ["ck", "ok"]}
