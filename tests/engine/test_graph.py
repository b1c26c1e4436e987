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


def test_every_stack_is_found_across_containers():
    g = ModuleGraph(EncDec())
    assert g.blocks() == ["encoder.0", "encoder.1"] + [f"decoder.{i}" for i in range(4)]
    assert g.block_groups() == [["encoder.0", "encoder.1"], [f"decoder.{i}" for i in range(4)]]
    assert "2 blocks under 'encoder'" in g.describe() and "4 blocks under 'decoder'" in g.describe()


def test_a_small_stack_or_one_inside_a_block_is_not_a_stack():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Layer() for _ in range(2))
            self.tiny = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))

    assert ModuleGraph(Model()).blocks() == ["layers.0", "layers.1"]


def test_blocks_of_one_class_form_a_stack_when_one_owns_extra_weights():
    class Block(nn.Module):  # T5: the first block owns the relative-position bias
        def __init__(self, first):
            super().__init__()
            self.ff = nn.Linear(8, 8)
            self.bias = nn.Embedding(4, 2) if first else None

    model = nn.ModuleList(Block(i == 0) for i in range(3))
    assert ModuleGraph(model).blocks() == ["0", "1", "2"]


def test_a_star_matches_one_name_segment():
    model = HFStyle()
    assert ModuleGraph(model, ("model.layers.*",)).blocks() == [
        "model.layers.0", "model.layers.1", "model.layers.2"]
    assert ModuleGraph(model, ("**.layers.0",)).blocks() == ["model.layers.0"]
    assert ModuleGraph(model, ("model.**.layers.1",)).blocks() == ["model.layers.1"]
    with pytest.raises(PlanError, match=r"matches no module.*'model\.layers\.\*'"):
        ModuleGraph(model, ("layers.*",)).blocks()


def test_transformers_t5_has_two_stacks():
    transformers = require("transformers")
    cfg = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                num_decoder_layers=3, num_heads=4)
    g = ModuleGraph(transformers.T5ForConditionalGeneration(cfg))
    assert g.block_groups() == [["encoder.block.0", "encoder.block.1"],
                                ["decoder.block.0", "decoder.block.1", "decoder.block.2"]]


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
