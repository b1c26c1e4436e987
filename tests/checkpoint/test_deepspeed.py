"""A DeepSpeed checkpoint: its files are fsynced before the rename and read without
running code (weights_only), and only the files the manifest lists are read."""

import subprocess
import sys

import pytest

from tests.helpers import ROOT, child_env, read_json, require, run_torchrun

require("deepspeed")


@pytest.mark.dist
def test_deepspeed_files_fsynced_and_read_weights_only(tmp_path):
    script = ROOT / "tests" / "checkpoint" / "scripts" / "deepspeed_files.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=child_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = read_json(tmp_path / "deepspeed_files.json")
    assert any(n.endswith("optim_states.pt") for n in res["ds_files"]), res
    missing = [n for n in res["ds_files"] + ["deepspeed", "deepspeed/state"]
               if n not in res["synced"]]
    assert not missing, missing  # every DeepSpeed file and directory, before the rename
    assert res["clean"] is None and res["restored"], res  # weights_only admits DeepSpeed's own
    assert res["tampered"].startswith("CheckpointCorrupt") and "posix.system" in res["tampered"]
    assert "weights_only=True" in res["tampered"] and not res["pwned"], res
    assert res["unlisted"].startswith("CheckpointCorrupt"), res
    assert "manifest does not list: deepspeed/state/extra.pt" in res["unlisted"], res


@pytest.mark.dist
def test_zero3_state_dict_and_export_hold_full_weights(tmp_path):
    run_torchrun(ROOT / "tests" / "checkpoint" / "scripts" / "zero3_state.py", 2,
                 str(tmp_path), tmp_path=tmp_path)
    res = read_json(tmp_path / "zero3.json")
    assert [0] in res["partition_shapes"], res  # really partitioned: empty local data
    assert res["keys"] and res["shapes"], res
    assert res["before_equals_initial"] and res["trained"], res
    assert res["after_equals_deepspeed"], res  # DeepSpeed's own consolidated state dict
    assert res["export_equals_state_dict"], res
