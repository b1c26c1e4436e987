"""mixed_precision pass: autocast inside the root forward, fp32 out, keys kept, fp16 loss
scaling in rt.backward."""

from __future__ import annotations

import collections
import copy

import pytest
import torch

import overdrive as od
from overdrive.models.llama import tiny
from overdrive.passes.mixed_precision import MixedPrecision, outputs_to_fp32
from overdrive.plan_spec import Plan
from tests.helpers import assert_untouched, require, snapshot


def _matmul_dtypes(model):
    seen = []
    model.layers[0].attn.q_proj.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("mp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_forward_computes_in_low_precision_and_returns_fp32(mp, dtype):
    model = tiny(2)
    keys = list(model.state_dict())
    rt = od.accelerate(model, Plan(mixed_precision=mp))
    assert rt.model is model and "mixed_precision" in rt.report
    seen = _matmul_dtypes(model)
    batch = torch.randint(0, 256, (2, 16))
    out = model(batch, labels=batch)
    assert seen == [dtype]  # the matmul inside ran in the autocast dtype
    assert out.logits.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert list(model.state_dict()) == keys
    assert all(p.dtype == torch.float32 for p in model.parameters())
    out.loss.backward()
    assert model.layers[0].attn.q_proj.weight.grad.dtype == torch.float32


def test_autocast_is_a_forward_context_entered_by_the_one_root_wrapper():
    model = tiny(1)
    rt = od.accelerate(model, Plan(mixed_precision="bf16"))
    assert len(rt._handoff.forward_contexts) == 1
    with rt._handoff.forward_contexts[0]():
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    # one wrapper around the class's own forward, not autocast inside a context wrapper
    assert model._overdrive_context_forward.__func__ is type(model).forward
    assert list(model._forward_hooks.values())[-1].__name__ == "_outputs_to_fp32_hook"


def test_full_compile_traces_the_autocast_context_with_the_model():
    """The runtime's wrapper enters forward contexts with plain nested ``with``: dynamo
    traces autocast into the model's graph (an ExitStack would break the graph there)."""
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = tiny(1)
    ref = copy.deepcopy(model)
    od.accelerate(model, Plan(mixed_precision="bf16",
                              compile=od.Compile(mode="full", backend=recording)))
    x = torch.randint(0, 256, (2, 16))
    out = model(x, labels=x)
    linears = [sum(n.target is torch._C._nn.linear for n in g.graph.nodes) for g in graphs]
    main = graphs[linears.index(max(linears))]
    assert max(linears) == 8  # 7 block projections + lm_head: the whole model, one graph
    assert any("autocast" in str(n.target) for n in main.graph.nodes)
    assert out.logits.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = ref(x, labels=x).loss.float()
    torch.testing.assert_close(out.loss, expected)
    torch._dynamo.reset()


def test_no_autocast_on_the_device_is_refused_and_model_untouched(monkeypatch):
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    model = tiny(2)
    before = snapshot(model)
    with pytest.raises(od.BackendUnavailable, match=r"mixed_precision='bf16': torch.autocast "
                                                    r"is not available on device 'cpu'"):
        od.accelerate(model, Plan(mixed_precision="bf16"),
                      optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    assert_untouched(model, before)


def test_no_mixed_precision_leaves_forward_alone():
    model = tiny(1)
    rt = od.accelerate(model, Plan())
    assert "mixed_precision" not in rt.report and "forward" not in model.__dict__
    seen = _matmul_dtypes(model)
    model(torch.randint(0, 256, (1, 8)))
    assert seen == [torch.float32]


@pytest.mark.parametrize("plan, on", [
    (Plan(mixed_precision="bf16"), True),
    (Plan(mixed_precision="no"), False),
    (Plan(mixed_precision="bf16", fsdp=od.FSDP()), False),  # MixedPrecisionPolicy instead
    (Plan(mixed_precision="fp16", deepspeed=od.DeepSpeed()), False),  # DeepSpeed's config
    (Plan(mixed_precision="bf16", ddp=od.DDP()), True),
])
def test_runs_exactly_when_autocast_casts(plan, on):
    from overdrive.plan_spec import who_casts
    from overdrive.rewrite.manager import order_passes

    assert (MixedPrecision.config in {type(c) for c in plan.configs()}) is on
    assert ("mixed_precision" in [p.name for p, _ in order_passes(plan)]) is on
    assert (who_casts(plan) == "autocast") is on


def test_fp16_backward_scales_the_loss_with_the_runtime_scaler():
    model = tiny(1)
    ref = copy.deepcopy(model)  # fp32, no autocast
    rt = od.accelerate(model, Plan(mixed_precision="fp16"))
    batch = torch.randint(0, 256, (2, 16))
    rt.backward(model(batch, labels=batch).loss)
    ref(batch, labels=batch).loss.backward()
    scale = rt.scaler.get_scale()
    assert scale == 2.0 ** 16
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        # scaled fp16 gradients, unscaled, match fp32's to fp16 precision (~1e-3 relative)
        err = ((p.grad / scale - q.grad).norm() / q.grad.norm()).item()
        assert err < 0.02, name


def test_deepcopy_of_wrapped_model_runs_the_copy():
    model = tiny(1)
    od.accelerate(model, Plan(mixed_precision="bf16"))
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.zero_()
    x = torch.randint(0, 256, (1, 8))
    assert clone(x).logits.abs().sum() == 0  # the copy's (zeroed) weights, not the original's
    assert model(x).logits.abs().sum() > 0
    seen = _matmul_dtypes(clone)
    clone(x)
    assert seen == [torch.bfloat16]


def test_outputs_to_fp32_keeps_structure():
    h = torch.ones(2, dtype=torch.bfloat16)
    ids = torch.ones(2, dtype=torch.long)
    Pair = collections.namedtuple("Pair", "a b")
    out = outputs_to_fp32({"x": [h, (h, ids)], "p": Pair(h, 3)})
    assert out["x"][0].dtype == torch.float32 and out["x"][1][1].dtype == torch.long
    assert isinstance(out["p"], Pair) and out["p"].a.dtype == torch.float32 and out["p"].b == 3
    transformers = require("transformers")
    mo = transformers.modeling_outputs.CausalLMOutputWithPast(loss=h.sum(), logits=h)
    conv = outputs_to_fp32(mo)
    assert type(conv) is type(mo) and conv.logits.dtype == torch.float32
    assert conv["loss"].dtype == torch.float32 and conv.past_key_values is None


def test_training_under_bf16_autocast_reduces_loss():
    model = tiny(2)
    rt = od.accelerate(model, Plan(mixed_precision="bf16"),
                       optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    batch = torch.randint(0, 256, (4, 16))
    losses = []
    for _ in range(6):
        loss = rt.model(batch, labels=batch).loss
        rt.backward(loss)
        rt.optimizer.step()
        rt.optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
