"""casting's kernels: which one each device gets (tested for every device kind, on any
machine), the fused torch._scaled_mm path against the copy path, the fallbacks, and the
CPU copy path's reusable buffers."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import overdrive as od
from overdrive.errors import BackendUnavailable
from overdrive.passes import casting as casting_pass
from overdrive.passes.casting import CastLinear, FusedCastLinear
from overdrive.passes.casting_kernels import (DeviceKind, UpcastScratch, choose_kernel,
                                              denormals_kept, device_kind, upcast)
from overdrive.plan_spec import Plan

from tests.helpers import assert_untouched, snapshot

E4M3, E5M2, BF16 = torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16
H100 = DeviceKind("cuda", "cuda sm_90 (H100)", (9, 0), None, None)
H100_NO_ROWWISE = DeviceKind("cuda", "cuda sm_90 (H100)", (9, 0), "RuntimeError: no", None)
A100 = DeviceKind("cuda", "cuda sm_80 (A100)", (8, 0))
CPU_RUNS = DeviceKind("cpu", "cpu AVX512 (avx512_bf16)", None, None, None)
CPU_FAILS = DeviceKind("cpu", "cpu AVX2", None, "RuntimeError: x", "RuntimeError: x")
SCALED_MM_RUNS_HERE = device_kind(torch.device("cpu"), BF16).scaled_mm_runs


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---------------------------------------------------------------- the choice, everywhere

@pytest.mark.parametrize("kind, kernel, rowwise", [
    (H100, "scaled_mm", True),             # fp8 tensor cores, row-wise probe ran
    (H100_NO_ROWWISE, "scaled_mm", False),  # only the tensor-wise call runs
    (A100, "copy", False),                 # no fp8 tensor cores
    (CPU_RUNS, "copy", False),             # runs, but slower than the copy on CPUs
    (CPU_FAILS, "copy", False),
    (DeviceKind("cuda", "cuda (not present here)"), "copy", False),  # od.inspect elsewhere
], ids=["h100", "h100-tensorwise", "a100", "cpu", "cpu-no-scaled_mm", "unprobed"])
def test_auto_picks_the_fused_kernel_only_where_fp8_units_make_it_faster(kind, kernel, rowwise):
    choice = choose_kernel("auto", E4M3, BF16, kind)
    assert (choice.kernel, choice.rowwise, choice.machine) == (kernel, rowwise, kind.name)
    assert choice.reason


def test_copy_requested_and_unfit_dtypes_take_the_copy_path():
    assert choose_kernel("copy", E4M3, BF16, H100).reason == "casting.kernel='copy'"
    assert "float8_e4m3fn weights" in choose_kernel("auto", E5M2, BF16, H100).reason
    assert "bfloat16 or float16" in choose_kernel("auto", E4M3, torch.float32, H100).reason


@pytest.mark.parametrize("kind, storage, needle", [
    (A100, E4M3, "no fp8 tensor cores"), (CPU_FAILS, E4M3, "does not run on cpu AVX2"),
    (H100, E5M2, "float8_e4m3fn weights")])
def test_forced_scaled_mm_is_refused_where_it_cannot_run(kind, storage, needle):
    with pytest.raises(BackendUnavailable, match=needle) as err:
        choose_kernel("scaled_mm", storage, BF16, kind)
    assert "casting.kernel='auto' or 'copy'" in str(err.value)


def test_forced_scaled_mm_where_the_probe_ran():
    choice = choose_kernel("scaled_mm", E4M3, BF16, CPU_RUNS)
    assert choice.kernel == "scaled_mm" and choice.rowwise


def test_kernel_field_is_validated():
    with pytest.raises(od.PlanError, match="casting.kernel='fast'.*'auto', 'copy', 'scaled_mm'"):
        od.inspect(nn.Sequential(nn.Linear(16, 16)), Plan(casting=od.Casting(kernel="fast")))


def test_refused_forced_kernel_leaves_the_model_untouched(monkeypatch):
    monkeypatch.setattr(casting_pass, "device_kind", lambda device, compute: CPU_FAILS)
    model = nn.Sequential(nn.Linear(32, 32)).to(BF16)
    before = snapshot(model)
    with pytest.raises(BackendUnavailable):
        od.accelerate(model, Plan(casting=od.Casting(skip=(), kernel="scaled_mm")))
    assert_untouched(model, before)


def test_record_names_the_kernel_and_the_machine_and_inspect_agrees():
    plan = Plan(casting=od.Casting(skip=()))
    model = nn.Sequential(nn.Linear(32, 32)).to(BF16)
    preview = od.inspect(model, plan)["casting"].details
    rec = od.accelerate(model, plan).report["casting"]
    assert rec.details["kernel"] == preview["kernel"] == "copy"  # a CPU: always the copy
    assert rec.details["machine"].startswith("cpu ")
    assert rec.details["copy_layers"] == 1 and rec.details["fused_layers"] == 0
    assert any(n.startswith("kernel copy on cpu") for n in rec.notes)


# ---------------------------------------------------------------- the fused path

needs_scaled_mm = pytest.mark.skipif(not SCALED_MM_RUNS_HERE,
                                     reason="torch._scaled_mm does not run on this CPU")


def _mlp(bias=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128, bias=bias), nn.GELU(), nn.Linear(128, 48),
                          nn.Linear(48, 40)).to(BF16)  # 40: not a multiple of 16
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.05)
    return model


@needs_scaled_mm
def test_fused_path_matches_the_copy_path():
    fused, plain = _mlp(), _mlp()
    rec = od.accelerate(fused, Plan(casting=od.Casting(skip=(), kernel="scaled_mm"))).report
    od.accelerate(plain, Plan(casting=od.Casting(skip=(), kernel="copy")))
    assert isinstance(fused[0], FusedCastLinear) and type(plain[0]) is CastLinear
    x = torch.randn(3, 5, 64, dtype=BF16)
    with torch.no_grad():
        a, b = fused(x), plain(x)
    assert a.shape == b.shape == (3, 5, 40) and a.dtype == BF16
    # the fused path also rounds the activations to e4m3 (one scale per row): ~2-3%
    assert 0 < _rel(a, b) < 0.06
    assert rec["casting"].details["kernel"] == "scaled_mm"


@needs_scaled_mm
def test_layers_the_fused_kernel_cannot_take_fall_back_to_the_copy():
    model = _mlp()
    rec = od.accelerate(model, Plan(casting=od.Casting(skip=(), kernel="scaled_mm")))
    rec = rec.report["casting"]
    assert type(model[3]) is CastLinear and isinstance(model[2], FusedCastLinear)
    assert rec.details["fused_layers"] == 2 and rec.details["copy_layers"] == 1
    assert any("3 takes the copy path: in/out features 48/40" in n for n in rec.notes)


@needs_scaled_mm
def test_fused_layer_with_a_graph_through_its_input_uses_the_copy_path():
    fused, plain = _mlp(), _mlp()
    od.accelerate(fused, Plan(casting=od.Casting(skip=(), kernel="scaled_mm")))
    od.accelerate(plain, Plan(casting=od.Casting(skip=(), kernel="copy")))
    x = torch.randn(4, 64, dtype=BF16, requires_grad=True)
    out = fused(x)
    assert torch.equal(out, plain(x))  # exactly the copy path
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()


# ---------------------------------------------------------------- the CPU copy buffers

def _every_value(storage, n=700):
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(storage)
    # finite values: casting never stores a weight outside the format's finite range
    return every[torch.isfinite(every.float())].repeat(3)[:n].reshape(n // 20, 20)


@pytest.mark.parametrize("storage", [E4M3, E5M2])
@pytest.mark.parametrize("compute", [BF16, torch.float16, torch.float32])
def test_scratch_upcast_is_exact_for_every_value_across_chunk_boundaries(storage, compute):
    scratch = UpcastScratch()
    scratch.CHUNK = 100  # several chunks and a ragged last one
    weight = _every_value(storage)
    got, scale = scratch.upcast(weight, compute)
    assert got.dtype == compute and got.shape == weight.shape
    assert torch.equal(got.float() * scale, weight.float())  # subnormals included
    want, want_scale = upcast(weight, compute)
    assert torch.equal(got.float() * scale, want.float() * want_scale)


@pytest.mark.parametrize("storage", [E4M3, E5M2])
def test_scratch_upcast_stays_exact_when_denormals_are_flushed(storage):
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        assert not denormals_kept()
        got, scale = UpcastScratch().upcast(_every_value(storage), BF16)
    finally:
        torch.set_flush_denormal(False)
    assert denormals_kept()
    assert torch.equal(got.float() * scale, _every_value(storage).float())


def test_scratch_buffer_is_reused_and_not_used_under_autograd():
    scratch = UpcastScratch()
    w = torch.randn(8, 16).to(E4M3)
    a, _ = scratch.upcast(w, BF16)
    b, _ = scratch.upcast(torch.randn(4, 4).to(E4M3), BF16)
    assert a.data_ptr() == b.data_ptr()  # one buffer, the largest weight's size
    x = torch.randn(2, 16)
    assert scratch.applies(w, x)
    assert not scratch.applies(w, x.requires_grad_())
    with torch.no_grad():
        assert scratch.applies(w, x)


def test_cast_model_with_scratch_deepcopies_and_pickles():
    model = _mlp()
    od.accelerate(model, Plan(casting=od.Casting(skip=(), kernel="copy")))
    assert model[0].upcast_scratch is model[2].upcast_scratch  # one per model
    twin = copy.deepcopy(model)
    assert twin[0].upcast_scratch is twin[2].upcast_scratch is not model[0].upcast_scratch
    buf = io.BytesIO()
    torch.save(model, buf)  # the whole module, pickled: the scratch travels empty
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert again[0].upcast_scratch is not model[0].upcast_scratch
    x = torch.randn(2, 64, dtype=BF16)
    with torch.no_grad():
        assert torch.equal(again(x), model(x)) and torch.equal(twin(x), model(x))
