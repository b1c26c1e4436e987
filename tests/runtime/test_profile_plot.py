"""rt.profile writes a Chrome trace with the profiled steps' ops and a top-ops table, and
costs nothing outside its window; `overdrive plot` draws several runs into one PNG."""

from __future__ import annotations

import json

import pytest
import torch

import overdrive as od
from overdrive.cli import main
from tests.helpers import require


def _runtime(tmp_path, **kwargs):
    torch.manual_seed(0)
    return od.accelerate(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(),
                                             torch.nn.Linear(8, 1)),
                         optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
                         run_dir=tmp_path / "run", **kwargs)


def _step(rt) -> None:
    loss = rt.model(torch.randn(4, 8)).pow(2).mean()
    rt.backward(loss)
    rt.optimizer.step()
    rt.optimizer.zero_grad()


def test_profile_writes_a_trace_of_the_active_steps(tmp_path):
    rt = _runtime(tmp_path)
    with rt.profile(tmp_path / "prof", wait=1, warmup=1, active=2) as prof:
        for _ in range(6):
            _step(rt)
            if rt.step == 4:
                assert rt._profiler is None  # done after wait + warmup + active steps
    trace = json.load(open(tmp_path / "prof" / "trace_rank0.json"))
    names = [e.get("name", "") for e in trace["traceEvents"]]
    steps = sorted({n for n in names if n.startswith("ProfilerStep#")})
    assert steps == ["ProfilerStep#2", "ProfilerStep#3"]  # the two active steps only
    assert "aten::addmm" in names and any(n.startswith("Optimizer.step") for n in names)
    table = (tmp_path / "prof" / "top_ops_rank0.txt").read_text()
    assert "aten::" in table and prof.trace_path.name == "trace_rank0.json"


def test_profile_on_other_ranks_and_bad_arguments(tmp_path):
    rt = _runtime(tmp_path)
    prof = rt.profile(tmp_path / "prof", ranks=(1,))
    assert not prof.active and rt._profiler is None
    _step(rt)
    assert not (tmp_path / "prof").exists()
    with pytest.raises(od.OverdriveError, match="active=0"):
        rt.profile(tmp_path / "prof", active=0)


def test_plot_two_runs_writes_a_png(tmp_path, capsys):
    require("matplotlib", reason="matplotlib not installed "
                        "(pip install 'overdrive[plot]')")
    for name, lr in (("a", 0.01), ("b", 0.05)):
        torch.manual_seed(0)
        rt = od.accelerate(torch.nn.Linear(8, 1), optimizer=lambda p: torch.optim.SGD(p, lr=lr),
                           run_dir=tmp_path / name)
        for _ in range(5):
            _step(rt)
        rt.finish()
    out = tmp_path / "plot.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert "wrote" in capsys.readouterr().out


def test_plot_refuses_a_folder_without_metrics(tmp_path, capsys):
    require("matplotlib")
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_cli_module_imports_neither_torch_nor_matplotlib():
    import subprocess
    import sys

    code = ("import sys, overdrive.cli; "
            "print([m for m in ('matplotlib', 'tensorboard') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
