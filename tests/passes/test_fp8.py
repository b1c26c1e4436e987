"""fp8 pass: which Linears are swapped / skipped and why, numerics, training, keys,
backend selection and refusal (torchao runs here; Transformer Engine needs CUDA)."""

from __future__ import annotations

import contextlib
import copy
import sys
import types

import pytest
import torch
from torch import nn

import overdrive as od
from overdrive.errors import BackendUnavailable, PlanError
from overdrive.models.llama import tiny
from overdrive.passes import fp8 as fp8_pass
from overdrive.rewrite.graph import ModuleGraph
from overdrive.plan_spec import Plan
from overdrive.runtime.state import env_for

from tests.helpers import apply_pass, assert_untouched, check_pass, require, snapshot

Float8Linear = require("torchao.float8.float8_linear").Float8Linear

# e4m3 keeps 3 mantissa bits: round-to-nearest changes a (scaled, normal) value by at most
# 2^-4 relative. torchao quantizes both matmul operands (input and weight) with dynamic
# scales, so each product x_i*w_i carries two independent errors of at most 2^-4; for
# random operands the error terms add in quadrature like the signal, so the output's
# relative L2 error is at most about sqrt(2) * 2^-4 ~ 0.088 (measured: ~0.037 per layer,
# ~0.02 on the tiny Llama's logits). The lower bound proves fp8 really ran.
FP8_REL_ERR = 2 ** 0.5 * 2 ** -4
FP8_MIN_ERR = 1e-3

LLAMA_LINEARS = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def _linears(n_layers=2, parts=LLAMA_LINEARS):
    return [f"layers.{i}.{p}" for i in range(n_layers) for p in parts]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _env(plan, device="cpu", dry_run=False):
    return env_for(plan, rank=0, local_rank=0, world_size=1, device=torch.device(device),
                   dry_run=dry_run)


def _fp8(model, **kw):
    return od.accelerate(model, Plan(fp8=od.FP8(**kw)))


# --------------------------------------------------------------------------- selection


def test_default_swaps_every_block_linear_and_keeps_lm_head():
    model = tiny(2)
    rt = _fp8(model)
    rec = rt.report["fp8"]
    assert rec.details["backend"] == "torchao"  # auto on a machine without CUDA
    assert sorted(rec.modules) == sorted(_linears())
    assert all(isinstance(model.get_submodule(n), Float8Linear) for n in _linears())
    assert type(model.lm_head) is nn.Linear
    assert rec.details["output_projection"] == "lm_head"
    assert "output projection" in rec.details["skipped"]["lm_head"]
    assert any(n.startswith("lm_head skipped: output projection") for n in rec.notes)


class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.odd = nn.Linear(128, 40)  # 40 is not a multiple of 16
        self.back = nn.Linear(40, 64)
        self.output = nn.Linear(64, 32)

    def forward(self, x):
        return self.output(self.back(self.odd(self.up(x))))


def test_dims_not_multiple_of_16_and_output_named_output_are_skipped():
    model = _Odd()
    rec = _fp8(model).report["fp8"]
    assert rec.modules == ["up"]
    assert "in_features=128, out_features=40" in rec.details["skipped"]["odd"]
    assert "multiples of 16" in rec.details["skipped"]["back"]
    assert "output projection" in rec.details["skipped"]["output"]
    assert isinstance(model.up, Float8Linear) and type(model.odd) is nn.Linear


def test_last_linear_is_the_output_projection_when_none_is_named():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 16))
    rec = _fp8(model).report["fp8"]
    assert rec.modules == ["0", "2"]
    assert rec.details["output_projection"] == "4"
    assert type(model[4]) is nn.Linear


class _BlockWithOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(32, 32)
        self.output = nn.Linear(32, 32)  # a block's own projection, not the model's head

    def forward(self, x):
        return self.output(self.inner(x))


def test_an_output_linear_inside_the_blocks_is_not_the_head():
    model = nn.Sequential(nn.ModuleList([_BlockWithOutput(), _BlockWithOutput()]),
                          nn.Linear(32, 16))
    rec = _fp8(model).report["fp8"]
    assert rec.details["output_projection"] == "1"
    assert sorted(rec.modules) == ["0.0.inner", "0.0.output", "0.1.inner", "0.1.output"]


def test_regex_filter_selects_by_qualified_name():
    model = tiny(2)
    rec = _fp8(model, filter=r"mlp\.").report["fp8"]
    assert sorted(rec.modules) == sorted(_linears(parts=["mlp.gate_proj", "mlp.up_proj",
                                                         "mlp.down_proj"]))
    assert "does not match" in rec.details["skipped"]["layers.0.attn.q_proj"]
    assert type(model.layers[1].attn.o_proj) is nn.Linear


def test_filter_that_names_lm_head_converts_it():
    model = tiny(2)
    rec = _fp8(model, filter=r"lm_head|q_proj").report["fp8"]
    assert sorted(rec.modules) == sorted(["lm_head", "layers.0.attn.q_proj",
                                          "layers.1.attn.q_proj"])
    assert isinstance(model.lm_head, Float8Linear)
    assert rec.details["output_projection_converted"] is True


@pytest.mark.parametrize("flt", [lambda n: "attn" not in n, r"^(?!.*attn)"],
                         ids=["callable", "regex"])
def test_exclusion_filter_converting_lm_head_is_never_silent(flt):
    """A filter that only leaves something out also selects the output projection: it is
    converted (the filter decides), and the record says so."""
    model = tiny(2)
    rec = _fp8(model, filter=flt).report["fp8"]
    assert "lm_head" in rec.modules and isinstance(model.lm_head, Float8Linear)
    assert not any(".attn." in n for n in rec.modules)
    assert rec.details["output_projection_converted"] is True
    assert any(n.startswith("lm_head converted: fp8.filter selected the output projection")
               for n in rec.notes)


def test_without_filter_lm_head_is_kept_and_nothing_is_noted_as_converted():
    rec = _fp8(tiny(1)).report["fp8"]
    assert rec.details["output_projection_converted"] is False
    assert not any("converted: fp8.filter" in n for n in rec.notes)


def test_callable_filter_gets_the_qualified_name():
    seen = []

    def keep(name):
        seen.append(name)
        return name.startswith("layers.1.")

    model = tiny(2)
    rec = _fp8(model, filter=keep).report["fp8"]
    assert sorted(rec.modules) == sorted(n for n in _linears() if n.startswith("layers.1."))
    assert rec.details["skipped"]["layers.0.mlp.up_proj"] == "fp8.filter returned False"
    assert "lm_head" in seen and "layers.0.attn.q_proj" in seen


def test_nothing_eligible_is_refused_before_mutation():
    model = tiny(2)
    before = snapshot(model)
    with pytest.raises(PlanError, match=r"no nn.Linear \(or transformers Conv1D\) is eligible"):
        _fp8(model, filter="matches_nothing")
    assert_untouched(model, before)


def test_preview_lists_what_would_be_swapped_without_touching_the_model():
    model = tiny(2)
    before = snapshot(model)
    report = od.inspect(model, Plan(fp8=od.FP8(filter="down_proj")))
    rec = report["fp8"]
    assert rec.dry_run
    assert rec.modules == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]
    assert "lm_head" in rec.details["skipped"]
    assert_untouched(model, before)


# --------------------------------------------------------------------------- numerics


def test_single_layer_error_within_fp8_bound():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    ref = copy.deepcopy(model)
    _fp8(model)  # [1] is the output projection: only [0] is fp8
    x = torch.randn(64, 256)
    err = _rel(model[0](x), ref[0](x))
    assert FP8_MIN_ERR < err < FP8_REL_ERR


def test_model_logits_within_fp8_tolerance_of_fp32():
    model = tiny(2)
    ref = copy.deepcopy(model)
    _fp8(model)
    x = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        err = _rel(model(x).logits, ref(x).logits)
    assert FP8_MIN_ERR < err < FP8_REL_ERR


def test_state_dict_keys_and_weights_unchanged():
    model = tiny(2)
    ref_sd = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model.layers[0].attn.q_proj.weight
    _fp8(model)
    sd = model.state_dict()
    assert list(sd) == list(ref_sd)
    assert all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    assert model.layers[0].attn.q_proj.weight is weight  # torchao keeps the Parameter


def _train(model, steps=8):
    torch.manual_seed(1)
    batch = torch.randint(0, 256, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_short_training_run_loss_falls_like_fp32():
    ref = tiny(2)
    model = copy.deepcopy(ref)
    rt = od.accelerate(model, Plan(fp8=od.FP8()),
                       optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    assert rt.report["fp8"].modules
    fp8_losses, ref_losses = _train(model), _train(ref)
    assert fp8_losses[-1] < 0.8 * fp8_losses[0]
    # the fp8 run follows the fp32 one: its loss drop is within 10% of fp32's
    drop, ref_drop = fp8_losses[0] - fp8_losses[-1], ref_losses[0] - ref_losses[-1]
    assert abs(drop - ref_drop) < 0.1 * ref_drop


def test_rowwise_recipe_converts_and_runs():
    model = tiny(2)
    ref = copy.deepcopy(model)
    rec = _fp8(model, recipe="rowwise").report["fp8"]
    assert rec.details["recipe"] == "rowwise"
    assert model.layers[0].mlp.up_proj.config.cast_config_weight.scaling_granularity.value \
        == "axiswise"
    x = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        assert _rel(model(x).logits, ref(x).logits) < FP8_REL_ERR


# --------------------------------------------------------------------------- FSDP hook


def test_fsdp_tensorwise_enables_fp8_all_gather_and_post_step_hook(monkeypatch):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    monkeypatch.setattr(fp8_pass, "float8_collectives", lambda env: True)  # as on nccl
    plan = Plan(fp8=od.FP8(), fsdp=od.FSDP())
    env = _env(plan)
    model = tiny(2)
    applied = apply_pass(fp8_pass.FP8Training(), model, plan, env)
    assert applied.record.details["fsdp_float8_all_gather"] is True
    assert model.layers[0].attn.q_proj.config.enable_fsdp_float8_all_gather
    assert applied.post_step_hooks == [fp8_pass.precompute_fsdp_scales]

    # the hook really computes the scales of FSDP-sharded fp8 weights (1-rank gloo group)
    env.ensure_process_group()
    mesh = init_device_mesh("cpu", (1,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = torch.randint(0, 256, (2, 16))
    model(batch, labels=batch).loss.backward()
    opt.step()
    local = model.layers[0].attn.q_proj.weight._local_tensor
    assert getattr(local, "_precomputed_scale", None) is None
    for hook in applied.post_step_hooks:
        hook(model, opt)
    assert local._precomputed_scale is not None and local._precomputed_scale > 0


def test_fsdp_on_gloo_all_gathers_fp8_weights_in_high_precision():
    """gloo rejects float8 tensors: the float8 all-gather is off there, and the record
    (od.inspect's too) says why."""
    plan = Plan(fp8=od.FP8(), fsdp=od.FSDP())
    env = _env(plan)
    model = tiny(1)
    applied = apply_pass(fp8_pass.FP8Training(), model, plan, env)
    rec = applied.record
    assert rec.details["fsdp_float8_all_gather"] is False
    assert not model.layers[0].attn.q_proj.config.enable_fsdp_float8_all_gather
    assert applied.post_step_hooks == []
    assert any("gloo backend cannot all-gather float8" in n for n in rec.notes)
    if not torch.cuda.is_available():
        preview = od.inspect(tiny(1), plan, world_size=2)["fp8"]
        assert any("gloo backend cannot all-gather float8" in n for n in preview.notes)


@pytest.mark.parametrize("fp8_cfg, fsdp", [(od.FP8(), None),
                                            (od.FP8(recipe="rowwise"), od.FSDP()),
                                            (od.FP8(fsdp_float8_all_gather=False), od.FSDP())])
def test_no_post_step_hook_without_fsdp_fp8_all_gather(fp8_cfg, fsdp):
    plan = Plan(fp8=fp8_cfg, fsdp=fsdp)
    env = _env(plan)
    model = tiny(1)
    applied = apply_pass(fp8_pass.FP8Training(), model, plan, env)
    assert applied.post_step_hooks == []
    assert not model.layers[0].attn.q_proj.config.enable_fsdp_float8_all_gather


# --------------------------------------------------------------------------- backends


@pytest.mark.parametrize("backend, recipe, device, te_ok, expect", [
    ("auto", "tensorwise", "cuda", True, "te"),
    ("auto", "tensorwise", "cuda", False, "torchao"),
    ("auto", "tensorwise", "cpu", True, "torchao"),
    ("auto", "rowwise", "cuda", True, "torchao"),  # TE has no rowwise recipe
    ("auto", "mxfp8", "cuda", True, "te"),
    ("te", "tensorwise", "cpu", False, "te"),  # explicit choices are kept (check refuses)
    ("torchao", "rowwise", "cuda", True, "torchao"),
])
def test_choose_backend(backend, recipe, device, te_ok, expect):
    assert fp8_pass.choose_backend(od.FP8(backend=backend, recipe=recipe), device, te_ok) \
        == expect


def test_auto_mxfp8_without_te_names_the_te_extra():
    with pytest.raises(BackendUnavailable, match=r"pip install overdrive\[te\]"):
        fp8_pass.choose_backend(od.FP8(recipe="mxfp8"), "cpu", False)


def test_te_on_cpu_is_refused_and_model_untouched():
    model = tiny(2)
    before = snapshot(model)
    with pytest.raises(BackendUnavailable, match=r"CUDA.*pip install overdrive\[te\]"):
        _fp8(model, backend="te")
    assert_untouched(model, before)


@pytest.mark.parametrize("backend", ["torchao", "auto"])
def test_torchao_unimportable_is_refused_and_model_untouched(monkeypatch, backend):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    assert not fp8_pass.torchao_importable()
    model = tiny(2)
    before = snapshot(model)
    with pytest.raises(BackendUnavailable, match=r"pip install overdrive\[fp8\]"):
        _fp8(model, backend=backend)
    assert_untouched(model, before)


def test_te_on_old_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(fp8_pass, "te_importable", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    plan = Plan(fp8=od.FP8(backend="te"))
    model = tiny(1)
    with pytest.raises(BackendUnavailable, match="compute capability >= 8.9"):
        check_pass(fp8_pass.FP8Training(), ModuleGraph(model), plan, _env(plan, "cuda"))
    plan = Plan(fp8=od.FP8(backend="te", recipe="mxfp8"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.raises(BackendUnavailable, match="mxfp8.*10.0"):
        check_pass(fp8_pass.FP8Training(), ModuleGraph(model), plan, _env(plan, "cuda"))


def test_te_rowwise_is_a_plan_error(monkeypatch):
    monkeypatch.setattr(fp8_pass, "te_importable", lambda: True)
    plan = Plan(fp8=od.FP8(backend="te", recipe="rowwise"))
    with pytest.raises(PlanError, match="not available with backend='te'"):
        check_pass(fp8_pass.FP8Training(), ModuleGraph(tiny(1)), plan, _env(plan, "cuda"))


def test_inspect_plans_te_on_a_machine_without_it():
    report = od.inspect(tiny(1), Plan(fp8=od.FP8(backend="te")))
    rec = report["fp8"]
    assert rec.details["backend"] == "te" and rec.modules
    assert any("pip install overdrive[te]" in n for n in rec.notes)


# --------------------------------------------------------------------------- TE swap logic
#
# A stand-in for transformer_engine.pytorch with the constructor signatures overdrive
# uses. It exercises the swap (weights copied, keys kept, the recipe's fp8_autocast
# registered as a forward context) on machines without CUDA; the real module is tested
# below when CUDA and Transformer Engine are present.


def _fake_te(monkeypatch):
    entered = []

    class Linear(nn.Linear):
        def __init__(self, i, o, bias=True, params_dtype=None, device=None):
            super().__init__(i, o, bias=bias, dtype=params_dtype, device=device)

        def get_extra_state(self):  # TE saves fp8 metadata under "<name>._extra_state"
            return torch.zeros(1)

        def set_extra_state(self, state):
            pass

    class RMSNorm(nn.RMSNorm):
        def __init__(self, hidden, eps=1e-5, params_dtype=None, device=None):
            super().__init__(hidden, eps=eps, dtype=params_dtype, device=device)

    class LayerNorm(nn.LayerNorm):
        def __init__(self, hidden, eps=1e-5, params_dtype=None, device=None):
            super().__init__(hidden, eps=eps, dtype=params_dtype, device=device)

    @contextlib.contextmanager
    def fp8_autocast(enabled=True, fp8_recipe=None):
        entered.append(fp8_recipe)
        yield

    class Float8CurrentScaling:
        pass

    class MXFP8BlockScaling:
        pass

    te = types.ModuleType("transformer_engine.pytorch")
    te.Linear, te.RMSNorm, te.LayerNorm, te.fp8_autocast = Linear, RMSNorm, LayerNorm, \
        fp8_autocast
    recipe = types.ModuleType("transformer_engine.common.recipe")
    recipe.Float8CurrentScaling, recipe.MXFP8BlockScaling = Float8CurrentScaling, \
        MXFP8BlockScaling
    recipe.DelayedScaling = Float8CurrentScaling
    common = types.ModuleType("transformer_engine.common")
    common.recipe = recipe
    root = types.ModuleType("transformer_engine")
    root.pytorch, root.common = te, common
    for name, mod in [("transformer_engine", root), ("transformer_engine.pytorch", te),
                      ("transformer_engine.common", common),
                      ("transformer_engine.common.recipe", recipe)]:
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    return te, entered


def _apply_te(model, **kw):
    plan = Plan(fp8=od.FP8(**kw))
    env = _env(plan, "cuda")
    applied = apply_pass(fp8_pass.FP8Training(), model, plan, env)
    return applied.record, applied


def test_te_swap_copies_weights_keeps_keys_and_registers_fp8_autocast(monkeypatch):
    te, entered = _fake_te(monkeypatch)
    model = tiny(2)
    ref = copy.deepcopy(model)
    rec, applied = _apply_te(model, backend="auto", layernorm=True)
    assert rec.details["backend"] == "te"  # auto: CUDA + TE present
    assert sorted(rec.modules) == sorted(_linears() + [
        f"layers.{i}.{n}" for i in range(2) for n in ("attn_norm", "mlp_norm")] + ["norm"])
    assert isinstance(model.layers[0].attn.q_proj, te.Linear)
    assert isinstance(model.norm, te.RMSNorm) and type(model.lm_head) is nn.Linear
    assert list(model.state_dict()) == list(ref.state_dict())  # no _extra_state entries
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
    assert rec.details["te_recipe"] == "Float8CurrentScaling"
    assert len(applied.forward_contexts) == 1
    x = torch.randint(0, 256, (2, 8))
    with applied.forward_contexts[0]():
        out = model(x).logits
    assert type(entered[0]).__name__ == "Float8CurrentScaling"
    torch.testing.assert_close(out, ref(x).logits)


def test_te_mxfp8_recipe_and_no_norm_swap_by_default(monkeypatch):
    te, entered = _fake_te(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    model = tiny(1)
    rec, applied = _apply_te(model, backend="te", recipe="mxfp8")
    assert rec.details["te_recipe"] == "MXFP8BlockScaling"
    assert type(model.norm) is nn.RMSNorm
    with applied.forward_contexts[0]():
        pass
    assert type(entered[0]).__name__ == "MXFP8BlockScaling"


def test_te_swap_that_would_change_keys_is_refused_in_check(monkeypatch):
    """A TE module whose parameters are named differently would change the state_dict
    keys: refused by check() (a meta-device probe), before the model is touched."""
    te, _ = _fake_te(monkeypatch)

    class ScaledLinear(te.Linear):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.weight_scale = nn.Parameter(torch.ones(1, device=kw.get("device")))

    te.Linear = ScaledLinear
    model = tiny(1)
    before = snapshot(model)
    plan = Plan(fp8=od.FP8(backend="te"))
    with pytest.raises(PlanError, match=r"Transformer Engine's ScaledLinear has parameters "
                                        r"\['weight', 'weight_scale'\].*state_dict keys"):
        check_pass(fp8_pass.FP8Training(), ModuleGraph(model), plan, _env(plan, "cuda"))
    assert_untouched(model, before)


def test_te_without_current_scaling_is_refused_in_check(monkeypatch):
    """TE < 2.2 has no Float8CurrentScaling. Falling back to DelayedScaling would need the
    amax history the swapped modules drop with _extra_state: refuse, naming the upgrade;
    auto picks torchao instead."""
    _fake_te(monkeypatch)
    recipes = sys.modules["transformer_engine.common.recipe"]
    monkeypatch.delattr(recipes, "Float8CurrentScaling")
    model = tiny(1)
    before = snapshot(model)
    plan = Plan(fp8=od.FP8(backend="te"))
    upgrade = r"pip install -U 'transformer-engine\[pytorch\]>=2.2'"
    with pytest.raises(BackendUnavailable, match=r"Float8CurrentScaling.*>= 2.2.*" + upgrade):
        check_pass(fp8_pass.FP8Training(), ModuleGraph(model), plan, _env(plan, "cuda"))
    assert_untouched(model, before)
    auto = Plan(fp8=od.FP8(backend="auto"))
    assert fp8_pass.backend_for(auto.fp8, _env(auto, "cuda")) == "torchao"
    mx = Plan(fp8=od.FP8(backend="te", recipe="mxfp8"))  # MXFP8BlockScaling is there
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    check_pass(fp8_pass.FP8Training(), ModuleGraph(model), mx, _env(mx, "cuda"))


def test_pyproject_te_extra_requires_current_scaling():
    from tests.helpers import ROOT

    assert 'te = ["transformer-engine[pytorch]>=2.2"]' in (ROOT / "pyproject.toml").read_text()


# --------------------------------------------------------------------------- real TE

needs_te = pytest.mark.skipif(
    not (torch.cuda.is_available() and fp8_pass.te_importable()),
    reason="Transformer Engine path needs CUDA and transformer_engine (pip install "
           "overdrive[te])")


@needs_te
@pytest.mark.cuda
def test_te_real_swap_trains_under_fp8_autocast():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability >= 8.9")
    model = tiny(2, dim=128).cuda()
    ref = copy.deepcopy(model)
    rt = od.accelerate(model, Plan(fp8=od.FP8(backend="te")),
                       optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    assert rt.report["fp8"].details["backend"] == "te"
    assert list(model.state_dict()) == list(ref.state_dict())
    batch = torch.randint(0, 256, (4, 32), device="cuda")
    losses = []
    for _ in range(8):
        loss = rt.model(batch, labels=batch).loss  # the runtime enters fp8_autocast itself
        loss.backward()
        rt.optimizer.step()
        rt.optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_record_says_fp8_on_cpu_is_emulated():
    """On CPU torchao emulates the fp8 matmuls: the record (and od.inspect's) says so."""
    rec = _fp8(tiny(1)).report["fp8"]
    assert rec.details["emulated"] is True
    assert any("fp8 on cpu is emulated" in n and "no speedup" in n for n in rec.notes)
    if not torch.cuda.is_available():
        preview = od.inspect(tiny(1), Plan(fp8=od.FP8()))["fp8"]
        assert preview.details["emulated"] is True
        assert any("emulated" in n for n in preview.notes)


def test_transformers_conv1d_trains_in_fp8_with_its_layout_and_keys():
    Conv1D = require("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(64, 32), nn.GELU(), Conv1D(32, 64), nn.Linear(32, 10))
    plain = copy.deepcopy(model)
    keys = list(model.state_dict())
    rt = _fp8(model)
    assert rt.report["fp8"].details["converted"] == ["0", "2"]
    assert isinstance(model[0], Conv1D) and type(model[0]).__name__ == "Float8Conv1D"
    assert list(model.state_dict()) == keys and model[0].weight.shape == (32, 64)
    x = torch.randn(4, 8, 32)
    got, want = model(x), plain(x)
    err = _rel(got, want)
    assert FP8_MIN_ERR < err < FP8_REL_ERR  # fp8 really ran, within its rounding
    got.sum().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.shape == (32, 64)
