"""An async rt.save copies the state into CPU memory before it returns, into a copy it
keeps for the next async save: the second save allocates nothing new, and what the loop
does after the call never reaches the files."""

import os
import sys
import threading

import pytest
import torch

from ckpt_util import CountingLoader, make_model, manual_runtime, train_step, trained_runtime


def _staged_ptrs(rt) -> set[int]:
    cache = rt._ckpt_stager._state_dict_stager._cached_storage_mapping
    return {s.data_ptr() for s in cache.values()}


def test_async_saves_reuse_one_staging_copy_and_capture_the_call_time_state(tmp_path):
    rt, loader = trained_runtime()
    rt.save(tmp_path / "a", async_=True)
    rt.wait_for_save()
    first = _staged_ptrs(rt)
    assert first  # the model and AdamW tensors were staged
    train_step(rt, loader)
    at_call = {k: v.clone() for k, v in rt.model.state_dict().items()}
    rt.save(tmp_path / "b", async_=True)
    train_step(rt, loader)  # changes every parameter while the write may still run
    rt.wait_for_save()
    assert _staged_ptrs(rt) == first  # the same CPU copy, refilled
    fresh = make_model(2, seed=7)
    rt2 = manual_runtime(fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-2))
    rt2._loaders.append(CountingLoader())
    rt2.load(tmp_path / "b")
    for k, v in at_call.items():
        assert torch.equal(rt2.model.state_dict()[k], v), k


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_async_writers_run_at_the_lowest_priority_and_the_loop_keeps_its_own(
        tmp_path, monkeypatch):
    """The background write takes only CPU time the training loop leaves: every thread that
    writes an async save's DCP files runs at nice 19; a synced save writes at the caller's
    priority, and the caller's thread is never changed."""
    from overdrive.runtime import checkpoint_files as cf

    seen, write = [], cf._ChecksumStream.write

    def recording(self, data):
        seen.append((threading.get_native_id(),
                     os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        return write(self, data)

    monkeypatch.setattr(cf._ChecksumStream, "write", recording)
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    model = make_model(2, seed=0)
    rt = manual_runtime(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    rt.save(tmp_path / "sync")
    assert seen and {p for _, p in seen} == {mine}
    seen.clear()
    rt.save(tmp_path / "async", async_=True)
    rt.wait_for_save()
    assert seen and {p for _, p in seen} == {19}
    assert threading.get_native_id() not in {t for t, _ in seen}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
    fresh = make_model(2, seed=7)
    rt2 = manual_runtime(fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-2))
    rt2.load(tmp_path / "async")
    for k, v in rt.model.state_dict().items():
        assert torch.equal(rt2.model.state_dict()[k], v), k
