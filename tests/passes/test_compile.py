"""Compile pass: the compiled code really runs (a recording backend counts compilations
and calls — Accelerate's bug 4188 was a silently bypassed compile), identical blocks
share one graph, keys/classes survive, numerics match eager, refusals touch nothing."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

import overdrive as od
from overdrive.models.llama import tiny
from tests.helpers import assert_untouched, snapshot

RECORDER = "overdrive_test_recorder"


class Recorder:
    """A dynamo backend: counts graphs compiled and calls into the compiled graphs."""

    def __init__(self):
        self.graphs: list[torch.fx.GraphModule] = []
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs.append(gm)

        def run(*args):
            self.calls += 1
            return gm.forward(*args)

        return run


_recorder = Recorder()
if RECORDER not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(lambda gm, ex: _recorder(gm, ex), name=RECORDER)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    _recorder.graphs.clear()
    _recorder.calls = 0
    yield
    torch._dynamo.reset()


def _batch() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def _compiled(mode: str = "regional", backend: str = RECORDER, n_layers: int = 4, **kw):
    model = tiny(n_layers=n_layers)
    rt = od.accelerate(model, od.Plan(compile=od.Compile(mode=mode, backend=backend, **kw)))
    return model, rt.report["compile"]


def test_regional_compiles_one_graph_shared_by_identical_blocks():
    model, rec = _compiled(n_layers=12)
    keys = list(tiny(n_layers=12).state_dict())
    assert rec.modules == [f"layers.{i}" for i in range(12)]
    assert rec.details["mode"] == "regional"
    x = _batch()
    model(x, labels=x).loss.backward()
    # one graph for 12 identical blocks, and every block ran through it
    assert len(_recorder.graphs) == 1
    assert counters["stats"]["unique_graphs"] == 1
    assert _recorder.calls == 12
    model(x, labels=x)
    assert len(_recorder.graphs) == 1  # no recompiles on the second step
    assert _recorder.calls == 24
    # in place: same classes, no _orig_mod., leftovers stay eager
    assert list(model.state_dict()) == keys
    assert all(type(layer).__name__ == "Block" for layer in model.layers)
    assert model._compiled_call_impl is None and model.lm_head._compiled_call_impl is None
    assert all(layer._compiled_call_impl is not None for layer in model.layers)


def test_regional_matches_eager_forward_and_backward():
    x = _batch()
    ref = tiny(n_layers=2)
    ref_loss = ref(x, labels=x).loss
    ref_loss.backward()
    model, _ = _compiled(backend="aot_eager", n_layers=2)
    loss = model(x, labels=x).loss
    loss.backward()
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_full_compiles_the_root_in_place():
    model, rec = _compiled(mode="full")
    assert rec.modules == [""] and rec.details["mode"] == "full"
    assert not any("_orig_mod" in k for k in model.state_dict())
    assert list(model.state_dict()) == list(tiny(n_layers=4).state_dict())
    assert type(model).__name__ == "Llama" and model._compiled_call_impl is not None
    x = _batch()
    out = model(x, labels=x)
    assert _recorder.graphs and _recorder.calls >= 1
    torch.testing.assert_close(out.loss, tiny(n_layers=4)(x, labels=x).loss)


def test_no_blocks_falls_back_to_full_with_a_note():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    rt = od.accelerate(model, od.Plan(compile=od.Compile(backend=RECORDER)))
    rec = rt.report["compile"]
    assert rec.details["mode"] == "full" and rec.details["requested_mode"] == "regional"
    assert any("fell back" in n for n in rec.notes)
    model(torch.randn(3, 4))
    assert len(_recorder.graphs) == 1 and _recorder.calls == 1


def test_checkpointed_and_plain_blocks_give_exactly_two_graphs():
    model = tiny(n_layers=4)
    plan = od.Plan(checkpointing=od.Checkpointing(mode="every", every=2),
                   compile=od.Compile(backend=RECORDER))
    rt = od.accelerate(model, plan)
    assert rt.report.names() == ["checkpointing", "compile"]
    x = _batch()
    model(x, labels=x).loss.backward()
    assert len(_recorder.graphs) == 2  # one per distinct block kind, not one per block
    assert _recorder.calls == 4


@pytest.mark.parametrize("compile_kw, field", [
    ({"backend": "no_such_backend"}, "compile.backend"),
    ({"backend": "eager", "compile_mode": "max-autotune"}, "compile.compile_mode"),
    ({"compile_mode": "max-autotune", "options": {"max_autotune": True}}, "compile.compile_mode"),
    ({"options": {"not_an_option": 1}}, "compile.options"),
    ({"dynamic": "yes"}, "compile.dynamic"),
])
def test_refusals_name_the_field_and_touch_nothing(compile_kw, field):
    model = tiny(n_layers=2)
    before = snapshot(model)
    with pytest.raises(od.PlanError, match=field.replace(".", r"\.")):
        od.accelerate(model, od.Plan(compile=od.Compile(**compile_kw)))
    assert_untouched(model, before)
    assert all(m._compiled_call_impl is None for m in model.modules())


def test_inspect_lists_the_blocks_it_would_compile():
    model = tiny(n_layers=3)
    before = snapshot(model)
    report = od.inspect(model, "compile")
    rec = report["compile"]
    assert rec.dry_run and rec.modules == ["layers.0", "layers.1", "layers.2"]
    assert any("eager (outside the blocks): embed_tokens, norm, lm_head" in n for n in rec.notes)
    assert_untouched(model, before)
    assert all(m._compiled_call_impl is None for m in model.modules())


@pytest.mark.inductor
def test_regional_inductor_runs_and_matches_eager(tmp_path, monkeypatch):
    """Forward only (one inference graph) to keep the cold compile short on small CPUs."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    x = _batch()
    with torch.no_grad():
        ref = tiny(n_layers=2)(x, labels=x).loss
        model, rec = _compiled(backend="inductor", n_layers=2)
        loss = model(x, labels=x).loss
    assert rec.details["backend"] == "inductor"
    assert counters["stats"]["unique_graphs"] == 1
    assert any((tmp_path / "inductor").rglob("*.py")), "inductor wrote no kernels"
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)
