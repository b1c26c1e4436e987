"""Block detection and graph attributes on several model shapes."""

import pytest
import torch
from torch import nn

from overdrive import ModuleGraph, PlanError
from overdrive.models.llama import Llama, LlamaConfig, tiny
from tests.helpers import require


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(3))


class HFStyle(nn.Module):
    """transformers-style nesting: Outer.model.layers.N"""

    def __init__(self):
        super().__init__()
        self.model = Inner()
        self.lm_head = nn.Linear(8, 10)


class EncDec(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.decoder = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))


def test_llama_blocks_are_the_decoder_layers():
    g = ModuleGraph(tiny(n_layers=3))
    assert g.blocks() == ["layers.0", "layers.1", "layers.2"]
    assert set(g.non_block_leaves()) == {"embed_tokens", "norm", "lm_head"}


def test_plain_sequential_of_identical_stages():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)])
    assert ModuleGraph(model).blocks() == ["0", "1", "2"]


def test_transformers_style_nesting():
    assert ModuleGraph(HFStyle()).blocks() == ["model.layers.0", "model.layers.1",
                                               "model.layers.2"]


def test_transformers_llama():
    transformers = require("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    assert ModuleGraph(model).blocks() == ["model.layers.0", "model.layers.1"]


def test_no_repeats_is_a_valid_answer():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    g = ModuleGraph(model)
    assert g.blocks() == []
    assert "no repeated blocks" in g.describe()


def test_largest_group_wins_across_containers():
    assert ModuleGraph(EncDec()).blocks() == [f"decoder.{i}" for i in range(4)]


def test_differently_shaped_member_is_left_out():
    model = nn.ModuleList([nn.Linear(8, 16)] + [nn.Linear(16, 16) for _ in range(3)])
    assert ModuleGraph(model).blocks() == ["1", "2", "3"]


def test_meta_model_gives_the_same_blocks_and_sizes():
    with torch.device("meta"):
        meta = Llama(LlamaConfig(n_layers=2))
    real = Llama(LlamaConfig(n_layers=2))
    gm, gr = ModuleGraph(meta), ModuleGraph(real)
    assert gm.blocks() == gr.blocks()
    assert gm.total_params() == gr.total_params()
    assert gm.g.nodes["lm_head"]["device"].type == "meta"


def test_node_attributes_and_tied_weights_counted_once():
    model = Llama(LlamaConfig(n_layers=1, tie_embeddings=True))
    g = ModuleGraph(model)
    node = g.g.nodes["layers.0.attn.q_proj"]
    assert node["cls"] == "Linear" and node["params"] == 64 * 64
    assert node["bytes"] == 64 * 64 * 4 and node["dtype"] == torch.float32
    assert g.total_params() == sum(p.numel() for p in model.parameters())
    assert g.parent("layers.0.attn") == "layers.0"
    assert "layers.0.attn.q_proj" in g.subtree("layers.0")


def test_blocks_override_by_glob_and_name():
    model = tiny(n_layers=3)
    assert ModuleGraph(model, ("layers.1",)).blocks() == ["layers.1"]
    assert ModuleGraph(model, ("layers.*.mlp",)).blocks() == [
        "layers.0.mlp", "layers.1.mlp", "layers.2.mlp"]


def test_blocks_override_that_matches_nothing_names_the_field():
    with pytest.raises(PlanError, match=r"blocks: 'decoder\.\*' matches no module.*layers\.\*"):
        ModuleGraph(tiny(n_layers=2), ("decoder.*",)).blocks()


def test_blocks_override_must_not_nest():
    with pytest.raises(PlanError, match="must not nest"):
        ModuleGraph(tiny(n_layers=2), ("layers.0", "layers.0.mlp")).blocks()
