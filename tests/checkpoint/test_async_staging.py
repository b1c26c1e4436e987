"""An async rt.save copies the state into CPU memory before it returns, into a copy it
keeps for the next async save: the second save allocates nothing new, and what the loop
does after the call never reaches the files."""

import torch

from ckpt_util import CountingLoader, make_model, manual_runtime, train_step


def _staged_ptrs(rt) -> set[int]:
    cache = rt._ckpt_stager._state_dict_stager._cached_storage_mapping
    return {s.data_ptr() for s in cache.values()}


def test_async_saves_reuse_one_staging_copy_and_capture_the_call_time_state(tmp_path):
    model = make_model(2, seed=0)
    rt = manual_runtime(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    loader = CountingLoader()
    rt._loaders.append(loader)
    train_step(rt, loader)
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
