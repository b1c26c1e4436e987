"""tensor / sequence / context parallel on 2 CPU ranks (gloo) against one process, and
fsdp+tp / 2-D (dp_shard=2 × tp=2) on 4 ranks once the fsdp pass is in the tree.

One torchrun launch runs every 2-rank scenario (tests/tp_cp/tp_cp_worker.py) and
writes JSON; the tests below compare it with single-process runs made here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import read_json, run_torchrun
from overdrive.passes.context_parallel import balanced_positions
from tests.tp_cp.common import (batches, fp8_llama, hf_batches, hf_llama, llama,
                                stored_heads_llama, train)

WORKER = Path(__file__).with_name("tp_cp_worker.py")
TOL = 1e-4

pytestmark = pytest.mark.dist


def reference(make, **data) -> list[float]:
    torch.manual_seed(0)
    return train(make(), batches(**data))


def assert_curve(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want) == 5
    assert max(abs(a - b) for a, b in zip(got, want)) < TOL, (got, want)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp_cp")
    out = tmp / "out.json"
    run_torchrun(WORKER, 2, str(out), "tp", "sp", "divide", "hf", "cp_attention", "cp",
                 "cp_ac", "cp_hf", "fp8", tmp_path=tmp)
    return read_json(out)


def test_tp_matches_single_process(two_ranks):
    assert_curve(two_ranks["tp"]["losses"], reference(llama))
    assert two_ranks["tp"]["keys_kept"]


def test_tp_halves_sharded_parameter_bytes(two_ranks):
    b = two_ranks["tp"]["bytes"]
    assert b["local"] * 2 == b["full"] > 0
    full = sum(p.numel() * 4 for p in llama().parameters())
    assert two_ranks["tp"]["bytes_before"] == full
    assert two_ranks["tp"]["bytes_after"] == full - b["full"] // 2


def test_sequence_parallel_matches_single_process(two_ranks):
    assert_curve(two_ranks["sp"]["losses"], reference(llama))


def test_divide_attrs_for_stored_head_counts(two_ranks):
    assert two_ranks["divide"]["n_heads"] == 2  # 4 heads / tp 2
    assert_curve(two_ranks["divide"]["losses"], reference(stored_heads_llama))


def test_transformers_llama_with_its_own_plan(two_ranks):
    hf = two_ranks["hf"]
    assert hf["styles"]["lm_head"] == "colwise_rep"
    assert hf["styles"]["model.layers.0.self_attn.q_proj"] == "colwise"
    assert hf["bytes"]["local"] * 2 == hf["bytes"]["full"]
    assert_curve(hf["losses"], reference(hf_llama, vocab=128))


def test_fp8_tensorwise_layers_under_tp_and_sp(two_ranks):
    fp8 = two_ranks["fp8"]
    assert fp8["float8_modules"] == 14  # every q/k/v/o/gate/up/down of the 2 blocks
    # gloo cannot all-gather float8: the plain styles carry the Float8Linear layers
    assert any("cannot all-gather float8" in n for n in fp8["notes"])
    torch.manual_seed(0)
    assert_curve(fp8["losses"], train(fp8_llama(), batches()))


def test_cp_attention_equals_unsharded(two_ranks):
    errors = two_ranks["cp_attention"]["errors"]
    assert set(errors) == {"out", "grad_q", "grad_k", "grad_v"}
    assert max(errors.values()) < 1e-5, errors


def test_cp_refuses_masks_at_runtime(two_ranks):
    refused = two_ranks["cp_attention"]["refused"]
    assert "parallel.cp=2" in refused["mask"] and "attn_mask" in refused["mask"]
    assert "is_causal=False" in refused["non_causal"]


def test_cp_matches_single_process(two_ranks):
    cp = two_ranks["cp"]
    assert_curve(cp["losses"], reference(llama))
    assert cp["keys_kept"]
    assert "parallel.cp=2" in cp["bad_len"] and "2·cp = 4" in cp["bad_len"]
    assert any("averaged over the cp group" in n for n in cp["notes"])


def test_cp_under_checkpointing_and_compile(two_ranks):
    assert_curve(two_ranks["cp_ac"]["losses"], reference(llama))


def test_cp_transformers_llama_through_rt_shard(two_ranks):
    """transformers shifts labels inside its loss: under cp each rank's head+tail slice
    would give the chunk-boundary tokens wrong targets. rt.shard's data path splits the
    loader's batches itself; the loss curve equals one process on the full batches."""
    res = two_ranks["cp_hf"]
    torch.manual_seed(0)
    assert_curve(res["losses"], train(hf_llama(), hf_batches()))
    full = hf_batches(1)[0]["input_ids"]
    shifted = torch.nn.functional.pad(full[:, 1:], (0, 1), value=-100)
    for rank in (0, 1):
        idx = balanced_positions(16, 2, rank)
        got = res["first_batch"][str(rank)]
        assert got["input_ids"] == got["labels"] == full[:, idx].tolist()
        assert got["shift_labels"] == shifted[:, idx].tolist()
        assert got["position_ids"] == [idx.tolist()] * 2
        assert got["num_items_in_batch"] == 2 * 15 / 2  # this rank's share of the targets
    assert "parallel.cp=2" in res["tuple_error"] and "mapping" in res["tuple_error"]
    assert any("shift_labels" in n for n in res["notes"])


def test_tp_2_by_cp_2_four_ranks(tmp_path):
    out = tmp_path / "out.json"
    run_torchrun(WORKER, 4, str(out), "tp_cp", tmp_path=tmp_path)
    assert_curve(read_json(out)["tp_cp"]["losses"], reference(llama))


def test_fsdp_tp_two_ranks(tmp_path):
    out = tmp_path / "out.json"
    run_torchrun(WORKER, 2, str(out), "fsdp_tp", "fsdp_tp_hf", tmp_path=tmp_path)
    res = read_json(out)
    assert_curve(res["fsdp_tp"]["losses"], reference(llama))
    assert_curve(res["fsdp_tp_hf"]["losses"], reference(hf_llama, vocab=128))


def test_2d_dp_shard_2_tp_2_four_ranks(tmp_path):
    out = tmp_path / "out.json"
    run_torchrun(WORKER, 4, str(out), "fsdp_tp", tmp_path=tmp_path)
    res = read_json(out)["fsdp_tp"]
    assert res["passes"][:1] == ["tensor_parallel"] and "fsdp" in res["passes"]
    assert_curve(res["losses"], reference(llama))
    full = sum(p.numel() * 4 for p in llama().parameters())
    assert res["bytes_after"] == pytest.approx(full / 4, rel=0.1)
