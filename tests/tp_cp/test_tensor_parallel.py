"""tensor_parallel: plan resolution, refusals (single process, via od.inspect's dry run)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import overdrive as od
from overdrive.passes.tensor_parallel import head_counts, make_style, resolve_tp_plan
from overdrive.rewrite.graph import ModuleGraph
from tests.helpers import assert_untouched, require, snapshot
from tests.tp_cp.common import hf_llama, llama



def tp(n: int, **kw) -> od.Plan:
    extra = {k: kw.pop(k) for k in ("tp_plan", "tp_divide_attrs") if k in kw}
    return od.Plan(parallel=od.Parallel(tp=n, dp_shard=1, **kw), **extra)


def refused(model, plan, world_size, *fragments):
    before = snapshot(model)
    with pytest.raises(od.PlanError) as err:
        od.inspect(model, plan, world_size=world_size)
    for f in fragments:
        assert f in str(err.value), str(err.value)
    assert_untouched(model, before)
    return str(err.value)


def test_auto_plan_llama_default():
    styles, notes = resolve_tp_plan(ModuleGraph(llama()), tp(2))
    assert styles["layers.0.attn.q_proj"] == "colwise"
    assert styles["layers.1.mlp.up_proj"] == "colwise"
    assert styles["layers.0.attn.o_proj"] == styles["layers.1.mlp.down_proj"] == "rowwise"
    assert styles["embed_tokens"] == "embedding_rowwise" and styles["lm_head"] == "colwise_rep"
    assert "norm" not in styles and not notes
    sp, _ = resolve_tp_plan(ModuleGraph(llama()), tp(2, sequence_parallel=True))
    assert sp["norm"] == sp["layers.0.attn_norm"] == sp["layers.1.mlp_norm"] == "sequence_parallel"


def test_auto_plan_uses_transformers_own_plan():
    styles, _ = resolve_tp_plan(ModuleGraph(hf_llama()), tp(2))
    assert styles["lm_head"] == "colwise_rep"  # transformers' colwise_gather_output
    assert styles["model.embed_tokens"] == "embedding_rowwise"
    assert styles["model.layers.1.self_attn.k_proj"] == "colwise"
    assert styles["model.layers.0.mlp.down_proj"] == "rowwise"
    assert head_counts(ModuleGraph(hf_llama())) == {"heads": 4, "kv_heads": 2}


def test_tied_embeddings_are_left_whole():
    from overdrive.rewrite.graph import parameter_owners

    model = llama(tie_embeddings=True)
    styles, notes = resolve_tp_plan(ModuleGraph(model), tp(2))
    assert "embed_tokens" not in styles and "lm_head" not in styles
    assert any("tied" in n for n in notes)
    owners = parameter_owners(model)  # the map tensor_parallel and fsdp share
    assert owners[id(model.lm_head.weight)] == {"embed_tokens", "lm_head"}
    assert owners[id(model.norm.weight)] == {"norm"}


def test_explicit_tp_plan_naming_tied_modules_is_refused():
    """Sharding one of two modules sharing a weight would untie them: refused at check,
    whichever of the two the plan names; naming untied modules only is fine."""
    for name, other in (("lm_head", "embed_tokens"), ("embed_tokens", "lm_head")):
        style = "colwise_rep" if name == "lm_head" else "embedding_rowwise"
        refused(llama(tie_embeddings=True), tp(2, tp_plan={name: style}), 2,
                f"tp_plan: {name!r} ({style})", f"tied to {other!r}", "tp_plan='auto'")
    od.inspect(llama(tie_embeddings=True), tp(2, tp_plan={"layers.*.attn.q_proj": "colwise"}),
               world_size=2)


def test_inspect_reports_sharded_modules_and_halves_their_bytes():
    model = llama()
    report = od.inspect(model, tp(2), world_size=2)
    rec = report["tensor_parallel"]
    assert len(rec.details["sharded_modules"]) == 16
    full = sum(p.numel() * 4 for p in model.parameters())
    norms = sum(p.numel() * 4 for n, p in model.named_parameters() if "norm" in n)
    assert report.memory.parameters == pytest.approx((full - norms) / 2 + norms)


def test_heads_not_divisible():
    msg = refused(llama(), tp(8), 8, "parallel.tp=8", "4 heads", "valid tp values: [1, 2, 4]")
    assert "4 key/value heads" in msg
    refused(llama(n_kv_heads=2), tp(4), 4, "parallel.tp=4", "2 key/value heads", "[1, 2]")


def test_glob_matching_nothing():
    refused(llama(), tp(2, tp_plan={"layers.*.attn.q_proj": "colwise", "layers.*.nope": "rowwise"}),
            2, "tp_plan['layers.*.nope'] matches no module", "layers.*")


def test_nothing_to_shard():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    refused(model, tp(2), 2, "parallel.tp=2", "shards no module")


def test_tp_plan_none_with_tp_refused():
    refused(llama(), tp(2, tp_plan=None), 2, "tp_plan=None", "parallel.tp=2", "'auto'")


def test_style_on_wrong_module_type():
    refused(llama(), tp(2, tp_plan={"layers.*.attn_norm": "colwise"}), 2,
            "layers.0.attn_norm", "RMSNorm", "nn.Linear")


def test_unknown_or_dropped_style_is_refused_by_the_plan():
    for style in ("local_colwise", "gather", "diagonal"):
        with pytest.raises(od.PlanError, match="choose one of"):
            od.inspect(llama(), tp(2, tp_plan={"layers.*.attn.q_proj": style}), world_size=2)


def test_unsupported_style_in_model_plan():
    model = llama()
    model._tp_plan = {"layers.*.mlp.gate_proj": "packed_colwise"}
    refused(model, tp(2), 2, "packed_colwise", "layers.*.mlp.gate_proj")


def test_divide_attrs_checked():
    from tests.tp_cp.common import stored_heads_llama

    refused(llama(), tp(2, tp_divide_attrs=("n_heads",)), 2, "tp_divide_attrs", "'n_heads'",
            "(owners: <root>, layers.0.attn, layers.0.mlp, layers.1.attn, …)",
            "drop tp_divide_attrs")
    from overdrive.models.llama import tiny  # one owner: listed whole, no ellipsis

    refused(tiny(n_layers=1), tp(2, tp_divide_attrs=("n_heads",)), 2,
            "(owners: <root>); name")
    od.inspect(stored_heads_llama(), tp(2, tp_divide_attrs=("n_heads", "n_kv_heads")), world_size=2)
    with pytest.raises(od.PlanError, match="tp_divide_attrs"):
        od.Plan.from_dict({"parallel": {"tp": 2}, "tp_divide_attrs": ["n heads"]})


def test_sequence_parallel_refusals():
    od.inspect(hf_llama(), tp(2, sequence_parallel=True), world_size=2)  # own plan: trains
    pytest.importorskip("transformers")
    from tests.models.zoo import mixtral

    refused(mixtral(), tp(2, sequence_parallel=True), 2, "sequence_parallel=True",
            "grouped experts (model.layers.0.mlp.experts)")
    refused(llama(tie_embeddings=True), tp(2, sequence_parallel=True), 2,
            "sequence_parallel=True needs the token embedding")


def test_fp8_tensorwise_picks_torchao_styles():
    require("torchao")
    from torch.distributed.tensor.parallel import ColwiseParallel
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_tensor_parallel import (Float8ColwiseParallel,
                                                       Float8RowwiseParallel)

    tensorwise = convert_to_float8_training(nn.Sequential(nn.Linear(32, 32)))[0]
    rowwise = convert_to_float8_training(
        nn.Sequential(nn.Linear(32, 32)), config=Float8LinearConfig.from_recipe_name("rowwise"))[0]
    assert type(make_style("colwise", tensorwise, False)) is Float8ColwiseParallel
    assert type(make_style("rowwise", tensorwise, True)) is Float8RowwiseParallel
    assert type(make_style("colwise", rowwise, False)) is ColwiseParallel
    assert type(make_style("colwise", nn.Linear(4, 4), False)) is ColwiseParallel
    assert torch.is_tensor(tensorwise.weight)


def test_te_fp8_with_tp_refused():
    plan = od.Plan(parallel=od.Parallel(tp=2, dp_shard=1), fp8=od.FP8(backend="te"))
    refused(llama(ffn_dim=128), plan, 2, "fp8.backend='te'", "parallel.tp=2",
            "fp8.backend='torchao'")


def test_apply_refuses_modules_an_earlier_pass_swapped():
    """fp8.backend='auto' can resolve to Transformer Engine only on a CUDA machine; its
    te.Linear is no nn.Linear. apply keeps the styles check resolved and verifies them
    rather than silently leaving the swapped modules unsharded."""
    from types import SimpleNamespace

    from overdrive.passes.tensor_parallel import TensorParallel

    class NotALinear(nn.Module):  # stands in for te.Linear
        def __init__(self, linear):
            super().__init__()
            self.weight = linear.weight

    from tests.helpers import check_pass, pass_context

    model, plan = llama(), tp(2)
    tpp = TensorParallel()
    env = SimpleNamespace(backend="gloo", dry_run=False)  # no mesh: refused before it is used
    decision = check_pass(tpp, ModuleGraph(model), plan, env)
    for block in model.layers:  # what the fp8 pass does between check and apply
        block.attn.q_proj = NotALinear(block.attn.q_proj)
    with pytest.raises(od.PlanError, match=r"replaced a module.*layers.0.attn.q_proj.*NotALinear"):
        tpp.apply(model, decision, pass_context(tpp, ModuleGraph(model), plan, env))


def test_inspect_says_which_float8_styles_apply_will_use(monkeypatch):
    """apply uses torchao's float8 styles only where the backend can all-gather float8
    (not gloo); the preview said float8 styles everywhere."""
    plan = od.Plan(parallel=od.Parallel(tp=2, dp_shard=1), fp8=od.FP8())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    notes = od.inspect(llama(ffn_dim=128), plan, world_size=2)["tensor_parallel"].notes
    assert any("plain TP styles: the gloo backend" in n for n in notes), notes
    assert not any("float8 TP styles" in n for n in notes)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA machine: nccl
    notes = od.inspect(llama(ffn_dim=128), plan, world_size=2)["tensor_parallel"].notes
    assert any("torchao's float8 TP styles" in n for n in notes), notes


def test_loss_parallel_inspect_and_refusals():
    rec = od.inspect(llama(), tp(2, loss_parallel=True), world_size=2)["tensor_parallel"]
    assert rec.details["loss_parallel"] and rec.details["loss_head"] == "lm_head"
    assert any("loss parallel" in n for n in rec.notes)
    assert not od.inspect(llama(), tp(2), world_size=2)["tensor_parallel"].details[
        "loss_parallel"]
    refused(llama(), od.Plan(parallel=od.Parallel(loss_parallel=True)), 1,
            "parallel.loss_parallel=True", "parallel.tp > 1")
    refused(llama(tie_embeddings=True), tp(2, loss_parallel=True), 2,
            "parallel.loss_parallel=True", "vocabulary-sized head")
    refused(llama(), od.Plan(parallel=od.Parallel(pp=2, tp=2, dp_shard=1, loss_parallel=True)),
            4, "parallel.loss_parallel=True", "parallel.pp=2")
