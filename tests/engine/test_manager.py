"""Pass registry (keyed by config type), ordering, check-all-then-apply, PassFailed,
custom passes."""

import dataclasses

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


CONFIGS: dict[str, type] = {}


def _config(name):
    """A config dataclass of its own for the test pass ``name``."""
    if name not in CONFIGS:
        CONFIGS[name] = dataclasses.make_dataclass(f"Cfg_{name}", [], frozen=True)
    return CONFIGS[name]


def _plan(*names, **kwargs):
    return od.Plan(extra=tuple(_config(n)() for n in names), **kwargs)


def _make(name, after=(), before=(), requires=(), *, check=None, apply=None):
    class P(od.Pass):
        def check(self, ctx):
            if check:
                check(ctx.graph, ctx.plan, ctx.env)
            return od.Decision()

        def apply(self, model, decision, ctx):
            rec = self.record()
            if apply:
                apply(model, rec)
            return rec

    P.__qualname__ = f"P_{name}"
    return od.register_pass(name, after=after, before=before, requires=requires,
                            config=_config(name))(P)


def test_order_follows_constraints_deterministically(registry):
    _make("t_c", after=("t_b",))
    _make("t_a", before=("t_b",))
    _make("t_b")
    plan = _plan("t_c", "t_b", "t_a")
    names = [p.name for p, _ in order_passes(plan)]
    assert names == ["t_a", "t_b", "t_c"]
    assert [p.name for p, _ in order_passes(plan)] == names  # deterministic


def test_ties_follow_registration_order(registry):
    _make("t_second")
    _make("t_first_registered_later")
    mine = [p.name for p, _ in order_passes(_plan("t_first_registered_later", "t_second"))]
    assert mine == ["t_second", "t_first_registered_later"]


def test_cycle_names_the_passes(registry):
    _make("t_x", after=("t_y",))
    _make("t_y", after=("t_x",))
    with pytest.raises(od.PlanError, match=r"cycle: t_x → t_y → t_x|cycle: t_y → t_x → t_y"):
        order_passes(_plan("t_x", "t_y"))


def test_unknown_neighbour_and_missing_requirement(registry):
    _make("t_typo", after=("tensor_paralel",))
    with pytest.raises(od.PlanError, match=r"'t_typo' is ordered relative to pass "
                                           r"'tensor_paralel', which is not registered"):
        order_passes(_plan("t_typo"))
    manager.unregister_pass("t_typo")
    _make("t_off")
    _make("t_needs", requires=("t_off",))
    with pytest.raises(od.PlanError, match=r"'t_needs' requires pass 't_off', which does not "
                                           r"run: the plan holds no Cfg_t_off"):
        order_passes(_plan("t_needs"))


def test_a_pass_runs_exactly_when_its_config_is_in_the_plan(registry):
    _make("t_off", after=("t_on",))
    _make("t_on")
    assert [p.name for p, _ in order_passes(_plan("t_on"))] == ["t_on"]
    assert [p.name for p, _ in order_passes(od.Plan())] == []  # registered, yet absent
    assert [p.name for p, _ in order_passes(_plan("t_on", "t_off"))] == ["t_on", "t_off"]


def test_a_config_without_a_registered_pass_is_refused(registry):
    registry.pop("fsdp", None)
    with pytest.raises(od.PlanError, match=r"the plan holds FSDP\(\.\.\.\), but no pass is "
                                           r"registered for FSDP"):
        order_passes(od.Plan(fsdp=od.FSDP()))


def test_register_pass_needs_a_config_type_and_refuses_enabled(registry):
    class NoConfig(od.Pass):
        pass

    with pytest.raises(TypeError, match=r"needs config=<a dataclass type>"):
        od.register_pass("t_no_config")(NoConfig)

    class OldStyle(od.Pass):
        def enabled(self, plan):
            return True

    with pytest.raises(TypeError, match=r"defines enabled\(plan\).*Cfg_t_old"):
        od.register_pass("t_old", config=_config("t_old"))(OldStyle)
    with pytest.raises(od.PlanError, match="already keys pass 'fsdp'"):
        od.register_pass("t_steal", config=od.FSDP)(NoConfig)


def test_extra_holds_config_instances_once():
    with pytest.raises(od.PlanError, match="extra: .* is not a config"):
        od.Plan(extra=("fsdp",)).replace()
    with pytest.raises(od.PlanError, match="appears twice"):
        od.Plan(extra=(_config("t_dup")(), _config("t_dup")())).replace()


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
        od.accelerate(model, _plan("t_mutator", "t_refuser"))
    assert applied == []
    assert_untouched(model, before)


def test_exception_in_apply_becomes_pass_failed(registry):
    def half_done(model, rec):
        model.layers[0].mlp = nn.Identity()
        raise RuntimeError("boom")

    _make("t_broken", apply=half_done)
    with pytest.raises(od.PassFailed, match=r"pass 't_broken' failed: RuntimeError: boom.*"
                                            r"layers\.0\.mlp") as info:
        od.accelerate(tiny(n_layers=2), _plan("t_broken"))
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
        od.accelerate(tiny(n_layers=2), _plan("t_late"))
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
        od.accelerate(tiny(n_layers=2), _plan("t_in_place"))
    assert info.value.touched == ["embed_tokens", "layers.0", "layers.1", "norm"]


def test_records_are_timed_and_sized(registry):
    def halve(model, rec):
        model.lm_head.to(torch.float16)
        rec.touch("lm_head")
        rec.note("lm_head stored in fp16")

    _make("t_half", apply=halve)
    rt = od.accelerate(tiny(n_layers=2), _plan("t_half"))
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
    plan = _plan("t_freeze", checkpointing=od.Checkpointing(),
                 compile=od.Compile(backend="eager"))
    rt = od.accelerate(tiny(n_layers=2), plan)
    names = rt.report.names()
    assert names.index("checkpointing") < names.index("t_freeze") < names.index("compile")
    assert not rt.model.embed_tokens.weight.requires_grad


def test_register_pass_takes_only_pass_subclasses(registry):
    with pytest.raises(TypeError, match="subclass of od.Pass"):
        od.register_pass("t_fn", config=_config("t_fn"))(lambda m: m)


@dataclasses.dataclass(frozen=True)
class ScaleHeadConfig:
    """A user pass's own config: the factor it scales the output head by."""

    factor: float = 0.5


def test_user_pass_with_its_own_config_previewed_applied_and_absent_without_it(registry):
    """Registered once, process-wide; it runs exactly where its config is in the plan."""

    @od.register_pass("scale_head", config=ScaleHeadConfig, after=("checkpointing",),
                      before=("compile",))
    class ScaleHead(od.Pass):
        def check(self, ctx):
            if "lm_head" not in ctx.graph:
                raise od.PlanError("scale_head: the model has no lm_head")
            return od.Decision(modules=["lm_head"], details={"factor": ctx.cfg.factor},
                               notes=[f"lm_head weight × {ctx.cfg.factor}"])

        def apply(self, model, decision, ctx):
            with torch.no_grad():
                ctx.graph.module("lm_head").weight.mul_(decision.details["factor"])

    plan = od.Plan(checkpointing=od.Checkpointing(), compile=od.Compile(backend="eager"),
                   extra=(ScaleHeadConfig(factor=0.25),))
    report = od.inspect(tiny(n_layers=2), plan)
    assert report.names() == ["checkpointing", "scale_head", "compile"]
    assert report["scale_head"].modules == ["lm_head"]
    assert report["scale_head"].details == {"factor": 0.25}
    assert "lm_head weight × 0.25" in str(report)

    model = tiny(n_layers=2)
    head = model.lm_head.weight.detach().clone()
    rt = od.accelerate(model, plan)
    assert rt.report.names() == report.names()
    assert rt.report["scale_head"].modules == report["scale_head"].modules
    assert torch.equal(rt.model.lm_head.weight, head * 0.25)
    assert rt.report.plan["extra"] == [{"ScaleHeadConfig": {"factor": 0.25}}]

    for other in (od.Plan(checkpointing=od.Checkpointing()), "ac"):
        untouched = tiny(n_layers=2)
        head = untouched.lm_head.weight.detach().clone()
        assert "scale_head" not in od.inspect(untouched, other)
        assert "scale_head" not in od.accelerate(untouched, other).report
        assert torch.equal(untouched.lm_head.weight, head)


@dataclasses.dataclass(frozen=True)
class RenameHeadConfig:
    pass


def test_a_key_map_a_pass_hands_on_keeps_the_models_keys(registry, tmp_path):
    """A pass that moves a module under another name hands on the mapping; rt.state_dict
    and rt.export give the user's model's keys back."""

    @od.register_pass("rename_head", config=RenameHeadConfig)
    class RenameHead(od.Pass):
        def check(self, ctx):
            return od.Decision(modules=["lm_head"])

        def apply(self, model, decision, ctx):
            model.head = model.lm_head
            del model.lm_head
            return od.Applied(self.record(modules=["lm_head"]), key_map=od.KeyMap(
                to_model=lambda k: "lm_head." + k[5:] if k.startswith("head.") else k,
                from_model=lambda k: "head." + k[8:] if k.startswith("lm_head.") else k))

    model = tiny(n_layers=1)
    keys = set(model.state_dict())
    rt = od.accelerate(model, od.Plan(extra=(RenameHeadConfig(),)))
    assert "head.weight" in rt.model.state_dict()
    assert set(rt.state_dict()) == keys
    rt.export(tmp_path / "w")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "w" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == keys


def test_memory_effects_compose_without_naming_a_pass():
    """The estimate multiplies the splits that apply to each module and, when a pass
    splits the model between ranks (pipeline stages), counts the heaviest rank."""
    from overdrive.rewrite.estimate import estimate_memory

    graph = od.ModuleGraph(tiny(n_layers=4))
    full = estimate_memory(graph, [], 1)
    blocks = tuple(graph.blocks())
    tp = od.MemoryEffect(parameters=2, gradients=2, optimizer=2, modules=blocks)
    shard = od.MemoryEffect(parameters=4, gradients=4, optimizer=4)
    both = estimate_memory(graph, [tp, shard], 8)
    block_bytes = sum(graph.g.nodes[n]["bytes"] for n in graph.names()
                      if any(n == b or n.startswith(b + ".") for b in blocks))
    other = full.parameters - block_bytes
    assert both.parameters == int(block_bytes / 8 + other / 4)
    stages = od.MemoryEffect(held=(("embed_tokens", "layers.0", "layers.1"),
                                   ("layers.2", "layers.3", "norm", "lm_head")))
    split = estimate_memory(graph, [stages], 2)
    assert split.full_parameters == full.parameters
    assert full.parameters / 2 <= split.parameters < full.parameters
    cast = od.MemoryEffect(parameter_bytes=-1000, inference=True, notes=("no training",))
    inference = estimate_memory(graph, [cast], 1)
    assert inference.parameters == full.parameters - 1000
    assert inference.gradients == inference.optimizer == 0 and "no training" in inference.notes
