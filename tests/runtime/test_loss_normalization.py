"""Plan(loss_normalization=...) and Plan(global_batch_size=...): the same step on any layout.

Gradients after one step of a padded, variable-length causal-LM batch whose -100 labels are
spread unevenly: one process on the whole global batch (checked against the plain model's
whole-batch mean) vs 2 data ranks × grad_accum 2, × grad_accum 4, and 2 cp ranks × grad_accum
2 — overdrive's Llama and transformers' LlamaForCausalLM (num_items_in_batch), and a model
whose loss is a plain mean (rescaled). Then an elastic resume: 2 ranks trained, saved at
step 4, resumed on 1 rank (grad_accum 2 derived) and on 4 ranks: the same global batches,
the same parameters. fp64 models; gloo (tests/runtime/loss_norm_worker.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import overdrive as od
from overdrive.causal_lm import count_targets
from tests.helpers import assert_untouched, run_torchrun, snapshot

WORKER = Path(__file__).with_name("loss_norm_worker.py")
GRAD_TOL = 1e-6
LOSS_TOL = 1e-5  # the logged loss passes through float32 (the meter, ForCausalLMLoss)


# --------------------------------------------------------------------------- one process


def test_plan_fields_are_checked():
    cases = {
        "global_batch_size=0 is not valid": dict(global_batch_size=0),
        "global_batch_size=True is not valid": dict(global_batch_size=True),
        "grad_accum is derived from global_batch_size": dict(global_batch_size=8, grad_accum=2),
        "loss_normalization='token' is not valid; choose one of: 'auto', 'tokens', 'batch'":
            dict(loss_normalization="token"),
        "global_batch_size=8 with deepspeed": dict(global_batch_size=8, deepspeed=od.DeepSpeed()),
        "global_batch_size=8 with parallel.pp=2": dict(global_batch_size=8,
                                                       parallel=od.Parallel(pp=2)),
        "loss_normalization='tokens' with parallel.pp=2": dict(loss_normalization="tokens",
                                                               parallel=od.Parallel(pp=2)),
    }
    for message, fields in cases.items():
        with pytest.raises(od.PlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
            od.Plan(**fields).replace()
    assert od.Plan.from_dict({"global_batch_size": 16, "loss_normalization": "tokens"}) \
        .global_batch_size == 16


def test_global_batch_size_must_divide_over_the_data_ranks():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(od.PlanError, match=r"global_batch_size=6 is not divisible by the 4 "
                                           r"data-parallel ranks.*e\.g\. 8"):
        od.inspect(model, od.Plan(global_batch_size=6), world_size=4)


def test_inspect_shows_the_derived_grad_accum():
    from overdrive.models.llama import tiny

    model = tiny(n_layers=2)
    ids = torch.zeros(8, 16, dtype=torch.long)
    report = od.inspect(model, od.Plan(global_batch_size=64), world_size=4,
                        example_inputs={"input_ids": ids})
    assert report.steps.grad_accum == 2 and report.to_dict()["steps"]["grad_accum"] == 2
    assert "global_batch_size 64 = 4 data rank(s) × batch 8, grad_accum 2" in str(report)
    later = od.inspect(model, od.Plan(global_batch_size=64), world_size=4)
    assert later.steps.grad_accum is None and "derived at rt.shard" in str(later)
    with pytest.raises(od.PlanError, match=r"batch size 3 × 4 data rank\(s\) = 12.*"
                                           r"batch_size in \[1, 2, 4, 8, 16\]"):
        od.inspect(model, od.Plan(global_batch_size=64), world_size=4,
                   example_inputs={"input_ids": ids[:3]})


def rows(n: int) -> list[dict]:
    return [{"input_ids": torch.arange(6), "labels": torch.arange(6)} for _ in range(n)]


def test_shard_derives_grad_accum_and_refuses_a_batch_that_does_not_divide():
    model = torch.nn.Linear(4, 4)
    rt = od.accelerate(model, od.Plan(global_batch_size=12), trackers=())
    assert rt.grad_accum == 1  # not known before the loader
    with pytest.raises(od.OverdriveError, match=r"global_batch_size=12\).*rt.shard"):
        rt.accumulate()
    with pytest.raises(od.PlanError, match=r"global_batch_size=12 is not divisible by the "
                                           r"loader's batch size 5"):
        rt.shard(DataLoader(rows(10), batch_size=5))
    assert rt.grad_accum == 1 and rt._loaders == []  # refused: nothing changed
    loader = rt.shard(DataLoader(rows(12), batch_size=4))
    assert rt.grad_accum == 3 and rt.accumulate().n == 3 and rt.report.steps.grad_accum == 3
    rt.shard(DataLoader(rows(4), batch_size=2))  # an eval loader keeps the training layout
    assert rt.grad_accum == 3 and len(loader) == 3


def test_counting_rule():
    labels = torch.tensor([[-100, 5, 6, -100], [1, 2, -100, -100]])
    batch = {"input_ids": labels.clamp(min=0), "labels": labels}
    assert int(count_targets(batch, shifts=False)) == 4
    assert int(count_targets(batch, shifts=True)) == 3  # labels[..., 1:]: position 0 scores none
    shifted = dict(batch, shift_labels=torch.tensor([[5, -100]]))
    assert int(count_targets(shifted, shifts=True)) == 1
    assert count_targets({"input_ids": labels}, shifts=True) is None
    assert count_targets((labels, labels), shifts=True) is None


class MeanLoss(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 8)

    def forward(self, x, labels=None):
        logits = self.lin(x.unsqueeze(-1).float())
        return {"loss": torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                          labels.flatten())}


def test_explicit_tokens_needs_labels_and_auto_falls_back():
    data = [{"x": torch.arange(4)} for _ in range(4)]
    rt = od.accelerate(MeanLoss(), od.Plan(loss_normalization="tokens"), trackers=())
    loader = rt.shard(DataLoader(data, batch_size=2))
    with pytest.raises(od.OverdriveError, match="loss_normalization='tokens'.*'labels'"):
        next(iter(loader))
    rt = od.accelerate(MeanLoss(), trackers=())  # "auto": no labels, no counting
    loader = rt.shard(DataLoader(data, batch_size=2))
    it = iter(loader)
    batch = next(it)
    assert rt._active_loader is loader and loader.share is None and set(batch) == {"x"}


def test_plain_backward_keeps_the_mean_of_micro_batch_means():
    """rt.backward(loss) is unchanged by loss_normalization: 1/grad_accum of each loss."""
    torch.manual_seed(0)
    model = MeanLoss()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = MeanLoss()
    ref.load_state_dict(before)
    data = [{"x": torch.arange(4), "labels": torch.tensor([1, -100, -100, -100] if i else
                                                          [1, 2, 3, 4])} for i in range(2)]
    rt = od.accelerate(model, od.Plan(grad_accum=2, loss_normalization="tokens"), trackers=())
    for batch in rt.shard(DataLoader(data, batch_size=1)):
        with rt.accumulate():
            rt.backward(rt.model(**batch)["loss"])
    for d in data:
        (ref(**{k: v.unsqueeze(0) for k, v in d.items()})["loss"] / 2).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_a_refused_shard_leaves_the_model_untouched():
    model = torch.nn.Linear(4, 4)
    rt = od.accelerate(model, od.Plan(global_batch_size=8), trackers=())
    before = snapshot(model)
    with pytest.raises(od.PlanError):
        rt.shard(DataLoader(rows(9), batch_size=3))
    assert_untouched(model, before)


# --------------------------------------------------------------------------- gloo

ONE = ["llama-p1", "hf-p1", "mean-p1"]
TWO = ["llama-ga2", "llama-ga4", "llama-batch", "hf-ga2", "hf-ga4", "mean-ga2", "llama-cp2",
       "hf-cp2"]


@pytest.fixture(scope="module")
def grads(tmp_path_factory):
    out = tmp_path_factory.mktemp("loss_norm")
    run_torchrun(WORKER, 1, str(out), "grads", *ONE, tmp_path=out)
    run_torchrun(WORKER, 2, str(out), "grads", *TWO, tmp_path=out)
    return {name: torch.load(out / f"{name}.pt") for name in ONE + TWO}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.dist
@pytest.mark.parametrize("kind", ["llama", "hf", "mean"])
def test_one_process_is_the_whole_batch_token_mean(grads, kind):
    got = grads[f"{kind}-p1"]
    ref = got["reference"]
    assert len(got["ids"]) == 8
    assert max_diff(got["grads"], ref["grads"]) < GRAD_TOL
    assert abs(got["logged"] - ref["loss"]) < LOSS_TOL


@pytest.mark.dist
@pytest.mark.parametrize("name,grad_accum", [
    ("llama-ga2", 2), ("llama-ga4", 4), ("llama-cp2", 2),
    ("hf-ga2", 2), ("hf-ga4", 4), ("hf-cp2", 2), ("mean-ga2", 2)])
def test_every_layout_gives_the_same_step(grads, name, grad_accum):
    got, one = grads[name], grads[name.split("-")[0] + "-p1"]
    assert got["grad_accum"] == grad_accum  # derived from global_batch_size
    assert got["ids"] == one["ids"]  # the same global batch: one permutation for any layout
    assert max_diff(got["grads"], one["grads"]) < GRAD_TOL
    assert abs(got["logged"] - one["logged"]) < LOSS_TOL


@pytest.mark.dist
def test_batch_normalisation_is_the_mean_of_means_and_differs(grads):
    """The check can fail: the mean of micro-batch means is off on these batches."""
    got, one = grads["llama-batch"], grads["llama-p1"]
    assert got["ids"] == one["ids"]
    assert max_diff(got["grads"], one["grads"]) > 1e-3


def launch(nproc: int, out: Path, *args: str):
    return run_torchrun(WORKER, nproc, str(out), "train", *args, tmp_path=out)


@pytest.fixture(scope="module")
def elastic(tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic")
    ckpt = str(out / "step-4")
    launch(2, out, "full2", "4", "--save-at", "4", ckpt)  # uninterrupted, saves at step 4
    proc = launch(1, out, "resume1", "4", "--resume", ckpt, "--load-first")
    return out, ckpt, torch.load(out / "full2.pt"), proc.stdout + proc.stderr


def assert_continues(full: dict, resumed: dict) -> None:
    assert sorted(resumed["steps"]) == [5, 6, 7, 8, 9, 10]
    for step, ids in resumed["steps"].items():
        assert ids == full["steps"][step], step
    assert max_diff(resumed["params"], full["params"]) < 1e-5


@pytest.mark.dist
def test_resume_on_one_rank_continues_with_the_same_global_batches(elastic):
    out, _, full, output = elastic
    resumed = torch.load(out / "resume1.pt")
    assert resumed["grad_accum"] == 2 and full["grad_accum"] == 1
    assert len({i for step in full["steps"].values() for i in step}) > 40  # shuffled, epochs
    assert_continues(full, resumed)
    assert "resumed elastically at step 4 from 2 to 1 data rank(s), grad_accum 1 → 2" in output


@pytest.mark.dist
@pytest.mark.slow
def test_resume_on_four_ranks_with_a_smaller_loader_batch(elastic):
    """4 data ranks of batch 2 (the global batch of 8 kept), shard made before rt.load."""
    out, ckpt, full, _ = elastic
    proc = launch(4, out, "resume4", "2", "--resume", ckpt)
    resumed = torch.load(out / "resume4.pt")
    assert resumed["grad_accum"] == 1
    assert_continues(full, resumed)
    assert "from 2 to 4 data rank(s), grad_accum 1 → 1" in proc.stdout + proc.stderr


def test_which_models_get_num_items_in_batch():
    """Only a forward that hands num_items_in_batch to its token loss gets it; a model
    computing its own mean (T5, a classification head, a plain module) is rescaled."""
    from overdrive.causal_lm import shifts_labels, takes_num_items
    from overdrive.models.llama import tiny
    from tests.models import zoo

    assert takes_num_items(tiny(n_layers=1)) and shifts_labels(tiny(n_layers=1))
    for name, gets in (("llama", True), ("gpt2", True), ("t5", False), ("bert", False)):
        model = getattr(zoo, name)()
        assert takes_num_items(model) is gets, name
        assert shifts_labels(model) is gets, name
    assert not takes_num_items(MeanLoss()) and not shifts_labels(MeanLoss())
