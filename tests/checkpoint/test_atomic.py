"""SIGKILL inside a save leaves the previous checkpoint intact and loadable at its path, and
nothing half-written under the new one."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckpt_util import CountingLoader, make_model, manual_runtime
from tests.helpers import ROOT, child_env

SCRIPT = Path(__file__).parent / "scripts" / "save_then_hang.py"


def _kill_at(tmp_path, stage, target):
    signal_file = tmp_path / "reached"
    env = child_env(HANG_AT=f"{stage}:{signal_file}")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path), target], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not signal_file.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the save never reached the hook"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _load_previous(tmp_path):
    """A fresh runtime loading step-1: the previous checkpoint, complete and bit-exact."""
    model = make_model(2, seed=3)
    rt = manual_runtime(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    rt._loaders.append(CountingLoader())
    assert rt.load(tmp_path / "step-1")["step"] == 1
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    return rt


@pytest.mark.parametrize("stage,target", [("write", "new"), ("rename", "new"),
                                          ("rename", "overwrite")])
def test_kill_during_save_keeps_previous_checkpoint(tmp_path, stage, target):
    _kill_at(tmp_path, stage, target)
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert names == ["expected.pt", "reached", "step-1"]  # step-2 never appears half-written
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and ".tmp-" in leftovers[0]

    rt = _load_previous(tmp_path)
    rt.save(tmp_path / ("step-1" if target == "overwrite" else "step-2"))
    # the next save of that path removed the dead sibling
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_kill_between_the_renames_of_an_overwrite_still_loads_the_previous(tmp_path):
    _kill_at(tmp_path, "swap", "overwrite")  # step-1 renamed aside, the new one not yet in
    assert not (tmp_path / "step-1").exists()
    hidden = sorted(p.name.rsplit("-", 1)[0] for p in tmp_path.iterdir() if p.name.startswith("."))
    assert hidden == [".step-1.old", ".step-1.tmp"], hidden

    rt = _load_previous(tmp_path)
    rt.save(tmp_path / "step-2")  # another path: step-1's leftovers are not its business
    assert rt.load(tmp_path / "step-1")["step"] == 1
    rt.save(tmp_path / "step-1")  # the next save of the path puts it back, then replaces it
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert rt.load(tmp_path / "step-1")["step"] == 1
