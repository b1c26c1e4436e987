"""The collective ledger on 2 gloo ranks: a rank that skips a collective (an rt.reduce, or
DDP's or FSDP2's gradient sync by skipping a backward or a synced micro-step), whose
collective fails in the backend while the ledgers disagree, calls rt.save
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


def run(scenario: str, tmp_path: Path, pg_timeout: int = 120):
    proc = run_torchrun(SCRIPT, 2, scenario, str(tmp_path), tmp_path=tmp_path, check=False,
                        timeout=240, env=child_env(OVERDRIVE_PG_TIMEOUT=str(pg_timeout)))
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


def check_fault(proc, results, ended, tmp_path, *, raised: list[int] | None,
                names: list[str]):
    """``raised``: the ranks that must raise DesyncError in their main thread in time;
    [] — at least one rank does; None — every rank may be blocked in C++ (each reports
    and exits)."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    fault = float((tmp_path / "fault").read_text())
    assert ended - fault < DESYNC_TIMEOUT + 5 + 15, f"the launch took {ended - fault:.1f} s " \
        "after the fault to end (torchrun's teardown included)"
    for rank in range(2):
        message = reported(proc, rank)
        for part in names:
            assert part in message, f"rank {rank}: {part!r} not in {message!r}"
    assert raised is None or raised or \
        any(r.get("error") == "DesyncError" for r in results.values()), results
    for rank in raised or []:  # these ranks raised it in their main thread, in time
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


def ledgers(tmp_path: Path) -> list[list[str]]:
    """Each rank's ledger entries just before the fault (written by the scenario)."""
    return [json.loads((tmp_path / f"ledger{r}.json").read_text()) for r in range(2)]


@pytest.mark.dist
def test_a_rank_that_skips_a_ddp_backward_is_named_on_every_rank(tmp_path):
    """DDP reduces its buckets in C++ inside backward; rt.backward notes each synced
    backward as one ledger entry. Rank 1 skips one and steps, with the default step
    metrics on: its step waits for rank 0 in the store before the step metrics'
    all-reduce could meet rank 0's gradient all-reduce (gloo aborts on that)."""
    proc, results, ended = run("skip_bucket", tmp_path)
    for entries in ledgers(tmp_path):
        assert entries[:4] == [
            "issued all_reduce float32[5] #1 in ddp gradient sync (2 gradients)",
            "at optimizer step 1 (after all_reduce #1)",
            "issued all_reduce float64[4] #2 in step metrics",
            "issued all_reduce float32[5] #3 in ddp gradient sync (2 gradients)"], entries
    # rank 1 raises; rank 0, blocked in the gradient all-reduce (C++), reports and exits
    check_fault(proc, results, ended, tmp_path, raised=[1], names=[
        "ranks 0 and 1 issued different collectives",
        "rank 0 issued all_reduce float32[5] #9 in ddp gradient sync (2 gradients)",
        "rank 1 at optimizer step 5 (after all_reduce #8)"])
    assert "SIGABRT" not in proc.stdout + proc.stderr


@pytest.mark.dist
def test_a_rank_that_skips_an_fsdp_backward_is_named_on_every_rank(tmp_path):
    """FSDP2's all-gathers and reduce-scatters: one entry per forward of the root (a
    pre-hook) and one per backward (rt.backward)."""
    proc, results, ended = run("fsdp_skip_backward", tmp_path)
    for entries in ledgers(tmp_path):
        assert entries[:3] == [
            "issued all_gather float32[49] #1 in fsdp forward (1 unit)",
            "issued all_gather+reduce_scatter float32[49] #2 in fsdp backward (1 unit)",
            "at optimizer step 1 (after all_gather+reduce_scatter #2)"], entries
    check_fault(proc, results, ended, tmp_path, raised=[1], names=[
        "ranks 0 and 1 issued different collectives",
        "rank 0 issued all_gather+reduce_scatter float32[49] #14 in fsdp backward (1 unit)",
        "rank 1 at optimizer step 5 (after all_gather #13)"])
    assert "SIGABRT" not in proc.stdout + proc.stderr


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("scenario,names", [
    ("ddp_skip_micro", ["rank 0 at optimizer step 3 (2 micro-steps, after all_reduce #5)",
                        "rank 1 at optimizer step 3 (4 micro-steps, after all_reduce #5)"]),
    ("fsdp_skip_micro", [
        "rank 0 issued all_gather+reduce_scatter float32[49] #14 in fsdp backward (1 unit)",
        "rank 1 issued all_gather float32[49] #14 in fsdp backward, no gradient sync"]),
])
def test_a_rank_that_skips_a_synced_micro_step_is_named(tmp_path, scenario, names):
    """grad_accum=2: rank 1 enters the synced micro-step of step 3 and skips it. Under DDP
    the gradient all-reduces still pair up (one micro-step apart): the micro-steps each
    step took are in its hash. Under FSDP2 the next micro-step's collectives differ (both
    ranks may then be blocked inside FSDP's collectives: each reports and exits)."""
    proc, results, ended = run(scenario, tmp_path)
    check_fault(proc, results, ended, tmp_path, raised=None,
                names=["ranks 0 and 1 issued different collectives", *names])


@pytest.mark.dist
def test_a_backend_error_in_a_collective_becomes_a_desync_error(tmp_path):
    """Rank 1 skips a backward and works outside overdrive for 8 s; rank 0's gradient
    all-reduce hits the process-group timeout (3 s, below desync_timeout): gloo's
    RuntimeError in rt.backward asks the other rank's ledger, which disagrees, and
    DesyncError (from the RuntimeError) names both sides."""
    proc, results, ended = run("backend_error", tmp_path, pg_timeout=3)
    check_fault(proc, results, ended, tmp_path, raised=[0], names=[
        "a collective failed on rank 0", "Timed out",
        "rank 0 issued all_reduce float32[5] #9 in ddp gradient sync (2 gradients), "
        "rank 1 had issued nothing more"])
    assert results[0]["cause"].startswith("RuntimeError: "), results[0]
    assert results[0]["since_fault"] < DESYNC_TIMEOUT, results[0]  # not the stall check


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


def test_a_backend_error_with_ledgers_that_agree_is_left_as_it_is():
    """diagnose's rule (runtime/ledger.py): the ranks in the same collective, with the same
    entries → no finding (the caller re-raises gloo's error untouched); a rank elsewhere or
    with other entries → a finding; only backend errors are diagnosed at all."""
    from overdrive.runtime.ledger import _backend_error, _failed_finding, _slice_expired

    entries = [(0, "issued all_reduce float32[1] #1 in rt.reduce", None),
               (1, "at optimizer step 1 (after all_reduce #1)", None)]
    pos = [1, 1, "", 7, "at optimizer step 1", "all_reduce", 9]
    dumps = {0: {"rank": 0, "pos": pos, "entries": entries},
             1: {"rank": 1, "pos": list(pos), "entries": list(entries)}}
    err = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer")
    assert _failed_finding(0, dumps, err) is None
    assert _failed_finding(0, {0: dumps[0]}, err) is None  # the other rank did not answer
    behind = {"rank": 1, "pos": [1, 0, "", 7, "at optimizer step 1", "all_reduce", 3],
              "entries": entries[:1]}
    finding = _failed_finding(0, {0: dumps[0], 1: behind}, err)
    assert finding["reason"] == "failed" and finding["ranks"] == [0, 1], finding
    assert _backend_error(err) and not _backend_error(RuntimeError("mat1 and mat2 shapes"))
    assert _slice_expired(RuntimeError("Operation timed out!"))
    assert not _slice_expired(RuntimeError(
        "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv"))
