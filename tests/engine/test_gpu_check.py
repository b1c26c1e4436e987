"""benchmarks/gpu_check.py on a machine without CUDA: it imports, every section is a
function, and a run stops at once with exit status 2 and a message saying what to install."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import child_env

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("gpu_check")
    finally:
        sys.path.remove(str(BENCH))


def test_every_section_is_a_function(gpu_check):
    assert set(gpu_check.SECTION_FNS) == set(gpu_check.SECTIONS)
    for name, fn in gpu_check.SECTION_FNS.items():
        assert callable(fn) and fn.__name__ == f"section_{name}"
    assert callable(gpu_check.child_compile) and callable(gpu_check.child_fsdp_offload)
    assert gpu_check.LLAMA3_8B_SLICE.dim == 4096 and gpu_check.LLAMA3_8B_SLICE.ffn == 14336


def test_without_cuda_it_fails_fast_and_says_what_to_install(gpu_check):
    out = subprocess.run([sys.executable, str(BENCH / "gpu_check.py")], capture_output=True,
                         text=True, env=child_env(), timeout=120)  # child_env hides GPUs
    assert out.returncode == gpu_check.NO_CUDA_EXIT == 2
    assert "gpu_check.py needs a CUDA GPU" in out.stderr
    assert gpu_check.CUDA_INSTALL in out.stderr and "--smoke" in out.stderr
    assert out.stdout == ""


def test_casting_section_runs_on_the_cpu_at_toy_size(gpu_check):
    """The one section cheap enough to run here (the rest: `gpu_check.py --smoke`)."""
    cfg = gpu_check.settings(smoke=True)
    res = gpu_check.section_casting(cfg)
    assert res["kernels"]["cast-auto"]["kernel"] == "copy"  # a CPU
    row = res["by_tokens"]["16"]
    assert set(row) == {"bf16", "cast-auto", "cast-copy"}
    assert row["bf16"]["vs_bf16"] == 1.0 and 0 < row["cast-copy"]["logits_rel_err"] < 0.2


def test_targets_are_read_from_the_sections(gpu_check):
    sections = {
        "fp8": {"variants": {"bf16": {"speedup_vs_bf16": 1.0},
                             "fp8-torchao-rowwise": {"speedup_vs_bf16": 1.3},
                             "fp8-te": {"skipped": "not installed"}}},
        "compile": {"cold_regional_vs_full": 0.4, "steady_regional_vs_full": 1.02},
        "casting": {"by_tokens": {"16": {"cast-auto": {"vs_bf16": 0.9, "logits_rel_err": 0.05}},
                                  "2048": {"cast-auto": {"vs_bf16": 1.2,
                                                         "logits_rel_err": 0.05}}},
                    "kernels": {"cast-auto": {"kernel": "scaled_mm", "machine": "cuda sm_90"}}},
        "offload": {"error": "boom"}}
    rows = {r["name"]: r for r in gpu_check.targets(sections)}
    assert rows["fp8-torchao-rowwise step speedup vs bf16"]["met"] is True
    assert rows["cold start regional / full"]["met"] is True
    assert rows["casting forward / bf16 (2048 tokens; kernel scaled_mm, cuda sm_90)"]["met"] \
        is False
    assert not any("fp8-te" in n or "offload" in n for n in rows)
