"""accelerate() / inspect(): flow, runtime core, refusal leaves the model untouched."""

import pytest
import torch

import overdrive as od
from overdrive.models.llama import Llama, LlamaConfig, tiny
from tests.helpers import assert_untouched, snapshot


def batch(b=2, s=16, vocab=256):
    ids = torch.randint(0, vocab, (b, s))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("plan", [
    "fsdp+turbo",
    {"fsdp": True, "ddp": True},
    {"compile": {"mode": "fast"}},
    {"grad_accum": 0},
    od.Plan(parallel=od.Parallel(tp=2)),  # world size 1 ≠ tp 2
    od.Plan(casting=od.Casting(), fp8=od.FP8()),
    od.Plan(blocks=("decoder.*",)),
], ids=["token", "engines", "value", "accum", "world", "contradiction", "blocks"])
def test_refused_plan_leaves_model_exactly_as_it_was(plan):
    model = tiny(n_layers=2)
    before = snapshot(model)
    with pytest.raises(od.PlanError):
        od.accelerate(model, plan, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    assert_untouched(model, before)


@pytest.mark.parametrize("plan", [None, "compile", "ac", {"mixed_precision": "bf16"}])
def test_meta_model_without_fsdp_is_refused_before_anything(plan):
    with torch.device("meta"):
        model = tiny(n_layers=2)
    before = snapshot(model)
    with pytest.raises(od.PlanError, match=r"model: Llama is on the meta device.*no fsdp.*"
                                           r"real device.*'fsdp'.*od.load_weights"):
        od.accelerate(model, plan)
    assert_untouched(model, before)


@pytest.mark.parametrize("part", ["lm_head", "rope"])
def test_partly_meta_model_is_refused_even_with_fsdp(part):
    model = tiny(n_layers=2)
    if part == "lm_head":
        model.lm_head = torch.nn.Linear(64, 256, bias=False, device="meta")
    else:
        model.rope = model.rope.to("meta")
    before = snapshot(model)
    with pytest.raises(od.PlanError, match=rf"on the meta device \({part}.*would wipe the real "
                                           r"weights"):
        od.accelerate(model, "fsdp")
    assert_untouched(model, before)


def test_single_process_runtime_trains_with_no_launcher():
    model = tiny(n_layers=2)
    keys = list(model.state_dict())
    rt = od.accelerate(model, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    assert (rt.rank, rt.world_size, rt.dp_rank, rt.dp_size, rt.is_main) == (0, 1, 0, 1, True)
    assert rt.device.type == "cpu" and rt.mesh is None
    data = batch()
    losses = []
    for _ in range(5):
        loss = rt.model(**data).loss
        rt.backward(loss)
        rt.optimizer.step()
        rt.optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert list(rt.state_dict()) == keys


def test_optimizer_instance_is_kept_when_parameters_survive():
    model = tiny(n_layers=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rt = od.accelerate(model, optimizer=opt)
    assert rt.optimizer.optimizer is opt  # wrapped for accumulation, same optimizer


def test_scheduler_factory_gets_the_built_optimizer():
    rt = od.accelerate(tiny(n_layers=1), optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                       scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1))
    assert rt.scheduler.scheduler.optimizer is rt.optimizer.optimizer


def test_bad_optimizer_argument():
    with pytest.raises(od.PlanError, match="optimizer=.*factory"):
        od.accelerate(tiny(n_layers=1), optimizer=42)


def test_optimizer_argument_refusals_leave_the_model_untouched():
    model = tiny(n_layers=1)
    used = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randint(0, 256, (1, 8))).logits.sum().backward()
    used.step()
    cases = [(42, "casting", r"optimizer=42 is not valid"),
             (lambda p: torch.optim.SGD(p, lr=0.1), "casting", r"casting is an inference pass"),
             (used, "casting", r"casting is an inference pass"),
             (used, "fp8", r"optimizer already holds state, but pass\(es\) fp8 replace")]
    for optimizer, plan, pattern in cases:
        before = snapshot(model)
        with pytest.raises(od.PlanError, match=pattern):
            od.accelerate(model, plan, optimizer=optimizer)
        assert_untouched(model, before)
    assert od.accelerate(model, None, optimizer=used).optimizer.optimizer is used


def test_backward_scales_by_grad_accum():
    torch.manual_seed(0)
    a, b = tiny(n_layers=1), tiny(n_layers=1)
    rt = od.accelerate(a, {"grad_accum": 4})
    data = batch()
    rt.backward(rt.model(**data).loss)
    b(**data).loss.div(4).backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)


def test_autocast_follows_mixed_precision():
    rt = od.accelerate(tiny(n_layers=1), {"mixed_precision": "bf16"})
    with rt.autocast():
        y = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert y.dtype == torch.bfloat16
    plain = od.accelerate(tiny(n_layers=1))
    with plain.autocast():
        assert torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4)).dtype \
            == torch.float32


def test_print_only_on_rank_zero(capsys):
    rt = od.accelerate(tiny(n_layers=1))
    rt.print("hello")
    rt.barrier()
    assert capsys.readouterr().out == "hello\n"


def test_inspect_touches_nothing_and_estimates_memory():
    model = tiny(n_layers=2)
    before = snapshot(model)
    rep = od.inspect(model, None, world_size=1, example_inputs=torch.randint(0, 256, (2, 16)))
    assert_untouched(model, before)
    assert rep.dry_run and rep.blocks == ["layers.0", "layers.1"]
    n = sum(p.numel() for p in model.parameters())
    assert rep.memory.parameters == n * 4 and rep.memory.gradients == n * 4
    assert rep.memory.optimizer == n * 8
    assert rep.memory.activations > 0
    assert rep.trace.forward_flops > 0
    assert '"memory_per_rank"' in rep.to_json()


def test_inspect_of_a_meta_model_with_example_inputs_leaves_no_grads():
    """A meta model is traced in place (no copy): the backward's gradients must not be
    left on the user's parameters."""
    from overdrive.models.llama import Llama, LlamaConfig

    with torch.device("meta"):
        model = Llama(LlamaConfig(n_layers=2))
    ids = torch.randint(0, 256, (2, 16))
    rep = od.inspect(model, "fsdp+ac", world_size=2, example_inputs={"input_ids": ids,
                                                                     "labels": ids})
    assert rep.trace.backward_flops > rep.trace.forward_flops > 0
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []


def test_inspect_reports_parameter_bytes_per_rank_before_and_after_each_pass():
    model = tiny(n_layers=2)
    full = sum(p.numel() * 4 for p in model.parameters())
    rep = od.inspect(model, "fsdp+compile+ac", world_size=4)
    sizes = {r.name: (r.bytes_before, r.bytes_after) for r in rep}
    assert sizes["checkpointing"] == sizes["compile"] == (full, full)
    assert sizes["fsdp"] == (full, full // 4) == (full, rep.memory.parameters)
    assert "0 B" not in str(rep)
    cast = od.inspect(model, od.Plan(casting=od.Casting(skip=("embed",))))
    rec = cast["casting"]
    saved = rec.details["cast_weight_bytes_before"] - rec.details["cast_weight_bytes_after"]
    assert saved > 0 and (rec.bytes_before, rec.bytes_after) == (full, full - saved)
    assert cast.memory.parameters == full - saved and cast.memory.optimizer == 0
    # what the real run measures
    rt = od.accelerate(tiny(n_layers=2), od.Plan(casting=od.Casting(skip=("embed",))))
    assert (rt.report["casting"].bytes_before, rt.report["casting"].bytes_after) \
        == (rec.bytes_before, rec.bytes_after)


def test_inspect_llama3_8b_on_meta_is_fast_and_touches_nothing():
    """Issue 2's done-when: the dry run of an 8B model before renting GPUs."""
    import time

    from overdrive.models.llama import llama3_8b

    with torch.device("meta"):
        model = llama3_8b()
    t0 = time.perf_counter()
    rep = od.inspect(model, "fsdp+compile", world_size=8)
    seconds = time.perf_counter() - t0
    assert seconds < 5, f"od.inspect took {seconds:.1f} s"
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    assert len(rep.blocks) == 32 and rep.names() == ["compile", "fsdp"]
    full = sum(p.numel() for p in model.parameters()) * 4
    assert rep.memory.world_size == 8 and rep.memory.full_parameters == full
    assert rep.memory.parameters == pytest.approx(full / 8, rel=1e-6)
    assert rep.memory.optimizer == pytest.approx(full / 8 * 2, rel=1e-6)
    assert rep["fsdp"].bytes_after == rep.memory.parameters
    assert "memory per rank (world size 8)" in str(rep)


def test_inspect_refuses_bad_world_size():
    with torch.device("meta"):
        model = Llama(LlamaConfig(n_layers=2))
    with pytest.raises(od.PlanError, match="world size 3"):
        od.inspect(model, od.Plan(parallel=od.Parallel(tp=2)), world_size=3)


def test_forward_contexts_from_passes_wrap_every_forward():
    """A pass can ask for a context around the forward (TE's fp8_autocast does)."""
    from overdrive.rewrite import manager

    entered = []

    class Ctx:
        def __enter__(self):
            entered.append("in")

        def __exit__(self, *exc):
            entered.append("out")

    @od.register_pass("t_ctx")
    class NeedsContext(od.Pass):
        def apply(self, model, graph, plan, env):
            env.forward_contexts.append(Ctx)
            return self.record()

    try:
        model = tiny(n_layers=1)
        keys = list(model.state_dict())
        rt = od.accelerate(model)
        rt.model(torch.randint(0, 256, (1, 8)))
        assert entered == ["in", "out"]
        assert type(rt.model).__name__ == "Llama" and list(rt.model.state_dict()) == keys
    finally:
        manager.unregister_pass("t_ctx")


# --------------------------------------------------------------------------- twice


def _refused_again(model, plan, *fragments):
    before = snapshot(model)
    with pytest.raises(od.PlanError) as err:
        od.accelerate(model, plan)
    for f in fragments:
        assert f in str(err.value), str(err.value)
    assert_untouched(model, before)
    return err


def test_accelerate_twice_with_the_same_pass_is_refused_before_any_change():
    model = tiny(n_layers=1)
    rt = od.accelerate(model, "bf16")
    _refused_again(model, "bf16", "already applied mixed_precision", "a second time",
                   "once per model")
    with pytest.raises(od.PlanError, match="already applied mixed_precision"):
        od.inspect(model, "bf16")
    x = torch.randint(0, 256, (2, 8))
    assert rt.model(x, labels=x).loss.isfinite()  # still one autocast, no recursion


def test_accelerate_twice_with_other_passes_enters_every_context_once():
    """A second od.accelerate with another pass that adds a forward context: the root
    forward is wrapped once, the earlier contexts stay outermost, each entered once."""
    from overdrive.rewrite.manager import unregister_pass

    model = tiny(n_layers=2)
    od.accelerate(model, "bf16")
    calls = []

    @od.register_pass("count_forwards")
    class CountForwards(od.Pass):
        def apply(self, model, graph, plan, env):
            env.forward_contexts.append(lambda: _Counting(calls))
            return self.record()

    try:
        od.accelerate(model)
    finally:
        unregister_pass("count_forwards")
    x = torch.randint(0, 256, (2, 8))
    out = model(x, labels=x)
    assert out.loss.isfinite() and calls == [torch.bfloat16]


class _Counting:
    """Records the autocast dtype in force when it is entered."""

    def __init__(self, calls):
        self.calls = calls

    def __enter__(self):
        self.calls.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
                          else None)

    def __exit__(self, *exc):
        return False


def test_fsdp_twice_and_hand_sharded_models_are_refused():
    from torch.distributed.fsdp import fully_shard

    model = tiny(n_layers=1)
    od.accelerate(model, "fsdp")
    _refused_again(model, "fsdp", "already applied fsdp")
    by_hand = tiny(n_layers=1)
    fully_shard(by_hand.layers[0])
    _refused_again(by_hand, "fsdp", "fully_shard was already applied to layers.0",
                   "drop the plan's fsdp")


def test_a_ddp_wrapped_model_is_refused():
    from torch.nn.parallel import DistributedDataParallel

    od.accelerate(tiny(n_layers=1), "fsdp")  # a process group for DDP
    wrapped = DistributedDataParallel(tiny(n_layers=1))
    _refused_again(wrapped, "ddp", "DistributedDataParallel", "model.module", "'module.'")
