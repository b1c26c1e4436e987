"""`overdrive launch`: the torchrun command it builds, a failing rank ending the job, and
the example training script on 2 CPU processes."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers import ROOT, child_env
from overdrive.cli import main


def test_dry_run_prints_the_single_node_command(capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert main(["launch", "--dry-run", "--nproc", "2", "train.py", "--steps", "3"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("OMP_NUM_THREADS=")
    assert out.endswith("-m torch.distributed.run --standalone --nproc-per-node=2 "
                        "--max-restarts=0 train.py --steps 3")


def test_dry_run_multi_node_uses_elastic_rendezvous(capsys):
    main(["launch", "--dry-run", "--nproc", "8", "--nnodes", "2", "--node-rank", "1",
          "--rdzv-endpoint", "node0:29500", "train.py"])
    out = capsys.readouterr().out
    for part in ("--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29500",
                 "--node-rank=1", "--nproc-per-node=8"):
        assert part in out
    assert "--standalone" not in out


def test_multi_node_without_endpoint_is_refused():
    with pytest.raises(SystemExit, match="needs --rdzv-endpoint"):
        main(["launch", "--dry-run", "--nnodes", "2", "train.py"])


FAILING = """
import time
import torch
from overdrive.plan_spec import Plan
from overdrive.rewrite.report import Report
from overdrive.runtime.runtime import Runtime
from overdrive.runtime.state import make_env

plan, env = make_env(Plan())
rt = Runtime(torch.nn.Linear(2, 2), plan=plan, report=Report([]), env=env)
rt.barrier()
if rt.rank == 1:
    print(f"raising at {time.time()}", flush=True)
    raise ValueError("boom on purpose")
rt.reduce(torch.ones(1), "sum")  # rank 0 waits here for a rank that is gone
time.sleep(600)
"""


@pytest.mark.dist
def test_a_raising_rank_ends_the_job_promptly_and_is_named(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(FAILING))
    # the collective timeout is long (120 s): the job must end well before it, because
    # torchrun stops the other rank once one has failed (startup time, which a loaded
    # machine stretches, is not counted)
    proc = subprocess.run([sys.executable, "-m", "overdrive.cli", "launch", "--nproc", "2",
                           str(script)], env=child_env(OVERDRIVE_PG_TIMEOUT="120"),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    ended = time.time()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    raised = float(re.search(r"raising at ([0-9.]+)", out).group(1))
    assert ended - raised < 60, f"ended {ended - raised:.0f}s after the raise\n{out}"
    # torch names the rank on every line of its traceback, torchrun's summary names it too
    # (no exception hook of overdrive's: torchrun stops the other ranks)
    assert "[rank1]: ValueError: boom on purpose" in out
    assert "rank      : 1" in out


@pytest.mark.dist
def test_example_trains_on_two_processes(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "overdrive.cli", "launch", "--nproc", "2",
                           str(ROOT / "examples" / "train_llm.py"), "--steps", "3"],
                          env=child_env(), capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    losses = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 3, out  # printed by rank 0 only


@pytest.mark.parametrize("bad", ["abc", "0", "-2", "1.5"])
def test_a_bad_nproc_is_an_argparse_error_not_a_traceback(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["launch", "--dry-run", "--nproc", bad, "train.py"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --nproc: {bad!r} is not a number of processes" in err
    assert "Traceback" not in err
