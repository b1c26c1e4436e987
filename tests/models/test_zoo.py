"""The model zoo: every model × plan trains like a plain loop, or is refused at check time
with its tested message and the model untouched; inspect agrees with accelerate.

A representative subset runs in ``make test``; the whole matrix is ``slow``. The 2-rank
cells of one model share one torchrun launch (torch and transformers import once).
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import ROOT, require, run_torchrun
from tests.models import zoo
from tests.models.render_docs import render

require("transformers")

# make test: one cell of each plan kind over the families that broke before
FAST_SINGLE = {("llama", "sac"), ("gemma2", "ac"), ("t5", "ac"), ("gpt2", "casting"),
               ("t5", "casting"), ("encoder_lm", "casting"), ("cnn", "ac"), ("bert", "bf16"),
               ("qwen2", "fp8"), ("gpt2", "compile-eager"), ("encoder_lm", "compile+ac")}
FAST_DIST = (["cnn", "gpt2"], ["ddp", "fsdp", "fsdp+tp"])  # one torchrun launch


def _single_cells():
    for model in zoo.MODELS:
        for plan in zoo.SINGLE_PLANS:
            marks = () if (model, plan) in FAST_SINGLE else (pytest.mark.slow,)
            yield pytest.param(model, plan, id=f"{model}-{plan}", marks=marks)


@pytest.mark.parametrize("model,plan", list(_single_cells()))
def test_single_process_cell(model, plan):
    import torch

    torch._dynamo.reset()
    zoo.check_cell(zoo.run_cell(model, plan, zoo.SINGLE_PLANS[plan]()))


def _run_dist(tmp_path, models: list[str], plans: list[str]) -> list[zoo.CellResult]:
    out = tmp_path / "cells.json"
    run_torchrun(ROOT / "tests" / "models" / "dist_worker.py", zoo.DIST_WORLD, str(out),
                 ",".join(models), ",".join(plans), timeout=900)
    return [zoo.CellResult(**r) for r in json.loads(out.read_text())]


@pytest.mark.dist
def test_two_rank_cells_subset(tmp_path):
    results = _run_dist(tmp_path, *FAST_DIST)
    assert len(results) == len(FAST_DIST[0]) * len(FAST_DIST[1])
    for res in results:
        zoo.check_cell(res)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("model", list(zoo.MODELS))
def test_two_rank_cells(tmp_path, model):
    failures = []
    for res in _run_dist(tmp_path, [model], list(zoo.DIST_PLANS)):
        try:
            zoo.check_cell(res)
        except AssertionError as err:
            failures.append(str(err))
    assert not failures, "\n".join(failures)


@pytest.mark.dist
@pytest.mark.slow
def test_two_rank_sequence_parallel_on_model_plans(tmp_path):
    """Llama/Qwen2 train under tp+sp on transformers' own plans like a plain loop;
    Mixtral is refused at check time (experts)."""
    results = _run_dist(tmp_path, list(zoo.SP_MODELS), list(zoo.SP_PLANS))
    assert len(results) == len(zoo.SP_MODELS) * len(zoo.SP_PLANS)
    for res in results:
        zoo.check_cell(res)


def test_models_doc_is_current():
    """docs/models.md is rendered from the zoo's expectations, which the cells test."""
    doc = ROOT / "docs" / "models.md"
    assert doc.read_text() == render(), \
        "docs/models.md is stale: run `python -m tests.models.render_docs`"


def test_inspect_fsdp_of_a_real_multihead_attention_model_is_not_refused():
    """inspect looks at a meta copy; nn.MultiheadAttention's uninitialisable meta weights
    matter only for a model that is itself on meta (accelerate trains this one)."""
    import overdrive as od

    report = od.inspect(zoo.EncoderLM(), "fsdp", world_size=2)
    assert "fsdp" in report.names()


BUFFERS_SCRIPT = """
import json, sys, torch, torch.distributed as dist
import overdrive as od
from tests.models import zoo
from tests.models.dist_worker import _buffers_agree

out = {}
for flag in (True, False):
    torch.manual_seed(0)
    model = zoo.BatchNormCNN()
    rt = od.accelerate(model, od.Plan(ddp=od.DDP(broadcast_buffers=flag)),
                       optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    batch = zoo.shard(zoo.make_batches("image", 1)[0], rt.rank, 2)
    rt.backward(zoo.loss_of("image", model, batch))
    out[str(flag)] = {"agree": _buffers_agree(model),
                      "notes": rt.report["ddp"].notes}
if rt.rank == 0:
    json.dump(out, open(sys.argv[1], "w"))
"""


@pytest.mark.dist
@pytest.mark.slow
def test_ddp_broadcast_buffers_switch(tmp_path):
    out = tmp_path / "buffers.json"
    run_torchrun(BUFFERS_SCRIPT, 2, str(out), tmp_path=tmp_path)
    got = json.loads(out.read_text())
    assert got["True"]["agree"] and any("broadcast_buffers=True" in n for n in got["True"]["notes"])
    assert not got["False"]["agree"]  # each rank keeps its own data's running stats


def test_report_lists_each_stack_of_blocks():
    import overdrive as od

    report = od.inspect(zoo.t5(), "ac")
    assert report.block_groups() == [["encoder.block.0", "encoder.block.1"],
                                     ["decoder.block.0", "decoder.block.1"]]
    assert "blocks: 2 under 'encoder.block', 2 under 'decoder.block'" in str(report)
    assert report.to_dict()["block_groups"] == report.block_groups()


def _tp_styles(model) -> dict[str, str]:
    import overdrive as od

    report = od.inspect(model, zoo.DIST_PLANS["fsdp+tp"](), world_size=2)
    return report["tensor_parallel"].details["styles"]


def test_auto_tp_plan_pairs_projections_by_structure():
    from torch import nn

    class MLP(nn.Module):  # torchtitan's order: w1 (gate), w2 (down), w3 (up)
        def __init__(self):
            super().__init__()
            self.w1, self.w2, self.w3 = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 64)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = MLP()

    model = nn.Module()
    model.layers = nn.ModuleList(Block() for _ in range(2))
    assert _tp_styles(model) == {f"layers.{i}.mlp.{n}": s for i in range(2)
                                 for n, s in (("w1", "colwise"), ("w3", "colwise"),
                                              ("w2", "rowwise"))}
    bert = _tp_styles(zoo.bert())
    layer = "bert.encoder.layer.0."
    assert {k[len(layer):]: v for k, v in bert.items() if k.startswith(layer)} == {
        "attention.self.query": "colwise", "attention.self.key": "colwise",
        "attention.self.value": "colwise", "attention.output.dense": "rowwise",
        "intermediate.dense": "colwise", "output.dense": "rowwise"}
    enc = _tp_styles(zoo.EncoderLM())
    assert "encoder.layers.0.self_attn.out_proj" not in enc  # fed by a raw in_proj_weight
    assert enc["encoder.layers.0.linear1"] == "colwise"
    t5 = _tp_styles(zoo.t5())
    assert not any("Attention" in k for k in t5)  # the relative bias is per head
    assert t5["decoder.block.1.layer.2.DenseReluDense.wo"] == "rowwise"


def test_auto_tp_plan_shards_conv1d_and_grouped_experts():
    """GPT-2's Conv1D layers get the local-shard styles (c_attn strided over q/k/v);
    Mixtral's grouped experts are sharded on their hidden dim, their parameter entries in
    the model's plan need no note."""
    import overdrive as od

    gpt2 = _tp_styles(zoo.gpt2())
    assert gpt2["transformer.h.0.attn.c_attn"] == "conv1d_colwise"
    assert gpt2["transformer.h.0.attn.c_proj"] == "conv1d_rowwise"
    assert gpt2["transformer.h.1.mlp.c_fc"] == "conv1d_colwise"
    assert "lm_head" not in gpt2  # tied to wte
    report = od.inspect(zoo.mixtral(), zoo.DIST_PLANS["fsdp+tp"](), world_size=2)
    rec = report["tensor_parallel"]
    assert rec.details["styles"]["model.layers.0.mlp.experts"] == "experts"
    assert "model.layers.0.mlp.gate" not in rec.details["styles"]  # the router: replicated
    assert not any("experts" in n and "skipped" in n for n in rec.notes)


def test_sequence_parallel_on_a_model_plan_keeps_the_embedding_output_whole():
    """transformers models derive positions and the causal mask from the embedding
    output's length: under tp+sp it stays whole and the first block splits the sequence."""
    import overdrive as od

    report = od.inspect(zoo.llama(), zoo.SP_PLANS["tp+sp"](), world_size=2)
    styles = report["tensor_parallel"].details["styles"]
    assert styles["model.embed_tokens"] == "embedding_rowwise_rep"
    assert styles["model.layers.0"] == "sequence_split" and "model.layers.1" not in styles
    assert styles["model.norm"] == styles["model.layers.1.input_layernorm"] == \
        "sequence_parallel_local"
    assert styles["lm_head"] == "colwise_rep"
