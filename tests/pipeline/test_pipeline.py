"""Pipeline parallelism: plan fields and refusals, the stage split, the bubble, and gloo
runs on 2 and 4 ranks against one process (tests/pipeline/pp_worker.py runs the
scenarios named on its command line and writes JSON)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import overdrive as od
from overdrive.models.llama import tiny
from overdrive.passes.pipeline import balanced_starts
from overdrive.bubble import bubble_fraction
from tests.helpers import assert_untouched, read_json, run_torchrun, snapshot
from tests.pipeline.common import batches, hf_batches, hf_llama, llama, train_steps

WORKER = Path(__file__).with_name("pp_worker.py")
TOL = 1e-5


def single_process(make, data) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    rt = od.accelerate(make(), None, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    return train_steps(rt, data, clip=1.0), rt.state_dict()


def assert_matches(got: dict, want: tuple, tol: float = TOL) -> None:
    losses, state = want
    assert len(got["losses"]) == len(losses) == 5
    assert max(abs(a - b) for a, b in zip(got["losses"], losses)) < tol, (got["losses"], losses)
    assert set(got["state"]) == set(state)
    worst = max((torch.tensor(got["state"][k]) - v).abs().max().item() for k, v in state.items())
    assert worst < tol, worst


# --------------------------------------------------------------------------- plan


def test_pp_presets_and_mesh_order():
    assert od.Plan.preset("pp").parallel.pp == 2
    assert od.Plan.preset("fsdp+pp4").parallel.pp == 4
    plan = od.Plan.from_dict({"parallel": {"pp": 2}, "pipeline": {"schedule": "gpipe",
                                                                   "split": [0, 3]}})
    assert plan.pipeline.split == (0, 3)
    from overdrive.runtime.state import MESH_DIMS, mesh_coordinates

    assert MESH_DIMS[0] == "pp"
    resolved = od.Plan(parallel=od.Parallel(pp=2, dp_shard=2))
    assert mesh_coordinates(2, resolved.parallel) == {"pp": 1, "dp_replicate": 0, "dp_shard": 0,
                                             "cp": 0, "tp": 0}


@pytest.mark.parametrize("plan, words", [
    (dict(parallel=od.Parallel(pp=2), pipeline=od.Pipeline(schedule="zbv", stages_per_rank=3)),
     "exactly pipeline.stages_per_rank=2"),
    (dict(parallel=od.Parallel(pp=2), pipeline=od.Pipeline(schedule="interleaved-1f1b")),
     "stages_per_rank >= 2"),
    (dict(parallel=od.Parallel(pp=2), pipeline=od.Pipeline(stages_per_rank=2)),
     "runs one stage per rank"),
    (dict(parallel=od.Parallel(pp=2), deepspeed=od.DeepSpeed()), "deepspeed with parallel.pp"),
    (dict(pipeline=od.Pipeline()), "parallel.pp=1"),
    (dict(parallel=od.Parallel(pp=2), pipeline=od.Pipeline(schedule="wavy")), "schedule"),
    (dict(parallel=od.Parallel(pp=2), pipeline=od.Pipeline(split=(2, 1))), "increasing"),
])
def test_plan_refusals(plan, words):
    with pytest.raises(od.PlanError, match=words.replace("(", r"\(").replace(")", r"\)")):
        od.Plan(**plan).replace()


def test_world_size_mismatch_is_refused():
    with pytest.raises(od.PlanError, match="do not match the world size"):
        od.inspect(llama(), od.Plan(parallel=od.Parallel(pp=2, dp_shard=2)), world_size=2)


def test_too_few_blocks_is_refused_untouched():
    model = llama(2)
    before = snapshot(model)
    plan = od.Plan(parallel=od.Parallel(pp=2), pipeline=od.Pipeline(
        schedule="interleaved-1f1b", stages_per_rank=2))
    with pytest.raises(od.PlanError, match="4 stages need at least 4 blocks"):
        od.inspect(model, plan, world_size=2)
    assert_untouched(model, before)


def test_tied_embeddings_and_bad_split_are_refused():
    with pytest.raises(od.PlanError, match="tied"):
        od.inspect(tiny(tie_embeddings=True), "pp", world_size=2)
    plan = od.Plan(parallel=od.Parallel(pp=2), pipeline=od.Pipeline(split=(0, 4)))
    with pytest.raises(od.PlanError, match="does not give 2 stages"):
        od.inspect(llama(4), plan, world_size=2)


# --------------------------------------------------------------------------- split


def test_balanced_split_is_exact():
    assert balanced_starts([1, 1, 1, 1], 2) == [0, 2]
    assert balanced_starts([5, 1, 1, 1, 1, 1], 2) == [0, 1]
    assert balanced_starts([1, 1, 1, 1, 1, 1, 1, 1], 4) == [0, 2, 4, 6]


def test_inspect_shows_stages_memory_and_bubble():
    report = od.inspect(llama(4), "fsdp+pp", world_size=8)
    details = report["pipeline"].details
    stages = details["stages"]
    assert [s["blocks"] for s in stages] == [[0, 1], [2, 3]]
    assert stages[0]["modules"][0] == "embed_tokens" and stages[1]["modules"][-1] == "lm_head"
    full = sum(p.numel() * 4 for p in llama(4).parameters())
    assert sum(s["param_bytes"] for s in stages) == full
    # the prediction is the cost model's on the traced per-stage FLOPs (lm_head on stage 1)
    assert details["bubble_fraction"] == bubble_fraction("1f1b", 2, 2, 1,
                                                         tuple(details["stage_flops"]))
    assert details["stage_flops"][1] > details["stage_flops"][0] > 0
    assert report.memory.parameters == pytest.approx(max(s["param_bytes"] for s in stages) / 4,
                                                     rel=0.01)  # one stage over dp_shard 4
    assert "pipeline" in str(report)
    memory = [s["memory"] for s in stages]  # per stage, after fsdp's 4-way sharding
    assert memory[0]["parameters"] == pytest.approx(stages[0]["param_bytes"] / 4, rel=0.01)
    assert all(m["optimizer"] == 2 * m["gradients"] for m in memory)


def test_explicit_split_and_v_layout():
    plan = od.Plan(parallel=od.Parallel(pp=2), pipeline=od.Pipeline(
        schedule="zbv", stages_per_rank=2, split=(0, 1, 2, 3)))
    stages = od.inspect(llama(4), plan, world_size=2)["pipeline"].details["stages"]
    assert [s["rank"] for s in stages] == [0, 1, 1, 0]
    assert [s["blocks"] for s in stages] == [[0], [1], [2], [3]]


class RepeatBlock(torch.nn.Module):
    """Same parameters as any other RepeatBlock; ``repeat`` times the FLOPs."""

    def __init__(self, dim: int, repeat: int):
        super().__init__()
        self.proj, self.repeat = torch.nn.Linear(dim, dim), repeat

    def forward(self, x):
        for _ in range(self.repeat):
            x = self.proj(x)
        return x


class RepeatModel(torch.nn.Module):
    def __init__(self, repeats, dim: int = 32):
        super().__init__()
        self.embed = torch.nn.Embedding(4, dim)
        self.layers = torch.nn.ModuleList(RepeatBlock(dim, r) for r in repeats)
        self.head = torch.nn.Linear(dim, 4)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_split_balances_traced_flops_not_only_params():
    plan = od.Plan(parallel=od.Parallel(pp=2), blocks=("layers.*",))
    even = od.inspect(RepeatModel([1, 1, 1, 1]), plan, world_size=2)["pipeline"].details
    assert [s["blocks"] for s in even["stages"]] == [[0, 1], [2, 3]]
    # equal parameters per block, but block 0 runs its matmul 7 times: the trace sees it
    heavy = od.inspect(RepeatModel([7, 1, 1, 1]), plan, world_size=2)["pipeline"].details
    assert [s["blocks"] for s in heavy["stages"]] == [[0], [1, 2, 3]]
    assert heavy["stage_flops"][0] > heavy["stage_flops"][1]


def test_bubble_cost_model():
    assert bubble_fraction("1f1b", 4, 8, 1) == pytest.approx(3 / 11, abs=1e-3)
    assert bubble_fraction("gpipe", 2, 4, 1) == pytest.approx(1 / 5, abs=1e-3)
    # equal stages: the closed form; a heavier last stage leaves the first one waiting
    assert bubble_fraction("gpipe", 2, 4, 1, (1.0, 1.0)) == pytest.approx(1 / 5, abs=1e-3)
    assert bubble_fraction("gpipe", 2, 4, 1, (1.0, 2.0)) > 0.3
    # split backward: the first stage has no input-backward (token ids), so zero-bubble
    # fills its bubble with weight work and nearly nothing is left
    assert bubble_fraction("zero-bubble", 2, 4, 2) < 0.06
    # interleaving shrinks the bubble; zero-bubble shrinks it more (torch's action lists)
    assert bubble_fraction("interleaved-1f1b", 2, 4, 2) < bubble_fraction("1f1b", 2, 4, 1)
    assert bubble_fraction("zbv", 2, 4, 2) < bubble_fraction("interleaved-1f1b", 2, 4, 2)


def test_bubble_counts_each_cross_rank_hop():
    from overdrive.bubble import action_lists, stage_ranks

    # GPipe, 2 equal stages, 4 micro-batches, hop h: rank 1's forwards start h late and
    # rank 0's backwards 2h late — makespan 15 + 2h over 12 units of work per rank
    for h in (0.0, 0.25, 0.5):
        assert bubble_fraction("gpipe", 2, 4, 1, None, h) == pytest.approx(
            1 - 12 / (15 + 2 * h), abs=1e-3)
    # a measured backward/forward ratio b: equal stages keep GPipe's bubble; zero-bubble's
    # first stage (weight step b·f, no input step) grows it
    assert bubble_fraction("gpipe", 2, 4, 1, None, 0.0, 3.0) == pytest.approx(0.2, abs=1e-3)
    assert bubble_fraction("zero-bubble", 2, 4, 2, None, 0.0, 3.0) > bubble_fraction(
        "zero-bubble", 2, 4, 2)
    # a rank measured slower stretches its actions: the other rank waits for it
    assert bubble_fraction("gpipe", 2, 4, 1, None, 0.0, 2.0, (1.0, 1.0)) == pytest.approx(0.2)
    assert bubble_fraction("zbv", 2, 4, 2, None, 0.0, 2.0, (0.9, 1.1)) > 0.1
    # zbv's V: stages 1 and 2 share rank 1 and hand over for free
    assert stage_ranks(action_lists("zbv", 2, 4, 2)) == {0: 0, 1: 1, 2: 1, 3: 0}
    for name, spr in (("1f1b", 1), ("interleaved-1f1b", 2), ("zero-bubble", 2), ("zbv", 2)):
        assert bubble_fraction(name, 2, 4, spr, None, 0.3) > bubble_fraction(name, 2, 4, spr)


def test_bubble_split_backward_costs_and_noise():
    from overdrive.bubble import expected_idle

    zb = bubble_fraction("zero-bubble", 2, 4, 2)
    # the split steps default to the full backward's halves
    assert bubble_fraction("zero-bubble", 2, 4, 2, None, 0.0, 2.0, None, 1.0, 1.0) == zb
    # measured: the input step dearer than the weight step, both over b/2 — the
    # schedule's packing assumed equal steps, so ranks wait
    assert bubble_fraction("zero-bubble", 2, 4, 2, None, 0.0, 2.0, None, 1.3, 1.1) > zb
    # no noise, one speed: the fixed-cost replay, per rank
    fixed = expected_idle("zbv", 2, 4, 2)
    assert sum(fixed) / 2 == pytest.approx(bubble_fraction("zbv", 2, 4, 2), abs=1e-3)
    # noisy actions leave a tightly packed schedule waiting more; seeded, so repeatable
    noisy = expected_idle("zbv", 2, 4, 2, jitter=0.4, samples=32)
    assert sum(noisy) > sum(fixed) + 0.04
    assert noisy == expected_idle("zbv", 2, 4, 2, jitter=0.4, samples=32)
    # a round where rank 1 ran slower leaves rank 0 waiting
    slow1 = expected_idle("gpipe", 2, 4, 1, rank_times=[(0.8, 1.2)])
    assert slow1[0] > slow1[1]
    with pytest.raises(ValueError, match="rank_times"):
        expected_idle("gpipe", 2, 4, 1, rank_times=[(1.0, 1.0, 1.0)])


def test_forward_backward_without_pp_matches_manual_loop():
    torch.manual_seed(0)
    rt = od.accelerate(llama(2), None, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    torch.manual_seed(0)
    model = llama(2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for batch in batches(2):
        loss = rt.forward_backward(batch)
        rt.optimizer.step(), rt.optimizer.zero_grad()
        want = model(**batch).loss
        want.backward()
        opt.step(), opt.zero_grad()
        assert float(loss) == pytest.approx(float(want.detach()), abs=1e-6)
    batch = batches(1)[0]
    tup = rt.forward_backward((batch["input_ids"], batch["labels"]))
    ce = torch.nn.functional.cross_entropy
    fn = rt.forward_backward(batch["input_ids"], loss_fn=lambda out, ids: ce(
        out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))
    assert float(tup) == pytest.approx(float(fn), abs=1e-6)
    assert rt.evaluate(batch).requires_grad is False


# --------------------------------------------------------------------------- gloo


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pp2")
    ckpt = tmp / "ckpt"
    run_torchrun(WORKER, 2, str(tmp / "out.json"), "1f1b", "hf", "refusals", "meta",
                 "shard", f"save:{ckpt}", tmp_path=tmp)
    # a single process's checkpoint after 3 steps, for the pp=2 launch to load
    torch.manual_seed(0)
    one = od.accelerate(llama(4), None, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    train_steps(one, batches()[:3], clip=1.0)
    one.save(tmp / "ckpt1")
    run_torchrun(WORKER, 2, str(tmp / "resume.json"), f"resume:{ckpt}", f"from1:{tmp / 'ckpt1'}",
                 tmp_path=tmp)
    out = read_json(tmp / "out.json")
    out.update(read_json(tmp / "resume.json"))
    out["tmp"] = tmp
    return out


@pytest.mark.dist
def test_1f1b_matches_single_process(two_ranks):
    assert_matches(two_ranks["1f1b"], single_process(llama, batches()))


@pytest.mark.dist
def test_evaluate_and_export_gather_every_stage(two_ranks):
    torch.manual_seed(0)
    rt = od.accelerate(llama(4), None, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    train_steps(rt, batches(), clip=1.0)
    assert two_ranks["1f1b"]["eval"] == pytest.approx(float(rt.evaluate(batches(1, seed=7)[0])),
                                                      abs=1e-5)
    assert two_ranks["1f1b"]["grads_after_eval"] is False
    model = llama(4)
    od.load_weights(model, two_ranks["tmp"] / "export")
    for k, v in rt.state_dict().items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-5), k


@pytest.mark.dist
def test_transformers_llama_trains_under_pp(two_ranks):
    assert_matches(two_ranks["hf"], single_process(hf_llama, hf_batches()))


@pytest.mark.dist
def test_runtime_refusals(two_ranks):
    ref = two_ranks["refusals"]
    assert "pipeline.microbatches=2 does not divide the local batch of 3 rows" in ref["indivisible"]
    assert "rt.forward_backward(batch)" in ref["model_call"]
    assert ref["still_trains"] > 0


@pytest.mark.dist
def test_meta_model_is_materialised_stage_by_stage(two_ranks):
    meta = two_ranks["meta"]
    assert not meta["on_meta"]
    held, rank = meta["held"]
    assert rank == 0 and held < 0.6 * meta["full"]  # embedding + 2 of 4 blocks
    assert all(0 < loss < 10 for loss in meta["losses"])


@pytest.mark.dist
def test_shard_gives_every_stage_the_same_batches(two_ranks):
    shard = two_ranks["shard"]
    assert shard["same"] and shard["batches"] == 4 and shard["dp_size"] == 1


@pytest.mark.dist
@pytest.mark.slow
def test_train_llm_example_under_pp(tmp_path):
    import subprocess
    import sys

    from tests.helpers import ROOT, child_env

    proc = subprocess.run([sys.executable, "-m", "overdrive.cli", "launch", "--nproc", "2",
                           str(ROOT / "examples" / "train_llm.py"), "--plan", "pp",
                           "--steps", "3"], env=child_env(), capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "pipeline" in proc.stdout
    assert len([ln for ln in proc.stdout.splitlines() if ln.startswith("step ")]) == 3


@pytest.mark.dist
def test_resume_under_pp_and_load_into_one_process(two_ranks):
    saved, resumed = two_ranks["save"]["losses"], two_ranks["resume"]["losses"]
    assert two_ranks["resume"]["meta_step"] == 3
    assert resumed == pytest.approx(saved[3:], abs=1e-6)
    # the pp=2 checkpoint in one process: the parameters of 3 single-process steps
    torch.manual_seed(0)
    ref = od.accelerate(llama(4), None, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    train_steps(ref, batches()[:3], clip=1.0)
    rt = od.accelerate(llama(4), None, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    rt.load(two_ranks["tmp"] / "ckpt")
    want = ref.state_dict()
    for k, v in rt.state_dict().items():
        assert (v - want[k]).abs().max().item() < TOL, k
    assert train_steps(rt, batches()[3:], clip=1.0) == pytest.approx(saved[3:], abs=1e-5)


@pytest.mark.dist
def test_single_process_checkpoint_loads_under_pp(two_ranks):
    got = two_ranks["from1"]
    assert got["saved_world"] == 1 and got["step"] == 5
    assert got["losses"] == pytest.approx(two_ranks["save"]["losses"][3:], abs=1e-5)


def test_data_ranks_of_a_pipeline_get_fsdp():
    report = od.inspect(llama(4), "pp", world_size=4)
    assert report.plan["fsdp"] is not None and report.plan["parallel"]["dp_shard"] == 2


def _worker_results(tmp_path_factory, name: str, nproc: int, *modes: str) -> dict:
    """Run pp_worker.py's ``modes`` on ``nproc`` gloo ranks; their results by mode."""
    tmp = tmp_path_factory.mktemp(name)
    run_torchrun(WORKER, nproc, str(tmp / "out.json"), *modes, tmp_path=tmp, timeout=600)
    return read_json(tmp / "out.json")


@pytest.fixture(scope="module")
def schedule_matrix(tmp_path_factory):
    return _worker_results(tmp_path_factory, "pp_sched", 2, "gpipe", "interleaved", "zbv",
                           "looped", "zero_bubble", "ac", "accum")


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("name, layers", [("gpipe", 4), ("interleaved", 8), ("zbv", 8),
                                          ("looped", 8), ("zero_bubble", 8), ("ac", 4),
                                          ("accum", 4)])
def test_schedules_match_single_process(schedule_matrix, name, layers):
    assert_matches(schedule_matrix[name], single_process(lambda: llama(layers), batches()))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return _worker_results(tmp_path_factory, "pp4", 4, "pp_fsdp", "pp_tp", "interleaved_fsdp")


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("name, layers", [("pp_fsdp", 4), ("pp_tp", 4),
                                          ("interleaved_fsdp", 8)])
def test_pp_composes_with_fsdp_and_tp(four_ranks, name, layers):
    assert_matches(four_ranks[name], single_process(lambda: llama(layers), batches()),
                   tol=1e-4)


@pytest.fixture(scope="module")
def accum_fsdp(tmp_path_factory):
    return _worker_results(tmp_path_factory, "pp4_accum", 4, "accum_fsdp")["accum_fsdp"]


@pytest.mark.dist
def test_accumulate_under_pp_and_fsdp_reduce_scatters_once_per_step(accum_fsdp):
    """grad_accum=2 on pp2 x fsdp2: same training as one process on whole batches, and
    the non-syncing micro-step skips the reduce-scatter (as many per optimizer step as a
    grad_accum=1 step)."""
    assert_matches(accum_fsdp, single_process(llama, batches()), tol=1e-4)
    counts = accum_fsdp["reduce_scatters_per_step"]
    assert counts["plain"] > 0
    assert counts["accum"] == counts["plain"], counts


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return _worker_results(tmp_path_factory, "pp2_compile", 2, "compile")["compile"]


@pytest.mark.dist
def test_regional_compile_under_pp_matches_eager(compiled):
    """Plan(compile=aot_eager) with pp=2 trains (dynamo captured the stages' blocks) and
    matches one eager process."""
    assert compiled["graphs"] > 0
    assert_matches(compiled, single_process(llama, batches()))
