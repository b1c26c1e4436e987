"""rt.save / rt.load in one process: round trip, errors, keep_last, async, safety."""

import json
import os
import pickle
import threading

import pytest
import torch

import overdrive as od
from overdrive.runtime import checkpoint_files as cf
from overdrive.runtime.checkpoint import io_threads

from ckpt_util import CountingLoader, make_model, manual_runtime, train_step


def _runtime(seed=0, n_layers=2, fp16=False, **kw):
    model = make_model(n_layers, seed=seed, dropout=0.1, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    plan = od.Plan(mixed_precision="fp16") if fp16 else None
    rt = manual_runtime(model, opt, sched, plan=plan)
    loader = CountingLoader()
    rt._loaders.append(loader)
    return rt, loader


def _train(rt, loader, n):
    return [train_step(rt, loader) for _ in range(n)]


@pytest.mark.parametrize("fp16", [False, True])
def test_load_right_after_save_restores_everything(tmp_path, fp16):
    rt, loader = _runtime(fp16=fp16)
    _train(rt, loader, 2)
    rt.save(tmp_path / "ck")
    expected = _train(rt, loader, 3)
    meta = rt.load(tmp_path / "ck")  # same process, right after saving
    assert meta["step"] == 2 and rt.step == 2 and loader.position == 2
    assert _train(rt, loader, 3) == expected  # RNG, optimizer, scheduler, scaler, loader


def test_fresh_runtime_loads_into_different_weights(tmp_path):
    rt, loader = _runtime(seed=0)
    _train(rt, loader, 2)
    rt.save(tmp_path / "ck")
    expected = _train(rt, loader, 2)
    rt2, loader2 = _runtime(seed=7)
    rt2.load(tmp_path / "ck")
    for (k, a), b in zip(rt.model.state_dict().items(), rt2.model.state_dict().values()):
        assert a.shape == b.shape, k
    assert rt2.scheduler.last_epoch == 2 and rt2.optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)
    assert _train(rt2, loader2, 2) == expected


def test_layout_is_tensors_plus_weights_only_files(tmp_path):
    rt, loader = _runtime()
    _train(rt, loader, 1)
    rt.save(tmp_path / "ck")
    names = sorted(os.listdir(tmp_path / "ck"))
    shards = [f"__0_{i}.distcp" for i in range(io_threads())]  # one per writer thread
    assert names == sorted([".metadata", *shards, "manifest.json", cf.MARKER, "rank-0.pt",
                            "state.pt"])
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary sibling left
    for f in ("rank-0.pt", "state.pt"):
        torch.load(tmp_path / "ck" / f, weights_only=True)
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())["files"]
    assert set(manifest) == set(names) - {"manifest.json", cf.MARKER}
    marker = json.loads((tmp_path / "ck" / cf.MARKER).read_text())
    assert marker["step"] == 1 and marker["world_size"] == 1 and "parallel" in marker["plan"]


def test_not_a_checkpoint(tmp_path):
    rt, _ = _runtime()
    with pytest.raises(od.NotACheckpoint, match="does not exist"):
        rt.load(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(od.NotACheckpoint, match="has no overdrive_checkpoint.json"):
        rt.load(tmp_path / "plain")
    (tmp_path / ".ck.tmp-abc").mkdir()
    with pytest.raises(od.NotACheckpoint, match="unfinished save"):
        rt.load(tmp_path / "ck")


def test_different_model_lists_keys(tmp_path):
    rt, loader = _runtime(n_layers=2)
    _train(rt, loader, 1)
    rt.save(tmp_path / "ck")
    deeper, _ = _runtime(n_layers=3)
    with pytest.raises(od.CheckpointMismatch, match=r"missing from the checkpoint .*model\.layers\.2\."):
        deeper.load(tmp_path / "ck")
    wider, _ = _runtime(dim=48)
    with pytest.raises(od.CheckpointMismatch, match=r"shape differs .*embed_tokens\.weight: checkpoint \[64, 32\], model \[64, 48\]"):
        wider.load(tmp_path / "ck")
    model = make_model(2)
    sgd = manual_runtime(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                         torch.optim.lr_scheduler.StepLR(torch.optim.SGD(model.parameters(), lr=1), 1))
    with pytest.raises(od.CheckpointMismatch, match="exp_avg"):
        sgd.load(tmp_path / "ck")


def test_truncated_and_corrupted_shard(tmp_path):
    rt, loader = _runtime()
    _train(rt, loader, 1)
    rt.save(tmp_path / "ck")
    shard = tmp_path / "ck" / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(od.CheckpointCorrupt, match="__0_0.distcp: .* bytes, the manifest says .*truncated"):
        rt.load(tmp_path / "ck")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(od.CheckpointCorrupt, match="crc32"):
        rt.load(tmp_path / "ck")
    rt.load(tmp_path / "ck", verify=False)  # size only: a flipped bit inside a value passes


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_metadata_pickle_is_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rt, loader = _runtime()
    _train(rt, loader, 1)
    ck = tmp_path / "ck"
    rt.save(ck)
    (ck / ".metadata").write_bytes(pickle.dumps(_Evil()))
    manifest = json.loads((ck / "manifest.json").read_text())  # an attacker fixes it up too
    manifest["files"][".metadata"] = {"size": (ck / ".metadata").stat().st_size,
                                      "crc32": cf.crc32_file(ck / ".metadata")}
    (ck / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(od.CheckpointCorrupt, match="posix.system is not allowed|os.system is not allowed"):
        rt.load(ck)
    assert not (tmp_path / "PWNED").exists()


def test_keep_last_removes_only_older_checkpoints_of_the_same_series(tmp_path):
    rt, loader = _runtime()
    (tmp_path / "notes").mkdir()
    _train(rt, loader, 1)
    for other in ("best", "run2-step-1", "step-1-ema"):  # complete checkpoints, other series
        rt.save(tmp_path / other)
    for step in range(1, 5):
        rt.save(tmp_path / f"step-{step}", keep_last=2)
        _train(rt, loader, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best", "notes", "run2-step-1", "step-1-ema", "step-3", "step-4"]
    rt.load(tmp_path / "step-3")
    assert rt.step == 3
    rt.load(tmp_path / "best")
    with pytest.raises(ValueError, match="'best' has no number"):
        rt.save(tmp_path / "best", keep_last=1)


def test_overwrite_same_path(tmp_path):
    rt, loader = _runtime()
    _train(rt, loader, 1)
    rt.save(tmp_path / "ck")
    _train(rt, loader, 1)
    rt.save(tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert rt.load(tmp_path / "ck")["step"] == 2


def test_async_save_snapshots_state_and_publishes_later(tmp_path):
    rt, loader = _runtime()
    _train(rt, loader, 2)
    before = {k: v.clone() for k, v in rt.model.state_dict().items()}
    rt.save(tmp_path / "ck", async_=True)
    _train(rt, loader, 1)  # training continues while the save is written
    rt.wait_for_save()
    assert (tmp_path / "ck" / cf.MARKER).is_file()
    rt.load(tmp_path / "ck")
    assert rt.step == 2
    for k, v in rt.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_public_flow_with_accelerate(tmp_path):
    model = make_model(2)
    rt = od.accelerate(model, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    loader = CountingLoader()
    rt._loaders.append(loader)
    _train(rt, loader, 2)
    rt.save(tmp_path / "ck")
    expected = _train(rt, loader, 2)
    rt2 = od.accelerate(make_model(2, seed=4),
                        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    loader2 = CountingLoader()
    rt2._loaders.append(loader2)
    rt2.load(tmp_path / "ck")
    assert _train(rt2, loader2, 2) == expected


@pytest.mark.parametrize("mode,nproc", [("plain", 1),
                                        pytest.param("destroy", 2, marks=pytest.mark.dist)])
def test_async_save_right_before_exit_is_published(tmp_path, mode, nproc):
    import subprocess
    import sys

    from tests.helpers import ROOT, child_env, run_torchrun

    script = ROOT / "tests" / "checkpoint" / "scripts" / "async_then_exit.py"
    if nproc == 1:
        proc = subprocess.run([sys.executable, str(script), mode, str(tmp_path)],
                              env=child_env(), cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    else:
        run_torchrun(script, nproc, mode, str(tmp_path), tmp_path=tmp_path)
    assert (tmp_path / "ck" / cf.MARKER).is_file(), sorted(p.name for p in tmp_path.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    model = make_model(2, seed=5)
    rt = manual_runtime(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    rt._loaders.append(CountingLoader())
    assert rt.load(tmp_path / "ck")["step"] == 2
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    for k, v in rt.model.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_loader_sharded_after_load_resumes_at_its_position(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.arange(40).reshape(20, 2))

    def fresh(seed):
        model = make_model(2, seed=seed)
        return manual_runtime(model, torch.optim.AdamW(model.parameters(), lr=1e-2))

    rt = fresh(0)
    train = rt.shard(DataLoader(data, batch_size=2, shuffle=True))
    it = iter(train)
    seen = [next(it)[0].tolist() for _ in range(3)]
    rt.save(tmp_path / "ck")
    expected = [next(it)[0].tolist() for _ in range(3)]

    rt2 = fresh(1)
    rt2.load(tmp_path / "ck")  # no loader yet: its position waits for rt.shard
    assert len(rt2._pending_loader_states) == 1
    rt2.save(tmp_path / "ck2")  # saved again before rt.shard: the position is kept
    rt2 = fresh(2)
    rt2.load(tmp_path / "ck2")
    resumed = iter(rt2.shard(DataLoader(data, batch_size=2, shuffle=True)))
    assert [next(resumed)[0].tolist() for _ in range(3)] == expected, seen
    assert rt2._pending_loader_states == []


def test_manifest_is_computed_while_writing(tmp_path, monkeypatch):
    rt, loader = _runtime()
    _train(rt, loader, 1)
    read = []
    real_crc, real_describe = cf.crc32_file, cf.describe_file
    monkeypatch.setattr(cf, "crc32_file", lambda p: read.append(p.name) or real_crc(p))
    monkeypatch.setattr(cf, "describe_file", lambda p: read.append(p.name) or real_describe(p))
    rt.save(tmp_path / "ck")
    assert read == []  # no file was read back to checksum it
    monkeypatch.setattr(cf, "crc32_file", real_crc)
    monkeypatch.setattr(cf, "describe_file", real_describe)
    manifest = json.loads((tmp_path / "ck" / cf.MANIFEST).read_text())["files"]
    names = cf.data_files(tmp_path / "ck")
    assert sorted(manifest) == names and ".metadata" in names
    assert manifest == cf.describe_files(tmp_path / "ck", names)  # what a reread computes


def test_dcp_records_skip_torch_crc32_on_every_writer_thread(tmp_path, monkeypatch):
    """The manifest's crc32 (checked before every load) covers DCP's files, so torch.save's
    per-record crc32 is off while they are written — on each DCP writer thread — and the
    (thread-local) option is back as it was afterwards."""
    seen = []
    real_save = torch.save

    def spy(obj, *args, **kwargs):
        if isinstance(obj, torch.Tensor):  # DCP's records (state.pt and rank-<r>.pt are dicts)
            seen.append(torch.serialization.get_crc32_options())
        return real_save(obj, *args, **kwargs)

    rt, loader = _runtime()
    _train(rt, loader, 1)
    monkeypatch.setattr(torch, "save", spy)
    for name, async_ in (("ck", False), ("ck-async", True)):
        seen.clear()
        rt.save(tmp_path / name, async_=async_)
        rt.wait_for_save()
        assert seen and not any(seen), name
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.serialization.get_crc32_options() is True
    expected = _train(rt, loader, 2)
    rt.load(tmp_path / "ck")
    assert _train(rt, loader, 2) == expected


def test_io_threads_follow_the_cores_per_local_rank(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert io_threads() == 4  # at most 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert io_threads() == 2
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert io_threads() == 1  # 8 ranks on 2 cores: never below one


def test_load_reads_the_rank_files_in_pieces_on_parallel_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    rt, loader = _runtime(n_layers=4)
    _train(rt, loader, 1)
    rt.save(tmp_path / "ck")
    files = [n for n in os.listdir(tmp_path / "ck") if n.endswith(".distcp")]
    assert len(files) == 4
    from overdrive.runtime import checkpoint_read

    reads, pread_into = [], checkpoint_read.MappedFile.pread_into

    def recording(self, target, start, nbytes, at=0):
        reads.append((threading.get_ident(), self.fd, nbytes))
        return pread_into(self, target, start, nbytes, at)

    monkeypatch.setattr(checkpoint_read.MappedFile, "pread_into", recording)
    rt2, _ = _runtime(seed=7, n_layers=4)
    rt2.load(tmp_path / "ck")
    assert len({fd for _, fd, _ in reads}) == len(files)  # every file read
    assert max(n for _, _, n in reads) <= checkpoint_read.CHUNK  # in pieces
    assert threading.get_ident() not in {thread for thread, _, _ in reads}  # on the pool
    for k, v in rt.model.state_dict().items():
        assert torch.equal(v, rt2.model.state_dict()[k]), k
    sd, sd2 = rt.optimizer.state_dict()["state"], rt2.optimizer.state_dict()["state"]
    assert all(torch.equal(sd[i]["exp_avg"], sd2[i]["exp_avg"]) for i in sd)


def test_manifest_checksums_are_plain_crc32(tmp_path):
    """zlib-ng computes them faster; the values are zlib's, so any crc32 tool checks them."""
    import zlib

    from overdrive.runtime import checkpoint_crc

    chunk = checkpoint_crc.CHUNK
    data = os.urandom(2 * chunk + 17)
    (tmp_path / "f").write_bytes(data)
    assert cf.crc32_file(tmp_path / "f") == zlib.crc32(data)
    assert cf.write_file(tmp_path / "g", data) == {
        "size": len(data), "crc32": zlib.crc32(data), "chunk": chunk,
        "chunks": [zlib.crc32(data[i:i + chunk]) for i in range(0, len(data), chunk)]}
    assert cf.describe_files(tmp_path, ["f"])["f"] == cf.write_file(tmp_path / "g", data)


def test_a_manifest_without_chunk_crc32s_still_loads(tmp_path):
    """Checkpoints written before the manifest's version 2 hold only whole-file crc32s:
    they are checked a file at a time, and a damaged one is still refused."""
    import json

    rt, loader = _runtime()
    _train(rt, loader, 1)
    rt.save(tmp_path / "ck")
    path = tmp_path / "ck" / cf.MANIFEST
    doc = json.loads(path.read_text())
    assert doc["version"] == cf.MANIFEST_VERSION
    old = {"files": {n: {"size": e["size"], "crc32": e["crc32"]} for n, e in doc["files"].items()}}
    path.write_text(json.dumps(old))
    rt2, _ = _runtime(seed=7)
    rt2.load(tmp_path / "ck")
    for k, v in rt.model.state_dict().items():
        assert torch.equal(v, rt2.model.state_dict()[k]), k
    shard = tmp_path / "ck" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(od.CheckpointCorrupt, match=r"__0_0.distcp: crc32 differs"):
        _runtime(seed=7)[0].load(tmp_path / "ck")


def test_a_damaged_chunk_crc32_list_is_refused(tmp_path):
    import json

    rt, loader = _runtime()
    rt.save(tmp_path / "ck")
    path = tmp_path / "ck" / cf.MANIFEST
    doc = json.loads(path.read_text())
    doc["files"]["__0_0.distcp"]["chunks"].append(0)
    path.write_text(json.dumps(doc))
    with pytest.raises(od.CheckpointCorrupt, match=r"chunk crc32s of '__0_0.distcp'.*needs"):
        _runtime(seed=7)[0].load(tmp_path / "ck")
    doc["files"]["__0_0.distcp"]["chunks"][0] ^= 1
    doc["files"]["__0_0.distcp"]["chunks"].pop()
    path.write_text(json.dumps(doc))
    with pytest.raises(od.CheckpointCorrupt, match=r"__0_0.distcp: crc32 differs"):
        _runtime(seed=7)[0].load(tmp_path / "ck")
