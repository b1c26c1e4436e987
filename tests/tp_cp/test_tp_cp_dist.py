"""tensor / sequence / context parallel and fsdp+tp on 2 CPU ranks (gloo) against one
process; tp × cp and 2-D fsdp+tp (dp_shard=2 × tp=2) on 4 ranks.

Two torchrun launches in all, one per world size (tests/tp_cp/tp_cp_worker.py runs every
scenario named on its command line and writes JSON); the tests below compare them with
single-process runs made here."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.helpers import child_env, read_json, run_torchrun
from overdrive.passes.context_parallel import balanced_positions
from tests.tp_cp.common import (batches, fp8_llama, hf_batches, hf_llama, linear_only_net,
                                llama, regression_batches, stored_heads_llama, train,
                                train_regression)

WORKER = Path(__file__).with_name("tp_cp_worker.py")
TOL = 1e-4


def cpu_only() -> dict:
    return child_env()


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
    proc = run_torchrun(WORKER, 2, str(out), "tp", "sp", "divide", "hf", "cp_attention",
                        "cp", "cp_ignored", "fsdp_fp8", "cp_ac", "cp_hf", "fp8", "fsdp_tp",
                        "fsdp_tp_hf", "refusals", "loss_parallel", tmp_path=tmp, env=cpu_only())
    return {**read_json(out), "output": proc.stdout + proc.stderr}


def test_no_known_harmless_noise(two_ranks):
    """fsdp+tp, fp8 and transformers on every rank print none of the lines known to be
    harmless: torchao's CUDA-only kernels failing to load, torchao's enum registration
    deprecation, torch's 'Slicing a flattened dim' (overdrive keeps the flattened meshes)."""
    out = two_ranks["output"]
    for line in ("Slicing a flattened dim", "Failed to load", "register_constant() on Enum"):
        assert line not in out, out[out.find(line) - 300:out.find(line) + 300]


def test_tp_matches_single_process(two_ranks):
    assert_curve(two_ranks["tp"]["losses"], reference(llama))
    assert two_ranks["tp"]["keys_kept"]


def test_tp_halves_sharded_parameter_bytes(two_ranks):
    b = two_ranks["tp"]["bytes"]
    assert b["local"] * 2 == b["full"] > 0
    full = sum(p.numel() * 4 for p in llama().parameters())
    assert two_ranks["tp"]["bytes_before"] == full
    assert two_ranks["tp"]["bytes_after"] == full - b["full"] // 2


def adamw_reference(model, data, loss_fn) -> tuple[list[float], dict]:
    """One process, AdamW (as the worker's loss_parallel scenario): losses, parameters."""
    from tests.tp_cp.tp_cp_worker import ADAMW_LR

    opt = torch.optim.AdamW(model.parameters(), lr=ADAMW_LR)
    losses = []
    for batch in data:
        out = model(**batch)
        loss = out.loss if loss_fn is None else loss_fn(out, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.tolist() for k, v in model.state_dict().items()}


def assert_params(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert sorted(got) == sorted(want)
    worst = max((torch.tensor(got[k]) - torch.tensor(want[k])).abs().max().item() for k in want)
    assert worst < tol, worst


def test_loss_parallel_matches_single_process(two_ranks):
    """parallel.loss_parallel=True: transformers' own output.loss (labels with -100) in a
    manual rt.model/rt.backward loop, and a loss_fn on the vocab-sharded logits through
    rt.forward_backward (with sequence parallel), both match one process, losses and
    parameters, after 5 AdamW steps."""
    from tests.tp_cp.tp_cp_worker import lm_loss

    lp = two_ranks["loss_parallel"]
    assert lp["details"] == {"loss_parallel": True, "loss_head": "lm_head"}
    assert lp["logits_sharded"]
    losses, params = adamw_reference(hf_llama(), batches(vocab=128, ignored=3), None)
    assert max(abs(a - b) for a, b in zip(lp["hf_losses"], losses)) < 1e-5
    assert len(lp["hf_logged"]) == len(losses)  # one step-metrics row a step
    assert max(abs(a - b) for a, b in zip(lp["hf_logged"], lp["hf_losses"])) < 1e-6
    assert_params(lp["hf_params"], params)
    torch.manual_seed(0)
    model = llama()
    losses, params = adamw_reference(model, batches(ignored=3), lm_loss)
    assert max(abs(a - b) for a, b in zip(lp["fn_losses"], losses)) < 1e-5
    assert_params(lp["fn_params"], params)
    with torch.no_grad():
        want = lm_loss(model(**batches(1, seed=2)[0]), batches(1, seed=2)[0]).item()
    assert abs(lp["eval_loss"] - want) < 1e-5


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


def test_fsdp_fp8_on_gloo_with_float8_only_units(two_ranks):
    """Every FSDP unit of this model holds only float8 weights; gloo cannot all-gather
    float8, so the fp8 pass has FSDP gather them in high precision, and says so."""
    from torchao.float8 import convert_to_float8_training

    res = two_ranks["fsdp_fp8"]
    assert res["all_gather"] is False
    assert any("gloo backend cannot all-gather float8" in n for n in res["notes"])
    model = convert_to_float8_training(linear_only_net(),
                                       module_filter_fn=lambda _m, fqn: fqn != "head")
    assert_curve(res["losses"], train_regression(model, regression_batches()))


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


def test_cp_loss_is_the_exact_token_mean(two_ranks):
    """Ignored targets fall unevenly on the cp ranks: the cp average of the losses (and the
    training it drives) equals one process, not a mean of per-rank means."""
    assert_curve(two_ranks["cp_ignored"]["losses"], reference(llama, ignored=10))


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


@pytest.mark.parametrize("case,fragments", [
    ("tp_heads", ["parallel.tp=2", "1 key/value heads", "valid tp values: [1]"]),
    ("cp_window", ["parallel.cp=2", "sliding-window", "layers.1.attn.sliding_window=8"]),
    ("cp_bidirectional", ["parallel.cp=2", "not causal", "is_causal=False"]),
    ("offload_tp", ["fsdp.offload=True", "parallel.tp=2"]),
    ("offload_fp8", ["fsdp.offload=True", "fp8"]),
    ("fsdp_twice", ["already applied fsdp", "a second time"]),
    ("ddp_wrapped", ["DistributedDataParallel", "model.module"]),
    ("tp_tied", ["tp_plan", "'lm_head'", "tied to 'embed_tokens'", "tp_plan='auto'"]),
])
def test_refusals_through_accelerate_leave_the_model_untouched(two_ranks, case, fragments):
    res = two_ranks["refusals"][case]
    assert res["error"] is not None, f"{case}: od.accelerate did not refuse"
    for f in fragments:
        assert f in res["error"], res["error"]
    assert res["untouched"], f"{case}: the refused plan changed the model"


def norm_bytes(model) -> int:
    """The parameters every tp plan here leaves whole (norm weights): sharded by FSDP only."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "norm" in n)


def assert_fsdp_tp_bytes(res: dict, model, dp: int, tp: int) -> None:
    """Every rank holds exactly 1/(dp·tp) of the tp-sharded weights and 1/dp of the rest
    (all dims here divide evenly: FSDP adds no padding)."""
    full, whole = sum(p.numel() * p.element_size() for p in model.parameters()), norm_bytes(model)
    expected = (full - whole) // (dp * tp) + whole // dp
    assert res["rank_bytes"] == [expected] * dp * tp, (res["rank_bytes"], expected)
    assert res["bytes_after"] == expected  # rank 0's report says the same


def test_fsdp_tp_two_ranks(two_ranks):
    """dp_shard=1 × tp=2: FSDP spans one rank, so each rank holds half the tp weights."""
    assert two_ranks["fsdp_tp"]["metrics"] == [0]  # one dp rank: the tp peer is not gathered
    assert_curve(two_ranks["fsdp_tp"]["losses"], reference(llama))
    assert_fsdp_tp_bytes(two_ranks["fsdp_tp"], llama(), dp=1, tp=2)
    assert_curve(two_ranks["fsdp_tp_hf"]["losses"], reference(hf_llama, vocab=128))
    assert_fsdp_tp_bytes(two_ranks["fsdp_tp_hf"], hf_llama(), dp=1, tp=2)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp_cp4")
    out = tmp / "out.json"
    proc = run_torchrun(WORKER, 4, str(out), "tp_cp", "fsdp_tp", "fsdp_tp_hf", "fsdp_tp_meta",
                        tmp_path=tmp, env=cpu_only())
    return {**read_json(out), "output": proc.stdout + proc.stderr}


def test_tp_2_by_cp_2_four_ranks(four_ranks):
    assert_curve(four_ranks["tp_cp"]["losses"], reference(llama))


def test_2d_dp_shard_2_tp_2_four_ranks(four_ranks):
    res = four_ranks["fsdp_tp"]
    assert res["passes"][:1] == ["tensor_parallel"] and "fsdp" in res["passes"]
    assert_curve(res["losses"], reference(llama))
    assert_fsdp_tp_bytes(res, llama(), dp=2, tp=2)
    assert sorted(res["metrics"]) == [0, 1]  # one row per dp rank, none from tp peers


def test_no_known_harmless_noise_four_ranks(four_ranks):
    test_no_known_harmless_noise(four_ranks)


def test_2d_transformers_llama_with_its_own_plan_four_ranks(four_ranks):
    res = four_ranks["fsdp_tp_hf"]
    assert_curve(res["losses"], reference(hf_llama, vocab=128))
    assert_fsdp_tp_bytes(res, hf_llama(), dp=2, tp=2)


def test_meta_model_under_fsdp_tp_draws_every_shard(four_ranks):
    """CPU has no DTensor RNG: seeding by the FSDP shard rank alone gave both tp shards
    of every weight the same values (duplicated heads that never diverge)."""
    res = four_ranks["fsdp_tp_meta"]
    assert res["coords"] == [[0, 0], [0, 1], [1, 0], [1, 1]]  # (dp_shard, tp) per rank
    q = [s["q_proj"] for s in res["sums"]]  # sharded over dp_shard and tp: 4 draws
    assert len(set(q)) == 4, q
    embed = [s["embed"] for s in res["sums"]]  # tied, so tp leaves it whole: replicas
    assert embed[0] == embed[1] and embed[2] == embed[3] and embed[0] != embed[2], embed
    assert all(math.isfinite(x) for x in res["losses"])
