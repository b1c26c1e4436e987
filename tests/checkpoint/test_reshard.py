"""Saved on 2 ranks (FSDP2 shards), loaded on 1 and on 4 (DCP resharding)."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, child_env, read_json, run_torchrun

SCRIPT = ROOT / "tests" / "checkpoint" / "scripts" / "reshard.py"


@pytest.mark.dist
def test_fsdp_checkpoint_reshards_2_to_1_and_2_to_4(tmp_path):
    run_torchrun(SCRIPT, 2, "save", str(tmp_path), tmp_path=tmp_path)
    # each rank wrote its own shards, one file per writer thread (the cores it has)
    threads = max(1, min(4, (os.cpu_count() or 1) // 2))
    assert sorted(p.name for p in (tmp_path / "ck").glob("*.distcp")) == [
        f"__{rank}_{i}.distcp" for rank in range(2) for i in range(threads)]
    proc = subprocess.run([sys.executable, str(SCRIPT), "load", str(tmp_path)], env=child_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run_torchrun(SCRIPT, 4, "load", str(tmp_path), tmp_path=tmp_path)
    for m in (1, 4):
        res = read_json(tmp_path / f"load-{m}.json")
        assert res["keys"] and res["n"] > 20, res
        assert res["max_diff"] == 0.0, res  # model and AdamW state, bit for bit
        assert res["step"] == 2
        assert res["export_diff"] == 0.0 and res["export_logits_equal"], res
        # FSDP2 shards are dim-0 pieces: every rank reads each of its pieces (whole saved
        # shards or parts of them) straight into its local shard's storage
        direct, copied, unpickled = res["reads"]
        assert direct >= res["n"] and copied == 0 and unpickled == 0, res
