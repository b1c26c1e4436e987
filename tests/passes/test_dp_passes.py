"""fsdp / ddp / deepspeed in one process: refusals (model untouched), 1-rank behaviour,
od.inspect previews. The multi-process behaviour is in tests/data_parallel/test_data_parallel.py."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from tests.helpers import assert_untouched, snapshot

import overdrive as od
from overdrive.models.llama import Llama, LlamaConfig, tiny
from overdrive.plan_spec import Parallel, resolve_sizes



def small():
    return tiny(n_layers=2, dim=32, vocab_size=64, max_seq_len=16)


def refuse(model, plan, match, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
           error=od.PlanError):
    before = snapshot(model)
    with pytest.raises(error, match=match):
        od.accelerate(model, plan, optimizer=optimizer)
    assert_untouched(model, before)


# --------------------------------------------------------------------------- sizes


def test_sizes_not_matching_the_world_are_refused():
    refuse(small(), od.Plan(fsdp=od.FSDP(), parallel=od.Parallel(dp_shard=3)),
           r"dp_shard=3 .* = 3 do not match the world size 1")
    with pytest.raises(od.PlanError, match="world size 4 is not divisible"):
        resolve_sizes(Parallel(dp_shard=-1, tp=3), 4)
    with pytest.raises(od.PlanError, match="= 8 do not match the world size 4"):
        resolve_sizes(Parallel(dp_replicate=2, dp_shard=2, tp=2), 4)
    assert resolve_sizes(Parallel(dp_replicate=2, dp_shard=-1), 8).dp_shard == 4


def test_two_engines_are_refused():
    refuse(small(), {"fsdp": True, "ddp": True}, "choose one data-parallel engine")
    refuse(small(), od.Plan(fsdp=od.FSDP(), deepspeed=od.DeepSpeed()),
           "fsdp and deepspeed together")


# --------------------------------------------------------------------------- fsdp


def test_fsdp_offload_on_cpu_is_refused():
    refuse(small(), od.Plan(fsdp=od.FSDP(offload=True)), "fsdp.offload=True .* CPU device")


def test_meta_model_without_initialisers_is_refused():
    class NoInit(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.empty(4, 4))
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x @ self.w)

    with torch.device("meta"):
        model = NoInit()
    params = list(model.named_parameters())
    with pytest.raises(od.PlanError, match=r"meta device and <root> cannot be initialised"):
        od.accelerate(model, od.Plan(fsdp=od.FSDP()))
    assert type(model) is NoInit and list(model.named_parameters()) == params
    assert all(p.is_meta for _, p in params)  # (torch.equal has no meta kernel)


class _NormWithoutReset(torch.nn.Module):
    """An RMSNorm with no reset_parameters (as many hand-written models have)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


def _meta_8b_without_norm_init():
    """Llama-3-8B's shapes on the meta device, norms without reset_parameters, and no
    model-wide init_weights: nothing could initialise the norms after sharding."""
    from overdrive.models.llama import llama3_8b

    with torch.device("meta"):
        model = llama3_8b()
        for block in model.layers:
            block.attn_norm, block.mlp_norm = _NormWithoutReset(4096), _NormWithoutReset(4096)
        model.norm = _NormWithoutReset(4096)
    model.init_weights = None
    return model


def test_inspect_of_a_meta_8b_model_notes_what_accelerate_cannot_initialise():
    """The dry run before renting GPUs: od.inspect plans it (fast) and says what the real
    od.accelerate will refuse; od.accelerate still refuses, before touching the model."""
    model = _meta_8b_without_norm_init()
    report = od.inspect(model, "fsdp", world_size=8)
    notes = report["fsdp"].notes
    assert any("od.accelerate will refuse" in n and "layers.0.attn_norm" in n
               and "(and 61 more)" in n for n in notes), notes
    assert report.memory.parameters > 0
    params = list(model.named_parameters())
    with pytest.raises(od.PlanError, match=r"meta device and <root>, layers.0.attn_norm"):
        od.accelerate(model, od.Plan(fsdp=od.FSDP()))
    assert list(model.named_parameters()) == params


def test_inspect_of_a_real_model_has_no_initialiser_note():
    """Only a model that is itself on meta needs initialising (the dry run's copy is not)."""
    model = small()
    model.norm = _NormWithoutReset(model.cfg.dim)
    assert not any("will refuse" in n for n in od.inspect(model, "fsdp")["fsdp"].notes)


def test_fsdp_single_process_matches_plain_training():
    ref = small()
    model = small()
    x = torch.randint(0, 64, (2, 16))
    rt = od.accelerate(model, "fsdp", optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for _ in range(3):
        got = rt.model(x, labels=x).loss
        rt.backward(got)
        rt.optimizer.step(), rt.optimizer.zero_grad()
        want = ref(x, labels=x).loss
        want.backward()
        opt.step(), opt.zero_grad()
        assert abs(got.item() - want.item()) < 1e-5
    assert rt.model is model and rt._handoff.gradient_sync is not None
    assert list(rt.state_dict()) == list(ref.state_dict())
    rec = rt.report["fsdp"]
    assert rec.details["units"][-2] == ["norm", "lm_head"]
    assert rec.details["mesh"] == {"dp_shard_cp": 1}


def test_fsdp_mixed_precision_policy():
    from overdrive.passes.fsdp import _mp_policy, decide

    def policy(plan):
        return _mp_policy(decide(od.ModuleGraph(tiny(n_layers=2)), plan))

    mp = policy(od.Plan(fsdp=od.FSDP(), mixed_precision="bf16"))
    assert mp.param_dtype == torch.bfloat16 and mp.reduce_dtype == torch.float32
    mp = policy(od.Plan(fsdp=od.FSDP(param_dtype="float16", reduce_dtype=None),
                        mixed_precision="bf16"))
    assert mp.param_dtype == torch.float16 and mp.reduce_dtype is None  # the part wins
    assert policy(od.Plan(fsdp=od.FSDP())).param_dtype is None


def test_fsdp_units_tied_embeddings_and_no_blocks():
    from overdrive.passes.fsdp import shard_units

    tied = tiny(n_layers=2, dim=32, vocab_size=64, tie_embeddings=True)
    units, notes = shard_units(od.ModuleGraph(tied))
    assert units == [["layers.0"], ["layers.1"], ["norm"]]  # embed/lm_head: root
    assert any("share parameters" in n for n in notes)
    flat = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    units, notes = shard_units(od.ModuleGraph(flat))
    assert units == [] and "no repeated blocks" in notes[0]


def test_inspect_previews_fsdp_and_hsdp():
    with torch.device("meta"):
        model = Llama(LlamaConfig(n_layers=4))
    report = od.inspect(model, "fsdp", world_size=4)
    rec = report["fsdp"]
    assert rec.dry_run and rec.details["shard_size"] == 4
    assert rec.details["units"][0] == ["embed_tokens"]
    assert report.memory.parameters == pytest.approx(report.memory.full_parameters / 4, rel=0.01)
    hsdp = od.inspect(model, "hsdp", world_size=4)["fsdp"].details
    assert (hsdp["shard_size"], hsdp["replicate_size"]) == (2, 2)


# --------------------------------------------------------------------------- ddp


def test_ddp_single_process_is_a_noop_with_a_note():
    model = small()
    before = snapshot(model)
    rt = od.accelerate(model, "ddp")
    assert_untouched(model, before)
    assert rt.report["ddp"].notes == [
        "one data-parallel rank: nothing to all-reduce, ddp is a no-op"]
    assert rt._handoff.gradient_sync is None


@pytest.mark.parametrize("plan", ["ddp", "zero3"])
def test_meta_model_refused_by_replicating_engines(plan):
    with torch.device("meta"):
        model = Llama(LlamaConfig(n_layers=2, dim=32))
    params = list(model.named_parameters())
    with pytest.raises(od.PlanError, match="meta device"):
        od.accelerate(model, plan, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    assert type(model) is Llama and list(model.named_parameters()) == params
    assert all(p.is_meta for _, p in params)


def test_ddp_with_tensor_parallel_refused():
    plan = od.Plan(ddp=od.DDP(), parallel=od.Parallel(dp_shard=2, tp=2))
    with pytest.raises(od.PlanError, match=r"ddp with parallel.tp=2 and 2 data-parallel ranks.*"
                                           r"fsdp=od.FSDP\(\)"):
        od.inspect(small(), plan, world_size=4)
    implied = od.inspect(small(), od.Plan(parallel=od.Parallel(tp=2)), world_size=4)
    assert implied.names()[-1] == "fsdp" and "ddp" not in implied  # no engine named: fsdp
    one_data_rank = od.Plan(ddp=od.DDP(), parallel=od.Parallel(dp_shard=1, tp=2))
    assert "one data-parallel rank" in od.inspect(small(), one_data_rank, world_size=2)[
        "ddp"].notes[0]


@pytest.mark.parametrize("plan", ["ddp", "zero2"])
def test_meta_buffers_refused_by_replicating_engines(plan):
    """Real weights but a meta buffer (e.g. rope tables built under torch.device('meta')):
    nothing would ever fill it; both engines broadcast buffers from rank 0."""
    model = small()
    model.rope = torch.empty_like(model.rope, device="meta")
    with pytest.raises(od.PlanError, match="meta device"):
        od.accelerate(model, plan, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    assert model.rope.is_meta and type(model) is Llama


def test_ddp_auto_enabled_only_with_several_data_ranks():
    assert od.inspect(small(), None, world_size=2).names() == ["ddp"]
    assert od.inspect(small(), None, world_size=1).names() == []


# --------------------------------------------------------------------------- deepspeed


@pytest.mark.parametrize("config,match", [
    ({"zero_optimization": {"stage": 3}}, r"zero_optimization.stage=3 but deepspeed.zero_stage=2"),
    ({"gradient_accumulation_steps": 4}, r"gradient_accumulation_steps=4 but plan.grad_accum=1"),
    ({"bf16": {"enabled": True}}, r"bf16.enabled=true but plan.mixed_precision='no'"),
    ({"fp16": {"enabled": True}}, r"fp16.enabled=true but plan.mixed_precision='no'"),
    ({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2},
     r"train_batch_size=8 is not train_micro_batch_size_per_gpu=2 × grad_accum=1"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
     r"offload_optimizer.device='cpu' but deepspeed.offload_optimizer=False"),
    ({"gradient_clipping": 2.0}, None),  # only a contradiction when the plan sets it too
    # the batch-size identity holds whatever the config says about accumulation
    ({"gradient_accumulation_steps": 1, "train_batch_size": 8,
      "train_micro_batch_size_per_gpu": 2}, r"train_batch_size=8 is not .* = 2"),
    ({"bfloat16": {"enabled": True}}, r"bfloat16.enabled=true but plan.mixed_precision='no'"),
])
def test_deepspeed_config_contradictions(config, match):
    if match is None:
        plan = od.Plan(deepspeed=od.DeepSpeed(config=config, gradient_clipping=1.0))
        refuse(small(), plan, r"gradient_clipping=2.0 but deepspeed.gradient_clipping=1.0")
        return
    refuse(small(), od.Plan(deepspeed=od.DeepSpeed(config=config)), match)


def test_deepspeed_config_file_and_mixed_precision_contradiction(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"fp16": {"enabled": True}}))
    plan = od.Plan(deepspeed=od.DeepSpeed(config=str(path)), mixed_precision="bf16")
    refuse(small(), plan, r"fp16.enabled=true but plan.mixed_precision='bf16'")


@pytest.mark.parametrize("config,plan_kw,match", [
    ({"bf16": {"enabled": False}}, {"mixed_precision": "bf16"},
     r"bf16.enabled=false but plan.mixed_precision='bf16'"),
    ({"fp16": {"enabled": False}}, {"mixed_precision": "fp16"},
     r"fp16.enabled=false but plan.mixed_precision='fp16'"),
    ({"bfloat16": {"enabled": False}}, {"mixed_precision": "bf16"},
     r"bfloat16.enabled=false"),
    ({"train_batch_size": 3}, {"grad_accum": 2},
     r"train_batch_size=3 is not divisible by grad_accum=2 × data ranks=1"),
])
def test_deepspeed_explicit_settings_against_the_plan(config, plan_kw, match):
    refuse(small(), od.Plan(deepspeed=od.DeepSpeed(config=config), **plan_kw), match)


def test_deepspeed_config_keeps_what_agrees_with_the_plan():
    from overdrive.passes.deepspeed import build_config, contradictions

    nvme = {"zero_optimization": {"offload_optimizer": {"device": "nvme",
                                                        "nvme_path": "/local_nvme"}}}
    plan = od.Plan(deepspeed=od.DeepSpeed(zero_stage=3, offload_optimizer=True, config=nvme))
    assert contradictions(nvme, plan, dp_size=2) == []
    off = build_config(plan, dp_size=2, client_optimizer=True)["zero_optimization"]
    assert off["offload_optimizer"] == {"device": "nvme", "nvme_path": "/local_nvme"}
    plan = od.Plan(deepspeed=od.DeepSpeed(offload_optimizer=True))
    assert build_config(plan, 1, True)["zero_optimization"]["offload_optimizer"] == {
        "device": "cpu"}
    old_name = {"bfloat16": {"enabled": True, "immediate_grad_update": False}}
    plan = od.Plan(deepspeed=od.DeepSpeed(config=old_name), mixed_precision="bf16")
    assert contradictions(old_name, plan, dp_size=1) == []
    cfg = build_config(plan, 1, True)
    assert "bfloat16" not in cfg  # one section, which DeepSpeed reads first
    assert cfg["bf16"] == {"enabled": True, "immediate_grad_update": False}
    batch = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2,
             "gradient_accumulation_steps": 4}
    assert contradictions(batch, od.Plan(deepspeed=od.DeepSpeed(config=batch), grad_accum=4),
                          dp_size=2) == []


def test_deepspeed_needs_exactly_one_optimizer():
    refuse(small(), "zero2", "deepspeed needs an optimizer", optimizer=None)
    plan = od.Plan(deepspeed=od.DeepSpeed(config={"optimizer": {"type": "SGD"}}))
    refuse(small(), plan, "keep one of them")


def test_deepspeed_offload_on_cpu_is_refused():
    refuse(small(), od.Plan(deepspeed=od.DeepSpeed(offload_optimizer=True)),
           "offload_optimizer=True is not valid on a CPU device")


def test_deepspeed_missing_is_backend_unavailable(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real(name, *a))
    refuse(small(), "zero2", r"pip install overdrive\[deepspeed\]", error=od.BackendUnavailable)


def test_deepspeed_config_is_filled_from_the_plan():
    from overdrive.passes.deepspeed import build_config

    plan = od.Plan(deepspeed=od.DeepSpeed(zero_stage=3, config={"steps_per_print": 7},
                                          gradient_clipping=1.0),
                   mixed_precision="bf16", grad_accum=4)
    cfg = build_config(plan, dp_size=2, client_optimizer=True)
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["gradient_clipping"] == 1.0 and cfg["steps_per_print"] == 7
    assert cfg["train_micro_batch_size_per_gpu"] == 1
    assert cfg["zero_allow_untested_optimizer"] is True
    assert plan.deepspeed.config == {"steps_per_print": 7}  # the user's dict is not mutated
