"""Issue 21 on 2 gloo ranks: split_between_processes, triggers, DDP communication hooks,
register_for_checkpointing, several models (distillation), scheduler semantics. One
torchrun launch runs every scenario (accelerate_scenarios.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import child_env, read_json, run_torchrun

pytestmark = pytest.mark.dist
SCRIPT = Path(__file__).with_name("accelerate_scenarios.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerate")
    run_torchrun(SCRIPT, 2, str(out), tmp_path=out, env=child_env(OVERDRIVE_PG_TIMEOUT="60"))
    result = [read_json(out / f"rank{r}.json") for r in (0, 1)]
    for r, res in enumerate(result):
        for name, value in res.items():
            assert not (isinstance(value, dict) and "error" in value), \
                f"rank {r} scenario {name} raised:\n{value['error']}"
    return result


def test_split_between_processes(ranks):
    r0, r1 = (r["split"] for r in ranks)
    assert (r0["list4"], r1["list4"]) == ([0, 1], [2, 3])  # 2N items: 2 a rank
    assert (r0["list3"], r1["list3"]) == ([0, 1], [2])  # 2N - 1: the last rank gets 1
    assert (len(r0["list17"]), len(r1["list17"])) == (9, 8)  # rank < 17 % 2 gets one more
    assert r0["list17"] + r1["list17"] == list(range(17))
    assert r0["dict"] == {"ids": [0, 1, 2], "text": ["a", "b", "c"]}
    assert r1["dict"] == {"ids": [3, 4], "text": ["d", "e"]}
    for r in (r0, r1):  # padded: ceil(n / 2) rows each, gathered and truncated = the input
        assert (r["padded1_rows"], r["padded5_rows"]) == (1, 3)
        assert r["padded1_gathered"] and r["padded5_gathered"]
        assert r["padded_list_gathered"] == [0, 1, 2, 3, 4]
    assert (r0["padded_list"], r1["padded_list"]) == ([0, 1, 2], [3, 4, 4])


def test_trigger_set_on_one_rank_stops_every_rank_once(ranks):
    assert [r["trigger"] for r in ranks] == [{"stopped_at": 3, "again": False}] * 2


def test_fp16_comm_hook_all_reduces_in_half_precision(ranks):
    exact, fp16 = (torch.tensor(ranks[0]["comm_hooks"][h]["grads"]) for h in ("None", "fp16"))
    assert ranks[0]["comm_hooks"]["fp16"]["details"] == {"comm_hook": "fp16"}
    assert torch.equal(fp16, fp16.half().float())  # the averaged grads went through fp16
    assert not torch.equal(fp16, exact)
    torch.testing.assert_close(fp16, exact, rtol=5e-3, atol=1e-4)  # a few fp16 ulps
    assert ranks[0]["comm_hooks"]["fp16"]["grads"] == ranks[1]["comm_hooks"]["fp16"]["grads"]


def test_powersgd_comm_hook_compresses_after_its_start_iteration(ranks):
    hooks = ranks[0]["comm_hooks"]
    assert hooks["powersgd"]["details"] == {"comm_hook": "powersgd", "powersgd_rank": 1,
                                            "powersgd_start_iter": 2}
    exact, psgd = (torch.tensor(hooks[h]["grads"]) for h in ("None", "powersgd"))
    assert torch.equal(psgd[:2], exact[:2])  # plain all-reduce for the first 2 steps
    assert not torch.allclose(psgd[2:], exact[2:], atol=1e-4)  # then a rank-1 approximation
    assert ranks[0]["comm_hooks"]["powersgd"]["grads"] == \
        ranks[1]["comm_hooks"]["powersgd"]["grads"]  # every rank got the same gradient
    losses = hooks["powersgd"]["losses"]
    assert losses == sorted(losses, reverse=True)  # and it still trains


def test_registered_objects_round_trip_on_two_ranks(ranks):
    for r in ranks:
        assert r["custom_state"]["restored"]
        assert "holds 1 object(s) registered for checkpointing (EMA), this runtime has 0" \
            in r["custom_state"]["refused"]
    assert ranks[0]["custom_state"]["shadow_sum"] == ranks[1]["custom_state"]["shadow_sum"]


def test_fsdp_student_and_frozen_fsdp_teacher_match_one_process(ranks):
    for r in ranks:
        d = r["distillation"]
        assert d["same_mesh"] and d["new_groups"] == 0  # the teacher reused the mesh
        assert d["teacher_sync_calls"] == []  # rt.accumulate of the student left it alone
        assert d["teacher_unchanged"] and d["teacher_steps"] == 0 and d["student_steps"] == 3
        assert d["max_param_diff"] < 1e-5
        assert d["losses"] == pytest.approx(d["ref_losses"], rel=1e-5)


def test_frozen_model_under_ddp_is_prepared_for_inference(ranks):
    for r in ranks:
        d = r["frozen_ddp"]
        assert d["passes"] == ["ddp"] and d["shape"] == [1, 2]
        assert any("no parameter requires grad" in n for n in d["notes"])


@pytest.mark.parametrize("ga", ["1", "2", "4"])
def test_scheduler_steps_once_per_optimizer_step_on_two_ranks(ranks, ga):
    for r in ranks:
        lrs = r["scheduler"][ga]
        assert len(lrs) == 10 * int(ga)
        assert lrs[-1] == 0 and lrs[-2] != 0
        assert len(set(lrs)) == (10 if ga == "1" else 11)  # one lr per optimizer step
