"""Single-device passes composed in canonical order: fp8 → checkpointing → compile
(→ mixed_precision), trained for a few steps."""

from __future__ import annotations

import pytest
import torch

import overdrive as od
from overdrive.models.llama import tiny
from overdrive.plan_spec import Plan


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_fp8_checkpointing_compile_train_together(mixed_precision):
    from torchao.float8.float8_linear import Float8Linear

    model = tiny(2)
    keys = list(model.state_dict())
    plan = Plan(fp8=od.FP8(backend="torchao"), checkpointing=od.Checkpointing(mode="full"),
                compile=od.Compile(mode="regional", backend="aot_eager"),
                mixed_precision=mixed_precision)
    rt = od.accelerate(model, plan, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    expected = ["fp8", "checkpointing", "compile"]
    if mixed_precision != "no":
        expected.append("mixed_precision")
    assert rt.report.names() == expected
    assert rt.model is model
    assert isinstance(model.get_submodule("layers.0.attn.q_proj"), Float8Linear)
    assert list(model.state_dict()) == keys  # no _orig_mod. / _checkpoint_wrapped_module.

    batch = torch.randint(0, 256, (2, 16))
    losses = []
    for _ in range(5):
        loss = rt.model(batch, labels=batch).loss
        rt.backward(loss)
        rt.optimizer.step()
        rt.optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.85 * losses[0]


def test_blocks_are_resolved_once_so_a_partial_fp8_swap_keeps_every_block():
    """fp8 converting layers 0 and 2 only makes them differ structurally from 1 and 3;
    the later passes must still act on all four blocks, as od.inspect previews."""
    from overdrive.passes.checkpointing import is_checkpointed

    plan = Plan(fp8=od.FP8(filter=r"layers\.[02]\."), checkpointing=od.Checkpointing(),
                compile=od.Compile(backend="eager"))
    blocks = [f"layers.{i}" for i in range(4)]
    preview = od.inspect(tiny(4), plan)
    assert preview["checkpointing"].modules == blocks and preview["compile"].modules == blocks
    model = tiny(4)
    rt = od.accelerate(model, plan)
    assert rt.report.blocks == blocks
    assert {n.split(".")[1] for n in rt.report["fp8"].modules} == {"0", "2"}
    assert rt.report["checkpointing"].modules == blocks
    assert rt.report["compile"].modules == blocks
    assert all(is_checkpointed(model.layers[i]) for i in range(4))
    assert all(model.layers[i]._compiled_call_impl is not None for i in range(4))
