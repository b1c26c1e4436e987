"""Exact resume: 6 steps saving after step 3 == fresh processes that load and run 4-6."""

import pytest

import subprocess
import sys

from tests.helpers import ROOT, child_env, read_json, run_torchrun

SCRIPT = ROOT / "tests" / "checkpoint" / "scripts" / "resume.py"


def _run(tmp_path, nproc, *args):
    if nproc > 1:
        run_torchrun(SCRIPT, nproc, *args, tmp_path=tmp_path)
        return
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], env=child_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def _check_resume(tmp_path, mode, nproc):
    _run(tmp_path, nproc, mode, "full", str(tmp_path))
    _run(tmp_path, nproc, mode, "resume", str(tmp_path))
    for r in range(nproc):
        full = read_json(tmp_path / f"full-rank{r}.json")
        resumed = read_json(tmp_path / f"resume-rank{r}.json")
        assert resumed["step"] == full["step"] == 6
        assert resumed["batches"][3:] == full["batches"][3:]
        for a, b in zip(full["losses"][3:], resumed["losses"][3:]):
            assert abs(a - b) <= 1e-6, (r, full["losses"], resumed["losses"])
    if nproc > 1:  # ranks saw different data: per-rank RNG/loader state was restored
        assert read_json(tmp_path / "full-rank0.json")["batches"] != \
            read_json(tmp_path / "full-rank1.json")["batches"]


@pytest.mark.dist
def test_exact_resume_single_process_fp16_scaler(tmp_path):
    _check_resume(tmp_path, "manual-fp16", 1)


@pytest.mark.dist
@pytest.mark.slow  # fsdp and deepspeed keep 2-rank resume in make test
def test_exact_resume_two_ranks_replicated(tmp_path):
    _check_resume(tmp_path, "manual", 2)


@pytest.mark.dist
@pytest.mark.slow  # fsdp and deepspeed keep 2-rank resume in make test
def test_exact_resume_ddp(tmp_path):
    _check_resume(tmp_path, "ddp", 2)


@pytest.mark.dist
def test_exact_resume_fsdp(tmp_path):
    _check_resume(tmp_path, "fsdp", 2)


@pytest.mark.dist
def test_exact_resume_fp16_scaling(tmp_path):
    _check_resume(tmp_path, "fp16", 1)


@pytest.mark.dist
def test_exact_resume_deepspeed(tmp_path):
    _check_resume(tmp_path, "deepspeed", 2)
