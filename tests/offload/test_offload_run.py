"""Disk offload runs forward and generate exactly like the unoffloaded model, within its
memory budget; weights= streams a checkpoint into a meta model (also without offload),
checks keys first, and reuses a matching offload folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import overdrive as od
from overdrive.errors import CheckpointMismatch, PlanError
from tests.helpers import assert_untouched, child_env, snapshot
from tests.offload.offload_common import block_bytes, build, llama_config, model_bytes

MARGIN = 48 * 2**20  # allocator slack, activations, the KV cache, Python objects


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A reference Llama and its save_pretrained directory."""
    torch.manual_seed(0)
    ref = build(llama_config())
    path = tmp_path_factory.mktemp("export")
    ref.save_pretrained(path)
    return ref, path


def _offload_plan(total: int, folder, prefetch: int = 1) -> od.Plan:
    return od.Plan(offload=od.Offload(max_memory={"cpu": total // 4, "disk": "10GiB"},
                                      offload_folder=str(folder), prefetch=prefetch))


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_disk_offload_forward_and_generate_equal(exported, tmp_path, prefetch):
    ref, path = exported
    model = build(ref.config, meta=True)
    rt = od.accelerate(model, _offload_plan(model_bytes(ref), tmp_path, prefetch), weights=path)
    details = rt.report.passes[0].details
    assert details["bytes_per_device"]["disk"] > 2 * details["bytes_per_device"]["cpu"]
    ids = torch.randint(0, ref.config.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref.generate(ids, max_new_tokens=6, do_sample=False))
    # between forwards, offloaded weights hold one element each
    layer = model.model.layers[3].self_attn.q_proj.weight
    assert layer.untyped_storage().nbytes() == layer.element_size()
    assert (tmp_path / "index.json").is_file()


def test_a_write_to_a_loaded_weight_never_reaches_the_offload_folder(exported, tmp_path):
    """On the CPU a loaded weight views the mapped offload file (copy-on-write): a write
    into it lasts one forward, and neither the file nor the next forward sees it."""
    ref, path = exported
    model = build(ref.config, meta=True)
    od.accelerate(model, _offload_plan(model_bytes(ref), tmp_path), weights=path)
    files = {f: f.read_bytes() for f in tmp_path.glob("*.safetensors")}
    layer = model.model.layers[3]

    def write(module, args):
        module.self_attn.q_proj.weight.data.add_(1.0)

    handle = layer.register_forward_pre_hook(write)
    ids = torch.randint(0, ref.config.vocab_size, (1, 9))
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, ref(ids).logits)
        handle.remove()
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert {f: f.read_bytes() for f in files} == files


def test_offload_of_an_in_memory_model_with_tied_weights(tmp_path):
    torch.manual_seed(0)
    ref = build(llama_config(tied=True))
    model = build(llama_config(tied=True))
    model.load_state_dict(ref.state_dict())
    od.accelerate(model, _offload_plan(model_bytes(ref), tmp_path))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one parameter
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_offload_folder_is_reused_when_it_matches(exported, tmp_path):
    ref, path = exported
    plan = _offload_plan(model_bytes(ref), tmp_path)
    first = od.accelerate(build(ref.config, meta=True), plan, weights=path)
    assert first.report.passes[0].details["offload_folder_reused"] is False
    stamp = (tmp_path / "index.json").stat().st_mtime_ns
    model = build(ref.config, meta=True)
    second = od.accelerate(model, plan, weights=path)
    assert second.report.passes[0].details["offload_folder_reused"] is True
    assert (tmp_path / "index.json").stat().st_mtime_ns == stamp
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    bf16 = od.Plan(offload=od.Offload(max_memory={"cpu": model_bytes(ref) // 4, "disk": "1GiB"},
                                      offload_folder=str(tmp_path), dtype="bfloat16"))
    third = od.accelerate(build(ref.config, meta=True), bf16, weights=path)
    assert third.report.passes[0].details["offload_folder_reused"] is False


def test_weights_stream_into_a_meta_model_without_offload(exported):
    ref, path = exported
    model = build(ref.config, meta=True)
    od.accelerate(model, None, weights=path)
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_rt_export_directory_loads_into_offload(tmp_path):
    torch.manual_seed(0)
    ref = build(llama_config())
    rt = od.accelerate(build(llama_config()), None)
    rt.model.load_state_dict(ref.state_dict())
    rt.export(tmp_path / "exp", max_shard_size="300KB")
    assert (tmp_path / "exp" / "model.safetensors.index.json").is_file()
    model = build(ref.config, meta=True)
    od.accelerate(model, _offload_plan(model_bytes(ref), tmp_path / "off"),
                  weights=tmp_path / "exp")
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def _edited_export(path: Path, tmp: Path, drop: str | None, add: str | None) -> Path:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path / "model.safetensors"))
    if drop:
        sd.pop(drop)
    if add:
        sd[add] = torch.zeros(3)
    out = tmp / "edited"
    out.mkdir()
    save_file(sd, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("drop,add", [("model.layers.2.mlp.up_proj.weight", None),
                                      (None, "model.layers.2.extra"),
                                      ("lm_head.weight", "model.unknown")])
@pytest.mark.parametrize("plan_kind", ["offload", "none"])
def test_mismatched_checkpoint_is_refused_untouched(exported, tmp_path, drop, add, plan_kind):
    ref, path = exported
    bad = _edited_export(path, tmp_path, drop, add)
    model = build(ref.config, meta=True)
    before = snapshot(model)
    plan = _offload_plan(model_bytes(ref), tmp_path / "off") if plan_kind == "offload" else None
    with pytest.raises(CheckpointMismatch) as err:
        od.accelerate(model, plan, weights=bad)
    for key in filter(None, (drop, add)):
        assert key in str(err.value)
    assert_untouched(model, before)
    assert not (tmp_path / "off").exists()


def test_weights_refused_with_fsdp_and_missing_path(exported, tmp_path):
    ref, path = exported
    model = build(ref.config, meta=True)
    with pytest.raises(PlanError, match="weights="):
        od.accelerate(model, "fsdp", weights=path)
    with pytest.raises(od.NotACheckpoint):
        od.accelerate(model, None, weights=tmp_path / "nothing")


def _child(export: Path, mode: str, budget: int, folder: Path) -> dict:
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(root / "tests/offload/rss_child.py"), str(export),
                          mode, str(budget), str(folder)], capture_output=True, text=True,
                         env=child_env(OMP_NUM_THREADS="1"), cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def big_export(tmp_path_factory):
    """~70 MB of fp32 weights: large against the fixed costs of the measurement."""
    cfg = llama_config(layers=8, hidden=384, vocab=4096)
    model = build(cfg)
    path = tmp_path_factory.mktemp("big")
    model.save_pretrained(path)
    return path, model_bytes(model), block_bytes(model)


def test_disk_offload_peak_rss_stays_within_budget(big_export, tmp_path):
    path, total, block = big_export
    budget = total // 4
    got = _child(path, "offload", budget, tmp_path / "off")
    assert got["peak_above_baseline"] < budget + 2 * block + MARGIN, (got, total, block)
    assert got["peak_above_baseline"] < total  # never the whole model


def test_streaming_weights_peak_rss_is_one_model(big_export, tmp_path):
    path, total, _ = big_export
    got = _child(path, "stream", 0, tmp_path / "unused")
    assert got["load_peak_above_baseline"] <= 1.2 * total, (got, total)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_cpu_disk_offload_matches_the_gpu_model(exported, tmp_path):
    ref, path = exported
    gpu_ref = build(ref.config).cuda()
    gpu_ref.load_state_dict(ref.state_dict())
    total = model_bytes(ref)
    model = build(ref.config, meta=True)
    plan = od.Plan(offload=od.Offload(max_memory={"cuda:0": total // 3, "cpu": total // 3,
                                                  "disk": "1GiB"}, offload_folder=str(tmp_path)))
    rt = od.accelerate(model, plan, weights=path)
    assert set(rt.report.passes[0].details["bytes_per_device"]) == {"cuda:0", "cpu", "disk"}
    ids = torch.randint(0, ref.config.vocab_size, (2, 11), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gpu_ref(ids).logits)
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, gpu_ref.generate(ids, max_new_tokens=6, do_sample=False))
