"""The meta-device trace: call order, shapes, FLOPs, saved activations."""

import torch

from overdrive.models.llama import Llama, LlamaConfig, tiny
from overdrive.rewrite.trace import meta_copy, trace_model


def test_trace_of_a_real_model_touches_no_weights():
    model = tiny(n_layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = trace_model(model, torch.randint(0, 256, (2, 16)))
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    order = t.call_order
    assert order[0] == "" and order.index("embed_tokens") < order.index("layers.0") \
        < order.index("layers.1") < order.index("lm_head")
    assert t["lm_head"].output_shapes == [(2, 16, 256)]


def test_flops_match_the_matmul_count():
    cfg = LlamaConfig(n_layers=1, dim=64, n_heads=4, vocab_size=256)
    model = Llama(cfg)
    b, s = 2, 16
    t = trace_model(model, torch.randint(0, 256, (b, s)))
    assert t["lm_head"].flops == 2 * b * s * cfg.dim * cfg.vocab_size
    assert t["layers.0.attn.q_proj"].flops == 2 * b * s * cfg.dim * cfg.dim
    assert t.backward_flops >= t.forward_flops > 0  # backward: about 2× forward


def test_activation_bytes_exclude_weights_and_sum_up():
    model = tiny(n_layers=2)
    t = trace_model(model, torch.randint(0, 256, (1, 16)))
    q = t["layers.0.attn.q_proj"]
    assert q.activation_bytes == 1 * 16 * 64 * 4  # its fp32 input, not its weight
    assert t.activation_bytes >= t["layers.0"].activation_bytes + t["layers.1"].activation_bytes


def test_meta_copy_keeps_ties_and_shapes():
    model = Llama(LlamaConfig(n_layers=1, tie_embeddings=True))
    m = meta_copy(model)
    assert m.lm_head.weight is m.embed_tokens.weight
    assert m.lm_head.weight.device.type == "meta"
    assert model.lm_head.weight.device.type == "cpu"


def test_attention_activations_grow_linearly_like_a_fused_kernel():
    """On meta, SDPA would take the math path and save an (s × s) matrix; the trace routes
    it to the fused kernel so the estimate matches what flash attention keeps."""
    with torch.device("meta"):
        model = Llama(LlamaConfig(n_layers=1, max_seq_len=1024))
    short = trace_model(model, torch.randint(0, 256, (1, 256)))["layers.0.attn"]
    long = trace_model(model, torch.randint(0, 256, (1, 1024)))["layers.0.attn"]
    assert long.activation_bytes == 4 * short.activation_bytes
    assert long.flops > 4 * short.flops  # the s² score matmuls are still counted
