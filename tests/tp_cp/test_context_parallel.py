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
    env = SimpleNamespace(parallel=cp(2).parallel)  # no mesh: refused before it is needed
    batch = {"input_ids": torch.zeros(2, 10, dtype=torch.long)}
    with pytest.raises(od.PlanError, match=r"parallel.cp=2.*10.*2·cp = 4"):
        shard_sequence(batch, env)
    env1 = SimpleNamespace(parallel=od.Plan().parallel)
    assert shard_sequence(batch, env1) is batch


def cp_env(n: int, rank: int) -> SimpleNamespace:
    mesh = {"cp": SimpleNamespace(get_local_rank=lambda: rank)}
    return SimpleNamespace(parallel=cp(n).parallel, mesh=mesh)


def test_causal_lm_labels_shifted_before_the_split():
    ids = torch.arange(16).repeat(2, 1)
    ids[1, 3] = -100  # an ignored target stays ignored after the shift
    for rank in (0, 1):
        idx = balanced_positions(16, 2, rank)
        out = shard_sequence({"input_ids": ids, "labels": ids}, cp_env(2, rank), causal_lm=True,
                             attention_mask=True)
        shifted = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
        assert torch.equal(out["shift_labels"], shifted[:, idx])
        assert torch.equal(out["labels"], ids[:, idx])  # still given: transformers needs it
        assert out["num_items_in_batch"].item() == (2 * 15 - 1) / 2
        assert out["attention_mask"].shape == (2, 8) and bool(out["attention_mask"].all())
        assert torch.equal(out["position_ids"], idx.expand(2, -1))
    # overdrive's Llama: shifted the same way, no attention_mask (it takes none)
    ours = shard_sequence({"input_ids": ids, "labels": ids}, cp_env(2, 0), causal_lm=True)
    assert set(ours) == {"input_ids", "labels", "shift_labels", "num_items_in_batch",
                         "position_ids"}
    # a model that does not shift: labels arrive aligned with the inputs and are only sliced
    plain = shard_sequence({"input_ids": ids, "labels": ids}, cp_env(2, 0))
    assert set(plain) == {"input_ids", "labels", "position_ids"}
    given = shard_sequence({"input_ids": ids, "labels": ids, "num_items_in_batch": 10},
                           cp_env(2, 1), causal_lm=True)
    assert given["num_items_in_batch"] == 5


def test_tensor_and_tuple_batches_refused_with_a_clear_message():
    ids = torch.zeros(2, 16, dtype=torch.long)
    for batch in (ids, (ids, ids), [ids, ids]):
        with pytest.raises(od.PlanError, match=r"parallel.cp=2.*mapping.*position_ids"):
            shard_sequence(batch, cp_env(2, 0))


def test_causal_lm_detection():
    from overdrive.causal_lm import is_transformers_causal_lm, takes_shift_labels

    assert is_transformers_causal_lm(hf_llama())
    assert not is_transformers_causal_lm(llama())
    assert takes_shift_labels(llama()) and not takes_shift_labels(torch.nn.Linear(2, 2))


def test_llama_shifts_labels_like_transformers():
    """labels = input ids: position t is scored against token t+1 (-100 ignored), as
    transformers' causal LMs do; shift_labels / num_items_in_batch as theirs."""
    import torch.nn.functional as F

    model = llama()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, 5] = -100
    out = model(ids, labels=labels)
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    want = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)
    same = model(ids, shift_labels=targets).loss
    torch.testing.assert_close(same, want)
    n = (targets != -100).sum()
    torch.testing.assert_close(model(ids, labels=labels, num_items_in_batch=2 * n).loss, want / 2)


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


def test_bidirectional_attention_refused_at_check():
    from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

    bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64))
    with pytest.raises(od.PlanError, match=r"parallel.cp=2.*not causal.*is_causal=False"):
        od.inspect(bert, cp(2), world_size=2)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1,
                                             num_heads=2, d_kv=16))
    with pytest.raises(od.PlanError, match="is_encoder_decoder=True"):
        od.inspect(t5, cp(2), world_size=2)
    model = hf_llama()
    model.config.is_causal = False
    with pytest.raises(od.PlanError, match="config.is_causal=False"):
        od.inspect(model, cp(2), world_size=2)
    od.inspect(hf_llama(), cp(2), world_size=2)  # a causal decoder passes
