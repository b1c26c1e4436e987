"""Tracking: one metrics.jsonl on rank 0 with one row per optimizer step, whose loss is
the mean of every rank's micro-step losses; tensorboard, wandb (offline), mlflow (local
store) and a custom od.Tracker get the same rows; argument checks before mutation."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import overdrive as od
from tests.helpers import ROOT, assert_untouched, require, run_torchrun, snapshot

WORKER = ROOT / "tests" / "runtime" / "tracking_worker.py"
STEP_KEYS = {"step", "loss", "grad_norm", "lr", "step_seconds", "samples_per_s",
             "tokens_per_s", "memory_peak_gb"}


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.dist
def test_two_ranks_log_one_row_per_step_with_the_mean_loss(tmp_path):
    trackers = "jsonl,tensorboard" if _have("tensorboard") else "jsonl"
    run_torchrun(WORKER, 2, str(tmp_path), trackers, tmp_path=tmp_path)
    run = tmp_path / "run"
    rows = _rows(run)
    step_rows, extra = rows[:-1], rows[-1]
    assert [r["step"] for r in step_rows] == [1, 2, 3, 4]
    for r in step_rows:
        assert STEP_KEYS <= set(r), sorted(r)
        assert r["lr"] == 0.05
        # 2 ranks x 2 micro-batches x 4 sequences x 8 tokens per step
        assert r["tokens_per_s"] * r["step_seconds"] == pytest.approx(128, rel=1e-6)
        assert r["samples_per_s"] * r["step_seconds"] == pytest.approx(16, rel=1e-6)
    assert extra == {"step": 4, "eval_loss": 0.5, "epoch": 0}

    _check_mean_losses(tmp_path, step_rows)

    # rank 0 alone wrote: one metrics file, rank 1's custom tracker never opened
    assert sorted(p.name for p in tmp_path.rglob("metrics.jsonl")) == ["metrics.jsonl"]
    recorder = json.loads((tmp_path / "recorder_rank0.json").read_text())
    assert not (tmp_path / "recorder_rank1.json").exists()
    assert recorder["rows"] == rows  # the custom tracker got the same rows
    assert recorder["config"]["run_config"] == {"lr": 0.05, "nested": {"a": [1, 2]}}
    assert recorder["config"]["plan"]["grad_accum"] == 2
    assert json.loads((run / "config.json").read_text()) == recorder["config"]
    for rank in (0, 1):  # rt.profile(ranks=None): a trace per rank
        trace = json.loads((tmp_path / "prof" / f"trace_rank{rank}.json").read_text())
        assert any(e.get("name") == "ProfilerStep#1" for e in trace["traceEvents"])

    if _have("tensorboard"):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(run / "tensorboard"))
        acc.Reload()
        assert {"loss", "lr", "tokens_per_s", "eval_loss"} <= set(acc.Tags()["scalars"])
        events = acc.Scalars("loss")
        assert [e.step for e in events] == [1, 2, 3, 4]
        assert [e.value for e in events] == pytest.approx([r["loss"] for r in step_rows],
                                                          rel=1e-6)


def _check_mean_losses(tmp_path: Path, step_rows: list[dict]) -> None:
    per_rank = [json.loads((tmp_path / f"losses_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(step_rows) == len(per_rank[0])
    for i, row in enumerate(step_rows):
        micro = per_rank[0][i] + per_rank[1][i]
        assert len(micro) == 4
        assert row["loss"] == pytest.approx(sum(micro) / len(micro), rel=1e-6)


@pytest.mark.dist
def test_two_ranks_without_finish_complete_the_last_rows_at_exit(tmp_path):
    """No rt.finish(): the other rank posts its parts of the last rows at exit and rank 0
    completes them there — every row is written, with the mean loss of both ranks."""
    run_torchrun(WORKER, 2, str(tmp_path), "jsonl", "exit", tmp_path=tmp_path)
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 4]
    assert rows[-1] == {"step": 4, "eval_loss": 0.5, "epoch": 0}
    _check_mean_losses(tmp_path, rows[:-1])


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _train(rt, steps: int = 3) -> None:
    for _ in range(steps):
        loss = rt.model(torch.randn(4, 3)).pow(2).mean()
        rt.backward(loss)
        rt.optimizer.step()
        rt.optimizer.zero_grad()


def _accelerate(**kwargs):
    torch.manual_seed(0)
    return od.accelerate(torch.nn.Linear(3, 1), optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                         **kwargs)


def test_wandb_offline_writes_its_run_files(tmp_path, monkeypatch):
    require("wandb", reason="wandb not installed (pip install 'overdrive[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    rt = _accelerate(trackers=("wandb",), run_dir=tmp_path / "run", run_config={"x": 1})
    _train(rt)
    rt.finish()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "run").rglob("*"))
    (log,) = runs[0].glob("*.wandb")  # wandb's record log, for `wandb sync`
    deadline = time.monotonic() + 60  # wandb's service process writes it after finish()
    while not all(k in log.read_bytes() for k in (b"step_seconds", b"run_config")):
        assert time.monotonic() < deadline, log.read_bytes()[:200]
        time.sleep(0.2)


def test_mlflow_local_store_has_the_metrics(tmp_path, monkeypatch):
    require("mlflow", reason="mlflow not installed (pip install 'overdrive[mlflow]')")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rt = _accelerate(trackers=("mlflow",), run_dir=tmp_path / "run")
    _train(rt)
    rt.finish()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("overdrive")
    (run,) = client.search_runs([exp.experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert run.info.status == "FINISHED"
    assert list((tmp_path / "run" / "mlartifacts").rglob("config.json"))


def test_log_every_and_step_override(tmp_path):
    rt = _accelerate(run_dir=tmp_path / "run", log_every=2)
    _train(rt, steps=5)
    rt.log({"acc": 0.9}, step=100)
    rt.finish()
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [2, 4, 100]
    assert rows[0]["step_seconds"] > 0


class _Rows(od.Tracker):
    def __init__(self):
        self.rows = []

    def log(self, metrics, step):
        self.rows.append((step, sorted(metrics)))


def test_rows_are_recorded_then_written_in_order_at_finish(tmp_path, monkeypatch):
    """A logged step only records its numbers; the rows reach the trackers at the next
    flush (here never before finish), in step order, rt.log rows behind the steps before
    them, the last ones written by rt.finish()."""
    from overdrive.runtime import step_metrics

    monkeypatch.setattr(step_metrics, "FLUSH_INTERVAL_S", 1e9)
    rows = _Rows()
    rt = _accelerate(trackers=("jsonl", rows), run_dir=tmp_path / "run")
    _train(rt, steps=3)
    assert [s for s, _ in rows.rows] == [1]  # the first row is written at once
    assert len(rt._meter._recorded) == 2  # steps 2 and 3: recorded, not yet read
    rt.log({"eval": 1.0})
    _train(rt, steps=2)
    assert [s for s, _ in rows.rows] == [1, 2, 3, 3]
    rt.finish()
    assert [s for s, _ in rows.rows] == [1, 2, 3, 3, 4, 5]
    assert rows.rows[3] == (3, ["eval"])
    assert [r["step"] for r in _rows(tmp_path / "run")] == [1, 2, 3, 3, 4, 5]
    _train(rt, steps=1)  # after finish: no more rows, no error
    assert len(rows.rows) == 6


def _real_default_run_dir(monkeypatch, tmp_path) -> None:
    """Undo conftest's redirection: runs/<timestamp> in the working directory."""
    from overdrive.runtime import tracking

    monkeypatch.setattr(tracking, "default_run_dir", tracking.ORIGINAL_DEFAULT_RUN_DIR)
    monkeypatch.chdir(tmp_path)


def test_log_every_zero_and_no_trackers_write_nothing(tmp_path, monkeypatch):
    _real_default_run_dir(monkeypatch, tmp_path)
    rt = _accelerate(log_every=0)
    _train(rt)
    assert rt._meter is None
    rt.finish()
    assert not (tmp_path / "runs").exists()  # nothing logged, nothing created
    rt = _accelerate(trackers=())
    _train(rt)
    rt.log({"x": 1.0})
    rt.finish()
    assert not (tmp_path / "runs").exists()


def test_default_run_dir_is_a_fresh_timestamped_folder(tmp_path, monkeypatch):
    _real_default_run_dir(monkeypatch, tmp_path)
    first, second = _accelerate(), _accelerate()
    _train(first, 1), _train(second, 1)
    first.finish(), second.finish()
    dirs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(dirs) == 2 and first.run_dir != second.run_dir
    assert all(len(_rows(tmp_path / "runs" / d)) == 1 for d in dirs)


def test_rt_log_reads_tensors_and_refuses_what_is_not_a_number(tmp_path):
    rt = _accelerate(run_dir=tmp_path / "run", log_every=0)
    rt.log({"a": torch.tensor(2.0), "b": torch.tensor([3]), "c": 1})
    with pytest.raises(od.OverdriveError, match="'v' is a tensor of shape"):
        rt.log({"v": torch.ones(3)})
    with pytest.raises(od.OverdriveError, match="'s' = 'x' is not a number"):
        rt.log({"s": "x"})
    rt.finish()
    assert _rows(tmp_path / "run") == [{"step": 0, "a": 2.0, "b": 3.0, "c": 1}]
    with pytest.raises(od.OverdriveError, match="after rt.finish"):
        rt.log({"a": 1})


@pytest.mark.parametrize("kwargs, error, match", [
    ({"trackers": ("nope",)}, od.PlanError, "'nope' is not a tracker"),
    ({"log_every": -1}, od.PlanError, "log_every=-1"),
    ({"run_config": [1]}, od.PlanError, "run_config=list"),
])
def test_bad_tracking_arguments_are_refused_before_mutation(kwargs, error, match):
    model = torch.nn.Linear(3, 1)
    before = snapshot(model)
    with pytest.raises(error, match=match):
        od.accelerate(model, "ddp" if False else None, **kwargs)
    assert_untouched(model, before)


def test_a_missing_tracker_package_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "trackio" else real(name, *a))
    model = torch.nn.Linear(3, 1)
    before = snapshot(model)
    with pytest.raises(od.BackendUnavailable, match=r"overdrive\[trackio\]"):
        od.accelerate(model, trackers=("jsonl", "trackio"))
    assert_untouched(model, before)


def test_the_log_line_is_compact():
    from overdrive.runtime.step_metrics import format_line

    line = format_line(7, {"loss": 2.5, "grad_norm": 0.5, "lr": 3e-4, "tokens_per_s": 51200.0,
                           "step_seconds": 0.25, "memory_allocated_gb": 1.5,
                           "memory_peak_gb": 2.0, "tflops": 312.5, "mfu": 0.41})
    assert line == ("step 7 | loss 2.5000 | grad_norm 0.500 | lr 3.00e-04 | 51.2k tok/s | "
                    "0.250 s/step | 312.5 TFLOP/s mfu 41.0% | mem 1.50/2.00 GB")


def test_tflops_and_mfu_from_the_meta_trace_where_a_peak_is_known(tmp_path):
    """On CPU no peak is known, so accelerate builds no FLOP model; here the meter is given
    a peak and a meta copy, as on a GPU, and must report FLOP/s from the traced FLOPs."""
    from torch.utils.data import DataLoader

    from overdrive.rewrite.trace import meta_copy, trace_model
    from overdrive.runtime.step_metrics import StepMeter

    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16)

        def forward(self, input_ids):
            return self.head(self.emb(input_ids)).logsumexp(-1).mean()

    model = Tokens()
    shadow = meta_copy(model)
    rt = od.accelerate(model, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                       run_dir=tmp_path / "run")
    assert rt._meter._peak is None  # CPU: no peak, no MFU
    rt._meter = StepMeter(rt, 1, rt._tracking, peak=1e12, shadow=shadow)
    ids = [{"input_ids": torch.randint(0, 16, (6,))} for _ in range(8)]
    for batch in rt.shard(DataLoader(ids, batch_size=4)):
        rt.backward(rt.model(**batch))
        rt.optimizer.step()
        rt.optimizer.zero_grad()
    rt.finish()
    rows = _rows(tmp_path / "run")
    trace = trace_model(meta_copy(model), {"input_ids": torch.zeros(4, 6, dtype=torch.long)})
    per_token = (trace.forward_flops + trace.backward_flops) / 24
    for r in rows:
        assert r["tflops"] * 1e12 * r["step_seconds"] == pytest.approx(per_token * 24, rel=1e-6)
        assert r["mfu"] == pytest.approx(r["tflops"], rel=1e-6)  # peak 1 TFLOP/s


@pytest.mark.parametrize("step,metrics", [
    (3, {"loss": 0.1, "samples": 5, "lr": 1e-12, "neg": -0.0, "big": 1e300}),
    (1, {}), (2, {'a"b\u00e9': 1.5}), (2, {"x": float("nan")}), (2, {"x": float("-inf")}),
    (2, {"x": True}), (2, {"step": 5}),
])
def test_jsonl_rows_are_what_json_dumps_writes(tmp_path, step, metrics):
    from overdrive.runtime.tracking import JsonlTracker

    tracker = JsonlTracker()
    tracker.open(tmp_path)
    tracker.log(dict(metrics), step)
    tracker.finish()
    assert (tmp_path / "metrics.jsonl").read_text() == json.dumps({"step": step, **metrics}) + "\n"


TRACKIO_CHILD = """
import json, sys, torch
import overdrive as od
from trackio.sqlite_storage import SQLiteStorage

torch.manual_seed(0)
rt = od.accelerate(torch.nn.Linear(3, 1), optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                   trackers=("trackio",), run_dir=sys.argv[1] + "/run", run_config={"x": 1})
for _ in range(3):
    rt.backward(rt.model(torch.randn(4, 3)).pow(2).mean())
    rt.optimizer.step()
    rt.optimizer.zero_grad()
rt.log({"eval_loss": 0.5})
rt.finish()
logs = SQLiteStorage.get_logs("overdrive", "run")
print("LOGS", json.dumps([{k: v for k, v in r.items() if k in ("step", "loss", "lr", "eval_loss")}
                          for r in logs]))
"""


def test_trackio_local_run_has_the_rows(tmp_path):
    """trackio pins pillow<13, older than the shared venv's, so it is not a test extra:
    install it beside the venv (``pip install --target DIR --no-deps trackio brotli
    gradio-client orjson python-multipart``, then PYTHONPATH=DIR) to run this test."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("trackio") is None:
        pytest.skip("trackio not importable (its pillow<13 pin conflicts with the venv; "
                    "see this test's docstring for installing it beside the venv)")
    from tests.helpers import child_env

    script = tmp_path / "child.py"
    script.write_text(TRACKIO_CHILD)
    env = child_env(TRACKIO_DIR=str(tmp_path / "trackio"), TRACKIO_PROJECT="overdrive",
                    HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("LOGS "))
    logs = json.loads(line[5:])
    assert [r["step"] for r in logs if "loss" in r] == [1, 2, 3]
    assert all(r["lr"] == 0.1 for r in logs if "loss" in r)
    assert any(r.get("eval_loss") == 0.5 and r["step"] == 3 for r in logs)
    assert (tmp_path / "trackio" / "overdrive.db").exists()


def test_token_counter_finds_the_tokens_once_and_counts_real_rows():
    """The loader resolves where a batch's tokens are at an epoch's first batch; each
    batch then costs one lookup. Padded rows (n_real < rows) are not counted; a batch
    shaped otherwise is counted from scratch; float-only batches count none."""
    from overdrive.runtime.step_metrics import token_count, token_counter

    ids = torch.zeros(4, 8, dtype=torch.long)
    as_dict = {"attention_mask": torch.ones(4, 8, dtype=torch.long), "input_ids": ids}
    as_tuple = (torch.randn(4, 3), torch.zeros(4, 5, dtype=torch.int32))
    for batch, tokens in ((as_dict, 32), (as_tuple, 20), (ids, 32)):
        count = token_counter(batch)
        assert count(batch, 4) == tokens == token_count(batch)
        assert count(batch, 1) == tokens // 4  # three padding rows
    count = token_counter(as_dict)
    assert count({"labels": torch.zeros(2, 3, dtype=torch.long)}, 2) == 6  # reshaped
    assert count({"x": torch.randn(2, 3)}, 2) == 0
    assert token_counter((torch.randn(4, 3), torch.randn(4, 1))) is None


def test_rows_count_every_token_of_an_uneven_epoch(tmp_path):
    """tokens_per_s × step_seconds over the rows is every token rt.shard yielded, the
    smaller last batch included (10 rows of 6 tokens, batches of 4)."""
    from torch.utils.data import DataLoader

    data = [{"input_ids": torch.full((6,), i)} for i in range(10)]
    model = torch.nn.Embedding(10, 1)
    rt = od.accelerate(model, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                       run_dir=tmp_path / "run")
    for batch in rt.shard(DataLoader(data, batch_size=4)):
        rt.backward(rt.model(batch["input_ids"]).mean())
        rt.optimizer.step()
        rt.optimizer.zero_grad()
    rt.finish()
    rows = _rows(tmp_path / "run")
    assert len(rows) == 3
    assert sum(r["tokens_per_s"] * r["step_seconds"] for r in rows) == pytest.approx(60)
    assert sum(r["samples_per_s"] * r["step_seconds"] for r in rows) == pytest.approx(10)


class _Batched(od.Tracker):
    def __init__(self):
        self.calls = []

    def log(self, metrics, step):
        raise AssertionError("log_rows overrides log for the step rows")

    def log_rows(self, rows):
        self.calls.append([step for _, step in rows])


def test_a_flush_gives_each_tracker_its_rows_in_one_call(tmp_path, monkeypatch):
    from overdrive.runtime import step_metrics

    monkeypatch.setattr(step_metrics, "FLUSH_INTERVAL_S", 1e9)
    batched, plain = _Batched(), _Rows()
    rt = _accelerate(trackers=("jsonl", batched, plain), run_dir=tmp_path / "run")
    _train(rt, steps=4)
    rt.finish()
    assert batched.calls == [[1], [2, 3, 4]]  # the first row at once, the rest at finish
    assert [s for s, _ in plain.rows] == [1, 2, 3, 4]  # the default: log for each row
    assert [r["step"] for r in _rows(tmp_path / "run")] == [1, 2, 3, 4]


def test_jsonl_log_rows_writes_each_row_as_json_dumps_would(tmp_path):
    from overdrive.runtime.tracking import JsonlTracker

    rows = [({"loss": 0.5, "lr": 0.1}, 1), ({"loss": float("nan"), "lr": 0.1}, 2),
            ({"a%d": 1.0, "n": 10 ** 400, "x": 1e308}, 3), ({"n": 3, "b": False}, 4),
            ({"loss": 0.25, "lr": 0.1}, 5), ({"loss": 2.5e-7, "lr": 3}, 6), ({}, 7), ({}, 8),
            ({"x": 1.5}, 9.0), ({"x": -0.0}, 10), ({"x": 1e308}, 11), ({"x": 1e308}, 12),
            ({"lr": 0.1, "loss": 0.5}, 13), ({"lr": 0.1, "loss": 0.5}, True)]
    tracker = JsonlTracker()
    tracker.open(tmp_path)
    tracker.log_rows(rows)
    tracker.finish()
    expected = "".join(json.dumps({"step": step, **m}) + "\n" for m, step in rows)
    assert (tmp_path / "metrics.jsonl").read_text() == expected


def test_cpu_losses_are_kept_as_the_floats_the_guard_read(tmp_path):
    """On the CPU the non-finite guard already reads each loss (item()): the meter keeps
    that float, not a tensor (nothing held between flushes); where the guard read
    nothing the detached tensor is kept, and the row's loss is the mean of both kinds."""
    torch.manual_seed(0)
    rt = od.accelerate(torch.nn.Linear(3, 1), od.Plan(grad_accum=3),
                       optimizer=lambda p: torch.optim.SGD(p, lr=0.1), trackers=("jsonl",),
                       run_dir=tmp_path / "run")
    seen, kinds = [], []
    for guarded in (True, False, True):
        rt._guard.enabled = guarded
        with rt.accumulate():
            loss = rt.model(torch.randn(4, 3)).pow(2).mean()
            seen.append(loss.item())
            rt.backward(loss)
            kinds.append(type(rt._meter._losses[-1]))
            rt.optimizer.step()
            rt.optimizer.zero_grad()
    rt.finish()
    assert kinds == [float, torch.Tensor, float]
    (row,) = _rows(tmp_path / "run")
    assert row["loss"] == pytest.approx(sum(seen) / 3, rel=1e-6)
