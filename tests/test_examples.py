"""Every script in examples/ runs on CPU as written (train_llm.py is run by
tests/runtime/test_launch.py and by `make demo`)."""

import subprocess
import sys

import pytest

from tests.helpers import ROOT, child_env

EXAMPLES = ROOT / "examples"


def run(*cmd: str, cwd) -> str:
    proc = subprocess.run([sys.executable, *cmd], env=child_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return proc.stdout


def test_custom_pass(tmp_path):
    out = run(str(EXAMPLES / "custom_pass.py"), cwd=tmp_path)
    assert "freeze_embeddings" in out and "embed_tokens: frozen" in out
    assert "step 2: loss" in out


def test_inference_fp8_casting(tmp_path):
    out = run(str(EXAMPLES / "inference_fp8_casting.py"), cwd=tmp_path)
    assert "casting" in out and "MiB (bf16) ->" in out and "logits relative error" in out


def test_inspect_plan_on_64_ranks(tmp_path):
    out = run(str(EXAMPLES / "inspect_plan.py"), cwd=tmp_path)
    assert "world size 64" in out and "model still on meta" in out


@pytest.mark.dist
def test_finetune_transformers_under_fsdp_tp_exports_and_reloads(tmp_path):
    out = run("-m", "overdrive.cli", "launch", "--nproc", "2",
              str(EXAMPLES / "finetune_transformers.py"), "--plan", "fsdp+tp",
              "--out", str(tmp_path / "ft"), cwd=tmp_path)
    assert "tensor_parallel" in out and "step 4: loss" in out
    assert "reloaded with from_pretrained" in out
    assert (tmp_path / "ft" / "model.safetensors").is_file()


@pytest.mark.dist
def test_distill_and_infer_then_export_and_inspect_offline(tmp_path):
    out = run("-m", "overdrive.cli", "launch", "--nproc", "2",
              str(EXAMPLES / "distill_and_infer.py"), "--out", str(tmp_path / "d"), cwd=tmp_path)
    assert "student: fsdp; teacher: fsdp; one mesh: True" in out
    assert "early stop" in out and "EMA restored by rt.load: True" in out
    assert "5 answers for 5 prompts" in out
    run("-m", "overdrive.cli", "export", str(tmp_path / "d" / "ck"), str(tmp_path / "hf"),
        "--dtype", "bf16", cwd=tmp_path)
    out = run("-m", "overdrive.cli", "inspect", "--config", str(tmp_path / "hf" / "config.json"),
              "--plan", "fsdp", "--world-size", "8", cwd=tmp_path)
    assert "LlamaForCausalLM" in out and "memory per rank (world size 8)" in out


@pytest.mark.dist
@pytest.mark.slow
def test_distill_and_infer_under_ddp_with_a_powersgd_hook(tmp_path):
    out = run("-m", "overdrive.cli", "launch", "--nproc", "2",
              str(EXAMPLES / "distill_and_infer.py"), "--plan", "ddp", "--comm-hook",
              "powersgd", "--out", str(tmp_path / "d"), cwd=tmp_path)
    assert "student: ddp; teacher: ddp" in out and "EMA restored by rt.load: True" in out


def test_big_model_inference(tmp_path):
    out = run(str(EXAMPLES / "big_model_inference.py"), "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert "[offload] device map" in out and "same as in memory: True" in out
    assert (tmp_path / "b" / "offload" / "index.json").is_file()
