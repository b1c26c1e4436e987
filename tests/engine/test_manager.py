"""Pass registry, ordering, check-all-then-apply, PassFailed, custom passes."""

import pytest
import torch
from torch import nn

import overdrive as od
from overdrive.models.llama import tiny
from overdrive.rewrite import manager
from overdrive.rewrite.manager import order_passes
from tests.helpers import assert_untouched, snapshot


@pytest.fixture
def registry():
    """Isolate the global registry: tests may add passes, built-ins stay as they were."""
    saved = dict(manager._REGISTRY)
    yield manager._REGISTRY
    manager._REGISTRY.clear()
    manager._REGISTRY.update(saved)


def _make(name, after=(), before=(), requires=(), *, enabled=True, check=None, apply=None):
    class P(od.Pass):
        def enabled(self, plan):
            return enabled

        def check(self, graph, plan, env):
            if check:
                check(graph, plan, env)

        def apply(self, model, graph, plan, env):
            rec = self.record()
            if apply:
                apply(model, rec)
            return rec

    P.__qualname__ = f"P_{name}"
    return od.register_pass(name, after=after, before=before, requires=requires)(P)


def test_order_follows_constraints_deterministically(registry):
    _make("t_c", after=("t_b",))
    _make("t_a", before=("t_b",))
    _make("t_b")
    names = [p.name for p in order_passes(od.Plan())]
    mine = [n for n in names if n.startswith("t_")]
    assert mine == ["t_a", "t_b", "t_c"]
    assert [p.name for p in order_passes(od.Plan())] == names  # deterministic


def test_ties_follow_registration_order(registry):
    _make("t_second")
    _make("t_first_registered_later")
    mine = [p.name for p in order_passes(od.Plan()) if p.name.startswith("t_")]
    assert mine == ["t_second", "t_first_registered_later"]


def test_cycle_names_the_passes(registry):
    _make("t_x", after=("t_y",))
    _make("t_y", after=("t_x",))
    with pytest.raises(od.PlanError, match=r"cycle: t_x → t_y → t_x|cycle: t_y → t_x → t_y"):
        order_passes(od.Plan())


def test_unknown_neighbour_and_missing_requirement(registry):
    _make("t_typo", after=("tensor_paralel",))
    with pytest.raises(od.PlanError, match=r"'t_typo' is ordered relative to pass "
                                           r"'tensor_paralel', which is not registered"):
        order_passes(od.Plan())
    manager.unregister_pass("t_typo")
    _make("t_off", enabled=False)
    _make("t_needs", requires=("t_off",))
    with pytest.raises(od.PlanError, match=r"'t_needs' requires pass 't_off', which is not "
                                           r"enabled by the plan"):
        order_passes(od.Plan())


def test_disabled_passes_impose_no_order(registry):
    _make("t_off", enabled=False, after=("t_on",))
    _make("t_on")
    assert "t_off" not in [p.name for p in order_passes(od.Plan())]


def test_plan_asking_for_an_unregistered_pass_is_refused(registry):
    registry.pop("fsdp", None)
    with pytest.raises(od.PlanError, match=r"asks for pass 'fsdp', which is not registered"):
        order_passes(od.Plan(fsdp=od.FSDP()))


def test_all_checks_run_before_any_apply(registry):
    applied = []

    def mutate(model, rec):
        applied.append(True)
        model.lm_head = nn.Identity()

    def refuse(graph, plan, env):
        raise od.PlanError("t_refuser: refused on purpose")

    _make("t_mutator", apply=mutate)
    _make("t_refuser", after=("t_mutator",), check=refuse)
    model = tiny(n_layers=2)
    before = snapshot(model)
    with pytest.raises(od.PlanError, match="refused on purpose"):
        od.accelerate(model)
    assert applied == []
    assert_untouched(model, before)


def test_exception_in_apply_becomes_pass_failed(registry):
    def half_done(model, rec):
        model.layers[0].mlp = nn.Identity()
        raise RuntimeError("boom")

    _make("t_broken", apply=half_done)
    with pytest.raises(od.PassFailed, match=r"pass 't_broken' failed: RuntimeError: boom.*"
                                            r"layers\.0\.mlp") as info:
        od.accelerate(tiny(n_layers=2))
    assert info.value.pass_name == "t_broken"
    assert "layers.0.mlp" in info.value.touched


def test_overdrive_error_in_apply_also_becomes_pass_failed(registry):
    """A PlanError raised after the model was touched is no plain refusal: the model is
    partly transformed, and PassFailed says so (the PlanError stays as the cause)."""
    def half_done(model, rec):
        model.lm_head = nn.Identity()
        raise od.PlanError("t_late: refused too late")

    _make("t_late", apply=half_done)
    with pytest.raises(od.PassFailed, match=r"pass 't_late' failed: PlanError: t_late: "
                                            r"refused too late.*lm_head") as info:
        od.accelerate(tiny(n_layers=2))
    assert isinstance(info.value.__cause__, od.PlanError)
    assert info.value.touched == ["lm_head"]


def test_pass_failed_names_modules_changed_in_place(registry):
    """Checkpointing and compile keep the module objects and classes: the touched list
    must still show the blocks whose forward / compiled call they replaced."""
    from overdrive.passes.checkpointing import checkpoint_block

    def in_place_then_boom(model, rec):
        model.layers[0].compile(backend="eager")
        checkpoint_block(model.layers[1])
        model.norm.weight.data = model.norm.weight.data.half()
        model.embed_tokens.register_forward_hook(lambda *a: None)
        raise RuntimeError("boom")

    _make("t_in_place", apply=in_place_then_boom)
    with pytest.raises(od.PassFailed, match="touched 4 module") as info:
        od.accelerate(tiny(n_layers=2))
    assert info.value.touched == ["embed_tokens", "layers.0", "layers.1", "norm"]


def test_records_are_timed_and_sized(registry):
    def halve(model, rec):
        model.lm_head.to(torch.float16)
        rec.touch("lm_head")
        rec.note("lm_head stored in fp16")

    _make("t_half", apply=halve)
    rt = od.accelerate(tiny(n_layers=2))
    rec = rt.report["t_half"]
    assert rec.modules == ["lm_head"] and rec.notes == ["lm_head stored in fp16"]
    assert rec.bytes_before - rec.bytes_after == 64 * 256 * 2
    assert rec.seconds >= 0
    assert "t_half" in str(rt.report) and "lm_head stored in fp16" in str(rt.report)


def test_custom_pass_between_builtins(registry):
    seen = []

    def freeze(model, rec):
        seen.append([type(m.forward).__name__ for m in model.layers])
        model.embed_tokens.weight.requires_grad_(False)
        rec.touch("embed_tokens")

    _make("t_freeze", after=("checkpointing",), before=("compile",), apply=freeze)
    plan = od.Plan(checkpointing=od.Checkpointing(), compile=od.Compile(backend="eager"))
    rt = od.accelerate(tiny(n_layers=2), plan)
    names = rt.report.names()
    assert names.index("checkpointing") < names.index("t_freeze") < names.index("compile")
    assert not rt.model.embed_tokens.weight.requires_grad


def test_register_pass_takes_only_pass_subclasses(registry):
    with pytest.raises(TypeError, match="subclass of od.Pass"):
        od.register_pass("t_fn")(lambda m: m)
