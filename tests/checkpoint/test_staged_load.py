"""rt.load reads and checks everything before it restores anything: a record, RNG state or
counter the checks refuse leaves the runtime exactly as it was, and every failure is a
CheckpointError (DCP's CheckpointException is a BaseException: never let it out)."""

import pytest
import torch

import overdrive as od

from ckpt_util import (CountingLoader, Evil, assert_same_state, last_record, make_model,
                       manual_runtime, replace_record, rewrite_pt, runtime_state, train_step)


def _runtime(seed):
    model = make_model(2, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rt = manual_runtime(model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2))
    rt._loaders.append(CountingLoader())
    train_step(rt, rt._loaders[0])
    return rt


@pytest.fixture
def saved(tmp_path):
    rt = _runtime(seed=0)
    train_step(rt, rt._loaders[0])
    rt.save(tmp_path / "ck")
    return tmp_path / "ck"


def _refused(ck, error, match):
    rt = _runtime(seed=7)
    before = runtime_state(rt)
    with pytest.raises(error, match=match):
        rt.load(ck)
    assert_same_state(before, runtime_state(rt))


def test_evil_pickle_in_the_last_record_restores_nothing(saved, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    replace_record(saved, last_record(saved), Evil())
    _refused(saved, od.CheckpointCorrupt, r"cannot be read with weights_only=True")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("edit,match", [
    (lambda t: torch.zeros(3, 5), r"holds a torch.float32 tensor of shape \[3, 5\]; the DCP"),
    (lambda t: t.to(torch.int64), r"holds a torch.int64 tensor"),
    (lambda t: {"not": "a tensor"}, r"holds a dict, not a tensor"),
])
def test_a_wrong_record_restores_nothing(saved, edit, match):
    replace_record(saved, last_record(saved), edit=edit)
    _refused(saved, od.CheckpointCorrupt, match)


def test_a_record_whose_storage_is_cut_short_restores_nothing(saved):
    """The record's pickle is intact but its storage entry lost bytes (a crafted file
    whose manifest agrees): caught without reading the data."""
    import io
    import zipfile

    key = last_record(saved)
    buf = io.BytesIO()
    torch.save(torch.zeros(4), buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        names = {n: z.read(n) for n in z.namelist()}
    storage = next(n for n in names if n.endswith("/data/0"))
    names[storage] = names[storage][:8]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for n, b in names.items():
            z.writestr(n, b)

    replace_record(saved, key, raw=out.getvalue())
    _refused(saved, od.CheckpointCorrupt, key)


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.update(torch=torch.zeros(3, dtype=torch.uint8)), r"RNG state is not valid"),
    (lambda s: s.update(python=[3, [1, 2], None]), r"RNG state is not valid"),
    (lambda s: s.update(numpy=["MT19937", [1, 2], 0, 0, 0.0]), r"RNG state is not valid"),
    (lambda s: s.update(loaders="nope"), r"'loaders' is a str, expected list"),
])
def test_a_bad_rng_or_loader_state_restores_nothing(saved, edit, match):
    rewrite_pt(saved, "rank-0.pt", edit)
    _refused(saved, od.CheckpointCorrupt, match)


@pytest.mark.parametrize("counters,match", [
    ({"step": 2, "grad_accum": 1000}, r"counters \['grad_accum'\] are not counters"),
    ({"step": 2, "model": 5}, r"counters \['model'\] are not counters"),
    ({"step": "2"}, r"counter step='2' is not an integer >= 0"),
    ({"step": -1}, r"counter step=-1"),
    ({"step": True}, r"counter step=True"),
])
def test_only_known_counters_are_restored(saved, counters, match):
    rewrite_pt(saved, "state.pt", lambda s: s.update(counters=counters))
    _refused(saved, od.CheckpointCorrupt, match)


def test_scheduler_state_may_not_set_other_attributes(saved):
    rewrite_pt(saved, "state.pt", lambda s: s["scheduler"].update(optimizer=5))
    _refused(saved, od.CheckpointMismatch, r"scheduler state has keys .*'optimizer'")


def test_a_good_load_still_restores_everything(saved):
    rt = _runtime(seed=7)
    assert rt.load(saved)["step"] == 2 and rt.step == 2
    ref = make_model(2, seed=0)
    assert not torch.equal(ref.lm_head.weight, rt.model.lm_head.weight)  # it was trained


@pytest.mark.dist
def test_a_load_one_rank_fails_while_checking_raises_on_both_untouched(tmp_path):
    """2 ranks: rank 1's RNG state (only rank 1 reads it) or one record (checked by one
    rank) is bad: both ranks raise a CheckpointError, neither hangs, neither changed."""
    from tests.helpers import ROOT, read_json, run_torchrun

    run_torchrun(ROOT / "tests" / "checkpoint" / "scripts" / "refused_while_checking.py", 2,
                 str(tmp_path), tmp_path=tmp_path, timeout=180)
    for case in ("rng", "record"):
        out = [read_json(tmp_path / f"{case}-rank{r}.json") for r in range(2)]
        assert all(o["untouched"] for o in out), (case, out)
        assert all(o["error"] and o["error"].startswith("CheckpointCorrupt") for o in out), out
    rng = [read_json(tmp_path / f"rng-rank{r}.json")["error"] for r in range(2)]
    assert "RNG state is not valid" in rng[1] and "rank 1 refused the load" in rng[0], rng


def test_dcp_records_take_the_fast_check_and_the_slow_one_agrees(saved, monkeypatch):
    """Records torch.save writes for a plain tensor are read by ``_RecordUnpickler`` (no
    torch.load per record); anything else goes through torch's weights_only loader on the
    meta device, which must accept and refuse the same records."""
    import mmap
    import zipfile

    from overdrive.runtime import checkpoint_files as cf

    md = cf.SafeReader(str(saved), cf.read_manifest(saved)).read_metadata()
    for idx in cf.record_order(md.storage_data):
        info = md.storage_data[idx]
        with open(saved / info.relative_path, "rb") as f, \
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            z = zipfile.ZipFile(cf.MapSlice(data, info.offset, info.length))
            assert cf._fast_record(z) is not None, idx.fqn
    monkeypatch.setattr(cf, "_fast_record", lambda z: None)  # every record: the slow path
    assert _runtime(seed=7).load(saved)["step"] == 2
    replace_record(saved, last_record(saved), edit=lambda t: torch.zeros(3, 5))
    _refused(saved, od.CheckpointCorrupt, r"holds a torch.float32 tensor of shape \[3, 5\]")
