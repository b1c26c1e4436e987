"""`overdrive export CHECKPOINT OUT`: an rt.save checkpoint → a transformers directory,
in a fresh process, without the training script (issue 21)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import overdrive as od
from overdrive.runtime.checkpoint_export import export_checkpoint
from tests.helpers import ROOT, child_env, require, run_torchrun

SCRIPT = ROOT / "tests" / "checkpoint" / "scripts" / "train_hf_and_save.py"


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "overdrive", *args], capture_output=True,
                          text=True, env=child_env(), cwd=ROOT, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def main(capsys, *args):
    """The command in this process (the fresh-process export is the 2-rank test's)."""
    from overdrive.cli import main as cli_main

    code = cli_main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def trained(tmp_path, plan):
    run_torchrun(SCRIPT, 2, str(tmp_path), plan, tmp_path=tmp_path)
    return tmp_path / "ck", torch.load(tmp_path / "logits.pt")


def reloaded_logits(directory, probe, **kw):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(directory), **kw)
    with torch.no_grad():
        return model(input_ids=probe).logits


def check_export(tmp_path, plan):
    ck, run = trained(tmp_path, plan)
    cli("export", str(ck), str(tmp_path / "hf"))
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    torch.testing.assert_close(reloaded_logits(tmp_path / "hf", run["probe"]), run["logits"],
                               rtol=1e-5, atol=1e-5)
    return ck, run


@pytest.mark.dist
def test_export_of_a_two_rank_fsdp_checkpoint_loads_with_from_pretrained(tmp_path):
    ck, run = check_export(tmp_path, "fsdp")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # tied once
    # dtype bf16, sharded output (in this process: the fresh-process export is the one above)
    export_checkpoint(ck, tmp_path / "bf16", dtype="bf16", max_shard_size="20KB")
    assert (tmp_path / "bf16" / "model.safetensors.index.json").is_file()
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    logits = reloaded_logits(tmp_path / "bf16", run["probe"])
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), run["logits"], rtol=0.1, atol=0.1)


@pytest.mark.dist
@pytest.mark.slow
def test_export_of_a_two_rank_tensor_parallel_checkpoint(tmp_path):
    check_export(tmp_path, "fsdp+tp")


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


@pytest.mark.dist
@pytest.mark.slow
def test_export_of_a_two_rank_zero3_checkpoint_reads_weights_only(tmp_path):
    """DeepSpeed's zero_to_fp32 consolidates the partitions; every file it reads goes
    through weights_only=True: a pickled callable in a (manifest-consistent) file is
    refused, not run."""
    require("deepspeed")
    from overdrive.runtime import checkpoint_files as cf

    ck, _ = check_export(tmp_path, "zero3")
    optim = next(ck.glob("deepspeed/state/*optim_states.pt"))
    state = torch.load(optim, weights_only=False)
    state["optimizer_state_dict"]["evil"] = Evil()
    torch.save(state, optim)
    manifest = json.loads((ck / cf.MANIFEST).read_text())
    name = optim.relative_to(ck).as_posix()
    manifest["files"][name] = cf.describe_files(ck, [name])[name]
    (ck / cf.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(od.CheckpointCorrupt, match="weights_only=True"):
        export_checkpoint(ck, tmp_path / "evil")
    assert not (ROOT / "PWNED").exists() and not (tmp_path / "PWNED").exists()
    assert not (tmp_path / "evil").exists()


def _single_process_checkpoint(tmp_path):
    from overdrive.models.llama import tiny

    rt = od.accelerate(tiny(2, vocab_size=64, dim=32, n_heads=2, max_seq_len=16),
                       optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    rt.save(tmp_path / "ck")
    return rt, tmp_path / "ck"


def test_export_without_a_recorded_config_writes_weights_and_takes_config(tmp_path):
    rt, ck = _single_process_checkpoint(tmp_path)
    export_checkpoint(ck, tmp_path / "w")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["model.safetensors"]
    (tmp_path / "cfg.json").write_text(json.dumps({"model_type": "custom", "dim": 32}))
    export_checkpoint(ck, tmp_path / "c", config=tmp_path / "cfg.json")
    written = json.loads((tmp_path / "c" / "config.json").read_text())
    assert written["dim"] == 32 and written["dtype"] == "float32"
    from overdrive.models.llama import tiny

    other = tiny(2, vocab_size=64, dim=32, n_heads=2, max_seq_len=16)
    other.init_weights(seed=5)
    od.load_weights(other, tmp_path / "w")
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(),
                                                  rt.model.state_dict().values()))


def test_export_refusals(tmp_path, capsys):
    _, ck = _single_process_checkpoint(tmp_path)
    code, _, err = main(capsys, "export", str(tmp_path / "nothing"), str(tmp_path / "o"))
    assert code == 2 and "NotACheckpoint" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(od.OverdriveError, match="exists and is not empty.*--overwrite"):
        export_checkpoint(ck, tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    export_checkpoint(ck, tmp_path / "full", overwrite=True)
    assert not (tmp_path / "full" / "x").exists()
    with pytest.raises(od.OverdriveError, match="dtype='int4' is not valid"):
        export_checkpoint(ck, tmp_path / "o", dtype="int4")
    victim = next(p for p in sorted(ck.iterdir()) if p.name.endswith(".distcp"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    code, _, err = main(capsys, "export", str(ck), str(tmp_path / "o"))
    assert code == 2 and "CheckpointCorrupt" in err and "crc32" in err
    assert not (tmp_path / "o").exists()


def test_inspect_builds_a_transformers_model_from_a_config_file(tmp_path, capsys):
    config = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, out, _ = main(capsys, "inspect", "--config", str(tmp_path / "config.json"), "--arch",
                        "LlamaForCausalLM", "--plan", "fsdp", "--world-size", "4")
    assert code == 0 and "LlamaForCausalLM" in out and "3 under 'model.layers'" in out
    assert "memory per rank (world size 4)" in out
    with pytest.raises(SystemExit, match="names no architectures; pass --arch"):
        main(capsys, "inspect", "--config", str(tmp_path), "--world-size", "2")
    with pytest.raises(SystemExit, match="no model class 'NoSuchModel'"):
        main(capsys, "inspect", "--config", str(tmp_path), "--arch", "NoSuchModel")
