"""Activation checkpointing pass: recomputation really happens (counted), gradients are
unchanged (dropout too), keys and classes survive, budget mode picks the fewest blocks."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

import overdrive as od
from overdrive.models.llama import tiny
from overdrive.passes.checkpointing import is_checkpointed
from overdrive.rewrite.estimate import activation_estimate
from overdrive.rewrite.trace import trace_model
from tests.helpers import assert_untouched, require, snapshot

BATCH = (2, 16)


def _batch(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, BATCH, generator=g)


def _checkpointed(mode: str, n_layers: int = 4, **cfg) -> nn.Module:
    model = tiny(n_layers=n_layers, **cfg)
    if mode != "none":
        od.accelerate(model, od.Plan(checkpointing=od.Checkpointing(mode=mode, every=2)))
    return model


class PointwiseCounter(TorchDispatchMode):
    """Counts the pointwise aten ops (norms, activations, RoPE, adds…) that run."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += torch.Tag.pointwise in func.tags
        return func(*args, **(kwargs or {}))


def _fwd_bwd(model: nn.Module, x: torch.Tensor) -> None:
    model(x, labels=x).loss.backward()


def _flops(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        _fwd_bwd(model, x)
    return counter.get_total_flops()


def _pointwise(model: nn.Module, x: torch.Tensor) -> int:
    with PointwiseCounter() as counter:
        _fwd_bwd(model, x)
    return counter.count


def test_recomputation_is_counted():
    x = _batch()
    flops = {m: _flops(_checkpointed(m), x) for m in ("none", "every", "selective", "full")}
    pointwise = {m: _pointwise(_checkpointed(m), x) for m in ("none", "selective", "full")}
    # full AC reruns every block's forward in backward; every=2 reruns half of them
    extra = flops["full"] - flops["none"]
    assert extra > 0
    assert flops["every"] - flops["none"] == extra // 2
    # selective recomputes every second matmul (attention never), and the same pointwise
    # ops full AC does: torchtitan's ordering no AC < selective < full
    assert flops["none"] < flops["selective"] < flops["full"]
    assert pointwise["none"] < pointwise["selective"] == pointwise["full"]


class KeptStorages(TorchDispatchMode):
    """Weak references to the storage of every tensor an op produces. After the forward,
    those still alive (parameters aside) are what backward will use: autograd's saved
    tensors and checkpointing's caches alike — no CUDA memory stats needed."""

    def __init__(self):
        super().__init__()
        self.refs = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.refs.setdefault(s._cdata, (StorageWeakRef(s), s.nbytes()))
        return out


def _kept_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    with KeptStorages() as kept:
        loss = model(x, labels=x).loss
    gc.collect()
    alive = sum(n for key, (ref, n) in kept.refs.items()
                if key not in params and not ref.expired())
    del loss
    return alive


def test_selective_keeps_less_activation_memory_than_none_and_more_than_full():
    x = _batch()
    kept = {m: _kept_activation_bytes(_checkpointed(m), x) for m in ("none", "selective", "full")}
    assert kept["none"] > kept["selective"] > kept["full"] > 0


@pytest.mark.parametrize("mode", ["full", "every", "selective"])
def test_keys_objects_and_classes_survive(mode):
    model = tiny(n_layers=4)
    keys = list(model.state_dict())
    modules = [(n, type(m), id(m)) for n, m in model.named_modules()]
    rt = od.accelerate(model, od.Plan(checkpointing=od.Checkpointing(mode=mode)))
    assert list(model.state_dict()) == keys
    assert [(n, type(m), id(m)) for n, m in model.named_modules()] == modules
    assert not any("_checkpoint_wrapped_module" in k for k in model.state_dict())
    rec = rt.report["checkpointing"]
    expected = ["layers.1", "layers.3"] if mode == "every" else [f"layers.{i}" for i in range(4)]
    assert rec.modules == expected
    assert rec.details["mode"] == mode
    assert [n for n, m in model.named_modules() if is_checkpointed(m)] == expected


def _grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)  # same dropout masks in every run
    _fwd_bwd(model, x)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradients_match_no_checkpointing(dropout):
    x = _batch()
    ref = _grads(_checkpointed("none", dropout=dropout).train(), x)
    for mode in ("full", "every", "selective"):
        got = _grads(_checkpointed(mode, dropout=dropout).train(), x)
        for name, g in ref.items():
            torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7,
                                       msg=f"{mode}, dropout={dropout}: grad of {name}")


def _budget_plan(budget: int) -> od.Plan:
    return od.Plan(checkpointing=od.Checkpointing(mode="budget", budget_bytes=budget,
                                                  budget_input_shape=BATCH))


def test_budget_checkpoints_the_fewest_blocks_that_fit():
    model = tiny(n_layers=4)
    x = torch.zeros(BATCH, dtype=torch.long)
    trace = trace_model(model, x, backward=False)
    blocks = [f"layers.{i}" for i in range(4)]
    acts = {b: trace[b].activation_bytes for b in blocks}
    kept = {b: 2 * 16 * 64 * 4 for b in blocks}  # each block keeps its (2, 16, 64) fp32 input
    one = activation_estimate(trace.activation_bytes, blocks, acts, kept, blocks[:1])
    two = activation_estimate(trace.activation_bytes, blocks, acts, kept, blocks[:2])
    assert two < one < trace.activation_bytes
    budget = (one + two) // 2  # one block is not enough, two are

    rt = od.accelerate(model, _budget_plan(budget))
    rec = rt.report["checkpointing"]
    assert rec.details["mode"] == "budget"
    assert rec.modules == blocks[:2]
    assert rec.details["estimated_activation_bytes"] <= budget
    # measured on the checkpointed model: what autograd really keeps fits the budget
    assert trace_model(model, x, backward=False).activation_bytes <= budget
    # a budget the un-checkpointed model already fits needs no block (plan from YAML/JSON)
    roomy = od.inspect(tiny(n_layers=4), {"checkpointing": {
        "mode": "budget", "budget_bytes": trace.activation_bytes, "budget_input_shape": [2, 16]}})
    assert roomy["checkpointing"].modules == []


def test_inspect_budget_mode_traces_the_example_inputs():
    """od.inspect(example_inputs=...) is enough for budget mode: no budget_input_shape."""
    x = torch.zeros(BATCH, dtype=torch.long)
    trace = trace_model(tiny(n_layers=4), x, backward=False)
    plan = od.Plan(checkpointing=od.Checkpointing(mode="budget",
                                                  budget_bytes=trace.activation_bytes - 1))
    rec = od.inspect(tiny(n_layers=4), plan, example_inputs=x)["checkpointing"]
    assert rec.details["traced_activation_bytes"] == trace.activation_bytes
    assert len(rec.modules) == 1  # just below the traced total: one block is enough
    # bigger inputs, same budget: more blocks
    big = od.inspect(tiny(n_layers=4), plan, example_inputs=torch.zeros(4, 16, dtype=torch.long))
    assert len(big["checkpointing"].modules) > 1
    with pytest.raises(od.PlanError, match=r"budget_input_shape=\(batch, seq_len\).*"
                                           r"od.inspect\(model, plan, example_inputs=...\)"):
        od.inspect(tiny(n_layers=4), plan)


@pytest.mark.parametrize("budget", [True, False])
def test_inspect_memory_and_budget_mode_share_one_activation_model(budget):
    """od.inspect's activation estimate is the one budget mode chooses its blocks by."""
    x = torch.zeros(BATCH, dtype=torch.long)
    total = trace_model(tiny(n_layers=4), x, backward=False).activation_bytes
    ac = od.Checkpointing(mode="budget", budget_bytes=total * 2 // 3) if budget \
        else od.Checkpointing(mode="every", every=2)
    report = od.inspect(tiny(n_layers=4), od.Plan(checkpointing=ac), example_inputs=x)
    rec = report["checkpointing"]
    assert rec.modules and report.memory.activations < total
    blocks = [f"layers.{i}" for i in range(4)]
    acts = {b: report.trace[b].activation_bytes for b in blocks}
    kept = {b: 2 * 16 * 64 * 4 for b in blocks}  # (2, 16, 64) fp32 block outputs
    assert report.memory.activations == activation_estimate(
        report.trace.activation_bytes, blocks, acts, kept, rec.modules)
    if budget:
        assert report.memory.activations == rec.details["estimated_activation_bytes"]


def test_budget_refusals_leave_the_model_untouched():
    model = tiny(n_layers=4)
    before = snapshot(model)
    with pytest.raises(od.PlanError, match="budget_bytes=1 cannot be met"):
        od.accelerate(model, _budget_plan(1))
    with pytest.raises(od.PlanError, match="budget_input_shape"):
        od.accelerate(model, od.Plan(checkpointing=od.Checkpointing(mode="budget",
                                                                    budget_bytes=10**9)))
    assert_untouched(model, before)


def test_refuses_models_without_blocks_and_bad_every():
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    before = snapshot(plain)
    with pytest.raises(od.PlanError, match=r"blocks.*Plan\(blocks="):
        od.accelerate(plain, "ac")
    assert_untouched(plain, before)
    model = tiny(n_layers=2)
    before = snapshot(model)
    with pytest.raises(od.PlanError, match="checkpointing.every"):
        od.accelerate(model, od.Plan(checkpointing=od.Checkpointing(mode="every", every=3)))
    with pytest.raises(od.PlanError, match="checkpointing.every"):
        od.Plan(checkpointing=od.Checkpointing(mode="every", every=0)).replace()
    assert_untouched(model, before)
    od.accelerate(model, "ac")
    with pytest.raises(od.PlanError, match="already applied checkpointing"):
        od.accelerate(model, "ac")


def test_inspect_previews_without_touching():
    model = tiny(n_layers=4)
    before = snapshot(model)
    report = od.inspect(model, od.Plan(checkpointing=od.Checkpointing(mode="every", every=2)))
    rec = report["checkpointing"]
    assert rec.dry_run and rec.modules == ["layers.1", "layers.3"]
    assert rec.details["mode"] == "every"
    assert_untouched(model, before)


def test_composes_with_compile_and_trains():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny(n_layers=2, dropout=0.1)
    plan = od.Plan(checkpointing=od.Checkpointing(mode="selective"),
                   compile=od.Compile(backend="eager"))
    rt = od.accelerate(model, plan, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    assert rt.report.names() == ["checkpointing", "compile"]
    x = _batch()
    losses = []
    for _ in range(8):
        loss = rt.model(x, labels=x).loss
        loss.backward()
        rt.optimizer.step()
        rt.optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert counters["stats"]["unique_graphs"] == 1  # checkpointed blocks still share a graph
    torch._dynamo.reset()


def _hf(name: str):
    require("transformers")
    from tests.models import zoo
    torch.manual_seed(0)
    return zoo.MODELS[name].build()


@pytest.mark.parametrize("name", ["gpt2", "gemma2"])
def test_transformers_blocks_train_with_caching_off_and_still_cache_in_eval(name):
    """The KV cache is off inside checkpointed blocks while training (GPT-2 passes it
    positionally, Gemma2 would otherwise replay a longer cache); eval still caches."""
    model = _hf(name)
    plain = copy.deepcopy(model)
    rt = od.accelerate(model, "sac")
    assert any("caching is off" in n for n in rt.report["checkpointing"].notes)
    x = _batch()[:, :8] % 64
    loss = model(x, labels=x).loss
    loss.backward()
    want = plain(x, labels=x).loss
    want.backward()
    assert torch.allclose(loss, want)
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n
    model.eval()
    with torch.no_grad():
        out = model(x, use_cache=True)
    assert out.past_key_values is not None and out.past_key_values.get_seq_length() == 8


def test_batchnorm_running_stats_update_once_per_step():
    from tests.models.zoo import BatchNormCNN

    model, plain = BatchNormCNN(), BatchNormCNN()
    plain.load_state_dict(model.state_dict())
    rt = od.accelerate(model, "ac")
    assert any("BatchNorm running stats" in n for n in rt.report["checkpointing"].notes)
    x = torch.randn(4, 3, 8, 8)
    model(x).sum().backward()
    plain(x).sum().backward()
    for a, b in zip(model.buffers(), plain.buffers()):
        assert torch.equal(a, b)
    assert int(model.blocks[0].bn.num_batches_tracked) == 1
