"""Compile pass after the first step: every region ran compiled code (or a loud warning),
recompiles after warmup are counted with the guard that failed, and the warm-start cache
(fingerprint, miss / hit, broken bundles) — with eager/aot_eager where torch's artifact API
allows (those backends leave no artifacts), and one real inductor warm start in a fresh
process."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

import overdrive as od
from overdrive.models.llama import tiny
from overdrive.passes import compile_cache
from tests.helpers import child_env

FAILING = "overdrive_test_failing_backend"


def _failing_backend(gm, example_inputs):
    raise RuntimeError("this backend always fails")


if FAILING not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(_failing_backend, name=FAILING)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _rt(tmp_path, n_layers=3, **compile_kw):
    compile_kw.setdefault("backend", "eager")
    plan = od.Plan(compile=od.Compile(cache_dir=str(tmp_path / "cache"), **compile_kw))
    return od.accelerate(tiny(n_layers=n_layers), plan,
                         optimizer=lambda p: torch.optim.SGD(p, lr=0.01))


def _step(rt, seq=16):
    ids = torch.randint(0, 256, (2, seq))
    rt.backward(rt.model(input_ids=ids, labels=ids).loss)
    rt.optimizer.step()
    rt.optimizer.zero_grad()


def test_first_step_confirms_every_block_ran_compiled_code(tmp_path):
    rt = _rt(tmp_path, n_layers=3)
    details = rt.report["compile"].details
    assert details["cache"] == "miss" and "ran_compiled" not in details
    _step(rt)
    assert details["ran_compiled"] == ["layers.0", "layers.1", "layers.2"]
    assert details["ran_eager"] == [] and details["not_called"] == []
    assert details["graphs"] == 1 and details["graph_breaks"] == 0
    assert details["compile_seconds"] > 0
    assert any("ran compiled code" in n for n in rt.report["compile"].notes)
    for _ in range(2):  # static shapes: zero recompiles after step 1
        _step(rt)
    assert details["recompiles_after_first_step"] == 0
    # eager leaves no torch artifacts: nothing is written, and the record says why
    assert details["cache_written"] is False and not (tmp_path / "cache").exists()
    assert any("leaves no torch compile artifacts" in n for n in rt.report["compile"].notes)


def test_shape_change_after_warmup_warns_naming_the_guard(tmp_path, caplog):
    rt = _rt(tmp_path, n_layers=2, backend="aot_eager")
    _step(rt, seq=16)
    _step(rt, seq=16)
    assert rt.report["compile"].details["recompiles_after_first_step"] == 0
    with caplog.at_level(logging.WARNING, logger="overdrive"):
        _step(rt, seq=24)
    details = rt.report["compile"].details
    assert details["recompiles_after_first_step"] == 1
    (reason,) = details["recompile_reasons"]
    assert "step 3" in reason and "size mismatch at index 1. expected 16, actual 24" in reason
    assert any("recompile after the first step" in r.message and "size mismatch" in r.message
               for r in caplog.records)


def test_a_block_that_fell_back_to_eager_is_reported_loudly(tmp_path, caplog):
    rt = _rt(tmp_path, n_layers=2, backend=FAILING)
    with torch._dynamo.config.patch(suppress_errors=True), \
            caplog.at_level(logging.WARNING, logger="overdrive"), \
            pytest.warns(RuntimeWarning, match="ran EAGER code"):
        _step(rt)
    details = rt.report["compile"].details
    assert details["ran_eager"] == ["layers.0", "layers.1"] and details["ran_compiled"] == []
    assert any("always fails" in f for f in details["failed_compiles"])
    assert any("ran EAGER code" in r.message for r in caplog.records)


def test_force_eager_stance_is_reported(tmp_path):
    rt = _rt(tmp_path, n_layers=2)
    with torch.compiler.set_stance("force_eager"), pytest.warns(RuntimeWarning, match="EAGER"):
        _step(rt)
    assert rt.report["compile"].details["ran_eager"] == ["layers.0", "layers.1"]


def test_a_block_whose_forward_is_called_directly_is_reported(tmp_path):
    class Bypass(nn.Module):  # a parent that calls its blocks' forward, not the blocks
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8)) for _ in range(2))

        def forward(self, x):
            for layer in self.layers:
                x = layer.forward(x)
            return x

    plan = od.Plan(compile=od.Compile(backend="eager", cache_dir=str(tmp_path)),
                   blocks=("layers.*",))
    rt = od.accelerate(Bypass(), plan, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    with pytest.warns(RuntimeWarning, match="never called through module"):
        rt.backward(rt.model(torch.randn(2, 8)).sum())
        rt.optimizer.step()
    assert rt.report["compile"].details["not_called"] == ["layers.0", "layers.1"]


def test_fingerprint_follows_plan_model_and_torch(tmp_path, monkeypatch):
    dev = torch.device("cpu")
    plan = od.Plan(compile=od.Compile())
    key = compile_cache.fingerprint(plan, tiny(n_layers=2), dev, 1)
    assert key == compile_cache.fingerprint(plan, tiny(n_layers=2), dev, 1)  # stable
    assert key != compile_cache.fingerprint(plan, tiny(n_layers=3), dev, 1)
    assert key != compile_cache.fingerprint(
        od.Plan(compile=od.Compile(), checkpointing=od.Checkpointing()), tiny(n_layers=2), dev, 1)
    assert key != compile_cache.fingerprint(plan, tiny(n_layers=2, dim=32), dev, 1)
    assert key != compile_cache.fingerprint(plan, tiny(n_layers=2), dev, 2)
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert key != compile_cache.fingerprint(plan, tiny(n_layers=2), dev, 1)


def test_inspect_and_accelerate_name_the_same_cache_file(tmp_path):
    plan = od.Plan(compile=od.Compile(backend="eager", cache_dir=str(tmp_path)))
    preview = od.inspect(tiny(n_layers=2), plan)["compile"]
    rec = od.accelerate(tiny(n_layers=2), plan).report["compile"]
    assert preview.details["cache_file"] == rec.details["cache_file"]
    assert Path(rec.details["cache_file"]).parent == tmp_path


def test_default_cache_dir_is_under_the_user_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_cache_dir() == tmp_path / "overdrive" / "compile"
    rec = od.accelerate(tiny(n_layers=2), od.Plan(compile=od.Compile(backend="eager")))
    assert rec.report["compile"].details["cache_file"].startswith(str(tmp_path))


def test_a_broken_bundle_is_a_warned_miss_never_a_failure(tmp_path, caplog):
    plan = od.Plan(compile=od.Compile(backend="eager", cache_dir=str(tmp_path)))
    path = Path(od.inspect(tiny(n_layers=2), plan)["compile"].details["cache_file"])
    path.write_bytes(b"not a zip file")
    with caplog.at_level(logging.WARNING, logger="overdrive"):
        rt = od.accelerate(tiny(n_layers=2), plan)
    details = rt.report["compile"].details
    assert details["cache"] == "miss"
    assert any("cache not used" in n and "could not be read" in n
               for n in rt.report["compile"].notes)
    assert any("cache not used" in r.message for r in caplog.records)


def test_no_cache_means_no_cache_file(tmp_path):
    rt = od.accelerate(tiny(n_layers=2), od.Plan(compile=od.Compile(backend="eager",
                                                                      cache=False)))
    assert "cache_file" not in rt.report["compile"].details


@pytest.mark.parametrize("compile_kw, field", [
    ({"cache": "yes"}, "compile.cache"),
    ({"cache_dir": 3}, "compile.cache_dir"),
])
def test_cache_refusals_name_the_field(compile_kw, field):
    with pytest.raises(od.PlanError, match=field.replace(".", r"\.")):
        od.accelerate(tiny(n_layers=2), od.Plan(compile=od.Compile(backend="eager",
                                                                   **compile_kw)))


def test_a_file_as_cache_dir_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(od.PlanError, match=r"compile\.cache_dir.*is a file"):
        od.accelerate(tiny(n_layers=2),
                      od.Plan(compile=od.Compile(backend="eager", cache_dir=str(tmp_path / "f"))))


WARM_START = textwrap.dedent("""
    import json, sys, time, torch
    import overdrive as od
    from overdrive.models.llama import tiny
    t0 = time.perf_counter()
    plan = od.Plan(compile=od.Compile(backend="inductor", cache_dir=sys.argv[1]))
    rt = od.accelerate(tiny(n_layers=2), plan, optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():  # one inference graph keeps the cold compile short
        rt.model(input_ids=ids, labels=ids)
    rt.optimizer.step()  # the first step: the compile pass checks and writes its bundle
    d = rt.report["compile"].details
    print(json.dumps({"seconds": time.perf_counter() - t0, "cache": d["cache"],
                      "written": d.get("cache_written"), "ran_eager": d["ran_eager"],
                      "ran_compiled": d["ran_compiled"],
                      "fx_hits": int(__import__("torch._dynamo.utils").
                                     _dynamo.utils.counters["inductor"]["fxgraph_cache_hit"])}))
""")


@pytest.mark.inductor
def test_inductor_warm_start_in_a_fresh_process_with_inductors_cache_wiped(tmp_path):
    """Cold, then a fresh process with an empty TORCHINDUCTOR_CACHE_DIR and the bundle."""
    script = tmp_path / "warm.py"
    script.write_text(WARM_START)

    def launch(name):
        env = {**child_env(), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / name),
               "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, str(script), str(tmp_path / "cache")], env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    cold = launch("inductor-cold")
    assert cold["cache"] == "miss" and cold["written"] is True and cold["ran_eager"] == []
    assert len(list((tmp_path / "cache").glob("*.zip"))) == 1
    warm = launch("inductor-warm")  # a new machine: inductor's own cache is empty
    assert warm["cache"] == "hit" and warm["written"] is False
    assert warm["ran_compiled"] == ["layers.0", "layers.1"] and warm["fx_hits"] >= 1
    assert warm["seconds"] < cold["seconds"], (warm, cold)


DDP_RECOMPILE = """
    import json, logging, sys
    from pathlib import Path
    import torch
    import overdrive as od
    from overdrive.models.llama import tiny

    out = Path(sys.argv[1])
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logging.getLogger("overdrive").addHandler(Keep())
    plan = od.Plan(ddp=od.DDP(), compile=od.Compile(backend="eager", cache_dir=str(out)))
    rt = od.accelerate(tiny(n_layers=2), plan, optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
    for seq in (16, 16, 24):
        ids = torch.randint(0, 256, (2, seq))
        rt.backward(rt.model(input_ids=ids, labels=ids).loss)
        rt.optimizer.step()
        rt.optimizer.zero_grad()
    d = rt.report["compile"].details
    (out / f"rank{rt.rank}.json").write_text(json.dumps({
        "recompiles": d["recompiles_after_first_step"], "ran_compiled": d["ran_compiled"],
        "cache_file": d["cache_file"],
        "logged": [m for m in lines if "recompile after the first step" in m]}))
"""


@pytest.mark.dist
def test_two_ranks_count_recompiles_and_only_rank0_logs(tmp_path):
    from tests.helpers import run_torchrun

    run_torchrun(DDP_RECOMPILE, 2, str(tmp_path), tmp_path=tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    for r in (r0, r1):
        assert r["recompiles"] == 1 and r["ran_compiled"] == ["layers.0", "layers.1"]
    assert r0["cache_file"] == r1["cache_file"]  # data-parallel peers share one bundle
    assert len(r0["logged"]) == 1 and "size mismatch" in r0["logged"][0]
    assert r1["logged"] == []
