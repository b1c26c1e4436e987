"""rt.load copies each DCP record's bytes straight into the tensor it restores
(``checkpoint_read.py``): no intermediate tensor per record, the same bits as the saved
state, a view's ``copy_`` or torch.load where a record or destination does not allow the
direct read, and nothing read before every check passed."""

import pytest
import torch

import overdrive as od
from overdrive.runtime import checkpoint_files as cf
from overdrive.runtime import checkpoint_read

from ckpt_util import (CountingLoader, assert_same_state, make_model, manual_runtime,
                       replace_record, runtime_state, train_step)


def _runtime(seed, model=None):
    model = make_model(2, seed=seed) if model is None else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rt = manual_runtime(model, opt)
    rt._loaders.append(CountingLoader())
    train_step(rt, rt._loaders[0])
    return rt


@pytest.fixture
def reads(monkeypatch):
    """The ReadCounts of every load's read (one per rt.load)."""
    seen = []
    read_data = cf.SafeReader.read_data

    def spy(self, plan, planner):
        out = read_data(self, plan, planner)
        seen.append(self.counts)
        return out

    monkeypatch.setattr(cf.SafeReader, "read_data", spy)
    return seen


def _tensors(rt) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in rt.model.state_dict().items()}
    for pid, st in rt.optimizer.state_dict()["state"].items():
        out.update({f"optim.{pid}.{k}": v for k, v in st.items()})
    return out


def _assert_bit_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_every_record_is_read_straight_into_the_parameters_storage(tmp_path, reads):
    rt = _runtime(seed=0)
    rt.save(tmp_path / "ck")
    saved = {k: v.clone() for k, v in _tensors(rt).items()}
    rt2 = _runtime(seed=7)
    ptrs = {k: v.data_ptr() for k, v in _tensors(rt2).items()}
    rt2.load(tmp_path / "ck")
    _assert_bit_identical(saved, _tensors(rt2))
    # the model's and the optimizer's own tensors were filled in place: no new storage
    assert {k: v.data_ptr() for k, v in _tensors(rt2).items()} == ptrs
    (counts,) = reads
    assert counts.copied == 0 and counts.unpickled == 0
    assert counts.direct == len(saved)  # one record per tensor (model and AdamW state)
    assert counts.direct_bytes == sum(v.numel() * v.element_size() for v in saved.values())


def test_records_that_are_views_of_a_bigger_storage_are_read_at_their_offset(tmp_path,
                                                                              reads):
    """A record whose tensor starts inside its storage (a narrowed view, saved with the
    whole storage) is still read directly, from the view's first byte."""
    rt = _runtime(seed=0)
    rt.save(tmp_path / "ck")
    key = "model.lm_head.weight"
    before = rt.model.lm_head.weight.detach().clone()
    replace_record(tmp_path / "ck", key,
                   edit=lambda t: torch.cat([torch.full_like(t, 7.0), t])[t.shape[0]:])
    rt2 = _runtime(seed=7)
    rt2.load(tmp_path / "ck")
    assert torch.equal(rt2.model.lm_head.weight, before)
    assert reads[0].copied == 0 and reads[0].unpickled == 0


def test_a_strided_record_is_copied_through_a_view_of_the_file(tmp_path, reads):
    """A record saved transposed (its bytes are not the destination's row-major order)
    cannot be read as one range: it is copied from a view of the mapped file."""
    rt = _runtime(seed=0)
    rt.save(tmp_path / "ck")
    key = "model.lm_head.weight"
    before = rt.model.lm_head.weight.detach().clone()
    replace_record(tmp_path / "ck", key, edit=lambda t: t.t().contiguous().t())
    rt2 = _runtime(seed=7)
    rt2.load(tmp_path / "ck")
    assert torch.equal(rt2.model.lm_head.weight, before)
    assert reads[0].copied == 1 and reads[0].unpickled == 0


class _Transposed(torch.nn.Module):
    """A parameter that is not contiguous: the direct read cannot fill it."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(6, 4, generator=g).t())
        self.b = torch.nn.Parameter(torch.randn(6, generator=g))


def test_a_destination_that_is_not_contiguous_is_filled_by_copy(tmp_path, reads):
    src = _Transposed(0)
    rt = manual_runtime(src)
    rt.save(tmp_path / "ck")
    dst = _Transposed(1)
    rt2 = manual_runtime(dst)
    rt2.load(tmp_path / "ck")
    assert not dst.w.is_contiguous()
    assert torch.equal(dst.w, src.w) and torch.equal(dst.b, src.b)
    assert (reads[0].direct, reads[0].copied, reads[0].unpickled) == (1, 1, 0)


def test_a_record_the_parser_does_not_know_is_read_by_torch_load(tmp_path, reads,
                                                                  monkeypatch):
    rt = _runtime(seed=0)
    rt.save(tmp_path / "ck")
    saved = {k: v.clone() for k, v in _tensors(rt).items()}
    monkeypatch.setattr(cf, "_fast_record", lambda z: None)  # every record: unknown layout
    rt2 = _runtime(seed=7)
    rt2.load(tmp_path / "ck")
    _assert_bit_identical(saved, _tensors(rt2))
    assert (reads[0].direct, reads[0].copied, reads[0].unpickled) == (0, 0, len(saved))


def test_a_corrupted_byte_is_refused_before_any_record_is_read(tmp_path, monkeypatch):
    """The crc32 check runs first: a flipped byte in a record's data is refused with no
    record read into the model (and so the runtime as it was)."""
    rt = _runtime(seed=0)
    rt.save(tmp_path / "ck")
    shard = tmp_path / "ck" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    touched = []
    monkeypatch.setattr(checkpoint_read, "read_data", lambda *a, **k: touched.append(a))
    rt2 = _runtime(seed=7)
    before = runtime_state(rt2)
    with pytest.raises(od.CheckpointCorrupt, match=r"__0_0.distcp: crc32 differs"):
        rt2.load(tmp_path / "ck")
    assert touched == []
    assert_same_state(before, runtime_state(rt2))
