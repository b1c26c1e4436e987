"""The collective ledger on 2 gloo ranks: a rank that skips a collective (an rt.reduce, or
a DDP bucket all-reduce by skipping a backward), calls rt.save
or rt.gather_for_metrics alone, or stalls makes every rank report a DesyncError naming
both sides within desync_timeout + 5 s; a long clean run (after rank 0 spent longer than
desync_timeout alone in rt.main_process_first) raises nothing. Scenarios:
desync_scenarios.py."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.helpers import child_env, run_torchrun

SCRIPT = Path(__file__).with_name("desync_scenarios.py")
DESYNC_TIMEOUT = 5.0


def run(scenario: str, tmp_path: Path):
    proc = run_torchrun(SCRIPT, 2, scenario, str(tmp_path), tmp_path=tmp_path, check=False,
                        timeout=240, env=child_env(OVERDRIVE_PG_TIMEOUT="120"))
    ended = time.time()
    results = {r: json.loads((tmp_path / f"rank{r}.json").read_text())
               for r in range(2) if (tmp_path / f"rank{r}.json").exists()}
    return proc, results, ended


def reported(proc, rank: int) -> str:
    """The DesyncError rank ``rank``'s ledger logged (every rank logs it when it is found,
    also a rank that is then stopped, blocked in C++ or asleep)."""
    out = proc.stdout + proc.stderr
    found = re.findall(rf"overdrive: rank {rank}: DesyncError: (.*)", out)
    assert found, f"rank {rank} reported no DesyncError\n{out[-6000:]}"
    return found[0]


def check_fault(proc, results, ended, tmp_path, *, raised: list[int], names: list[str]):
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    fault = float((tmp_path / "fault").read_text())
    assert ended - fault < DESYNC_TIMEOUT + 5 + 15, f"the launch took {ended - fault:.1f} s " \
        "after the fault to end (torchrun's teardown included)"
    for rank in range(2):
        message = reported(proc, rank)
        for part in names:
            assert part in message, f"rank {rank}: {part!r} not in {message!r}"
    assert raised or any(r.get("error") == "DesyncError" for r in results.values()), results
    for rank in raised:  # these ranks raised it in their main thread, in time
        res = results[rank]
        assert res["error"] == "DesyncError", res
        assert res["since_fault"] < DESYNC_TIMEOUT + 5, res
        for part in names:
            assert part in res["message"], (part, res["message"])


@pytest.mark.dist
def test_a_rank_that_skips_one_all_reduce_is_named_on_every_rank(tmp_path):
    proc, results, ended = run("skip_reduce", tmp_path)
    check_fault(proc, results, ended, tmp_path, raised=[0, 1], names=[
        "ranks 0 and 1 issued different collectives",
        "rank 1 at optimizer step 6", "rank 0 entered rt.reduce",
        "rt.reduce called on ranks [0] only"])


@pytest.mark.dist
def test_a_rank_that_skips_a_ddp_bucket_all_reduce_is_named_on_every_rank(tmp_path):
    """DDP's buckets are reduced by torch inside backward; the ddp pass's comm hook
    reports each to the ledger, so one rank's missing bucket is a mismatch at the step."""
    proc, results, ended = run("skip_bucket", tmp_path)
    # the first rank to raise leaves the other blocked in a bucket's all-reduce (C++):
    # its ledger reports, then ends it
    check_fault(proc, results, ended, tmp_path, raised=[], names=[
        "ranks 0 and 1 issued different collectives",
        "rank 0 issued all_reduce float32[5] #5 in ddp bucket 0",
        "rank 1 at optimizer step 5 (after all_reduce #4)"])
    raisers = [r for r in results.values() if r.get("error") == "DesyncError"]
    assert min(r["since_fault"] for r in raisers) < DESYNC_TIMEOUT + 5, raisers


@pytest.mark.dist
def test_rt_save_on_one_rank_says_it_is_collective(tmp_path):
    proc, results, ended = run("save_alone", tmp_path)
    # rank 0 is blocked in DDP's all-reduce (C++): its ledger reports, then ends it
    check_fault(proc, results, ended, tmp_path, raised=[1], names=[
        "rt.save called on ranks [1] only; every rank must call it",
        "rank 0 is in rt.backward", "rank 1 is in rt.save"])


@pytest.mark.dist
@pytest.mark.slow
def test_rt_gather_for_metrics_on_one_rank_says_it_is_collective(tmp_path):
    proc, results, ended = run("gather_alone", tmp_path)
    check_fault(proc, results, ended, tmp_path, raised=[0, 1], names=[
        "rt.gather_for_metrics called on ranks [0] only; every rank must call it",
        "rank 0 entered rt.gather_for_metrics", "rank 1 at optimizer step 4"])


@pytest.mark.dist
@pytest.mark.slow
def test_a_rank_asleep_in_forward_is_caught_by_desync_timeout(tmp_path):
    proc, results, ended = run("sleep_forward", tmp_path)
    # rank 0 waits inside rt.reduce (sliced waits: it raises); rank 1 sleeps (ended)
    check_fault(proc, results, ended, tmp_path, raised=[0], names=[
        "stood still at different places", "desync_timeout=5.0",
        "rank 0 is in rt.reduce", "rank 1 has left rt.reduce"])


@pytest.mark.dist
@pytest.mark.parametrize("scenario,steps", [
    ("clean_short", 200),
    pytest.param("clean", 1000, marks=pytest.mark.slow),  # ~35 s of steps and 10 saves
])
def test_clean_steps_with_saves_and_evals_raise_nothing(tmp_path, scenario, steps):
    proc, results, _ = run(scenario, tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "DesyncError" not in proc.stdout + proc.stderr
    assert [results[r]["steps"] for r in range(2)] == [steps, steps]
