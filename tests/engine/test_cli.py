"""The overdrive command: inspect and env."""

import json
import subprocess
import sys

from tests.helpers import ROOT, child_env


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "overdrive", *args], capture_output=True,
                          text=True, env=child_env(), cwd=ROOT, timeout=120)


def test_env_reports_versions_and_backends():
    out = run_cli("env", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["torch"].startswith("2.") and info["cuda_available"] in (True, False)
    assert "torchao" in info and "deepspeed" in info and "transformer_engine" in info
    assert info["distributed_backends"]["gloo"] is True


def test_inspect_prints_the_report():
    out = run_cli("inspect", "overdrive.models.llama:llama3_8b", "--world-size", "1")
    assert out.returncode == 0, out.stderr
    assert "dry run" in out.stdout and "32 under 'layers'" in out.stdout
    assert "memory per rank (world size 1)" in out.stdout


def test_inspect_plan_error_is_a_clean_message():
    out = run_cli("inspect", "overdrive.models.llama:tiny", "--plan", "fsdp+warp")
    assert out.returncode == 2
    assert "PlanError" in out.stderr and "unknown preset token 'warp'" in out.stderr
    assert "Traceback" not in out.stderr
