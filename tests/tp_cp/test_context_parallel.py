"""context_parallel: load-balanced positions, refusals (single process)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import overdrive as od
from overdrive.passes.context_parallel import balanced_positions, shard_sequence
from tests.helpers import assert_untouched, snapshot
from tests.tp_cp.common import hf_llama, llama



def cp(n: int) -> od.Plan:
    return od.Plan(parallel=od.Parallel(cp=n, dp_shard=1))


def test_balanced_positions_head_tail():
    assert balanced_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert balanced_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    every = torch.cat([balanced_positions(24, 3, r) for r in range(3)])
    assert sorted(every.tolist()) == list(range(24))


def test_sequence_not_divisible_names_parallel_cp():
    env = SimpleNamespace(plan=cp(2))  # no mesh: the length is refused before it is needed
    batch = {"input_ids": torch.zeros(2, 10, dtype=torch.long)}
    with pytest.raises(od.PlanError, match=r"parallel.cp=2.*10.*2·cp = 4"):
        shard_sequence(batch, env)
    env1 = SimpleNamespace(plan=od.Plan())
    assert shard_sequence(batch, env1) is batch


def test_inspect_previews_blocks():
    rec = od.inspect(llama(), cp(2), world_size=2)["context_parallel"]
    assert rec.modules == ["layers.0", "layers.1"]
    assert rec.details["load_balance"] == "head-tail"


def test_sliding_window_refused_untouched():
    model = llama()
    model.layers[1].attn.sliding_window = 8
    before = snapshot(model)
    with pytest.raises(od.PlanError, match=r"parallel.cp=2.*sliding-window.*layers.1.attn"):
        od.inspect(model, cp(2), world_size=2)
    assert_untouched(model, before)


def test_transformers_sliding_window_config_refused():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, sliding_window=8)
    model = MistralForCausalLM(cfg)
    before = snapshot(model)
    with pytest.raises(od.PlanError, match="sliding_window=8"):
        od.inspect(model, cp(2), world_size=2)
    assert_untouched(model, before)


def test_non_sdpa_attention_refused():
    model = hf_llama()
    model.config._attn_implementation = "eager"
    before = snapshot(model)
    with pytest.raises(od.PlanError, match="attn_implementation='sdpa'"):
        od.inspect(model, cp(2), world_size=2)
    assert_untouched(model, before)
