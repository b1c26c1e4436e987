"""casting pass: fp8 storage with a temporary bf16 compute copy; bytes, outputs, skips,
keys and refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import overdrive as od
from overdrive.errors import PlanError
from overdrive.models.llama import tiny
from overdrive.passes.casting import CastConv2d, CastLinear, upcast
from overdrive.rewrite.manager import parameter_bytes
from overdrive.plan_spec import Plan

from tests.helpers import assert_untouched, require, snapshot

CAST = Plan(casting=od.Casting())

# float8_e4m3fn keeps 3 mantissa bits: rounding a normal weight changes it by at most 2^-4
# relative (rms ~2.6% for Gaussian weights; weights below 2^-6 are subnormal and absolutely
# rounded to 2^-10, ~3.3% rms at std 0.02). Only weights are quantized here (inputs stay
# bf16), so a layer's output error is the weights' error: at most 2^-4 relative.
LAYER_REL_ERR = 2 ** -4


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _bf16_llama():
    return tiny(4, dim=128).to(torch.bfloat16).eval()


def test_parameter_bytes_at_most_055_of_bf16():
    model = _bf16_llama()
    bf16_bytes = parameter_bytes(model)
    rt = od.accelerate(model, CAST)
    rec = rt.report["casting"]
    assert parameter_bytes(model) <= 0.55 * bf16_bytes
    assert rec.bytes_before == bf16_bytes and rec.bytes_after == parameter_bytes(model)
    assert rec.details["storage"] == "float8_e4m3fn"
    assert rec.details["cast_weight_bytes_after"] * 2 == rec.details["cast_weight_bytes_before"]


def test_weights_stored_in_fp8_frozen_keys_and_objects_kept():
    model = _bf16_llama()
    keys = list(model.state_dict())
    q_proj = model.layers[0].attn.q_proj
    od.accelerate(model, CAST)
    assert list(model.state_dict()) == keys
    assert model.layers[0].attn.q_proj is q_proj and isinstance(q_proj, CastLinear)
    assert isinstance(q_proj, nn.Linear)
    assert q_proj.weight.dtype == torch.float8_e4m3fn and not q_proj.weight.requires_grad
    assert model.lm_head.weight.dtype == torch.bfloat16  # skipped
    assert model.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(2, 32), (16, 64)], ids=["few tokens: scale the input",
                                                             "many: scale the weight copy"])
def test_forward_equals_bf16_model_with_fp8_rounded_weights(shape):
    """The compute path is exactly 'upcast the stored weight, then bf16 matmul', whichever
    operand the power-of-two scale is applied to (the smaller one)."""
    model = _bf16_llama()
    rounded = copy.deepcopy(model)
    od.accelerate(model, CAST)
    with torch.no_grad():
        for name, m in rounded.named_modules():
            if isinstance(m, nn.Linear) and name != "lm_head":
                m.weight.copy_(m.weight.to(torch.float8_e4m3fn).to(torch.bfloat16))
        x = torch.randint(0, 256, shape)
        assert torch.equal(model(x).logits, rounded(x).logits)


def test_layer_output_close_to_bf16():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(256, 256)).to(torch.bfloat16)
    nn.init.normal_(layer[0].weight, std=0.02)
    ref = copy.deepcopy(layer)
    od.accelerate(layer, Plan(casting=od.Casting(skip=())))
    x = torch.randn(64, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        err = _rel(layer(x), ref(x))
    assert 1e-3 < err < LAYER_REL_ERR


def test_model_logits_close_to_bf16():
    # 28 weight-quantized layers in series; the residual projections (o_proj, down_proj,
    # std 0.02/sqrt(8)) sit mostly in e4m3's subnormal range, where rounding is absolute
    # (2^-10) and the relative error grows. Measured: ~8% relative error on the logits;
    # the bound leaves ~2x margin. (The exact compute path is pinned by the test above.)
    model = _bf16_llama()
    ref = copy.deepcopy(model)
    od.accelerate(model, CAST)
    x = torch.randint(0, 256, (4, 32))
    with torch.no_grad():
        out, want = model(x).logits, ref(x).logits
    assert 1e-3 < _rel(out, want) < 0.15


def test_skips_recorded_with_reason():
    model = _bf16_llama()
    rec = od.accelerate(model, Plan(casting=od.Casting(skip=("lm_head", "mlp")))).report["casting"]
    assert rec.details["skipped"]["lm_head"] == "name contains 'lm_head' (casting.skip)"
    assert rec.details["skipped"]["layers.2.mlp.up_proj"] == "name contains 'mlp' (casting.skip)"
    assert sorted(rec.modules) == sorted(f"layers.{i}.attn.{p}_proj" for i in range(4)
                                         for p in "qkvo")
    assert type(model.layers[0].mlp.up_proj) is nn.Linear
    assert any(n.startswith("lm_head skipped") for n in rec.notes)


def test_conv_layers_are_cast_and_compute_in_bf16():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3)).to(torch.bfloat16)
    ref = copy.deepcopy(model)
    rec = od.accelerate(model, Plan(casting=od.Casting(skip=()))).report["casting"]
    assert rec.modules == ["0", "2"] and isinstance(model[0], CastConv2d)
    x = torch.randn(2, 3, 12, 12, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(x)
        assert out.dtype == torch.bfloat16 and _rel(out, ref(x)) < 2 * LAYER_REL_ERR


def test_fp32_model_keeps_fp32_activations_between_cast_layers():
    model = nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 32))
    od.accelerate(model, Plan(casting=od.Casting(skip=())))
    seen = {}
    model[1].register_forward_pre_hook(lambda m, a: seen.update(norm_in=a[0].dtype))
    with torch.no_grad():
        out = model(torch.randn(4, 32))
    assert out.dtype == torch.float32 and seen["norm_in"] == torch.float32


def test_tied_weight_shared_with_a_kept_module_is_not_cast():
    model = tiny(2, tie_embeddings=True).to(torch.bfloat16)
    rec = od.accelerate(model, Plan(casting=od.Casting(skip=("norm", "embed")))).report["casting"]
    assert "shared with embed_tokens" in rec.details["skipped"]["lm_head"]
    assert model.embed_tokens.weight.dtype == torch.bfloat16


def test_optimizer_with_casting_is_refused_untouched():
    model = _bf16_llama()
    before = snapshot(model)
    with pytest.raises(PlanError, match="casting is an inference pass"):
        od.accelerate(model, CAST, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    with pytest.raises(PlanError, match="casting is an inference pass"):
        od.accelerate(model, CAST, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert_untouched(model, before)


def test_nothing_to_cast_is_refused_untouched():
    model = _bf16_llama()
    before = snapshot(model)
    with pytest.raises(PlanError, match="no Linear / Conv1d / Conv2d / Conv3d"):
        od.accelerate(model, Plan(casting=od.Casting(skip=("layers", "lm_head"))))
    assert_untouched(model, before)


def test_preview_reports_bytes_without_touching():
    model = _bf16_llama()
    before = snapshot(model)
    rec = od.inspect(model, CAST)["casting"]
    assert rec.dry_run and len(rec.modules) == 28
    assert rec.details["cast_weight_bytes_after"] * 2 == rec.details["cast_weight_bytes_before"]
    assert_untouched(model, before)


@pytest.mark.parametrize("storage", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float16, torch.float32])
def test_upcast_is_exact_for_every_float8_value(storage, compute):
    every = torch.arange(256, dtype=torch.uint8).view(storage)
    finite = every[torch.isfinite(every.float())]
    copy_, scale = upcast(finite, compute)
    want = finite.float()  # every float8 value is exact in bf16, fp16 and fp32
    assert copy_.dtype == compute
    assert torch.equal(copy_.float() * scale, want)
    assert torch.equal(copy_.float() * scale, finite.to(compute).float())


def test_fp16_compute_matches_fp16_model_with_rounded_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).to(torch.float16)
    rounded = copy.deepcopy(model)
    od.accelerate(model, Plan(casting=od.Casting(compute="float16", skip=())))
    with torch.no_grad():
        for m in rounded:
            m.weight.copy_(m.weight.to(torch.float8_e4m3fn).to(torch.float16))
        x = torch.randn(8, 64, dtype=torch.float16) * 300  # x * 256 would overflow fp16
        out = model(x)
        assert torch.isfinite(out).all() and torch.equal(out, rounded(x))


def test_weights_outside_e4m3_range_are_skipped_not_clipped():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    with torch.no_grad():
        model[1].weight[0, 0] = 1000.0
    rec = od.accelerate(model, Plan(casting=od.Casting(skip=()))).report["casting"]
    assert rec.modules == ["0"]
    assert "range" in rec.details["skipped"]["1"] and model[1].weight[0, 0] == 1000.0


def test_a_weight_read_outside_its_layer_is_skipped_and_the_rest_runs():
    """nn.TransformerEncoderLayer hands linear1/linear2's weights to a fused kernel
    (eval fast path): casting them would fail at the first forward, so they are skipped."""
    model = nn.Sequential(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
                          nn.Linear(32, 32)).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        want = model(x)
    rt = od.accelerate(model, od.Plan(casting=od.Casting()))
    notes = " ".join(rt.report["casting"].notes)
    assert "0.linear1 skipped: 0 (TransformerEncoderLayer) reads its weight directly" in notes
    assert model[0].linear1.weight.dtype == torch.float32
    assert model[1].weight.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        got = model(x)
    assert ((got - want).norm() / want.norm()).item() < 0.1


def test_transformers_conv1d_is_cast():
    Conv1D = require("transformers.pytorch_utils").Conv1D
    model = nn.Sequential(Conv1D(48, 32), nn.GELU(), Conv1D(32, 48)).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        want = model(x)
    rt = od.accelerate(model, od.Plan(casting=od.Casting()))
    assert rt.report["casting"].modules == ["0", "2"]
    assert model[0].weight.dtype == torch.float8_e4m3fn
    assert isinstance(model[0], Conv1D) and list(model.state_dict()) == [
        "0.weight", "0.bias", "2.weight", "2.bias"]
    with torch.no_grad():
        got = model(x)
    assert got.shape == want.shape
    assert ((got - want).norm() / want.norm()).item() < 0.1


def test_a_layer_whose_cast_forward_fails_on_a_meta_probe_is_skipped_untouched():
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 4))
    from overdrive.passes import casting

    original = casting.CastLinear._compute
    casting.CastLinear._compute = lambda self, x, w, b: x @ w  # wrong unless square
    try:
        rt = od.accelerate(model, od.Plan(casting=od.Casting()))
    finally:
        casting.CastLinear._compute = original
    notes = " ".join(rt.report["casting"].notes)
    assert "0 skipped: a one-layer probe of the cast layer failed on meta" in notes
    assert model[0].weight.dtype == torch.float32  # not cast: its forward would fail
    assert model[1].weight.dtype == torch.float8_e4m3fn
