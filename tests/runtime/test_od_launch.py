"""od.launch: rank 0's value comes back; a raising or dying rank ends the launch within
10 s with an error naming it; functions that are not importable go by cloudpickle."""

from __future__ import annotations

import time

import pytest

import overdrive as od
from tests.runtime import launch_fns
from tests.helpers import require

pytestmark = pytest.mark.dist


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def test_returns_rank0_value_with_args_and_kwargs():
    out = od.launch(launch_fns.rank_and_world, 2, nproc=2, scale=10)
    assert out == {"rank": 0, "world": 2, "sum": 1.0, "value": 30}


def test_a_raising_rank_reraises_in_the_parent_within_10s():
    with pytest.raises(od.LaunchError, match="rank 1 raised") as info:
        od.launch(launch_fns.rank1_raises, nproc=2, timeout=120)
    raised_at = float(str(info.value.__cause__).split("boom on purpose at ")[1].split()[0])
    assert time.time() - raised_at < 10
    assert isinstance(info.value.__cause__, ValueError)
    assert "rank1_raises" in info.value.remote_traceback  # the rank's own traceback
    assert info.value.rank == 1


def test_a_rank_that_exits_ends_the_launch_within_10s(tmp_path, monkeypatch):
    stamp = tmp_path / "exit_stamp"
    monkeypatch.setenv("EXIT_STAMP", str(stamp))
    with pytest.raises(od.LaunchError, match="rank 1 exited with code 3"):
        od.launch(launch_fns.rank1_exits, nproc=2, timeout=120)
    assert time.time() - float(stamp.read_text()) < 10


def test_a_closure_goes_by_cloudpickle():
    require("cloudpickle")
    base = 7

    def local_fn(x):  # not importable: defined inside the test, like a notebook cell
        import os
        return base + x + int(os.environ["WORLD_SIZE"])

    assert od.launch(local_fn, 1, nproc=2) == 10


def test_accelerate_inside_launch_logs_one_row_per_step(tmp_path):
    losses = od.launch(launch_fns.accelerate_and_train, 3, str(tmp_path / "run"), nproc=2)
    assert len(losses) == 3


def test_bad_nproc_is_refused():
    with pytest.raises(od.OverdriveError, match="nproc"):
        od.launch(launch_fns.rank_and_world, nproc=0)


NOTEBOOK = """
import sys
{block}
import overdrive as od
from overdrive.spawn import _payload

def cell_fn(x):  # defined in an interactive __main__ (no file), like a notebook cell
    import os
    return x * 10 + int(os.environ["WORLD_SIZE"])

method, _ = _payload(cell_fn, (1,), {{}}, None)
print("method", method, type(_).__name__)
print("result", od.launch(cell_fn, 4, nproc=2))
"""


@pytest.mark.parametrize("cloudpickle", [True, False], ids=["cloudpickle", "fork"])
def test_a_function_of_an_interactive_session(cloudpickle):
    import subprocess
    import sys

    from tests.helpers import child_env

    if cloudpickle:
        require("cloudpickle")
    block = "" if cloudpickle else "sys.modules['cloudpickle'] = None  # not installed"
    proc = subprocess.run([sys.executable, "-c", NOTEBOOK.format(block=block)],
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = "spawn _Cloudpickled" if cloudpickle else "fork tuple"
    assert f"method {expected}" in proc.stdout and "result 42" in proc.stdout
