"""The device map: Accelerate's assignments on the same model and budgets, and the plan's
refusals (budgets too small without disk, disk without a folder, inference only)."""

from __future__ import annotations

import pytest
import torch

import overdrive as od
from overdrive.errors import PlanError
from overdrive.passes import offload_placement as pl
from tests.helpers import assert_untouched, snapshot
from tests.offload.offload_common import build, llama_config, model_bytes

BLOCK = "LlamaDecoderLayer"


def _budgets(total: int):
    """GPU / CPU budgets that force splits, spills to the next device and disk."""
    return [
        {"cpu": total // 4},
        {"cpu": total // 2},
        {"cpu": 2 * total},
        {"cuda:0": total // 5, "cpu": total // 3},
        {"cuda:0": total // 6, "cuda:1": total // 4, "cpu": total // 5},
        {"cuda:0": total // 3, "cuda:1": total // 3, "cuda:2": total, "cpu": total},
    ]


def _as_accelerate(budget: dict) -> dict:
    return {int(k[5:]) if k.startswith("cuda:") else k: v for k, v in budget.items()}


def _from_accelerate(device_map: dict) -> dict:
    return {k: f"cuda:{v}" if isinstance(v, int) else v for k, v in device_map.items()}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("mode", ["sequential", "balanced", "balanced_low_0"])
def test_device_map_matches_accelerate(tied, mode):
    accel = pytest.importorskip("accelerate.utils", reason="accelerate is not installed "
                                "(pip install overdrive[bench]); it is the reference here")
    model = build(llama_config(tied=tied), meta=True)
    total = model_bytes(model)
    for budget in _budgets(total):
        for no_split in ([BLOCK], []):
            ours_budget = dict(budget)
            theirs_budget = _as_accelerate(budget)
            if mode != "sequential":
                ours_budget = pl.balanced_budgets(model, ours_budget, no_split, None,
                                                  low_zero=mode == "balanced_low_0")
                theirs_budget = accel.get_balanced_memory(
                    model, max_memory=theirs_budget, no_split_module_classes=no_split,
                    low_zero=mode == "balanced_low_0")
                assert ours_budget == {k: int(v) for k, v in
                                       _from_accelerate_keys(theirs_budget).items()}
            ours = pl.infer_device_map(model, ours_budget, no_split)
            theirs = accel.infer_auto_device_map(model, max_memory=theirs_budget,
                                                 no_split_module_classes=no_split)
            assert ours == _from_accelerate(theirs), (budget, no_split)


def _from_accelerate_keys(budget: dict) -> dict:
    return {f"cuda:{k}" if isinstance(k, int) else k: v for k, v in budget.items()}


def test_inspect_shows_the_map_and_bytes(tmp_path):
    model = build(llama_config(), meta=True)
    total = model_bytes(model)
    plan = od.Plan(offload=od.Offload(max_memory={"cpu": total // 4, "disk": "1GiB"},
                                      offload_folder=str(tmp_path)))
    rec = od.inspect(model, plan).passes[0]
    assert rec.name == "offload"
    assert rec.details["device_map"]["model.embed_tokens"] == "cpu"
    assert rec.details["device_map"]["lm_head"] == "disk"
    per_device = rec.details["bytes_per_device"]
    assert sum(per_device.values()) >= total and per_device["disk"] > 2 * per_device["cpu"]
    assert not any(tmp_path.iterdir())  # the dry run wrote nothing


def test_budget_without_disk_names_the_missing_bytes():
    model = build(llama_config())
    before = snapshot(model)
    total = model_bytes(model)
    with pytest.raises(PlanError, match=r"cannot hold the model: \d+ bytes more"):
        od.accelerate(model, od.Plan(offload=od.Offload(max_memory={"cpu": total // 2})))
    assert_untouched(model, before)


def test_disk_without_folder_is_refused():
    model = build(llama_config())
    before = snapshot(model)
    total = model_bytes(model)
    with pytest.raises(PlanError, match="offload_folder=None"):
        od.accelerate(model, od.Plan(offload=od.Offload(
            max_memory={"cpu": total // 2, "disk": "1GiB"})))
    assert_untouched(model, before)


@pytest.mark.parametrize("bad", [
    {"offload": {}, "ddp": {}},
    {"offload": {}, "fsdp": {}},
    {"offload": {"device_map": "everywhere"}},
    {"offload": {"max_memory": {"gpu7": 10}}},
    {"offload": {"prefetch": -1}},
    {"offload": {"device_map": {"model.nope": "cpu"}}},
])
def test_bad_offload_plans_are_refused(bad):
    model = build(llama_config())
    before = snapshot(model)
    with pytest.raises(PlanError):
        od.accelerate(model, bad)
    assert_untouched(model, before)


def test_offload_refuses_an_optimizer():
    model = build(llama_config())
    with pytest.raises(PlanError, match="inference pass"):
        od.accelerate(model, "offload", optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


def test_user_device_map_and_preset(tmp_path):
    model = build(llama_config())
    ref = build(llama_config())
    ref.load_state_dict(model.state_dict())
    device_map = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "disk"}
    od.accelerate(model, {"offload": {"device_map": device_map,
                                      "offload_folder": str(tmp_path)}})
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert od.Plan.preset("offload").offload == od.Offload()
