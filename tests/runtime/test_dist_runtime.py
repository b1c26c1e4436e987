"""Data sharding, gather_for_metrics, resume, collectives and clipping on 2 gloo ranks.

One torchrun launch runs every scenario (tests/runtime/runtime_scenarios.py); the tests below
check what each rank saw."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import child_env, read_json, run_torchrun

pytestmark = pytest.mark.dist
SCRIPT = Path(__file__).with_name("runtime_scenarios.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenarios")
    run_torchrun(SCRIPT, 2, str(out), tmp_path=out, env=child_env(OVERDRIVE_PG_TIMEOUT="60"))
    result = [read_json(out / f"rank{r}.json") for r in (0, 1)]
    for r, res in enumerate(result):
        for name, value in res.items():
            assert not (isinstance(value, dict) and "error" in value), \
                f"rank {r} scenario {name} raised:\n{value['error']}"
    return result


def real_items(batches) -> list[int]:
    return [v for values, n_real in batches for v in values[:n_real]]


@pytest.mark.parametrize("key", ["shuffle=False", "shuffle=True"])
def test_shards_are_disjoint_and_complete(ranks, key):
    per_rank = [r["shards"][key] for r in ranks]
    seen = [real_items(p["batches"]) for p in per_rank]
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(37))
    # even_batches: same number of equally sized batches, len() right
    assert [len(p["batches"]) for p in per_rank] == [5, 5] == [p["len"] for p in per_rank]
    assert all(len(values) == 4 for p in per_rank for values, _ in p["batches"])


def test_shuffle_without_plan_seed_follows_torch_manual_seed(ranks):
    """As DataLoader(shuffle=True): the same torch.manual_seed gives the same order, run
    after run; the ranks agree on one permutation (disjoint, complete shards)."""
    runs = [r["torch_seeded_shuffle"]["runs"] for r in ranks]
    assert all(first == second for first, second in runs)
    seen = [real_items(r[0]) for r in runs]
    assert set(seen[0]).isdisjoint(seen[1]) and sorted(seen[0] + seen[1]) == list(range(37))
    others = [r["torch_seeded_shuffle"]["other"] for r in ranks]
    assert others[0] != runs[0][0]  # another seed, another order


def test_shuffle_uses_one_permutation(ranks):
    order = [values for r in ranks for values, _ in r["shards"]["shuffle=True"]["batches"]]
    assert order[0] != [0, 1, 2, 3]  # really shuffled (seed 7)


def test_split_batches(ranks):
    b0, b1 = (r["shards"]["split"]["batches"] for r in ranks)
    assert [v for v, _ in b0][:2] == [[0, 1], [4, 5]]
    assert [v for v, _ in b1][:2] == [[2, 3], [6, 7]]
    assert sorted(real_items(b0) + real_items(b1)) == list(range(18))
    assert all(len(v) == 2 for v, _ in b0 + b1)


@pytest.mark.parametrize("key", ["dispatch", "iterable_no_dispatch"])
def test_iterable_datasets(ranks, key):
    b0, b1 = (r["shards"][key]["batches"] for r in ranks)
    assert sorted(real_items(b0) + real_items(b1)) == list(range(11))
    assert set(real_items(b0)).isdisjoint(real_items(b1))
    assert len(b0) == len(b1)
    if key == "dispatch":
        assert ranks[0]["shards"][key]["dispatch"] is True


def test_dispatch_without_even_batches_ends_cleanly(ranks):
    assert ranks[0]["shards"]["dispatch_uneven"] == [[0, 1], [4, 5], [8]]
    assert ranks[1]["shards"]["dispatch_uneven"] == [[2, 3], [6, 7]]


def test_gather_for_metrics_of_python_objects(ranks):
    for r in ranks:
        assert sorted(r["metrics"]["strings"]) == sorted(f"s{i}" for i in range(37))


def test_even_batches_on_and_off(ranks):
    assert [r["shards"]["three_even=True"] for r in ranks] == [[1, 1], [1, 1]]
    assert [r["shards"]["three_even=False"] for r in ranks] == [[1, 1], [1]]


@pytest.mark.parametrize("key,n", [("37_0", 37), ("22_4", 22), ("uneven", 37)])
def test_gather_for_metrics_returns_exactly_the_dataset(ranks, key, n):
    scale = 1 if key == "uneven" else 10
    for r in ranks:
        values = r["metrics"][key]
        assert len(values) == n
        assert sorted(values) == [scale * i for i in range(n)]


def test_resume_mid_epoch_continues_with_the_same_batches(ranks):
    for r in ranks:
        res = r["resume"]
        assert res["consumed"] == res["want"][:3]
        assert res["rest"] == res["want"][3:]
        assert res["state"] == {"epoch": 1, "position": 3, "seed": 7, "global_batches": 6,
                                "batch_size": 2, "dp_size": 2,
                                "samples": 12}  # global samples: 3 batches × 2 × 2 ranks
        assert res["after"]["epoch"] == 2 and res["after"]["position"] == 0
        # consumed batches were skipped at the index level: never read
        assert res["read"] == sorted(i for b in res["rest"] for i in b)


def test_collectives(ranks):
    for rank, r in enumerate(ranks):
        c = r["collectives"]
        assert c["gather"] == {"a": [0.0, 1.0], "b": [[0, 0], [0, 0], [1, 1], [1, 1]]}
        assert c["sum"] == [3.0, 9.0] and c["mean"] == [1.5, 4.5] and c["max"] == [2.0, 5.0]
        assert c["broadcast"] == [1, 11]
        assert c["object"] == ["r0", "r1"]
        assert c["after_error"] == [2.0]
        assert "rank 0: [([1, 3]" in c["mismatch"] and "rank 1: [([2, 3]" in c["mismatch"]
        assert "OverdriveError: reduce: tensors differ" in c["dtype_mismatch"]
        assert "'torch.float32'" in c["dtype_mismatch"] and "'torch.int64'" in c["dtype_mismatch"]
        assert c["pad_many"] == [[3 if i % 2 else 2, 2] for i in range(10)]
        assert c["object_collectives"] == 0
    assert ranks[0]["collectives"]["pad"] == [[1.0, 1.0], [-1.0, -1.0]]
    assert ranks[1]["collectives"]["pad"] == [[1.0, 1.0], [1.0, 1.0]]
    assert ranks[0]["collectives"]["pad_first"] == [[0.0, 1.0], [0.0, 1.0]]


def test_clip_grad_norm_of_sharded_grads_equals_single_process(ranks):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    torch.manual_seed(1)
    x = torch.randn(6, 8)
    model(x).pow(2).sum().backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    for r in ranks:
        got = r["clip_fsdp"]
        assert got["is_dtensor"] is True
        assert got["norm"] == pytest.approx(float(norm), rel=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(torch.tensor(got["clipped"][name]), p.grad,
                                       atol=1e-6, rtol=1e-5)


def test_clip_grad_norm_under_tensor_parallel_only_equals_single_process(ranks):
    from runtime_scenarios import tp_model

    model = tp_model()
    torch.manual_seed(1)
    x = torch.randn(6, 8)
    model(x).pow(3).sum().backward()
    inf_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], float("inf"))
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    for r in ranks:
        got = r["clip_tp"]
        assert got["inf_norm"] == pytest.approx(float(inf_norm), rel=1e-5)
        assert got["norm"] == pytest.approx(float(norm), rel=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(torch.tensor(got["clipped"][name]), p.grad,
                                       atol=1e-6, rtol=1e-5, msg=name)


def test_find_executable_batch_size_ranks_back_off_together(ranks):
    for r in ranks:  # rank 0 never ran out of memory, yet retried with rank 1
        assert r["batch_size_search"] == {"chosen": 92, "tried": [128, 115, 103, 92]}


def test_main_process_first_runs_rank_zero_before_the_others(ranks):
    zero, one = ranks[0]["main_first"], ranks[1]["main_first"]
    assert zero["end"] - zero["start"] >= 0.5
    assert one["start"] >= zero["end"]


# --------------------------------------------------------------------------- accumulation


def reference_state() -> dict[str, torch.Tensor]:
    """One process, full batches of 8: what 2 ranks × 4 micro-batches of 1 must give."""
    from runtime_scenarios import ACCUM, LR, STEPS, llama_and_tokens

    model, tokens = llama_and_tokens()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        x = tokens[step * 2 * ACCUM:(step + 1) * 2 * ACCUM]
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.state_dict()


def assert_same_state(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(torch.tensor(got[k]), v, atol=1e-5, rtol=1e-5, msg=k)


def test_accumulation_under_hand_applied_fsdp_matches_one_big_batch(ranks):
    want = reference_state()
    for r in ranks:
        got = r["accum_raw_fsdp"]
        assert got["steps"] == 2
        # sync off for micro-steps 1-3, on for the 4th: toggled only when it changes
        assert got["sync_calls"] == [False, True, False, True]
        assert_same_state(got["state"], want)


@pytest.mark.parametrize("plan", ["ddp", "fsdp"])
def test_accumulation_under_data_parallel_pass_matches_one_big_batch(plan, tmp_path):
    run_torchrun(SCRIPT, 2, str(tmp_path), "accumulate", plan, tmp_path=tmp_path)
    want = reference_state()
    for r in (0, 1):
        got = read_json(tmp_path / f"rank{r}.json")
        assert got["steps"] == 2
        # the real pass's switch: off for micro-steps 1-3, on for the 4th, of each step
        assert got["sync_calls"] == [False, True, False, True]
        assert got["reduced"] == [False, False, False, True] * 2  # and really not reduced
        assert_same_state(got["state"], want)


# --------------------------------------------------------------------------- 4 ranks


@pytest.fixture(scope="module")
def mesh_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh")
    run_torchrun(SCRIPT.with_name("mesh_scenarios.py"), 4, str(out), tmp_path=out,
                 env=child_env(OVERDRIVE_PG_TIMEOUT="60"))
    return [read_json(out / f"rank{r}.json") for r in range(4)]


@pytest.mark.parametrize("mesh", ["dp2_tp2", "dp2_cp2", "cp2_tp2"])
def test_dispatch_with_tp_or_cp_peers(mesh_ranks, mesh):
    got = [r[mesh] for r in mesh_ranks]
    for r, g in enumerate(got):
        assert "error" not in g, f"rank {r}:\n{g['error']}"
        assert g["dispatch"] is True
    assert [g["opened"] for g in got] == [1, 0, 0, 0]  # only global rank 0 reads the stream
    by_dp: dict[int, list] = {}
    for g in got:  # peers of one data-parallel rank see the same batches
        assert by_dp.setdefault(g["dp_rank"], g["batches"]) == g["batches"]
    dp_size = len(by_dp)
    assert dp_size == (1 if mesh == "cp2_tp2" else 2)
    seen = [v for batches in by_dp.values() for v in real_items(batches)]
    assert sorted(seen) == list(range(11))  # disjoint and complete over the dp ranks
