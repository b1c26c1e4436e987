"""Plan parsing, presets, round-trips and every field-level PlanError."""

import json

import pytest

import overdrive as od
from tests.helpers import require
from overdrive.plan_spec import resolve_for_world, resolve_plan, resolve_sizes


@pytest.mark.parametrize("name,check", [
    ("ddp", lambda p: p.ddp is not None and p.data_parallel == "ddp"),
    ("fsdp", lambda p: p.fsdp == od.FSDP()),
    ("fsdp+compile", lambda p: p.fsdp and p.compile.mode == "regional"),
    ("fsdp+tp", lambda p: p.parallel.tp == 2 and p.parallel.dp_shard == -1),
    ("fsdp+tp4", lambda p: p.parallel.tp == 4),
    ("fsdp+ac", lambda p: p.checkpointing.mode == "full"),
    ("fp8", lambda p: p.fp8 == od.FP8()),
    ("fsdp+compile+ac+fp8", lambda p: p.fsdp and p.compile and p.checkpointing and p.fp8),
    ("inference-fp8", lambda p: p.casting == od.Casting()),
    ("fsdp+cp2+bf16", lambda p: p.parallel.cp == 2 and p.mixed_precision == "bf16"),
    ("zero3", lambda p: p.deepspeed.zero_stage == 3),
    ("hsdp", lambda p: p.parallel.dp_replicate == 2 and p.fsdp),
    (" FSDP + Compile ", lambda p: p.fsdp and p.compile),
])
def test_presets(name, check):
    plan = od.Plan.preset(name)
    assert check(plan)
    assert resolve_plan(name) == plan


def test_unknown_preset_token_suggests_and_lists():
    with pytest.raises(od.PlanError, match=r"unknown preset token 'fdsp'.*Did you mean 'fsdp'"):
        resolve_plan("fdsp+compile")


ROUND_TRIP_PLANS = {
    **{name: od.Plan.preset(name) for name in ["ddp", "fsdp+compile+ac+fp8", "fsdp+tp4+sp",
                                               "zero2+bf16", "inference-fp8"]},
    "budget": od.Plan(checkpointing=od.Checkpointing(mode="budget", budget_bytes=2**30,
                                                     budget_input_shape=(8, 2048))),
    "casting": od.Plan(casting=od.Casting(storage="float8_e5m2", skip=("norm", "head"))),
    "attrs": od.Plan(parallel=od.Parallel(tp=2), blocks=("layers.*",),
                     tp_divide_attrs=("n_heads",)),
}


@pytest.mark.parametrize("name", list(ROUND_TRIP_PLANS))
def test_dict_round_trip(name):
    plan = ROUND_TRIP_PLANS[name]
    assert od.Plan.from_dict(plan.to_dict()) == plan
    back = od.Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back == plan and hash(back) == hash(plan)


@pytest.mark.parametrize("name", ["budget", "casting", "attrs"])
def test_file_round_trip(name, tmp_path):
    yaml = require("yaml")
    plan = ROUND_TRIP_PLANS[name]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(plan.to_dict()))
    (tmp_path / "p.json").write_text(json.dumps(plan.to_dict()))
    for back in (resolve_plan(str(tmp_path / "p.yaml")), resolve_plan(tmp_path / "p.json")):
        assert back == plan and hash(back) == hash(plan)


def test_yaml_and_json_files(tmp_path):
    yaml = require("yaml")
    plan = od.Plan(fsdp=od.FSDP(reshard_after_forward=False), compile=od.Compile(backend="eager"),
                   grad_accum=4, blocks=("layers.*",), mixed_precision="bf16")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(plan.to_dict()))
    (tmp_path / "p.json").write_text(json.dumps(plan.to_dict()))
    assert resolve_plan(str(tmp_path / "p.yaml")) == plan
    assert resolve_plan(tmp_path / "p.json") == plan
    (tmp_path / "short.yaml").write_text("fsdp: true\ncompile: regional\ngrad_accum: 2\n")
    short = resolve_plan(str(tmp_path / "short.yaml"))
    assert short.fsdp == od.FSDP() and short.compile.mode == "regional" and short.grad_accum == 2


def test_missing_plan_file():
    with pytest.raises(od.PlanError, match="no such plan file"):
        resolve_plan("nope.yaml")


@pytest.mark.parametrize("data,pattern", [
    ({"fsdpp": True}, r"plan: unknown key 'fsdpp'. Did you mean 'fsdp'\?.*Valid keys"),
    ({"compile": {"mdoe": "full"}}, r"compile: unknown key 'mdoe'.*Did you mean 'mode'"),
    ({"compile": {"mode": "fast"}}, r"compile.mode='fast' is not valid; choose one of: "
                                    r"'regional', 'full', 'off'"),
    ({"checkpointing": {"mode": "some"}}, r"checkpointing.mode='some'.*'selective'"),
    ({"checkpointing": {"mode": "budget"}}, r"checkpointing.budget_bytes=None"),
    ({"checkpointing": {"mode": "every", "every": 0}}, r"checkpointing.every=0"),
    ({"fp8": {"recipe": "e4m3"}}, r"fp8.recipe='e4m3'.*'tensorwise', 'rowwise', 'mxfp8'"),
    ({"fp8": {"backend": "cuda"}}, r"fp8.backend='cuda'.*'auto', 'torchao', 'te'"),
    ({"fp8": {"filter": "(["}}, r"fp8.filter='\(\[' is not a valid regex"),
    ({"fp8": {"backend": "torchao", "recipe": "mxfp8"}}, r"fp8.recipe='mxfp8'.*backend='te'"),
    ({"mixed_precision": "fp32"}, r"mixed_precision='fp32'.*'no', 'bf16', 'fp16'"),
    ({"grad_accum": 0}, r"grad_accum=0 is not valid; use an integer >= 1"),
    ({"grad_accum": 1.5}, r"grad_accum=1.5"),
    ({"parallel": {"tp": 0}}, r"parallel.tp=0 is not valid"),
    ({"parallel": {"tp": -1, "dp_shard": -1}}, r"only one size may be -1"),
    ({"deepspeed": {"zero_stage": 4}}, r"deepspeed.zero_stage=4.*0, 1, 2, 3"),
    ({"deepspeed": {"config": "/no/such.json"}}, r"deepspeed.config='/no/such.json': no such"),
    ({"fsdp": {"reduce_dtype": "float64"}}, r"fsdp.reduce_dtype='float64'"),
    ({"casting": {"storage": "int4"}}, r"casting.storage='int4'"),
    ({"tp_plan": {"layers.*.q": "diagonal"}}, r"tp_plan\['layers.\*.q'\]='diagonal'"),
    ({"tp_plan": "manual"}, r"tp_plan='manual' is not valid; use 'auto' or a dict"),
    ({"blocks": [""]}, r"blocks="),
    ({"seed": -3}, r"seed=-3"),
    ({"compile": 3}, r"plan.compile=3 is not valid"),
])
def test_bad_values_name_field_value_and_choices(data, pattern):
    with pytest.raises(od.PlanError, match=pattern):
        od.Plan.from_dict(data)


@pytest.mark.parametrize("data,pattern", [
    ({"ddp": {"static_graph": "no"}}, r"ddp.static_graph='no' is not valid; ddp.static_graph "
                                      r"takes true or false \(a boolean: unquoted in YAML\)"),
    ({"fp8": {"layernorm": "false"}}, r"fp8.layernorm='false'.*true or false"),
    ({"fsdp": {"offload": "false"}}, r"fsdp.offload='false'.*true or false"),
    ({"fsdp": {"reshard_after_forward": "no"}}, r"fsdp.reshard_after_forward='no'.*true or false"),
    ({"parallel": {"sequence_parallel": 1}}, r"parallel.sequence_parallel=1.*true or false"),
    ({"compile": {"fullgraph": "yes"}}, r"compile.fullgraph='yes'.*true or false"),
    ({"seed": True}, r"seed=True is not valid; seed takes an integer or null"),
    ({"deepspeed": {"zero_stage": True}}, r"deepspeed.zero_stage=True.*0, 1, 2, 3"),
    ({"mixed_precision": True}, r"mixed_precision=True.*'no', 'bf16', 'fp16'"),
    ({"casting": {"skip": 5}}, r"casting.skip=5 is not valid; casting.skip takes a list of "
                               r"strings"),
    ({"casting": {"skip": ["norm", 5]}}, r"casting.skip=\('norm', 5\)"),
    ({"tp_divide_attrs": [3]}, r"tp_divide_attrs=\(3,\)"),
    ({"checkpointing": {"mode": "budget", "budget_bytes": 1, "budget_input_shape": ["2"]}},
     r"checkpointing.budget_input_shape=\('2',\).*list of integers"),
], ids=lambda v: str(v)[:40] if isinstance(v, dict) else None)
def test_types_are_strict(data, pattern):
    """A quoted boolean is a string, ``true`` is not an integer: refused with the field,
    the value and what it takes (before any model is touched)."""
    with pytest.raises(od.PlanError, match=pattern):
        od.Plan.from_dict(data)


def test_strict_types_in_python_parts_and_plans():
    with pytest.raises(od.PlanError, match=r"ddp.static_graph='no'"):
        resolve_plan(od.Plan(ddp=od.DDP(static_graph="no")))
    with pytest.raises(od.PlanError, match=r"fsdp.offload='false'"):
        od.Plan().replace(fsdp=od.FSDP(offload="false"))
    ok = od.Plan.from_dict({"ddp": {"static_graph": True}, "seed": 3,
                            "compile": {"dynamic": None}})
    assert ok.ddp.static_graph is True and ok.seed == 3
    assert od.Plan.from_dict({"casting": {"skip": ["norm"]}}).casting.skip == ("norm",)


def test_plan_files_refused_with_plan_errors(tmp_path):
    with pytest.raises(od.PlanError, match=r"plan file '.*nope.yaml': no such file"):
        od.Plan.from_file(tmp_path / "nope.yaml")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("fsdp: true  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(od.PlanError, match=r"latin1.yaml' is not UTF-8 text.*save it as UTF-8"):
        resolve_plan(str(latin1))
    upper = tmp_path / "P.YAML"
    upper.write_text("fsdp: true\n")
    assert resolve_plan(str(upper)).fsdp == od.FSDP()  # a file, not a preset named 'p.yaml'
    with pytest.raises(od.PlanError, match="no such plan file"):
        resolve_plan(str(tmp_path / "MISSING.JSON"))
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    with pytest.raises(od.PlanError, match=r"dir.yaml' cannot be read"):
        od.Plan.from_file(folder)


def test_a_quoted_boolean_is_refused_before_the_model_is_touched(tmp_path):
    from overdrive.models.llama import tiny
    from tests.helpers import assert_untouched, snapshot

    (tmp_path / "p.yaml").write_text("fsdp:\n  reshard_after_forward: 'no'\n")
    model = tiny(n_layers=2)
    before = snapshot(model)
    with pytest.raises(od.PlanError, match=r"fsdp.reshard_after_forward='no'"):
        od.accelerate(model, str(tmp_path / "p.yaml"))
    assert_untouched(model, before)


@pytest.mark.parametrize("plan,pattern", [
    (od.Plan(fsdp=od.FSDP(), deepspeed=od.DeepSpeed()), r"fsdp and deepspeed together"),
    (od.Plan(fsdp=od.FSDP(), ddp=od.DDP()), r"fsdp and ddp together"),
    (od.Plan(casting=od.Casting(), fp8=od.FP8()), r"casting and fp8 together"),
    (od.Plan(casting=od.Casting(), fsdp=od.FSDP()), r"casting is an inference pass"),
    (od.Plan(deepspeed=od.DeepSpeed(), parallel=od.Parallel(tp=2)), r"deepspeed with parallel.tp=2"),
    (od.Plan(parallel=od.Parallel(sequence_parallel=True)), r"sequence_parallel=True needs"),
], ids=["ds+fsdp", "ddp+fsdp", "casting+fp8", "casting+fsdp", "ds+tp", "sp-no-tp"])
def test_contradictions(plan, pattern):
    with pytest.raises(od.PlanError, match=pattern):
        resolve_plan(plan)


def test_sizes_against_the_world():
    par = resolve_sizes(od.Parallel(tp=2), 8)
    assert (par.dp_replicate, par.dp_shard, par.tp, par.cp) == (1, 4, 2, 1)
    assert resolve_sizes(od.Parallel(dp_replicate=2, dp_shard=2), 4).dp_shard == 2
    with pytest.raises(od.PlanError, match=r"world size 6 is not divisible.*\(tp=4 = 4\); "
                       r"launch a multiple of 4 processes"):
        resolve_sizes(od.Parallel(tp=4), 6)
    with pytest.raises(od.PlanError, match=r"parallel.dp_shard=-1 .*\(tp=2 × cp=2 = 4\)"):
        resolve_sizes(od.Parallel(tp=2, cp=2), 2)
    with pytest.raises(od.PlanError, match=r"= 4 do not match the world size 8"):
        resolve_sizes(od.Parallel(dp_shard=2, tp=2), 8)


def test_data_parallel_is_never_silently_off():
    plan = resolve_for_world(od.Plan(), 4)
    assert plan.ddp is not None and plan.parallel.dp_shard == 4
    assert resolve_for_world(od.Plan(), 1).ddp is None
    assert resolve_for_world(od.Plan(parallel=od.Parallel(tp=2)), 2).ddp is None
    assert resolve_for_world(od.Plan.preset("fsdp"), 4).ddp is None
    # tp on several data ranks: fsdp (ddp cannot keep DTensor parameters)
    tp = resolve_for_world(od.Plan.preset("tp"), 4)
    assert tp.data_parallel == "fsdp" and tp.parallel.dp_shard == 2 and tp.parallel.tp == 2
    assert resolve_for_world(od.Plan.preset("cp"), 4).data_parallel == "ddp"


def test_plan_is_frozen_and_replace_validates():
    plan = od.Plan()
    with pytest.raises(Exception):
        plan.grad_accum = 2
    assert plan.replace(grad_accum=2).grad_accum == 2
    with pytest.raises(od.PlanError, match="grad_accum=0"):
        plan.replace(grad_accum=0)


def test_configs_select_the_passes():
    from overdrive.plan_spec import ContextParallelConfig, TensorParallelConfig
    from overdrive.rewrite.manager import order_passes

    plan = od.Plan.preset("fsdp+compile+ac+fp8+tp+cp")
    kinds = {type(c) for c in plan.configs()}
    assert kinds == {od.FP8, od.Checkpointing, od.FSDP, od.Compile, TensorParallelConfig,
                     ContextParallelConfig}
    assert {p.name for p, _ in order_passes(plan)} == {
        "fp8", "checkpointing", "fsdp", "compile", "tensor_parallel", "context_parallel"}
    assert od.Plan(compile=od.Compile(mode="off")).configs() == []
